// model/stage.h: THE model executor. A stage owns blocks [a, b) of the GPT (PanGu-α / CodeGeeX
// family) and, where its span holds them, the embeddings (token + position), the final norm,
// the top query layer and the tied LM head fused with the cross-entropy. The whole model is the
// one-stage case (model/gpt.h wraps it for single-process use); a pipeline runs one stage per
// virtual stage (train/executor.h). Forward and backward are explicit; every buffer comes from
// the MemoryPool passed in.
//
// Glossary: B batch, T sequence, N = B*T rows, Nl = N/tp rows of the residual stream here, C
// d_model, V vocab, L blocks, mb micro-batch id.
//
// Parameters: ONE flat f32 buffer (and grads, and a low-precision copy in bf16 mode) holding only
// the stage's tensors, in the global ParamLayout's order (model/geometry.h gives every offset).
// The tied token embedding: both the first stage (embedding) and the last stage (LM head) hold a
// copy when they differ; their gradients are summed by the executor before the optimizer step.
//
// Units (model/geometry.h) are the granularity of ZeRO and of gradient buckets. With a
// ParamStore (ZeRO-2/3, train/zero.h) the stage allocates no weights or grads: it acquires each
// unit just before use and reports each unit's gradient complete. The token embedding's gradient
// is reported complete after the head's contribution (in forward) and again after the
// embedding's (in backward), so no unit stays open across micro-batches.
//
// Recompute is chosen per block (parallel::Recompute); each block saves exactly what its
// backward needs in a stash, by mode:
//   none:      everything (inputs of every matmul, norm statistics, attention output and lse).
//   selective: drops what elementwise ops rebuild cheaply (norm outputs, activation outputs).
//   full:      keeps only the block input; the block's forward runs again during backward.
// All three give bit-identical gradients (recompute runs the identical deterministic kernels).
//
// Precision: f32, or bf16 (bf16 matmul inputs with f32 accumulation; master weights, grads,
// norms, softmax and the loss in f32). Same seed, same layout: bit-identical results; a pipeline's
// activations and per-micro-batch gradients are bit-identical to the one-stage model's.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "attention/context_parallel.h"
#include "comm/process_group.h"
#include "core/memory_pool.h"
#include "core/tensor.h"
#include "model/config.h"
#include "model/geometry.h"
#include "model/params.h"
#include "parallel/plan.h"

namespace loom::model {

struct BlockStash;  // model/block.h
struct MoeStats;    // model/moe.h
struct BlockCtx;    // model/block.h

enum class Precision { f32, bf16 };
using parallel::Recompute;
using parallel::recompute_from_name;
using parallel::recompute_name;

// Where a stage finds its parameters, unit by unit: the ZeRO-2/3 hook (train/zero.h). The stage
// acquires a unit's weights right before using them and releases them right after (so a store
// can gather them just in time and free them), and reports when a unit's gradient got a
// contribution.
class ParamStore {
 public:
  virtual ~ParamStore() = default;
  // f32 weights of unit u (pointer to its first element), valid until release(u). Calls nest:
  // each weights(u) is paired with one release(u).
  virtual const float* weights(int u) = 0;
  // The bf16 copy of unit u's weights (bf16 mode only), valid until release(u).
  virtual const bf16* weights_lp(int u) = 0;
  virtual void release(int u) = 0;
  // Gradient buffer of unit u for this contribution (zeroed on first use, accumulated into),
  // valid until grads_done(u).
  virtual float* grads(int u) = 0;
  virtual void grads_done(int u) = 0;
};

// bf16 mode runs "emulated" when kernels::bf16_matmul_path() is widen (no AMX, see
// kernels/cpu/matmul.h): a stage that owns its parameters keeps its low-precision weight copy and
// matmul inputs as f32 tensors holding bf16 values (rounded), and calls the f32 kernel on them:
// the identical numbers the widened bf16 matmul gives, without widening both operands on every
// call. Otherwise (and under a ParamStore) the copies are bf16 tensors.
bool bf16_emulated();
// Tests: 1 forces emulation on, 0 off, -1 back to the rule above. Affects stages built after.
void set_bf16_emulation_for_testing(int mode);

// Splits (B, T+1) token windows into inputs (B,T) and next-token targets (B,T) (resized).
void split_windows(const int32_t* tokens, int64_t B, int64_t T, std::vector<int32_t>& inputs,
                   std::vector<int32_t>& targets);

struct LossSum {
  double sum = 0;     // summed cross-entropy (nats) over counted tokens
  int64_t count = 0;  // counted (non-ignored) target tokens
};

class GptStage {
 public:
  // Allocates this span's weights (f32, plus the low-precision copy in bf16 mode) and zeroed
  // grads from `pool`. Weights are uninitialised until init_weights() or import_weights().
  // Throws loom::Error for a span outside [0, L) or an embedding / head on a span that does not
  // start at 0 / end at L.
  //
  // `tp` (optional, size P > 1): tensor parallel over that group. This rank holds its shards
  // (ParamLayout with TpShard) and runs the blocks split Megatron-style with sequence
  // parallelism (block.h); the embedding and the tied head are vocabulary-parallel, and the
  // cross-entropy combines per-rank statistics by all-reduces of O(rows) floats (head.h). Every
  // member calls every method collectively with the same tokens. B*T must be divisible by P.
  // Activations in and out are this rank's N/P rows. Replicated parameters (norms, position
  // tables, out/down biases) get per-rank partial gradients: the executor sums them over tp.
  //
  // `store` (optional): the parameters live there; weights() and grads() are then null and
  // init/import/export/zero_grads are the store's owner's business.
  //
  // `ep` (optional, size P > 1): expert parallel over that group (model/moe.h): this rank holds
  // experts [r*E/P, (r+1)*E/P) of every sparse block (StageGeometry with EpShard) and each sparse
  // block exchanges its dispatched rows with the group by all-to-all(v), forward and backward.
  // Every member calls forward/backward/forward_eval collectively (each on its own tokens).
  //
  // `expert_masters_outside` (bf16, no store; ECSS, train/executor.h): the f32 buffer omits
  // ecss_master_holes() (the experts' weight matrices); their f32 masters live in the caller's
  // host store, reached through set_hole_masters(), and only their bf16 compute copies are in
  // the pool. weights() is then null: use master_at(), to_full() and from_full().
  GptStage(const ModelConfig& cfg, const StageSpan& span, MemoryPool& pool, Precision precision,
           const comm::ProcessGroup* tp = nullptr, ParamStore* store = nullptr,
           const comm::ProcessGroup* ep = nullptr, bool expert_masters_outside = false);
  ~GptStage();
  GptStage(const GptStage&) = delete;
  GptStage& operator=(const GptStage&) = delete;

  const StageGeometry& geometry() const { return geo_; }
  const ModelConfig& config() const { return cfg_; }
  const StageSpan& span() const { return geo_.span(); }
  const ParamLayout& global_layout() const { return geo_.global(); }
  const comm::ProcessGroup* tp() const { return tp_; }
  int tp_size() const { return tp_ ? tp_->size() : 1; }
  const comm::ProcessGroup* ep() const { return ep_; }
  int ep_size() const { return ep_ ? ep_->size() : 1; }

  // Context parallel (null: none; the executor owns the context, which must outlive the stage's
  // use). With a cp group of G ranks, forward/backward/forward_eval take this rank's share of
  // every sequence: T is T_global / G rows in the context's layout (inputs and targets from
  // attention::cp_next_token_split), the position tables are read at the rows' global positions
  // (cp_position_ids), attention runs over the group and the loss covers this rank's tokens
  // (the executor sums it over dp x cp). Every cp member calls collectively. T_global must be
  // <= max_seq.
  void set_context_parallel(const attention::CpContext* cp) {
    if (cp) cfg_.check_context_parallel(cp->group.size());  // topk refused under cp
    cp_ = cp;
  }
  const attention::CpContext* context_parallel() const { return cp_; }
  int cp_size() const { return cp_ ? cp_->group.size() : 1; }
  Precision precision() const { return precision_; }
  const std::vector<StageParam>& params() const { return geo_.params(); }
  const StageParam& find(const std::string& name) const { return geo_.find(name); }
  int64_t total() const { return geo_.total(); }  // elements of the stage's flat buffer
  std::vector<std::pair<int64_t, int64_t>> held_ranges() const { return geo_.held_ranges(); }
  const std::vector<UnitRange>& units() const { return geo_.units(); }
  int token_unit() const { return geo_.token_unit(); }
  // (total()); null when the buffer has holes (expert_masters_outside) or under a store.
  float* weights() const { return holes_ ? nullptr : weights_.data<float>(); }
  float* grads() const { return grads_.data<float>(); }      // (total())
  // Local offset of embed.token.weight (V,C); -1 if the stage holds neither end.
  int64_t token_embedding() const { return geo_.token_embedding(); }

  void zero_grads();
  // Same logical initial weights at every layout (each tensor's Philox stream is named by its
  // global name).
  void init_weights(uint64_t seed);
  // Copies this stage's tensors from / to a full flat buffer in the global layout. export skips
  // tied copies unless `include_tied_copy`.
  void import_weights(const float* global_weights);
  void export_weights(float* global_weights, bool include_tied_copy = false) const;
  // Refreshes the low-precision copy from the f32 master weights (after every update; no-op in
  // f32 mode or under a store). With holes: the elements outside them (the holes' copies are
  // written by write_compute).
  void sync_low_precision_weights();

  // Holes (expert_masters_outside): null without. `load` takes the holes' f32 masters from a
  // buffer in this stage's layout (total() elements), `save` writes them into one; both must be
  // set before the weights are initialised, imported or exported.
  const HoleyLayout* holes() const { return holes_.get(); }
  void set_hole_masters(std::function<void(const float*)> load, std::function<void(float*)> save);
  // The f32 weight of element x of the stage's buffer (outside the holes).
  float* master_at(int64_t x) const;
  // All total() f32 weights in the stage's layout (the holes' from their masters where the
  // store has them, else their bf16 copies widened), and back (the holes' to their masters;
  // every low-precision copy refreshed).
  void to_full(float* full) const;
  void from_full(const float* full);
  // Elements [begin, end) were updated elsewhere (an expert store) to `src`: writes them where
  // the stage keeps them (f32, and for hole elements their low-precision copy only); returns
  // the bytes written. Without holes the f32 buffer (sync_low_precision_weights() follows).
  int64_t write_compute(int64_t begin, int64_t end, const float* src);

  // Recompute per block, indexed by the model's block number (size L); the query layer follows
  // the last block's mode. One mode for all: set_recompute(mode).
  void set_recompute(Recompute mode);
  void set_recompute(const std::vector<Recompute>& per_layer);

  // Without a store: called with [begin, end) of this stage's buffer each time a unit's gradient
  // got its last contribution of the running forward (the head's tied copy) or backward, so a
  // caller can start reducing it (null: none). Ranges of one micro-batch tile the buffer.
  using GradReadyHook = std::function<void(int64_t begin, int64_t end)>;
  void set_grad_ready_hook(GradReadyHook hook) { grad_ready_ = std::move(hook); }

  // Forward of micro-batch `mb`. inputs (B,T) int32 are read on the embedding stage (and kept
  // for its backward); otherwise `x` (Nl,C) is the previous stage's output. On the head stage
  // `targets` (B,T) (< 0 ignored) give the loss: the fused head + cross-entropy also runs its
  // backward at once, accumulating grad_scale * d(loss sum) into the tied embedding's grad and
  // keeping d(head input) for backward(mb); it returns an undefined tensor and writes *loss.
  // Otherwise returns the stage output (Nl,C). Stashes what backward needs under `mb`; a
  // micro-batch id already in flight is an error. Throws loom::Error on T > max_seq or token ids
  // outside [0, V) before anything is modified.
  //
  // Sparse (MoE) blocks (model/moe.h): a stage holding any reads `inputs` too (the rre router
  // routes by token id) and `domains` (B,T) int32, each input token's domain index into
  // cfg.moe.domains (ModelConfig::language_domains() maps languages); null domains put every
  // token in the "other" domain. The topk aux loss's gradient is weighted grad_scale * B*T (it
  // averages like the loss); its value and the routing counters go to moe_stats().
  Tensor forward(int mb, const int32_t* inputs, const int32_t* targets, const Tensor& x, int64_t B,
                 int64_t T, float grad_scale, LossSum* loss, const int32_t* domains = nullptr);
  // Evaluation: the same forward without a stash or any gradient (the head stage only scores
  // the targets into *loss). Any micro-batch may be in flight meanwhile.
  Tensor forward_eval(const int32_t* inputs, const int32_t* targets, const Tensor& x, int64_t B,
                      int64_t T, LossSum* loss, const int32_t* domains = nullptr);
  // Backward of micro-batch `mb`: `dy` (Nl,C) is the gradient of the stage output (ignored on
  // the head stage, which uses its stash). ACCUMULATES parameter grads, frees the stash and
  // returns d(input) (Nl,C), or an undefined tensor on the embedding stage.
  Tensor backward(int mb, Tensor& dy);
  int in_flight() const { return int(stash_.size()); }

  // Inference on the whole model (one stage, no tp): logits (B,T,V) of every position, or (B,V)
  // of each row's last position when `last_only`, for inputs (B,T).
  void logits(float* out, const int32_t* inputs, int64_t B, int64_t T, bool last_only,
              const int32_t* domains = nullptr);

  // Routing counters of this stage's sparse blocks since the last reset (training forwards).
  const MoeStats& moe_stats() const;
  void reset_moe_stats();
  bool has_sparse_blocks() const;

 private:
  struct MicroStash;
  // Embedding (or the input x) -> blocks -> [final norm -> query layer]: the stage output, or
  // on the head stage the head input (Nl,C). `st` null: evaluation (nothing kept).
  Tensor run_trunk(const int32_t* inputs, const int32_t* domains, const Tensor& x, int64_t B,
                   int64_t T, float grad_scale, MicroStash* st);
  Tensor forward_impl(int mb, const int32_t* inputs, const int32_t* targets, const Tensor& x,
                      int64_t B, int64_t T, float grad_scale, LossSum* loss, bool train,
                      const int32_t* domains);
  void check_tokens(const int32_t* ids, int64_t n, int64_t T, bool inputs) const;
  // Unit access, direct or through the store.
  const float* unit_w(int u);
  const bf16* unit_wl(int u);
  const float* unit_wr(int u);  // emulated bf16: the rounded f32 weights (else null)
  void unit_release(int u);
  float* unit_g(int u);
  // A contribution to unit u's gradient is complete; `final`: the micro-batch adds no more.
  void unit_grads_done(int u, bool final = true);
  BlockCtx ctx(int u, bool with_grads, int64_t B, int64_t T);
  BlockCtx plain_ctx(int64_t B, int64_t T) const;  // no weights: tp, pool and sizes only

  // cp: the global positions (T) of this rank's T local rows (cached per T); null without cp.
  const int64_t* positions(int64_t T) const;

  ModelConfig cfg_;
  const comm::ProcessGroup* tp_ = nullptr;
  const comm::ProcessGroup* ep_ = nullptr;
  const attention::CpContext* cp_ = nullptr;
  mutable std::vector<int64_t> positions_;  // (T) for the last T asked
  ParamStore* store_ = nullptr;
  StageGeometry geo_;
  MemoryPool& pool_;
  Precision precision_;
  bool emulated_ = false;  // bf16 emulated on f32 (see bf16_emulated())
  std::vector<Recompute> recompute_;  // (L)
  Tensor weights_, grads_, weights_lp_;  // weights_lp_: bf16, or f32 rounded when emulated
  std::unique_ptr<HoleyLayout> holes_;    // weights_ packed without them (null: none)
  std::function<void(const float*)> load_hole_masters_;
  std::function<void(float*)> save_hole_masters_;
  // Low-precision copy of f32 values src[0, n) into elements [x, x + n) of weights_lp_.
  void to_low_precision(const float* src, int64_t x, int64_t n);
  std::map<int, std::unique_ptr<MicroStash>> stash_;
  GradReadyHook grad_ready_;
  std::unique_ptr<MoeStats> moe_stats_;
};

// tp: the logical (tp = 1) flat buffer assembled from every tp rank's shard buffer `local`
// (weights, grads or optimizer moments in `mine`'s layout). Collective over tp; every rank
// receives it.
std::vector<float> gather_tp_buffer(const ModelConfig& cfg, const ParamLayout& mine,
                                    const float* local, const comm::ProcessGroup& tp);

// tp: replicated tensors (norms, position tables, out/down biases) get partial gradients from
// each rank's rows. Sums, over tp, those among `specs` (offsets into a flat buffer) that lie in
// [begin, end) of that buffer, whose element `begin` is at grads[0]: one all-reduce of their
// packed values. Collective over tp (every member passes the same specs and range).
void sum_replicated_grads(const std::vector<ParamSpec>& specs, float* grads, int64_t begin,
                          int64_t end, const comm::ProcessGroup& tp);

}  // namespace loom::model
