// train/train_config.h: the typed, strict training configuration (TOML).
//
//   model = "configs/models/tiny.toml"      # path, relative to the config file or the cwd
//   [data]   source = "synthetic" | "shards", path = "data/corpus", seed = 1234
//   [train]  batch, seq, micro_batches, steps, seed, precision = "f32"|"bf16",
//            recompute = "none"|"selective"|"full", threads (0 = automatic), eval_every,
//            eval_batches, time_limit_s (stop and checkpoint after this many seconds)
//   [optim]  lr, min_lr, beta1, beta2, eps, weight_decay, clip, warmup_steps, decay_steps
//   [checkpoint] dir, every (0 = only at the end), keep (newest N kept, default 2; 0 = all)
//   [log]    dir, every
//   [parallel] dp, tp, pp, cp, ep, zero, bucket_mb, schedule, virtual_stages, stage_layers,
//            ranks_per_node, micro_batches, recompute (none|selective|full or a per-layer list
//            such as "full:0-11,selective:12-23"); train.micro_batches and train.recompute are
//            accepted as the same settings; cp_scheme = "burst"|"ring"|"allgather"|"ulysses",
//            cp_layout = "zigzag"|"striped" (cp > 1: seq divisible by 2*cp for zigzag, cp for
//            striped); ecss = "off"|"dense"|"lazy" (MoE models: experts' f32 masters and AdamW
//            moments in a host store, docs/moe.md), ecss_store = "path" (back that store with
//            a memory-mapped file; default: anonymous host memory), cp_overlap = true|false (post each
//            ring transfer before the compute it hides behind; false waits for it first).
//   train.batch is the GLOBAL batch: sequences per optimizer step, whatever the layout. Each dp
//   rank takes batch/dp of them, split into micro_batches micro-batches.
// `--set section.key=value` overrides any key; unknown sections or keys are errors that list the
// allowed ones.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "model/config.h"
#include "model/stage.h"
#include "parallel/plan.h"
#include "optim/optimizer.h"

namespace loom::train {

struct TrainConfig {
  std::string source_path;  // the TOML file (for errors and relative paths)
  model::ModelConfig model;
  std::string model_path;
  std::string data_source = "synthetic";
  std::string data_path;
  uint64_t data_seed = 1234;
  int64_t batch = 8;  // global batch: sequences per optimizer step
  int64_t seq = 64;
  int64_t steps = 100;
  uint64_t seed = 1;
  model::Precision precision = model::Precision::f32;
  int64_t threads = 0;
  int64_t eval_every = 0;
  int64_t eval_batches = 4;
  double time_limit_s = 0;  // stop (and checkpoint) after this much training time; 0 = none
  optim::AdamWConfig optim;
  std::string checkpoint_dir = "runs/default/ckpt";
  int64_t checkpoint_every = 0;
  int64_t checkpoint_keep = 2;  // keep the newest N checkpoints (0: all)
  std::string log_dir = "runs/default";
  int64_t log_every = 1;
  // [parallel] as written (unset values take the plan's defaults); CLI flags override them.
  parallel::PlanSettings parallel;
  // parallel.ecss_store: the file backing the ECSS host store (empty: anonymous host memory).
  std::string ecss_store;
};

// Loads `path`, applies `overrides` ("section.key=value" or "model=path") and the layout `flags`
// (each set value replaces the config's [parallel] one), validates.
TrainConfig load_train_config(const std::string& path, const std::vector<std::string>& overrides,
                              const parallel::PlanSettings& flags = {});

parallel::ModelShape plan_shape(const model::ModelConfig& m);
// The run's plan on `world_size` ranks: parallel::make_plan over the config's settings, its
// global batch and model, plus the checks that need the sequence length. Throws naming the bad
// value and the values that work.
parallel::ParallelPlan make_train_plan(const TrainConfig& cfg, int world_size);

}  // namespace loom::train
