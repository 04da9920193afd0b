// `loom version`: prints the version and the build's features as JSON.
#include <cstdio>

#include "cli.h"

namespace {
void add_version(CLI::App& root, loom::cli::Context& ctx) {
  CLI::App* sub = root.add_subcommand("version", "print loom's version");
  sub->callback([&ctx] {
    std::printf("{\"loom\": \"0.1.0\", \"cxx\": %ld}\n", long(__cplusplus));
    ctx.exit_code = 0;
  });
}
}  // namespace

LOOM_REGISTER_COMMAND(version, add_version);
