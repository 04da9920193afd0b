// `loom train --config T.toml [--steps N] [--out DIR] [--resume DIR] [--set key=value ...]`
#include <cstdio>
#include <nlohmann/json.hpp>

#include "cli.h"
#include "train/trainer.h"

namespace {

struct TrainOptions {
  std::string config;
  int64_t steps = -1;
  std::string out;
  std::string resume;
  std::vector<std::string> sets;
};

void add_train(CLI::App& root, loom::cli::Context& ctx) {
  auto opts = std::make_shared<TrainOptions>();
  CLI::App* sub = root.add_subcommand("train", "train a model (configs/train/*.toml)");
  sub->add_option("--config", opts->config, "training config (TOML)")->required();
  sub->add_option("--steps", opts->steps, "total steps (overrides train.steps)");
  sub->add_option("--out", opts->out,
                  "run directory: metrics, plot and checkpoint go here (overrides log.dir and "
                  "checkpoint.dir)");
  sub->add_option("--resume", opts->resume, "continue from this checkpoint directory");
  sub->add_option("--set", opts->sets, "override a config key: section.key=value (repeatable)");
  sub->callback([opts, &ctx] {
    std::vector<std::string> sets = opts->sets;
    if (opts->steps >= 0) sets.push_back("train.steps=" + std::to_string(opts->steps));
    if (!opts->out.empty()) {
      sets.push_back("log.dir=\"" + opts->out + "\"");
      sets.push_back("checkpoint.dir=\"" + opts->out + "/ckpt\"");
    }
    loom::train::TrainConfig cfg = loom::train::load_train_config(opts->config, sets);
    loom::train::StepStats s = loom::train::run_training(cfg, opts->resume);
    nlohmann::json out = {{"step", s.step},
                          {"loss", s.loss},
                          {"tokens_per_s", s.tokens_per_s},
                          {"checkpoint", cfg.checkpoint_dir},
                          {"metrics", cfg.log_dir + "/metrics.jsonl"}};
    std::printf("%s\n", out.dump().c_str());
    ctx.exit_code = 0;
  });
}

}  // namespace

LOOM_REGISTER_COMMAND(train, add_train);
