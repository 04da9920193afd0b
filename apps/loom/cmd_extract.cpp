// `loom extract --checkpoint DIR --domain NAME --out DIR2`: the sub-model of one domain of an rre
// MoE checkpoint (the dense backbone plus that domain's experts and routing-table row; see
// interop/extract.h), written tensor by tensor as a flat checkpoint that `loom generate`, `loom
// eval loss` and `loom eval humaneval-x` load like any other. Prints one JSON line: the domain,
// parameter counts and sizes on disk of both checkpoints.
#include <cstdio>
#include <nlohmann/json.hpp>

#include "cli.h"
#include "interop/extract.h"

namespace {

void add_extract(CLI::App& root, loom::cli::Context& ctx) {
  struct Opts {
    std::string checkpoint, domain, out;
  };
  auto o = std::make_shared<Opts>();
  CLI::App* sub = root.add_subcommand(
      "extract", "write one domain's sub-model of an rre MoE checkpoint (backbone + its experts)");
  sub->add_option("--checkpoint", o->checkpoint, "source checkpoint directory")->required();
  sub->add_option("--domain", o->domain, "domain to keep, e.g. python")->required();
  sub->add_option("--out", o->out, "checkpoint directory to create")->required();
  sub->callback([o, &ctx] {
    const loom::interop::ExtractReport r =
        loom::interop::extract_domain(o->checkpoint, o->domain, o->out);
    nlohmann::json j = {{"domain", r.domain},
                        {"out", o->out},
                        {"params_full", r.params_full},
                        {"params_extracted", r.params_extracted},
                        {"weight_bytes_full", r.weight_bytes_full},
                        {"weight_bytes_extracted", r.weight_bytes_extracted},
                        {"disk_bytes_full", r.bytes_full},
                        {"disk_bytes_extracted", r.bytes_extracted}};
    std::printf("%s\n", j.dump().c_str());
    ctx.exit_code = 0;
  });
}

}  // namespace

LOOM_REGISTER_COMMAND(extract, add_extract);
