// train/trainer.h: the single-process training loop (one rank; the distributed issue adds
// groups around the same steps).
//
// One step: zero grads -> for each of M micro-batches: next (B, T+1) windows from the data
// stream, forward+backward accumulating grad/(B*T*M) -> global grad norm -> clip factor ->
// AdamW on the flat master weights -> refresh bf16 weights. Same seed and data give bit-identical
// losses; save() + resume() continue bit-identically (weights, optimizer moments and step, data
// position all restored).
#pragma once

#include <cstdint>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "core/memory_pool.h"
#include "model/gpt.h"
#include "optim/optimizer.h"
#include "train/train_config.h"

namespace loom::data {
class TokenStream;
}

namespace loom::train {

struct StepStats {
  int64_t step = 0;
  double loss = 0;       // mean nats per token over the step's tokens
  float lr = 0;
  double grad_norm = 0;  // before clipping
  double step_s = 0;
  double tokens_per_s = 0;
  double gflops = 0;     // achieved model FLOP/s (train_flops_per_token * tokens / time)
};

class Trainer {
 public:
  Trainer(const TrainConfig& cfg, MemoryPool& pool);
  ~Trainer();

  // Fresh start: weights from cfg.seed, data from the beginning.
  void init_fresh();
  // Continue from a checkpoint written by save(): weights, optimizer, step and data position.
  // Throws naming the difference if the checkpoint is of another model.
  void resume(const std::string& checkpoint_dir);
  StepStats train_step();
  // Mean validation loss over `batches` batches from the held-out stream (restarted each call,
  // so every evaluation sees the same tokens).
  double eval_loss(int64_t batches);
  // Writes a checkpoint directory atomically (see checkpoint/checkpoint.h).
  void save(const std::string& dir);

  int64_t step() const { return optimizer_->step_count(); }
  model::Gpt& model() { return *model_; }
  const TrainConfig& config() const { return cfg_; }
  nlohmann::json data_state() const;

 private:
  std::unique_ptr<data::TokenStream> make_stream(const std::string& split) const;

  TrainConfig cfg_;
  MemoryPool& pool_;
  std::unique_ptr<model::Gpt> model_;
  std::unique_ptr<optim::AdamW> optimizer_;
  std::unique_ptr<data::TokenStream> train_stream_;
  std::vector<int32_t> tokens_;  // (B, T+1)
};

// The full `loom train` loop: logs every cfg.log_every steps to stderr and metrics.jsonl in
// cfg.log_dir, checkpoints every cfg.checkpoint_every steps and at the end (and on SIGINT /
// SIGTERM, then returns early). `resume_dir` may be empty. Returns the final step's stats.
StepStats run_training(const TrainConfig& cfg, const std::string& resume_dir);

}  // namespace loom::train
