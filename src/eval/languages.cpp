// eval/languages.cpp: per-language toolchains, commands, limits and judging.
//
// Limits (per process): address space is generous where runtimes reserve virtual memory up
// front (JVM, V8, Go), and the JVM is told to reserve less. Compiles get their own wall limit,
// separate from the run's (the official harness shares one timeout and so times out C++
// compiles under load).
#include "eval/languages.h"

#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cstdlib>

#include "core/error.h"

extern char** environ;

namespace loom::eval {

namespace fs = std::filesystem;

namespace {

constexpr int64_t kGiB = int64_t(1) << 30;

// Absolute path of `name` (searched on PATH when relative), or "" when not found.
std::string find_tool(const std::string& name) {
  if (name.empty()) return {};
  if (name.find('/') != std::string::npos) {
    std::error_code ec;
    return (fs::exists(name, ec) && access(name.c_str(), X_OK) == 0) ? name : std::string();
  }
  const char* path = std::getenv("PATH");
  std::string p = path ? path : "/usr/local/bin:/usr/bin:/bin";
  size_t start = 0;
  while (start <= p.size()) {
    size_t end = p.find(':', start);
    if (end == std::string::npos) end = p.size();
    const std::string dir = p.substr(start, end - start);
    if (!dir.empty()) {
      const std::string cand = dir + "/" + name;
      if (access(cand.c_str(), X_OK) == 0) return cand;
    }
    start = end + 1;
  }
  return {};
}

// Runs a trusted probe command (toolchain version or import check) and returns its exit code
// and first output line. Used once per language before any sample runs.
std::pair<int, std::string> probe(const std::vector<std::string>& argv) {
  int fds[2];
  if (pipe(fds) != 0) return {-1, ""};
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_adddup2(&fa, fds[1], 1);
  posix_spawn_file_actions_adddup2(&fa, fds[1], 2);
  posix_spawn_file_actions_addclose(&fa, fds[0]);
  std::vector<char*> args;
  for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  pid_t pid = -1;
  const int rc = posix_spawn(&pid, args[0], &fa, nullptr, args.data(), environ);
  posix_spawn_file_actions_destroy(&fa);
  close(fds[1]);
  std::string out;
  char buf[4096];
  ssize_t n;
  while ((n = read(fds[0], buf, sizeof buf)) > 0 && out.size() < 65536) out.append(buf, size_t(n));
  close(fds[0]);
  if (rc != 0) return {-1, ""};
  int st = 0;
  waitpid(pid, &st, 0);
  const size_t nl = out.find('\n');
  return {WIFEXITED(st) ? WEXITSTATUS(st) : -1, out.substr(0, nl)};
}

std::string require_tool(const std::string& name, Language lang, const char* package) {
  const std::string path = find_tool(name);
  LOOM_CHECK(!path.empty(),
             "toolchain for {} is missing: '{}' not found{}; install the Debian package {} "
             "(scripts/install-deps does), or drop the language with --lang",
             task_prefix(lang), name, name.find('/') == std::string::npos ? " on PATH" : "",
             package);
  return path;
}

std::string lower(std::string s) {
  for (char& c : s) c = char(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

bool has(const std::string& hay, std::string_view needle) {
  return hay.find(needle) != std::string::npos;
}

// At most ~`limit` bytes for the results file: the head (what failed first) and the tail
// (where tracebacks put the exception), joined by " ... ".
std::string excerpt_of(const std::string& text, size_t limit = 400) {
  const size_t first = text.find_first_not_of(" \t\r\n");
  if (first == std::string::npos) return {};
  const size_t last = text.find_last_not_of(" \t\r\n");
  const std::string s = text.substr(first, last - first + 1);
  if (s.size() <= limit) return s;
  const size_t head = limit * 2 / 5, tail = limit - head;
  return s.substr(0, head) + " ... " + s.substr(s.size() - tail);
}

std::string both_streams(const SandboxResult& r) {
  if (r.err.empty()) return r.out;
  if (r.out.empty()) return r.err;
  return r.err + "\n[stdout] " + r.out;
}

// Evidence that the program ran into the sandbox rather than into its own bug. Matched on the
// lower-cased output; the messages are those of the C library, CPython, the JVM, V8 and Go.
constexpr const char* kViolationMarks[] = {
    "read-only file system",    "network is unreachable",  "memoryerror",
    "std::bad_alloc",           "outofmemoryerror",        "resource temporarily unavailable",
    "cannot allocate memory",   "out of memory",           "permission denied",
    "operation not permitted",  "blockingioerror",         "file too large",
    "unable to create native thread"};

std::vector<std::string> base_env(const fs::path& dir) {
  return {"PATH=/usr/local/bin:/usr/bin:/bin", "HOME=" + dir.string(), "TMPDIR=" + dir.string(),
          "LANG=C.UTF-8", "LC_ALL=C.UTF-8"};
}

// JVM flags that keep its start-up short and its reservations under the address-space limit.
const std::vector<std::string> kJvmFlags = {
    "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1", "-XX:ReservedCodeCacheSize=64m",
    "-XX:CompressedClassSpaceSize=64m", "-XX:-UsePerfData", "-Xshare:auto"};

std::string node_module_dir(const std::string& package, const ToolchainPaths& paths) {
  for (const std::string& d : paths.node_module_dirs)
    if (fs::exists(fs::path(d) / package)) return d;
  return {};
}

}  // namespace

std::string_view outcome_name(Outcome outcome) {
  switch (outcome) {
    case Outcome::kPassed: return "passed";
    case Outcome::kFailed: return "failed";
    case Outcome::kCompileError: return "compile_error";
    case Outcome::kTimeout: return "timeout";
    case Outcome::kRuntimeError: return "runtime_error";
    case Outcome::kSandboxViolation: return "sandbox_violation";
    case Outcome::kSkipped: return "skipped";
  }
  return "?";
}

Toolchain resolve_toolchain(Language lang, const ToolchainPaths& paths) {
  Toolchain tc;
  tc.language = lang;
  switch (lang) {
    case Language::kPython: {
      const std::string py = require_tool(paths.python, lang, "python3");
      // The official import helper imports numpy; without it every sample would fail.
      const auto [rc, line] = probe({py, "-c", "import numpy, sys; print(sys.version.split()[0])"});
      LOOM_CHECK(rc == 0,
                 "toolchain for Python is incomplete: {} cannot import numpy, which the "
                 "HumanEval-X import helper needs; install the Debian package python3-numpy",
                 py);
      tc.tools = {py};
      tc.version = "python " + line;
      break;
    }
    case Language::kCpp: {
      tc.tools = {require_tool(paths.gxx, lang, "g++")};
      tc.version = probe({tc.tools[0], "--version"}).second;
      break;
    }
    case Language::kJava: {
      tc.tools = {require_tool(paths.javac, lang, "default-jdk-headless"),
                  require_tool(paths.java, lang, "default-jdk-headless")};
      tc.version = probe({tc.tools[0], "-version"}).second;
      break;
    }
    case Language::kJavaScript: {
      tc.tools = {require_tool(paths.node, lang, "nodejs")};
      tc.version = "node " + probe({tc.tools[0], "--version"}).second;
      break;
    }
    case Language::kGo: {
      tc.tools = {require_tool(paths.go, lang, "golang-go")};
      const fs::path testify = fs::path(paths.gocode) / "src/github.com/stretchr/testify/assert";
      LOOM_CHECK(fs::is_directory(testify),
                 "toolchain for Go is incomplete: testify not found at {}; install the Debian "
                 "package golang-github-stretchr-testify-dev",
                 testify.string());
      tc.version = probe({tc.tools[0], "version"}).second;
      break;
    }
    case Language::kRust: {
      const std::string cargo = find_tool(paths.cargo);
      const char* home = std::getenv("CARGO_HOME");
      const fs::path registry =
          fs::path(home ? home : (std::string(std::getenv("HOME") ? std::getenv("HOME") : "/root") +
                                  "/.cargo")) / "registry";
      if (cargo.empty()) {
        tc.unavailable = "cargo not found (install cargo); Rust samples are skipped";
      } else {
        tc.unavailable = fmt::format(
            "cargo is at {} but HumanEval-X Rust tests need the crates rand, regex and md5, which "
            "cannot be fetched offline{}; Rust execution is not implemented in loom yet, so Rust "
            "samples are skipped (not failed)",
            cargo, fs::exists(registry) ? "" : " (no cargo registry at " + registry.string() + ")");
      }
      break;
    }
  }
  return tc;
}

std::string missing_requirement(const Program& program, const ToolchainPaths& paths) {
  for (const std::string& req : program.requirements) {
    if (req.rfind("npm:", 0) == 0) {
      const std::string pkg = req.substr(4);
      if (node_module_dir(pkg, paths).empty())
        return fmt::format("needs the npm package '{}', which is not installed (searched {}); "
                           "there is no npm registry here, so the task is skipped",
                           pkg, fmt::join(paths.node_module_dirs, ", "));
    } else if (req.rfind("header:", 0) == 0) {
      const std::string header = req.substr(7);
      if (!fs::exists(fs::path(paths.include_dir) / header))
        return fmt::format("needs the header <{}>; install the Debian package {}", header,
                           header.rfind("boost/", 0) == 0 ? "libboost-dev" : "libssl-dev");
    }
  }
  return {};
}

std::optional<StepSpec> compile_step(const Toolchain& tc, const Program& program,
                                     const fs::path& dir, const StepTimes& times,
                                     const fs::path& go_cache, const ToolchainPaths& paths) {
  StepSpec s;
  s.env = base_env(dir);
  s.limits.wall_seconds = times.compile_seconds;
  s.limits.cpu_seconds = int64_t(times.compile_seconds) + 1;
  s.limits.address_space_bytes = 4 * kGiB;
  s.limits.max_processes = 256;
  switch (program.language) {
    case Language::kPython:
    case Language::kJavaScript:
    case Language::kRust:
      return std::nullopt;
    case Language::kCpp:
      s.argv = {tc.tools[0], "-std=c++11", program.file_name, "-o", "a.out"};
      for (const auto& f : program.link_flags) s.argv.push_back(f);
      s.artifacts = {"a.out"};
      return s;
    case Language::kJava:
      s.argv = {tc.tools[0], "-J-Xmx512m"};
      for (const auto& f : kJvmFlags) s.argv.push_back("-J" + f);
      s.argv.push_back(program.file_name);
      s.artifacts = {"*.class"};
      return s;
    case Language::kGo:
      // GOPATH mode with Debian's sources: no module download, nothing written outside `dir`
      // except the shared build cache, which is bind-mounted writable for compiles only.
      s.argv = {tc.tools[0], "test", "-c", "-o", "main.test", program.file_name};
      s.env.push_back("GO111MODULE=off");
      s.env.push_back("GOPATH=" + (dir / "gopath").string() + ":" + paths.gocode);
      s.env.push_back("GOCACHE=" + go_cache.string());
      s.env.push_back("GOPROXY=off");
      s.env.push_back("GOFLAGS=");
      s.env.push_back("GOENV=off");
      s.env.push_back("GOTOOLCHAIN=local");
      s.extra_writable = {go_cache};
      s.umask = 0;  // cache entries are shared by the slots' different uids
      s.limits.address_space_bytes = 8 * kGiB;
      s.artifacts = {"main.test"};
      return s;
  }
  return std::nullopt;
}

StepSpec run_step(const Toolchain& tc, const Program& program, const fs::path& dir,
                  const StepTimes& times, const ToolchainPaths& paths) {
  StepSpec s;
  s.env = base_env(dir);
  // --timeout is CPU time of the whole sample (all its processes), with a wall-clock backstop
  // at 3x for samples that sleep or deadlock; one core of CPU quota and 32 processes+threads
  // (cgroup where available, RLIMIT_NPROC always), so a neighbour's fork bomb or busy loop
  // cannot turn a correct sample into a timeout (docs/eval.md, "Isolation between samples").
  s.limits = untrusted_run_limits(times.run_seconds);
  s.limits.address_space_bytes = 2 * kGiB;
  switch (program.language) {
    case Language::kPython:
      s.argv = {tc.tools[0], "-I", "-B", (dir / program.file_name).string()};
      s.env.push_back("PYTHONHASHSEED=0");  // set iteration order: reruns agree
      s.env.push_back("OPENBLAS_NUM_THREADS=1");
      s.env.push_back("OMP_NUM_THREADS=1");
      break;
    case Language::kCpp:
      s.argv = {(dir / "a.out").string()};
      break;
    case Language::kJava:
      // ActiveProcessorCount=2: the JVM sizes its compiler and GC thread pools from the CPU
      // count; pinned, it stays near 15 threads, well inside the 32-thread limit.
      s.argv = {tc.tools[1], "-Xmx1g", "-Xss8m", "-XX:ActiveProcessorCount=2",
                "-Djava.io.tmpdir=" + dir.string()};
      for (const auto& f : kJvmFlags) s.argv.push_back(f);
      s.argv.insert(s.argv.end(), {"-cp", dir.string(), "Main"});
      s.limits.address_space_bytes = 4 * kGiB;
      break;
    case Language::kJavaScript: {
      s.argv = {tc.tools[0], (dir / program.file_name).string()};
      std::string node_path;
      for (const auto& req : program.requirements)
        if (req.rfind("npm:", 0) == 0) {
          const std::string d = node_module_dir(req.substr(4), paths);
          if (!d.empty()) node_path = d;
        }
      if (!node_path.empty()) s.env.push_back("NODE_PATH=" + node_path);
      s.limits.address_space_bytes = 8 * kGiB;  // V8 reserves its heap cage up front
      break;
    }
    case Language::kGo:
      s.argv = {(dir / "main.test").string()};
      // Go starts a thread per P: bound them so the 32-thread limit holds on any machine.
      s.env.push_back("GOMAXPROCS=2");
      s.limits.address_space_bytes = 4 * kGiB;
      break;
    case Language::kRust:
      LOOM_ASSERT(false, "Rust programs are never run (toolchain unavailable)");
  }
  return s;
}

std::optional<Verdict> judge_compile(const SandboxResult& r) {
  if (!r.setup_error.empty()) return Verdict{Outcome::kCompileError, excerpt_of(r.setup_error)};
  if (r.timed_out)
    return Verdict{Outcome::kTimeout, "compile killed at the wall-clock limit"};
  if (r.output_limit)
    return Verdict{Outcome::kSandboxViolation, "compiler output exceeded the output limit"};
  if (r.exit_code == 0 && r.term_signal == 0) return std::nullopt;
  return Verdict{Outcome::kCompileError, excerpt_of(both_streams(r))};
}

Verdict judge_run(Language lang, const SandboxResult& r) {
  if (!r.setup_error.empty()) return {Outcome::kRuntimeError, excerpt_of(r.setup_error)};
  if (r.timed_out)
    return {Outcome::kTimeout,
            r.cpu_timeout ? fmt::format("CPU time limit reached ({:.1f} s over all its processes)",
                                        r.cpu_seconds)
                          : fmt::format("killed at the wall-clock backstop ({:.1f} s wall, {:.1f} s "
                                        "CPU: sleeping or deadlocked)",
                                        r.wall_seconds, r.cpu_seconds)};
  if (r.output_limit)
    return {Outcome::kSandboxViolation,
            fmt::format("output passed the limit ({} bytes seen); killed",
                        r.out_bytes + r.err_bytes)};
  if (r.term_signal == SIGXCPU) return {Outcome::kTimeout, "CPU time limit reached (SIGXCPU)"};
  if (r.term_signal == SIGXFSZ)
    return {Outcome::kSandboxViolation, "file size limit reached (SIGXFSZ)"};
  const bool clean_exit = r.term_signal == 0 && r.exit_code == 0;
  if (lang == Language::kJavaScript) {
    // Official rule: pass iff nothing at all was printed; the exit code is ignored.
    if (r.term_signal == 0 && r.out_bytes == 0 && r.err_bytes == 0) return {Outcome::kPassed, ""};
  } else if (clean_exit) {
    return {Outcome::kPassed, ""};
  }
  const std::string text = both_streams(r);
  const std::string low = lower(text);
  const std::string signal_note =
      r.term_signal ? fmt::format("killed by signal {} ({})\n", r.term_signal,
                                  strsignal(r.term_signal))
                    : "";
  for (const char* mark : kViolationMarks)
    if (has(low, mark)) return {Outcome::kSandboxViolation, excerpt_of(signal_note + text)};
  switch (lang) {
    case Language::kPython:
      if (has(text, "SyntaxError") || has(text, "IndentationError") || has(text, "TabError"))
        return {Outcome::kCompileError, excerpt_of(text)};
      if (has(text, "AssertionError")) return {Outcome::kFailed, excerpt_of(text)};
      break;
    case Language::kCpp:
      if (r.term_signal == SIGABRT && has(text, "Assertion"))
        return {Outcome::kFailed, excerpt_of(text)};
      break;
    case Language::kJava:
      if (has(text, "AssertionError")) return {Outcome::kFailed, excerpt_of(text)};
      break;
    case Language::kJavaScript:
      if (has(r.err, "SyntaxError")) return {Outcome::kCompileError, excerpt_of(text)};
      if (has(r.err, "Assertion failed")) return {Outcome::kFailed, excerpt_of(text)};
      if (r.term_signal == 0 && r.err_bytes == 0)
        return {Outcome::kFailed,
                excerpt_of("printed to stdout (HumanEval-X fails any output): " + r.out)};
      break;
    case Language::kGo:
      if (has(text, "panic: test timed out")) return {Outcome::kTimeout, excerpt_of(text)};
      if (has(text, "panic:")) return {Outcome::kRuntimeError, excerpt_of(text)};
      if (has(text, "--- FAIL")) return {Outcome::kFailed, excerpt_of(text)};
      break;
    case Language::kRust:
      break;
  }
  const std::string how =
      r.term_signal ? signal_note : fmt::format("exit code {}\n", r.exit_code);
  return {Outcome::kRuntimeError, excerpt_of(how + text)};
}

}  // namespace loom::eval
