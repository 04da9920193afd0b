// `loom info --model M.toml [--batch B --seq T]`: parameters, FLOPs and memory as JSON.
#include <cstdio>
#include <nlohmann/json.hpp>

#include "cli.h"
#include "model/config.h"
#include "model/memory.h"

namespace {

void add_info(CLI::App& root, loom::cli::Context& ctx) {
  struct Opts {
    std::string model;
    int64_t batch = 1, seq = 0;
    std::string precision = "f32", recompute = "none";
  };
  auto o = std::make_shared<Opts>();
  CLI::App* sub = root.add_subcommand("info", "parameters, FLOPs per token and memory of a model");
  sub->add_option("--model", o->model, "model config (TOML)")->required();
  sub->add_option("--batch", o->batch, "micro-batch size B");
  sub->add_option("--seq", o->seq, "sequence length T (default: max_seq)");
  sub->add_option("--dtype", o->precision, "f32 or bf16")->check(CLI::IsMember({"f32", "bf16"}));
  sub->add_option("--recompute", o->recompute, "none, selective or full")
      ->check(CLI::IsMember({"none", "selective", "full"}));
  sub->callback([o, &ctx] {
    using namespace loom::model;
    ModelConfig cfg = load_model_config(o->model);
    int64_t T = o->seq > 0 ? o->seq : cfg.max_seq;
    Precision p = o->precision == "bf16" ? Precision::bf16 : Precision::f32;
    MemoryEstimate m = estimate_training_memory(cfg, o->batch, T, p, recompute_from_name(o->recompute));
    nlohmann::json j = {{"model", cfg.name},
                        {"params", cfg.num_params()},
                        {"batch", o->batch},
                        {"seq", T},
                        {"flops_per_token_train", cfg.train_flops_per_token(T)},
                        {"flops_per_token_forward", cfg.train_flops_per_token(T) / 3.0},
                        {"memory_bytes",
                         {{"weights", m.weights},
                          {"grads", m.grads},
                          {"optimizer", m.optimizer},
                          {"activations", m.activations},
                          {"total", m.weights + m.grads + m.optimizer + m.activations}}}};
    std::printf("%s\n", j.dump(2).c_str());
    ctx.exit_code = 0;
  });
}

}  // namespace

LOOM_REGISTER_COMMAND(info, add_info);
