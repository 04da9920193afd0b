// train/executor.h: THE training executor, for every layout (dp x tp x pp, every ZeRO stage,
// pp = 1 included: one model chunk and no pipeline messages). Runs this rank's action list from
// parallel/schedule.h (GPipe, 1F1B, interleaved 1F1B; with pp = 1 every schedule is F0 B0 F1 B1
// ...) over its model chunks (model::GptStage) with non-blocking point-to-point transfers on the
// pp group, reduces gradients over dp in buckets while the backward runs (or reduce-scatters
// them unit by unit under ZeRO-2/3), synchronises the tied embedding, clips by the global
// gradient norm and applies AdamW to the rank's own parameters.
//
// Glossary: pp pipeline ranks (the pp group), VS virtual stages (model chunks) per rank, M
// micro-batches per step, B micro-batch size, T sequence, N = B*T rows, C d_model, mb
// micro-batch index, g = chunk * pp + rank the virtual stage of a chunk (layer group g).
//
// Contract
// - Every member of the pp group constructs the executor with the same model config and plan
//   (the constructor is collective over `pp`: it splits off the embedding group
//   {first rank, last rank}), and calls train_step() in lockstep.
// - Layer groups: plan.stage_layers lists the blocks of each of the pp*VS virtual stages in
//   virtual stage order (empty: even split, which needs pp*VS | n_layers); chunk c of rank r
//   holds layer group c*pp + r. Group 0 also holds the embedding, group pp*VS-1 the final norm,
//   query layer and tied head. Invalid lists throw loom::Error naming the valid values.
// - Transfers: activations (N,C) f32 forward, their gradients (N,C) f32 backward, each on its own
//   MPI tag derived from (micro-batch, sending virtual stage, kind), so a schedule that pairs a
//   receive with the wrong message fails with a timeout naming the op instead of silently
//   mixing micro-batches. Sends are isend, waited at the end of the step; receives are irecv,
//   waited (with the group timeout) before the next compute action. Per step each boundary
//   between consecutive virtual stages moves 2 * M * N * C * 4 bytes (counted as `send` on the
//   pp group's counters by the sender).
// - Data parallel (dp group of size D, under cp the dp x cp group): gradient scale 1/(B*T*M*D)
//   (T/G local rows under cp, so the scale is 1/(global tokens) either way); ZeRO 0/1: each chunk's
//   gradient ranges are all-reduced over dp in buckets of plan.bucket_mb, started during the
//   chunk's last micro-batch as units become final (the rest after the pipeline drains); ZeRO-1
//   keeps the AdamW state of, and updates, an equal share of every chunk, then broadcasts the
//   shares; ZeRO-2/3: each chunk's parameters live in a train::ZeroStore over the chunk's units
//   (gradients reduce-scattered per unit and micro-batch during the backward, stage 3 also
//   gathering each unit's weights just in time). The loss is summed over dp. Every dp replica
//   runs the same schedule, so the dp collectives of a chunk are issued in the same order on
//   every member.
// - Numerics: the tied embedding's gradient is all-reduced (sum) between its two holders before
//   the norm (ZeRO-2/3: the two holders' pieces of their identical token-embedding units); the
//   global grad norm sums each rank's squares (the tied embedding counted once, tp's replicated
//   tensors once) with an f64 all-reduce over pp and tp (and dp under ZeRO-2/3). Every layout
//   equals the one-rank run up to summation order; two runs of one layout are bit-identical.
// - ECSS (plan.ecss = "dense" | "lazy", ZeRO 0/1): the experts' f32 masters and AdamW moments
//   of what this rank's optimizer owns live in one optim::ExpertStore per chunk, outside the
//   pool; the chunk's AdamW covers the dense ranges only (model::ecss_split). In bf16 the
//   experts' weight matrices have no f32 copy in the pool (GptStage's expert_masters_outside);
//   under ZeRO-1 the stores' updated masters are then broadcast into the others' bf16 copies. Lazy mode sums the
//   step's per-expert loads over dp (x cp) so every rank updates the same experts. Checkpoints
//   and export/import read and write the store in the unchanged format.
// - Failure: a peer that never sends makes wait() throw loom::TimeoutError naming the group,
//   op and sequence number; the executor's state is then undefined (discard it).
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <memory>
#include <vector>

#include "attention/context_parallel.h"
#include "comm/process_group.h"
#include "core/memory_pool.h"
#include "core/tensor.h"
#include "model/config.h"
#include "model/stage.h"
#include "optim/expert_store.h"
#include "optim/optimizer.h"
#include "parallel/plan.h"
#include "parallel/schedule.h"
#include "train/zero.h"

namespace loom::train {

struct ExecutorConfig {
  // The layout: its dp, tp and pp must be the sizes of the groups passed to the executor. Uses
  // zero, recompute (per block), micro_batches, stage_layers, virtual_stages, schedule and
  // bucket_mb.
  parallel::ParallelPlan plan;
  model::Precision precision = model::Precision::f32;
  optim::AdamWConfig optim;
  // plan.ecss != "off": the file backing each chunk's ECSS host store (optim/expert_store.h);
  // every rank and chunk maps its own "<ecss_store>.pp<p>.dp<d>.tp<t>.c<chunk>". Empty:
  // anonymous host memory.
  std::string ecss_store;
};

struct StepResult {
  int64_t step = 0;      // optimizer steps taken, after this one
  double loss = 0;       // mean cross-entropy per counted token (same on every pp rank)
  double loss_sum = 0;   // summed over the step's micro-batches (the last stage's value)
  int64_t tokens = 0;    // counted target tokens
  double grad_norm = 0;  // global L2 norm before clipping
  float lr = 0;
  double dp_wait_s = 0;  // time blocked on the dp gradient reduction after the pipeline drained
  // The optimizer update of this rank's parameters (or its ZeRO share), and under ZeRO-1 the
  // time the updated shares take to reach every dp rank (the broadcasts after the update).
  double optimizer_s = 0;
  double zero_gather_s = 0;
  // cp: the attention kernels' largest per-call workspace (taken from the pool for the call,
  // category workspace, see attention/context_parallel.h) and the time blocked on cp transfers,
  // this step.
  int64_t cp_workspace_bytes = 0;
  double cp_wait_s = 0;
  // ECSS (plan.ecss != "off"): this rank's transfers between its expert stores and the pool
  // during the step (optim::EcssTransfers summed over chunks).
  optim::EcssTransfers ecss;
};

class Executor {
 public:
  // Builds this rank's chunks (weights uninitialised) and optimizer state from `pool`, and the
  // schedule. Collective over `pp`. Throws loom::Error for invalid layer splits or schedules, or
  // group sizes that differ from the plan's. Null groups (or groups of size 1) mean size 1.
  // `tp`: tensor parallel inside every stage (model::GptStage with tp): messages are this rank's
  // N/tp rows, weights/optimizer export and import use this tp rank's layout, replicated
  // parameters' gradients are summed over tp, and the grad norm counts them once.
  // `dp`: data parallel over that group (each dp rank runs its own pipeline on its own
  // micro-batches).
  // `cp` (plan.cp = G > 1): context parallel. Every sequence of the step's (M, B, T+1) windows
  // is split over the cp group in plan.cp_layout (attention::cp_next_token_split: this rank's
  // T/G inputs and their next-token targets, across chunk boundaries), attention runs over the
  // group with plan.cp_scheme, and the cp ranks are weight replicas: `dp` must then be the
  // gradient-reduction group of dp x cp ranks (parallel::ProcessGroups::dp_cp, size plan.dp *
  // plan.cp), over which gradients are all-reduced, ZeRO shards, and the loss sum and token
  // count are summed, so the loss is the mean over every token of the global batch. Everything
  // called "dp" below (dp_size(), ZeRO shares, bucketed reduction) is this group.
  Executor(const model::ModelConfig& cfg, const ExecutorConfig& ec, MemoryPool& pool,
           const comm::ProcessGroup* dp = nullptr, const comm::ProcessGroup* tp = nullptr,
           const comm::ProcessGroup* pp = nullptr, const comm::ProcessGroup* cp = nullptr);
  ~Executor();

  // Same logical weights as model::Gpt::init_weights(seed).
  void init_weights(uint64_t seed);
  // One training step over M micro-batches. tokens (M, B, T+1) int32 windows, micro-batch
  // major (T the global sequence length, also under cp); read only on ranks holding the
  // embedding, the head or sparse (MoE) blocks (others may pass null). domains (M, B, T+1)
  // int32: each token's MoE domain (model::GptStage::forward; null: "other"), read with the
  // tokens by stages with sparse blocks (under cp split like the tokens, onto the same rows).
  StepResult train_step(const int32_t* tokens, int64_t B, int64_t T,
                        const int32_t* domains = nullptr);

  // Mean loss per token of n_batches windows (n_batches, B, T+1) int32, forward only: each
  // window runs through the stages in order (no schedule, no gradient, no optimizer step).
  // tokens are read on the ranks holding the embedding or the head (under cp every cp rank
  // scores its share of each window and the sums are added over cp). Collective over pp (and
  // tp; dp too under ZeRO-3, which gathers the weights): every rank returns the same value.
  double eval_loss(const int32_t* tokens, int64_t n_batches, int64_t B, int64_t T,
                   const int32_t* domains = nullptr);

  int num_chunks() const { return int(chunks_.size()); }
  model::GptStage& chunk(int c) const { return *chunks_.at(size_t(c)); }
  const parallel::PipelineSchedule& schedule() const { return schedule_; }
  const parallel::ParallelPlan& plan() const { return ec_.plan; }
  int pp_rank() const { return pp_.valid() ? pp_.rank() : 0; }
  int pp_size() const { return pp_.valid() ? pp_.size() : 1; }
  int dp_rank() const { return dp_.valid() ? dp_.rank() : 0; }
  int dp_size() const { return dp_.valid() ? dp_.size() : 1; }
  int tp_rank() const { return tp_.valid() ? tp_.rank() : 0; }
  int tp_size() const { return tp_.valid() ? tp_.size() : 1; }
  int cp_rank() const { return cp_.valid() ? cp_.rank() : 0; }
  int cp_size() const { return cp_.valid() ? cp_.size() : 1; }
  // Expert parallel: the ep group every sparse block dispatches over (null without ep), and
  // the group of ranks holding the same experts (their gradients reduce over it).
  const comm::ProcessGroup* ep_group() const { return ep_.valid() ? &ep_ : nullptr; }
  const comm::ProcessGroup* expert_dp_group() const { return edp_.valid() ? &edp_ : nullptr; }
  // cp: the context every chunk's attention runs with (null without cp).
  const attention::CpContext* cp_context() const { return cp_ctx_.get(); }
  // Every chunk's optimizer: the ranges of its buffer it updates (m and v hold them packed).
  const optim::AdamW& optimizer(int c) const { return *optimizers_.at(size_t(c)); }
  // ZeRO-2/3: chunk c's store (null otherwise).
  const ZeroStore* store(int c) const { return stores_.empty() ? nullptr : stores_.at(size_t(c)).get(); }
  // ECSS: chunk c's expert store (null with plan.ecss = "off").
  const optim::ExpertStore* expert_store(int c) const {
    return ecss_.empty() ? nullptr : ecss_.at(size_t(c)).get();
  }
  // ECSS lazy: every sparse block's per-expert update counts on this rank (layer -> (E)), and
  // setting them (resume; blocks this rank does not hold are ignored).
  std::map<int64_t, std::vector<int64_t>> ecss_expert_steps() const;
  void set_ecss_expert_steps(const std::map<int64_t, std::vector<int64_t>>& steps);
  int64_t step_count() const { return step_; }
  // Writes this rank's parameters into a full flat buffer in the global layout (tied copies
  // skipped unless asked), e.g. to gather or checkpoint by name. Collective over dp under
  // ZeRO-2/3, and over the ranks sharing the experts under ZeRO-1 with ECSS in bf16.
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

  // Sharded checkpoints: kinds "weights", "m" and "v" of each logical tensor, addressed as
  // elements [lo, hi) of this tp rank's local slice of it (`spec`, as ParamLayout gives it).
  // for_each_checkpoint_piece calls f for every piece this rank writes, pointing into the
  // executor's own buffers (no copies): over the whole run every element of every tensor is
  // written exactly once: replicated-over-tp tensors by tp rank 0, the head's tied copy never,
  // and among dp replicas each rank its share (ZeRO 0: an equal share of each chunk; ZeRO >= 1:
  // what its optimizer owns). Pointers stay valid until the next train_step or load.
  using PieceFn = std::function<void(const char* kind, const ParamSpec& spec, int64_t lo,
                                     int64_t hi, const float* data)>;
  void for_each_checkpoint_piece(const PieceFn& f) const;
  // Fills this rank's weights (and, with `moments`, its optimizer state and step count) with
  // read(kind, spec, lo, hi, dst): only what this rank holds is read (its chunks' tensors, the
  // tied copy from the embedding's tensor, ZeRO-3 its pieces, ZeRO >= 1 its moments).
  using ReadFn = std::function<void(const char* kind, const ParamSpec& spec, int64_t lo,
                                    int64_t hi, float* dst)>;
  void load_checkpoint(const ReadFn& read, bool moments, int64_t step);

 private:
  model::ModelConfig cfg_;
  ExecutorConfig ec_;
  comm::ProcessGroup pp_, embedding_, dp_, tp_, cp_;
  // Expert parallel (plan.ep > 1): the ep group (dispatch) and the ranks holding the same
  // experts (their gradient reduction), both split from dp_.
  comm::ProcessGroup ep_, edp_;
  std::unique_ptr<attention::CpContext> cp_ctx_;  // cp > 1: shared by every chunk
  attention::CpStats cp_stats_;                   // its counters (reset every step)
  // cp: this rank's inputs and targets (B, T/G) of window block `tokens` (B, T+1); else the
  // plain split. T is the global sequence length.
  void split_tokens(const int32_t* tokens, int64_t B, int64_t T, std::vector<int32_t>& inputs,
                    std::vector<int32_t>& targets) const;
  MemoryPool& pool_;
  parallel::PipelineSchedule schedule_;
  std::vector<std::unique_ptr<ZeroStore>> stores_;  // ZeRO-2/3 (one per chunk), else empty
  std::vector<std::unique_ptr<model::GptStage>> chunks_;
  std::vector<std::unique_ptr<optim::AdamW>> optimizers_;  // one per chunk, over its buffer
  // ZeRO-1 with the experts' masters outside the pool (ECSS in bf16): every other store's
  // masters of chunk c, broadcast over the ranks sharing the experts, each piece handed to
  // take(begin, end, masters) (collective over that group; this rank's own pieces are not).
  void broadcast_expert_masters(int c,
                                const std::function<void(int64_t, int64_t, const float*)>& take) const;
  // ECSS (plan.ecss != "off"): one per chunk (null where the chunk holds no experts); the
  // chunk's AdamW then covers its dense ranges only.
  std::vector<std::unique_ptr<optim::ExpertStore>> ecss_;
  // dp gradient buckets (ZeRO 0/1): per chunk the ready, not yet reduced ranges of its buffer,
  // merged when adjacent (begin -> end).
  std::vector<std::map<int64_t, int64_t>> ready_;
  std::vector<comm::Work> reductions_;  // dp all-reduces in flight this step
  void grad_ready(int chunk, int64_t begin, int64_t end);
  std::string where() const;  // "[rank r/w group]" for messages
  void reduce_range(int chunk, int64_t begin, int64_t end);
  int64_t step_ = 0;
};

}  // namespace loom::train
