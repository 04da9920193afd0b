// loom: trains, evaluates and serves decoder-only language models. One binary, every job.
#include <algorithm>
#include <cstdio>
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

int main(int argc, char** argv) {
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
