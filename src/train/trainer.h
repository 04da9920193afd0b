// train/trainer.h: a training run of any layout: its ParallelPlan, the one training executor
// (train/executor.h), the data it reads, evaluation, checkpoints and the `loom train` loop.
//
// Glossary: G global batch (train.batch: sequences per optimizer step), dp/tp/pp the layout, M
// micro-batches per step, b = G/(dp*M) micro-batch size, T sequence.
//
// Data: every rank reads the same global sequence of windows (one stream, whatever the layout);
// step s takes the next G windows, and dp rank r trains on windows [r*G/dp, (r+1)*G/dp) of them,
// split into M micro-batches of b. So every layout sees the same windows in the same order,
// epoch ends included, and a run resumed at another layout continues the same training. Losses
// of every layout equal the one-rank run's up to summation order.
//
// One step: zero grads -> the executor runs the plan's schedule over this rank's micro-batches
// (gradient scale 1/(G*T)) -> dp reduction in buckets during the backward (or ZeRO-2/3
// reduce-scatters) -> global grad norm -> clip -> AdamW on this rank's shard -> bf16 refresh.
// Same seed, data and layout give bit-identical losses; save() + resume() continue
// bit-identically (weights, optimizer moments and step, data position all restored).
#pragma once

#include <cstdint>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "comm/process_group.h"
#include "core/memory_pool.h"
#include "parallel/plan.h"
#include "train/executor.h"
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
  double dp_wait_s = 0;  // time blocked on the dp gradient reduction after backward (exposed comm)
  double optimizer_s = 0;    // the optimizer update (this rank's parameters or ZeRO share)
  double zero_gather_s = 0;  // ZeRO-1: the updated shares sent to every dp rank
  int64_t cp_workspace_bytes = 0;  // cp attention workspace (in the pool; largest call)
  double cp_wait_s = 0;            // time blocked on cp attention transfers (exposed comm)
  // ECSS (parallel.ecss != "off"): this rank's expert-store transfers during the step.
  optim::EcssTransfers ecss;
  double tokens_per_s = 0;
  double gflops = 0;     // achieved model FLOP/s (train_flops_per_token * tokens / time)
};

class Trainer {
 public:
  // Groups (null or size 1: that axis has size 1): `dp` data parallel, `tp` tensor parallel (the
  // tp ranks of a dp rank see the same data), `pp` pipeline. The plan is make_train_plan(cfg,
  // dp*tp*pp) with the group sizes; a config that names other sizes is an error.
  // `cp` context parallel (every sequence split over its ranks, see Executor) needs `dp_cp`, the
  // dp x cp gradient-reduction group (parallel::ProcessGroups::dp_cp); the cp ranks of a dp rank
  // read the same windows.
  Trainer(const TrainConfig& cfg, MemoryPool& pool, const comm::ProcessGroup* dp = nullptr,
          const comm::ProcessGroup* tp = nullptr, const comm::ProcessGroup* pp = nullptr,
          const comm::ProcessGroup* cp = nullptr, const comm::ProcessGroup* dp_cp = nullptr);
  ~Trainer();

  // Fresh start: weights from cfg.seed, data from the beginning.
  void init_fresh();
  // Continue from a checkpoint written by save() at any layout: weights, optimizer, step and
  // data position. Throws naming the difference if the checkpoint is of another model.
  void resume(const std::string& checkpoint_dir);
  StepStats train_step();
  // Mean validation loss over `batches` batches of b sequences from the held-out stream
  // (restarted each call, so every evaluation sees the same tokens; the same on every rank).
  double eval_loss(int64_t batches);
  // Writes a checkpoint directory atomically (see checkpoint/checkpoint.h). Collective over all
  // the run's groups.
  void save(const std::string& dir);
  int dp_rank() const { return dp_.valid() ? dp_.rank() : 0; }  // the data axis (not cp)
  int dp_size() const { return dp_.valid() ? dp_.size() : 1; }
  int cp_rank() const { return exec_->cp_rank(); }
  int cp_size() const { return exec_->cp_size(); }
  int tp_rank() const { return exec_->tp_rank(); }
  int tp_size() const { return exec_->tp_size(); }
  int pp_rank() const { return exec_->pp_rank(); }
  int pp_size() const { return exec_->pp_size(); }
  // The whole model's weights in the logical (tp = 1, unsharded) layout, on every rank
  // (collective over every group).
  std::vector<float> full_weights() const;
  // Agrees across every group of the run: true if any rank's flag is set.
  bool any_rank(bool flag) const;

  int64_t step() const { return exec_->step_count(); }
  Executor& executor() { return *exec_; }
  const parallel::ParallelPlan& plan() const { return plan_; }
  const TrainConfig& config() const { return cfg_; }
  nlohmann::json data_state() const;

 private:
  std::unique_ptr<data::TokenStream> make_stream(const std::string& split) const;
  // rre_table = "balanced": builds the table from the corpus's per-language token counts
  // (data/data_meta.h) mapped to domains, logs its expected max/mean expert load against a
  // uniform table's, and writes it into every rre table this rank holds.
  void init_balanced_rre_tables();
  // This rank's (M, b, T+1) windows of the next global batch from `stream`, and for an rre MoE
  // model each token's domain (M, b, T+1) in `domains` (cleared otherwise).
  void next_windows(data::TokenStream& stream, std::vector<int32_t>& mine,
                    std::vector<int32_t>& domains);

  TrainConfig cfg_;
  parallel::ParallelPlan plan_;
  MemoryPool& pool_;
  comm::ProcessGroup dp_, tp_, pp_, cp_;
  std::unique_ptr<Executor> exec_;
  std::unique_ptr<data::TokenStream> train_stream_;
  std::vector<int32_t> global_, tokens_;  // (G, T+1) and this rank's (M, b, T+1)
  std::vector<int32_t> global_langs_, domains_;  // rre MoE: (G, T+1) languages, (M, b, T+1) domains
  std::vector<int32_t> language_domains_;         // language id -> domain (rre MoE; else empty)
};

// The full `loom train` loop on `world` (null: one process without MPI): makes the plan,
// builds the groups (order tp-cp-dp-pp), logs every cfg.log_every steps to stderr and
// metrics.jsonl in cfg.log_dir, checkpoints every cfg.checkpoint_every steps and at the end (and
// on SIGINT / SIGTERM, then returns early). `resume_dir` may be empty. Only world rank 0 logs
// and writes files. Returns the final step's stats.
StepStats run_training(const TrainConfig& cfg, const std::string& resume_dir,
                       const comm::ProcessGroup* world = nullptr);

}  // namespace loom::train
