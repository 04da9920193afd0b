// `loom plot --run LABEL=RUN_DIR/metrics.jsonl ... --out FILE.svg`: the loss curves of several
// runs in one SVG (train/plot.h: each run's validation curve, its train curve pale behind it).
#include <cstdio>

#include "cli.h"
#include "core/error.h"
#include "train/plot.h"

namespace {

void add_plot(CLI::App& root, loom::cli::Context& ctx) {
  struct Opts {
    std::vector<std::string> runs;
    std::string out;
  };
  auto o = std::make_shared<Opts>();
  CLI::App* sub = root.add_subcommand("plot", "loss curves of several runs in one SVG");
  sub->add_option("--run", o->runs, "LABEL=metrics.jsonl (repeatable)")->required();
  sub->add_option("--out", o->out, "SVG file to write")->required();
  sub->callback([o, &ctx] {
    std::vector<loom::train::LossRun> runs;
    for (const std::string& r : o->runs) {
      const size_t eq = r.find('=');
      LOOM_CHECK(eq != std::string::npos && eq > 0 && eq + 1 < r.size(),
                 "--run '{}' must be LABEL=PATH (e.g. dense=runs/dense/metrics.jsonl)", r);
      runs.push_back({r.substr(0, eq), r.substr(eq + 1)});
    }
    loom::train::write_loss_comparison(runs, o->out);
    std::printf("wrote %s\n", o->out.c_str());
    ctx.exit_code = 0;
  });
}

}  // namespace

LOOM_REGISTER_COMMAND(plot, add_plot);
