// train/trainer.h: the single-process training loop (one rank; the distributed issue adds
// groups around the same steps).
//
// One step: zero grads -> for each of M micro-batches: next (B, T+1) windows from this rank's
// data stream, forward+backward accumulating grad/(B*T*M*dp) -> (data parallel) gradients summed
// over the dp group in buckets that start, non-blocking, while backward is still running on the
// last micro-batch -> global grad norm -> clip factor -> AdamW (ZeRO-1: each dp rank updates its
// shard of the flat buffer, then the shards are broadcast) -> refresh bf16 weights. Same seed,
// data and layout give bit-identical losses; save() + resume() continue bit-identically
// (weights, optimizer moments and step, data position all restored). A dp run equals the serial
// run with dp times the batch, up to summation order.
#pragma once

#include <cstdint>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "comm/process_group.h"
#include "core/memory_pool.h"
#include "model/gpt.h"
#include "optim/optimizer.h"
#include "train/train_config.h"
#include "train/zero.h"

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
  double dp_wait_s = 0;  // time blocked on the dp gradient reduction after backward (exposed comm)
  double tokens_per_s = 0;
  double gflops = 0;     // achieved model FLOP/s (train_flops_per_token * tokens / time)
};

class Trainer {
 public:
  // `dp` (optional) is the data-parallel group; null means a single rank. `tp` (optional) the
  // tensor-parallel group (model/gpt.h): the tp ranks of one dp rank see the same data.
  Trainer(const TrainConfig& cfg, MemoryPool& pool, const comm::ProcessGroup* dp = nullptr,
          const comm::ProcessGroup* tp = nullptr);
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
  // Writes a checkpoint directory atomically (see checkpoint/checkpoint.h). Collective over the
  // dp and tp groups: dp rank 0 gathers sharded optimizer state, tp rank 0 of it gathers the tp
  // shards into the logical tensors and writes; everyone waits for it.
  void save(const std::string& dir);
  int dp_rank() const { return dp_ ? dp_->rank() : 0; }
  int dp_size() const { return dp_ ? dp_->size() : 1; }
  int tp_rank() const { return tp_ ? tp_->rank() : 0; }
  int tp_size() const { return tp_ ? tp_->size() : 1; }
  // The whole model's weights in the logical (tp = 1) layout, gathered over tp (collective over
  // tp; every tp rank gets them).
  std::vector<float> full_weights() const;
  // This rank's range [begin, end) of the flat buffer that its optimizer updates.
  int64_t shard_begin() const { return optimizer_->begin(); }
  int64_t shard_end() const { return optimizer_->end(); }
  // Agrees across the dp and tp groups: true if any rank's flag is set (max all-reduce).
  bool any_rank(bool flag) const;

  int64_t step() const { return optimizer_->step_count(); }
  model::Gpt& model() { return *model_; }
  const TrainConfig& config() const { return cfg_; }
  nlohmann::json data_state() const;

 private:
  std::unique_ptr<data::TokenStream> make_stream(const std::string& split) const;

  void reduce_gradients_start(int64_t begin, int64_t end);
  void broadcast_weight_shards();

  TrainConfig cfg_;
  MemoryPool& pool_;
  const comm::ProcessGroup* dp_ = nullptr;
  const comm::ProcessGroup* tp_ = nullptr;
  // Gradient buckets: [bucket_lo_, bucket_hi_) collects ready ranges until bucket_mb is reached.
  int64_t bucket_lo_ = -1, bucket_hi_ = -1;
  std::vector<comm::Work> pending_;
  std::unique_ptr<ZeroStore> zero_;  // ZeRO-2/3 (declared first: the model points into it)
  std::unique_ptr<model::Gpt> model_;
  std::unique_ptr<optim::AdamW> optimizer_;
  std::unique_ptr<data::TokenStream> train_stream_;
  std::vector<int32_t> tokens_;  // (B, T+1)
};

// The full `loom train` loop: logs every cfg.log_every steps to stderr and metrics.jsonl in
// cfg.log_dir, checkpoints every cfg.checkpoint_every steps and at the end (and on SIGINT /
// SIGTERM, then returns early). `resume_dir` may be empty. Returns the final step's stats.
// `world` (optional) is the MPI world when launched by mpirun: every rank is a dp rank
// (cfg.dp must be 0 or the world size) and only rank 0 logs and writes files.
StepStats run_training(const TrainConfig& cfg, const std::string& resume_dir,
                       const comm::ProcessGroup* world = nullptr);

}  // namespace loom::train
