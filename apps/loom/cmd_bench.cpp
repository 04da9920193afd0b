// `loom bench train-step --model M.toml --batch B --seq T --dtype f32|bf16 [--steps N]`:
// times full training steps (forward, backward, grad norm, AdamW) of the training executor
// (train::Executor, one rank, one micro-batch of B) on random tokens and prints JSON.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <vector>

#include "cli.h"
#include "core/rng.h"
#include "core/threads.h"
#include "kernels/cpu/matmul.h"
#include "train/executor.h"

namespace {

void add_bench(CLI::App& root, loom::cli::Context& ctx) {
  struct Opts {
    std::string model, dtype = "f32", recompute = "none";
    int64_t batch = 4, seq = 256, steps = 5, warmup = 2;
  };
  auto o = std::make_shared<Opts>();
  CLI::App* bench = loom::cli::subcommand_path(root, "bench", "benchmarks (JSON output)");
  CLI::App* sub = bench->add_subcommand("train-step", "time training steps of a model");
  sub->add_option("--model", o->model, "model config (TOML)")->required();
  sub->add_option("--batch", o->batch, "batch size B");
  sub->add_option("--seq", o->seq, "sequence length T");
  sub->add_option("--dtype", o->dtype, "f32 or bf16")->check(CLI::IsMember({"f32", "bf16"}));
  sub->add_option("--recompute", o->recompute, "none, selective or full")
      ->check(CLI::IsMember({"none", "selective", "full"}));
  sub->add_option("--steps", o->steps, "timed steps");
  sub->add_option("--warmup", o->warmup, "untimed steps first");
  sub->callback([o, &ctx] {
    using namespace loom;
    model::ModelConfig cfg = model::load_model_config(o->model);
    const bool bf = o->dtype == "bf16";
    MemoryPool pool;
    train::ExecutorConfig ec;
    ec.plan.micro_batch_size = o->batch;
    ec.plan.recompute = parallel::parse_recompute(o->recompute, cfg.n_layers);
    ec.precision = bf ? model::Precision::bf16 : model::Precision::f32;
    train::Executor exec(cfg, ec, pool);
    exec.init_weights(1);
    const int64_t B = o->batch, T = o->seq;
    std::vector<int32_t> tokens(size_t(B * (T + 1)));
    for (size_t i = 0; i < tokens.size(); ++i)
      tokens[i] = int32_t(rng_u64(7, 1, i) % uint64_t(cfg.vocab));
    std::vector<double> times;
    double loss = 0;
    for (int64_t s = 0; s < o->warmup + o->steps; ++s) {
      auto t0 = std::chrono::steady_clock::now();
      train::StepResult r = exec.train_step(tokens.data(), B, T);
      double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      if (s >= o->warmup) times.push_back(dt);
      loss = r.loss;
    }
    std::sort(times.begin(), times.end());
    double med = times[times.size() / 2];
    double tps = double(B * T) / med;
    double gflops = cfg.train_flops_per_token(T) * double(B * T) / med / 1e9;
    double peak = kernels::measure_matmul_peak_gflops(bf);
    nlohmann::json j = {{"impl", "loom"},
                        {"model", cfg.name},
                        {"dtype", o->dtype},
                        {"batch", B},
                        {"seq", T},
                        {"threads", num_threads()},
                        {"recompute", o->recompute},
                        {"steps", o->steps},
                        {"step_ms_median", med * 1e3},
                        {"step_ms_min", times.front() * 1e3},
                        {"tokens_per_s", tps},
                        {"gflops", gflops},
                        {"matmul_peak_gflops", peak},
                        {"peak_fraction", gflops / peak},
                        {"flops_per_token", cfg.train_flops_per_token(T)},
                        {"loss", loss},
                        {"peak_activation_bytes", pool.peak(MemCategory::activations)}};
    std::printf("%s\n", j.dump().c_str());
    ctx.exit_code = 0;
  });
}

}  // namespace

LOOM_REGISTER_COMMAND(bench, add_bench);
