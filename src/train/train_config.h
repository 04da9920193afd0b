// train/train_config.h: the typed, strict training configuration (TOML).
//
//   model = "configs/models/tiny.toml"      # path, relative to the config file or the cwd
//   [data]   source = "synthetic" | "shards", path = "data/corpus", seed = 1234
//   [train]  batch, seq, micro_batches, steps, seed, precision = "f32"|"bf16",
//            recompute = "none"|"selective"|"full", threads (0 = automatic), eval_every,
//            eval_batches, time_limit_s (stop and checkpoint after this many seconds)
//   [optim]  lr, min_lr, beta1, beta2, eps, weight_decay, clip, warmup_steps, decay_steps
//   [checkpoint] dir, every (0 = only at the end)
//   [log]    dir, every
//   [parallel] dp, tp, zero, bucket_mb, pp, schedule, virtual_stages, stage_layers,
//            ranks_per_node
//            (train.batch is per data-parallel rank and micro-batch)
// `--set section.key=value` overrides any key; unknown sections or keys are errors that list the
// allowed ones.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "model/config.h"
#include "model/gpt.h"
#include "optim/optimizer.h"

namespace loom::train {

struct TrainConfig {
  std::string source_path;  // the TOML file (for errors and relative paths)
  model::ModelConfig model;
  std::string model_path;
  std::string data_source = "synthetic";
  std::string data_path;
  uint64_t data_seed = 1234;
  int64_t batch = 8;
  int64_t seq = 64;
  int64_t micro_batches = 1;
  int64_t steps = 100;
  uint64_t seed = 1;
  model::Precision precision = model::Precision::f32;
  model::Recompute recompute = model::Recompute::none;
  int64_t threads = 0;
  int64_t eval_every = 0;
  int64_t eval_batches = 4;
  double time_limit_s = 0;  // stop (and checkpoint) after this much training time; 0 = none
  optim::AdamWConfig optim;
  std::string checkpoint_dir = "runs/default/ckpt";
  int64_t checkpoint_every = 0;
  std::string log_dir = "runs/default";
  int64_t log_every = 1;
  // [parallel]: data parallel size (0 = the world size), ZeRO stage (0: replicated optimizer,
  // 1: optimizer state sharded over dp, MindSpore's "optimizer parallel", 2: gradients too,
  // 3: weights too; train/zero.h), gradient bucket size.
  int64_t dp = 0;
  // Tensor parallel size (Megatron-style with sequence parallelism; model/gpt.h). World size =
  // dp x tp (x pp); tp ranks are adjacent (order tp-dp-pp).
  int64_t tp = 1;
  int64_t zero = 0;
  double bucket_mb = 4.0;
  // Pipeline parallel: pp stages (pp = world size, dp = 1 for now), schedule "gpipe" | "1f1b" |
  // "interleaved", virtual stages per rank (interleaved), blocks per layer group (empty = even).
  // train.micro_batches is the number of micro-batches in the pipeline.
  int64_t pp = 1;
  std::string schedule = "1f1b";
  int64_t virtual_stages = 1;
  std::vector<int64_t> stage_layers;
  // Node locality: 0 = MPI's shared-memory islands; K > 0 = every K consecutive ranks form a
  // node (emulates several nodes on one machine). The run log says where each axis's groups
  // lie and warns when tp groups span nodes.
  int64_t ranks_per_node = 0;
};

// Loads `path`, applies `overrides` ("section.key=value" or "model=path"), validates.
TrainConfig load_train_config(const std::string& path, const std::vector<std::string>& overrides);

}  // namespace loom::train
