// `loom init --model M.toml --out DIR [--seed S]`: a randomly initialised checkpoint.
#include <cstdio>
#include <filesystem>

#include "interop/model_checkpoint.h"
#include "cli.h"
#include "core/error.h"
#include "model/gpt.h"

namespace {

void add_init(CLI::App& root, loom::cli::Context& ctx) {
  struct Opts {
    std::string model, out;
    uint64_t seed = 1;
    bool overwrite = false;
  };
  auto o = std::make_shared<Opts>();
  CLI::App* sub = root.add_subcommand("init", "write a randomly initialised checkpoint");
  sub->add_option("--model", o->model, "model config (TOML)")->required();
  sub->add_option("--out", o->out, "checkpoint directory to create")->required();
  sub->add_option("--seed", o->seed, "initialisation seed");
  sub->add_flag("--overwrite", o->overwrite, "replace an existing checkpoint in --out");
  sub->callback([o, &ctx] {
    // A trained checkpoint must never be replaced by a random model by accident.
    std::error_code ec;
    LOOM_CHECK(o->overwrite || !std::filesystem::exists(o->out, ec) ||
                   (std::filesystem::is_directory(o->out, ec) &&
                    std::filesystem::is_empty(o->out, ec)),
               "--out '{}' already exists and is not empty; pass --overwrite to replace it with "
               "a random model, or choose another directory",
               o->out);
    loom::model::ModelConfig cfg = loom::model::load_model_config(o->model);
    loom::MemoryPool pool;
    loom::model::Gpt model(cfg, pool, loom::model::Precision::f32);
    model.init_weights(o->seed);
    loom::interop::save_checkpoint(o->out, cfg, model.layout(), model.weights(), {},
                                      {{"step", 0}, {"seed", o->seed}});
    std::printf("{\"checkpoint\": \"%s\", \"params\": %lld}\n", o->out.c_str(),
                (long long)cfg.num_params());
    ctx.exit_code = 0;
  });
}

}  // namespace

LOOM_REGISTER_COMMAND(init, add_init);
