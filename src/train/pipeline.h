// train/pipeline.h: pipeline-parallel training step. Runs this rank's action list from
// parallel/schedule.h (GPipe, 1F1B, interleaved 1F1B) over its model chunks (model::GptStage)
// with non-blocking point-to-point transfers on the pp group, then synchronises the tied
// embedding, clips by the global gradient norm and applies AdamW to the rank's own parameters.
//
// Glossary: pp pipeline ranks (the pp group), VS virtual stages (model chunks) per rank, M
// micro-batches per step, B micro-batch size, T sequence, N = B*T rows, C d_model, mb
// micro-batch index, g = chunk * pp + rank the virtual stage of a chunk (layer group g).
//
// Contract
// - Every member of the pp group constructs the executor with the same model config and
//   PipelineConfig (the constructor is collective over `pp`: it splits off the embedding group
//   {first rank, last rank}), and calls train_step() in lockstep.
// - Layer groups: stage_layers lists the blocks of each of the pp*VS virtual stages in virtual
//   stage order (empty: even split, which needs pp*VS | n_layers); chunk c of rank r holds layer
//   group c*pp + r. Group 0 also holds the embedding, group pp*VS-1 the final norm, query layer
//   and tied head. Invalid lists throw loom::Error naming the valid values.
// - Transfers: activations (N,C) f32 forward, their gradients (N,C) f32 backward, each on its own
//   MPI tag derived from (micro-batch, sending virtual stage, kind), so a schedule that pairs a
//   receive with the wrong message fails with a timeout naming the op instead of silently
//   mixing micro-batches. Sends are isend, waited at the end of the step; receives are irecv,
//   waited (with the group timeout) before the next compute action. Per step each boundary
//   between consecutive virtual stages moves 2 * M * N * C * 4 bytes (counted as `send` on the
//   pp group's counters by the sender).
// - Data parallel (dp group of size D): gradient scale 1/(B*T*M*D); each chunk's gradient is
//   all-reduced over dp (non-blocking, all chunks at once) after the pipeline drains (ZeRO-2/3:
//   reduce-scattered unit by unit during the backward instead), and the loss is summed over dp.
//   Every dp replica runs the same schedule, so the dp collectives of a chunk are issued in
//   the same order on every member.
// - Numerics: gradient scale 1/(B*T*M) as train/trainer.cpp; the tied embedding's gradient is
//   all-reduced (sum) between its two holders before the norm (ZeRO-2/3: the two holders'
//   pieces of their identical token-embedding units); the global grad norm sums each
//   rank's squares (the tied embedding counted once) with an f64 all-reduce over pp. The result
//   equals the serial Gpt + AdamW step up to summation order; two runs of one layout are
//   bit-identical.
// - Failure: a peer that never sends makes wait() throw loom::TimeoutError naming the group,
//   op and sequence number; the executor's state is then undefined (discard it).
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <vector>

#include "comm/process_group.h"
#include "core/memory_pool.h"
#include "core/tensor.h"
#include "model/config.h"
#include "model/gpt.h"
#include "model/stage.h"
#include "optim/optimizer.h"
#include "parallel/schedule.h"
#include "train/zero.h"

namespace loom::train {

struct PipelineConfig {
  parallel::ScheduleKind schedule = parallel::ScheduleKind::one_f_one_b;
  int micro_batches = 1;              // M
  int virtual_stages = 1;             // VS (interleaved only)
  std::vector<int64_t> stage_layers;  // (pp*VS) blocks per layer group; empty = even
  model::Precision precision = model::Precision::f32;
  model::Recompute recompute = model::Recompute::none;
  optim::AdamWConfig optim;
  // Data parallel (ZeRO 0/1): gradient bucket size. During each chunk's last micro-batch
  // (forward of the head's tied copy, backward of everything else) the ranges of units whose
  // gradients are final merge with adjacent ready ranges; a merged range's dp all-reduce starts,
  // non-blocking, once it holds bucket_mb (the rest after the pipeline drains).
  double bucket_mb = 4.0;
  // ZeRO stage over the dp group: 0; 1 (each dp rank keeps the AdamW state of, and updates,
  // an equal share of every chunk, then the shares are broadcast); 2 and 3 (each chunk's
  // parameters live in a train::ZeroStore over the chunk's units: gradients reduce-scattered
  // per unit and micro-batch during the backward, stage 3 also gathering each unit's weights
  // just in time for every forward and backward; see train/zero.h).
  int zero = 0;
};

struct PipelineStepStats {
  int64_t step = 0;      // optimizer steps taken, after this one
  double loss = 0;       // mean cross-entropy per counted token (same on every pp rank)
  double loss_sum = 0;   // summed over the step's micro-batches (the last stage's value)
  int64_t tokens = 0;    // counted target tokens
  double grad_norm = 0;  // global L2 norm before clipping
  float lr = 0;
  double dp_wait_s = 0;  // time blocked on the dp gradient reduction after the pipeline drained
};

class PipelineExecutor {
 public:
  // Builds this rank's chunks (weights uninitialised) and optimizer state from `pool`, and the
  // schedule. Collective over `pp`. Throws loom::Error for invalid layer splits or schedules.
  // `tp` (optional): tensor parallel inside every stage (model::GptStage with tp): messages are
  // this rank's N/tp rows, weights/optimizer export and import use this tp rank's layout,
  // replicated parameters' gradients are summed over tp, and the grad norm counts them once.
  // `dp` (optional): data parallel over that group (each dp rank runs its own pipeline on its
  // own micro-batches; after the backward every chunk's gradient is summed over dp).
  PipelineExecutor(const model::ModelConfig& cfg, const PipelineConfig& pc,
                   const comm::ProcessGroup& pp, MemoryPool& pool,
                   const comm::ProcessGroup* dp = nullptr,
                   const comm::ProcessGroup* tp = nullptr);
  ~PipelineExecutor();

  // Same logical weights as model::Gpt::init_weights(seed).
  void init_weights(uint64_t seed);
  // One training step over M micro-batches. tokens (M, B, T+1) int32 windows, micro-batch
  // major; read only on ranks holding the embedding or the head (others may pass null).
  PipelineStepStats train_step(const int32_t* tokens, int64_t B, int64_t T);

  // Mean loss per token of n_batches windows (n_batches, B, T+1) int32, forward only: each
  // window runs through the stages in order (no schedule, no gradient, no optimizer step).
  // tokens are read on the ranks holding the embedding or the head. Collective over pp (and
  // tp; dp too under ZeRO-3, which gathers the weights): every rank returns the same value.
  double eval_loss(const int32_t* tokens, int64_t n_batches, int64_t B, int64_t T);

  int num_chunks() const { return int(chunks_.size()); }
  model::GptStage& chunk(int c) const { return *chunks_.at(size_t(c)); }
  const parallel::PipelineSchedule& schedule() const { return schedule_; }
  const comm::ProcessGroup& pp_group() const { return pp_; }
  int64_t step_count() const { return step_; }
  // Writes this rank's parameters into a full flat buffer in the global layout (tied copies
  // skipped unless asked), e.g. to gather or checkpoint by name.
  void export_weights(float* global_weights, bool include_tied_copy = false) const;
  void import_weights(const float* global_weights);
  // AdamW state (m, v: each a full flat buffer in the global layout; tied copies skipped on
  // export; under ZeRO-1 only this dp rank's share is written, so the caller sums over dp)
  // and the step count, so a checkpoint can resume at any layout. import also refreshes
  // the step count; m and v of the head's tied copy are taken from the embedding's entries.
  void export_optimizer(float* global_m, float* global_v) const;
  void import_optimizer(const float* global_m, const float* global_v, int64_t step);
  // Sharded optimizer (ZeRO >= 1 over dp): every dp rank's shares summed, chunk by chunk, into
  // global_m / global_v on the ranks that pass them (others pass null). Collective over dp;
  // each rank holds two chunk-sized buffers at a time, not the whole model.
  void export_optimizer_dp_summed(float* global_m, float* global_v) const;

 private:
  model::ModelConfig cfg_;
  PipelineConfig pc_;
  comm::ProcessGroup pp_, embedding_, dp_, tp_;
  MemoryPool& pool_;
  parallel::PipelineSchedule schedule_;
  std::vector<std::unique_ptr<ZeroStore>> stores_;  // ZeRO-2/3 (one per chunk), else empty
  std::vector<std::unique_ptr<model::GptStage>> chunks_;
  std::vector<std::unique_ptr<optim::AdamW>> optimizers_;  // one per chunk, over its buffer
  // dp gradient buckets (ZeRO 0/1): per chunk the ready, not yet reduced ranges of its buffer,
  // merged when adjacent (begin -> end).
  std::vector<std::map<int64_t, int64_t>> ready_;
  std::vector<comm::Work> reductions_;  // dp all-reduces in flight this step
  void grad_ready(int chunk, int64_t begin, int64_t end);
  void reduce_range(int chunk, int64_t begin, int64_t end);
  int64_t step_ = 0;
};

}  // namespace loom::train
