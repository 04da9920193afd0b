// train/loop.h: the `loom train` loop shared by the data/tensor-parallel trainer
// (run_training) and the pipeline (run_pipeline_training): stop agreement (SIGINT, SIGTERM,
// train.time_limit_s), validation, metrics.jsonl, log lines, the terminal progress bar,
// periodic and final checkpoints and the loss plot. The two callers differ only in how they
// step, evaluate and save, which they pass in.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "comm/process_group.h"
#include "core/memory_pool.h"
#include "train/train_config.h"
#include "train/trainer.h"

namespace loom::train {

struct LoopHooks {
  std::function<int64_t()> step;                   // completed optimizer steps
  std::function<StepStats()> train_step;           // one step (collective)
  std::function<double()> eval_loss;               // validation loss (collective)
  std::function<void(const std::string&)> save;    // checkpoint into a directory (collective)
  std::function<bool(bool)> any_rank;              // true on every rank if any rank passes true
};

struct LoopContext {
  MemoryPool* pool = nullptr;  // its per-category peaks are reset and reported every step
  bool leader = true;          // writes metrics.jsonl, the plot and the progress bar
  int world_rank = 0;
  int world_size = 1;
  double peak_gflops = 0;  // matmul peak per rank (<= 0: not measured, no share of peak shown)
  std::vector<const comm::ProcessGroup*> groups;  // counters reset and reported every step
};

// Runs steps until cfg.steps, a signal or the time limit (every rank stops at the same step),
// then saves a final checkpoint. `resumed`: append to metrics.jsonl instead of starting it.
// Returns the last step's stats.
StepStats run_loop(const TrainConfig& cfg, const LoopHooks& hooks, const LoopContext& ctx,
                   bool resumed);

// Fault injection for the failure tests: throws loom::Error at the start of step `step` (1-based)
// on world rank `rank` when the environment sets LOOM_FAIL_AT=rank:step. Reads the variable
// once; a malformed value is itself an error naming the expected form.
void maybe_inject_failure(int world_rank, int64_t step);

}  // namespace loom::train
