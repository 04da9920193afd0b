#include "train/loop.h"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <utility>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/log.h"
#include "train/plot.h"
#include "train/run_dir.h"

namespace fs = std::filesystem;

namespace loom::train {

namespace {
volatile std::sig_atomic_t g_stop_signal = 0;
extern "C" void on_stop_signal(int sig) { g_stop_signal = sig; }
// Runs fn(); a loom::Error it throws (a collective timeout naming its peer, a bad batch) is
// rethrown, same type, with the step appended, so the log says which step was in progress.
template <typename Fn>
auto with_step_context(const char* what, int64_t step, const Fn& fn) {
  try {
    return fn();
  } catch (const InternalError&) {
    throw;
  } catch (const TimeoutError& e) {
    throw TimeoutError(fmt::format("{} (during {} {})", e.what(), what, step));
  } catch (const Error& e) {
    throw Error(fmt::format("{} (during {} {})", e.what(), what, step));
  }
}

}  // namespace

void maybe_inject_failure(int world_rank, int64_t step) {
  static const std::pair<int, int64_t> at = [] {
    const char* v = std::getenv("LOOM_FAIL_AT");
    if (!v || !*v) return std::pair<int, int64_t>{-1, -1};
    int r = -1;
    long long st = -1;
    char tail = 0;
    LOOM_CHECK(std::sscanf(v, "%d:%lld%c", &r, &st, &tail) == 2 && r >= 0 && st >= 1,
               "LOOM_FAIL_AT = '{}': expected RANK:STEP, e.g. 1:3 (fails rank 1 at step 3)", v);
    return std::pair<int, int64_t>{r, int64_t(st)};
  }();
  LOOM_CHECK(!(world_rank == at.first && step == at.second),
             "injected failure (LOOM_FAIL_AT) on rank {} at step {}", world_rank, step);
}

StepStats run_loop(const TrainConfig& cfg, const LoopHooks& hooks, const LoopContext& ctx,
                   bool resumed) {
  MemoryPool& pool = *ctx.pool;
  const bool leader = ctx.leader;
  std::ofstream metrics;
  if (leader) {
    fs::create_directories(cfg.log_dir);
    // A resumed run restarts at the checkpoint's step: the lines the interrupted run wrote after
    // it (and a line torn by a kill) would otherwise appear twice or break the plot.
    if (resumed) {
      const int64_t removed = truncate_metrics(cfg.log_dir + "/metrics.jsonl", hooks.step());
      if (removed > 0)
        LOOM_LOG_INFO("metrics.jsonl: removed {} line(s) after the resumed step {}", removed,
                      hooks.step());
    }
    metrics.open(cfg.log_dir + "/metrics.jsonl", resumed ? std::ios::app : std::ios::trunc);
    LOOM_CHECK(metrics.good(), "cannot write '{}/metrics.jsonl'", cfg.log_dir);
  }
  // Share of the matmul peak reached by the whole job (peak per rank x ranks).
  auto peak_share = [&](double gflops) {
    return ctx.peak_gflops > 0 ? gflops / ctx.peak_gflops / ctx.world_size : 0.0;
  };

  auto old_int = std::signal(SIGINT, on_stop_signal);
  auto old_term = std::signal(SIGTERM, on_stop_signal);
  const bool progress_bar = ::isatty(2) != 0;
  StepStats last;
  auto t_start = std::chrono::steady_clock::now();
  const int64_t first = hooks.step();
  auto out_of_time = [&] {
    return cfg.time_limit_s > 0 &&
           std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count() >=
               cfg.time_limit_s;
  };
  // Every rank must stop at the same step (their collectives must match): they agree each step.
  bool stop = hooks.any_rank(g_stop_signal != 0 || out_of_time());
  while (hooks.step() < cfg.steps && !stop) {
    pool.reset_peaks();
    for (const comm::ProcessGroup* g : ctx.groups) g->reset_counters();
    maybe_inject_failure(ctx.world_rank, hooks.step() + 1);
    last = with_step_context("training step", hooks.step() + 1, hooks.train_step);
    stop = with_step_context("the stop agreement after training step", last.step, [&] {
      return hooks.any_rank(g_stop_signal != 0 || out_of_time());
    });
    bool eval_now = cfg.eval_every > 0 &&
                    (last.step % cfg.eval_every == 0 || last.step == cfg.steps || stop);
    double val = eval_now ? with_step_context("validation after step", last.step, hooks.eval_loss)
                          : 0.0;
    if (leader) {
      nlohmann::json m = {{"step", last.step},          {"loss", last.loss},
                          {"lr", last.lr},              {"grad_norm", last.grad_norm},
                          {"step_s", last.step_s},      {"tokens_per_s", last.tokens_per_s},
                          {"gflops", last.gflops},      {"dp_wait_s", last.dp_wait_s},
                          {"optimizer_s", last.optimizer_s}};
      if (last.zero_gather_s > 0) m["zero_gather_s"] = last.zero_gather_s;
      if (ctx.peak_gflops > 0) m["peak_fraction"] = peak_share(last.gflops);
      if (last.cp_workspace_bytes > 0) {
        m["cp_workspace_bytes"] = last.cp_workspace_bytes;
        m["cp_wait_s"] = last.cp_wait_s;
      }
      if (cfg.parallel.ecss.value_or("off") != "off")
        m["ecss"] = {{"to_store_bytes", last.ecss.to_store_bytes},
                     {"to_pool_bytes", last.ecss.to_pool_bytes},
                     {"pieces_updated", last.ecss.pieces_updated},
                     {"elements_updated", last.ecss.elements_updated}};
      nlohmann::json mem;
      for (size_t c = 0; c < kNumMemCategories; ++c)
        mem[std::string(mem_category_name(MemCategory(c)))] = pool.peak(MemCategory(c));
      m["peak_bytes"] = mem;
      // Calls and bytes this rank sent per group and op during the step (comm/process_group.h).
      for (const comm::ProcessGroup* g : ctx.groups)
        m["comm_bytes"][g->name()] = nlohmann::json::parse(g->counters().to_json());
      if (eval_now) m["val_loss"] = val;
      metrics << m.dump() << "\n";
      metrics.flush();
    }
    // On a terminal, a progress bar redrawn every step between the log lines.
    if (leader && progress_bar) {
      double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count();
      double frac_steps = double(last.step) / double(std::max<int64_t>(1, cfg.steps));
      double frac_time = cfg.time_limit_s > 0 ? elapsed / cfg.time_limit_s : 0.0;
      double frac = std::min(1.0, std::max(frac_steps, frac_time));
      double eta = frac > 0 ? elapsed * (1 - frac) / frac : 0;
      int filled = int(frac * 30);
      std::fprintf(stderr, "\r[%s%s] %3.0f%% step %lld loss %.4f %.0f tok/s eta %.0fs   ",
                   std::string(size_t(filled), '#').c_str(), std::string(size_t(30 - filled), '.').c_str(),
                   100 * frac, (long long)last.step, last.loss, last.tokens_per_s, eta);
      std::fflush(stderr);
    }
    if (last.step % cfg.log_every == 0 || last.step == cfg.steps || eval_now || stop) {
      if (leader && progress_bar) std::fprintf(stderr, "\r%80s\r", "");
      double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count();
      double eta = elapsed / double(last.step - first) * double(cfg.steps - last.step);
      if (cfg.time_limit_s > 0) eta = std::min(eta, std::max(0.0, cfg.time_limit_s - elapsed));
      LOOM_LOG_INFO("step {:>5}/{} loss {:.4f}{} lr {:.2e} gnorm {:.3f} {:.0f} tok/s {:.1f} "
                    "GFLOP/s{} act {:.1f} MiB eta {:.0f}s",
                    last.step, cfg.steps, last.loss, eval_now ? fmt::format(" val {:.4f}", val) : "",
                    last.lr, last.grad_norm, last.tokens_per_s, last.gflops,
                    ctx.peak_gflops > 0
                        ? fmt::format(" ({:.0f}% of peak)", 100.0 * peak_share(last.gflops))
                        : "",
                    double(pool.peak(MemCategory::activations)) / (1 << 20), eta);
    }
    if (cfg.checkpoint_every > 0 && last.step % cfg.checkpoint_every == 0 &&
        last.step < cfg.steps && !stop)
      with_step_context("the checkpoint save after training step", last.step, [&] {
        hooks.save(cfg.checkpoint_dir);
        return 0;
      });
  }
  if (leader && progress_bar) std::fprintf(stderr, "\n");
  if (out_of_time())
    LOOM_LOG_INFO("time limit of {:.0f} s reached at step {}", cfg.time_limit_s, hooks.step());
  if (g_stop_signal)
    LOOM_LOG_WARN("signal {} received: saving a checkpoint at step {} and stopping",
                  int(g_stop_signal), hooks.step());
  hooks.save(cfg.checkpoint_dir);
  LOOM_LOG_INFO("checkpoint written to {} (step {})", cfg.checkpoint_dir, hooks.step());
  if (leader) {
    metrics.close();
    if (write_loss_plot(cfg.log_dir + "/metrics.jsonl", cfg.log_dir + "/loss.svg"))
      LOOM_LOG_INFO("loss plot written to {}/loss.svg", cfg.log_dir);
  }
  std::signal(SIGINT, old_int);
  std::signal(SIGTERM, old_term);
  g_stop_signal = 0;
  return last;
}

}  // namespace loom::train
