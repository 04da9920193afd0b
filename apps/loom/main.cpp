// loom: trains, evaluates and serves decoder-only language models. One binary, every job.
#include <execinfo.h>
#include <unistd.h>

#include <algorithm>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <utility>
#include <vector>

#include "cli.h"
#include "core/error.h"

namespace loom::cli {

namespace {
std::vector<std::pair<std::string, CommandAdder>>& registry() {
  static std::vector<std::pair<std::string, CommandAdder>> r;
  return r;
}
}  // namespace

CommandRegistration::CommandRegistration(const char* name, CommandAdder adder) {
  registry().emplace_back(name, adder);
}

CLI::App* subcommand_path(CLI::App& parent, const std::string& name,
                          const std::string& description) {
  for (CLI::App* sub : parent.get_subcommands([](CLI::App*) { return true; }))
    if (sub->get_name() == name) return sub;
  CLI::App* sub = parent.add_subcommand(name, description);
  sub->require_subcommand(0, 1);
  return sub;
}

}  // namespace loom::cli

namespace {

// A fatal signal (a crash, or glibc's abort on a corrupted heap) prints this process's stack to
// stderr before the default action runs (same exit status, core dump if enabled), so a crash seen
// once, on a host nobody can log into, leaves a trace to start from. Only write(2) and
// backtrace_symbols_fd (no malloc) run in the handler; backtrace() is called once at start-up
// so that its unwinder is loaded before any signal. Under mpirun, Open MPI's handlers replace
// these (they print a stack too). Sanitizer builds keep the sanitizers' own reports.
void write_str(const char* s) {
  const ssize_t r = ::write(2, s, std::strlen(s));
  (void)r;
}

extern "C" void on_fatal_signal(int sig) {
  const char* name = sig == SIGSEGV   ? "SIGSEGV"
                     : sig == SIGABRT ? "SIGABRT"
                     : sig == SIGBUS  ? "SIGBUS"
                     : sig == SIGFPE  ? "SIGFPE"
                                      : "SIGILL";
  write_str("\nloom: fatal signal ");
  write_str(name);
  write_str("; stack (resolve with: addr2line -C -f -e <loom binary> <offset>):\n");
  void* frames[64];
  const int n = ::backtrace(frames, 64);
  ::backtrace_symbols_fd(frames, n, 2);
  std::signal(sig, SIG_DFL);  // SA_RESETHAND already did; explicit for the raise below
  std::raise(sig);
}

void install_fatal_signal_handlers() {
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
  return;
#else
  void* warm[1];
  (void)::backtrace(warm, 1);
  struct sigaction sa {};
  sa.sa_handler = on_fatal_signal;
  sa.sa_flags = SA_RESETHAND | SA_NODEFER;
  sigemptyset(&sa.sa_mask);
  for (int s : {SIGSEGV, SIGABRT, SIGBUS, SIGFPE, SIGILL}) ::sigaction(s, &sa, nullptr);
#endif
}

}  // namespace

int main(int argc, char** argv) {
  install_fatal_signal_handlers();
  CLI::App app{"loom: train, evaluate and serve large language models on many devices"};
  app.require_subcommand(1);
  loom::cli::Context ctx;
  auto& reg = loom::cli::registry();
  // Registration order across translation units is unspecified; sort for a stable --help.
  std::sort(reg.begin(), reg.end());
  for (auto& [name, adder] : reg) adder(app, ctx);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  } catch (const loom::Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return ctx.exit_code;
}
