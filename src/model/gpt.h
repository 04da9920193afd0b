// model/gpt.h: the decoder-only transformer (GPT-2 / PanGu-α / CodeGeeX) with explicit forward
// and backward passes.
//
// Glossary: B batch, T sequence, N = B*T rows, C d_model, NH heads, NKV kv heads, HD head dim,
// KV = NKV*HD, F d_ff, V vocab, L blocks.
//
// Structure: embedding (token + position) -> L pre-LN blocks -> final norm -> [top query layer]
// -> tied LM head fused with cross-entropy. Each block saves exactly what its backward needs in a
// stash, or less, by recompute mode:
//   none:      everything (inputs of every matmul, norm statistics, attention output and lse).
//   selective: drops what elementwise ops rebuild cheaply (norm outputs, activation outputs).
//   full:      keeps only the block input; the block's forward runs again during backward.
// All three give bit-identical gradients (recompute runs the identical deterministic kernels).
//
// Precision: f32, or bf16 (bf16 matmul inputs with f32 accumulation; master weights, grads,
// norms, softmax and the loss in f32). Every buffer comes from the MemoryPool passed in:
// weights/grads at construction, activations (stash) and workspace per step.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "comm/process_group.h"
#include "core/memory_pool.h"
#include "core/tensor.h"
#include "model/config.h"
#include "model/params.h"

namespace loom::model {

struct BlockStash;  // model/block.h
struct BlockCtx;    // model/block.h

enum class Precision { f32, bf16 };
enum class Recompute { none, selective, full };
const char* recompute_name(Recompute r);
Recompute recompute_from_name(const std::string& s);  // throws naming the valid values

// Where the model finds its parameters, unit by unit: the ZeRO-2/3 hook (train/zero.h).
// Units tile the flat buffer in order: 0 the embeddings [token, position), 1..L the blocks,
// L+1 the head (final norm and the query layer). The model acquires a unit's weights right
// before using them and releases them right after (so a store can gather them just in time and
// free them), and reports when a unit's gradient got this micro-batch's last contribution.
class ParamStore {
 public:
  virtual ~ParamStore() = default;
  // f32 weights of unit u (pointer to its first element), valid until release(u). Calls nest:
  // each weights(u) is paired with one release(u).
  virtual const float* weights(int u) = 0;
  // The bf16 copy of unit u's weights (bf16 mode only), valid until release(u).
  virtual const bf16* weights_lp(int u) = 0;
  virtual void release(int u) = 0;
  // Gradient buffer of unit u for this micro-batch (zeroed on first use, accumulated into),
  // valid until grads_done(u), which the model calls after the unit's last contribution.
  virtual float* grads(int u) = 0;
  virtual void grads_done(int u) = 0;
};

struct UnitRange {
  int64_t begin = 0, end = 0;  // [begin, end) of the flat buffer
};

// bf16 mode runs "emulated" when kernels::bf16_matmul_path() is widen (oneDNN's f32 kernel is
// the faster one here): the model keeps its low-precision weight copy and matmul inputs as f32
// tensors holding bf16 values (rounded), and calls the f32 kernel on them: the identical numbers
// the widened bf16 matmul gives, without widening both operands on every call. Otherwise the
// copies are bf16 tensors. (ZeRO-2/3 stores and pipeline stages keep bf16 copies.)
bool bf16_emulated();
// Tests: 1 forces emulation on, 0 off, -1 back to the rule above. Affects models built after.
void set_bf16_emulation_for_testing(int mode);

// The units of a layout, in flat-buffer order (see ParamStore).
std::vector<UnitRange> param_units(const ModelConfig& cfg, const ParamLayout& layout);

// Splits (B, T+1) token windows into inputs (B,T) and next-token targets (B,T) (resized).
void split_windows(const int32_t* tokens, int64_t B, int64_t T, std::vector<int32_t>& inputs,
                   std::vector<int32_t>& targets);

struct LossSum {
  double sum = 0;     // summed cross-entropy (nats) over counted tokens
  int64_t count = 0;  // counted (non-ignored) target tokens
};

class Gpt {
 public:
  // Allocates weights (f32 master, plus a bf16 copy in bf16 mode: f32 rounded to bf16 values when
  // bf16_emulated()) and grads from `pool`.
  // Weights are uninitialised until init_weights() or a checkpoint load writes them.
  //
  // `tp` (optional, size P > 1): tensor parallel over that group. This rank holds its shards
  // (ParamLayout with TpShard, see params.h) and runs the blocks split Megatron-style with
  // sequence parallelism (block.h); the embedding and the tied head are vocabulary-parallel:
  // each rank looks up / scores only its V/P vocabulary rows, and the cross-entropy combines the
  // per-rank row max, sum of exponentials and target logit by all-reduces of O(rows) floats, so
  // logits are never gathered. Every member calls every method collectively with the same
  // tokens. B*T must be divisible by P. Losses are the whole model's on every tp rank.
  // Replicated parameters (norms, position tables, out/down biases) get per-rank partial
  // gradients: call reduce_replicated_grads() once before using the gradients.
  //
  // `store` (optional): the parameters live in the store (ZeRO-2/3), and the model allocates no
  // weights or grads of its own: weights() and grads() are null, init_weights() throws.
  Gpt(const ModelConfig& cfg, MemoryPool& pool, Precision precision,
      const comm::ProcessGroup* tp = nullptr, ParamStore* store = nullptr);
  ~Gpt();

  const ModelConfig& config() const { return cfg_; }
  const ParamLayout& layout() const { return layout_; }
  // The units (see ParamStore), in flat-buffer order.
  const std::vector<UnitRange>& units() const { return units_; }
  Precision precision() const { return precision_; }
  float* weights() const { return weights_.data<float>(); }  // (layout().total())
  float* grads() const { return grads_.data<float>(); }      // (layout().total())
  void init_weights(uint64_t seed);
  void zero_grads();
  const comm::ProcessGroup* tp() const { return tp_; }
  int tp_size() const { return tp_ ? tp_->size() : 1; }
  // tp: sums the replicated parameters' partial gradients over the tp group (one all-reduce of
  // their packed grads). No-op without tp.
  void reduce_replicated_grads();
  // Sum of squares of the whole model's gradient (tp: every tensor counted once, summed over
  // the group). Call after reduce_replicated_grads().
  double grad_sum_squares() const;
  // Refreshes the bf16 copy from the f32 master weights (call after every weight update; no-op
  // in f32 mode).
  void sync_low_precision_weights();

  // Recompute mode per block (size L); the query layer uses the last entry's mode.
  void set_recompute(Recompute mode);
  void set_recompute(const std::vector<Recompute>& per_layer);

  // One micro-batch: tokens (B, T+1) int32, inputs [:, :T], targets [:, 1:] (targets < 0 are
  // ignored). Runs forward and backward, ACCUMULATING into grads() the gradient of
  // grad_scale * (summed loss). Returns the summed loss and token count. Throws loom::Error on
  // T > max_seq or token ids outside [0, V) (before anything is modified).
  LossSum forward_backward(const int32_t* tokens, int64_t B, int64_t T, float grad_scale);
  // Forward only (evaluation): the summed loss. Allocates no gradient-sized buffers.
  LossSum forward_loss(const int32_t* tokens, int64_t B, int64_t T);
  // Logits of the last position of each row: inputs (B, T) -> logits (B, V) f32. (Not under tp.)
  void last_logits(float* logits, const int32_t* inputs, int64_t B, int64_t T);
  // Full logits for every position (tests): inputs (B,T) -> logits (B,T,V).
  void all_logits(float* logits, const int32_t* inputs, int64_t B, int64_t T);

  MemoryPool& pool() const { return pool_; }

  // Called during forward_backward each time a contiguous range [begin, end) of grads() has
  // received this micro-batch's last contribution, in backward order (query layer, final norm,
  // blocks L-1..0, embeddings), so data parallelism can start reducing it while backward goes
  // on. The ranges tile [0, layout().total()).
  using GradReadyHook = std::function<void(int64_t begin, int64_t end)>;
  void set_grad_ready_hook(GradReadyHook hook) { grad_ready_ = std::move(hook); }

 private:
  void check_inputs(const int32_t* tokens, int64_t B, int64_t T, int64_t row_stride) const;
  void check_tp_rows(int64_t B, int64_t T) const;
  // Runs embedding -> blocks -> final norm -> query layer; returns the (N,C) head input.
  Tensor forward_trunk(const int32_t* inputs, int64_t B, int64_t T, bool keep_stash);
  void backward_trunk(Tensor& dout, const int32_t* inputs, int64_t B, int64_t T);

  // Unit access through the store, or the model's own buffers.
  const float* unit_w(int u);
  const bf16* unit_wl(int u);
  const float* unit_wr(int u);  // emulated bf16: the rounded f32 weights (else null)
  void unit_release(int u);
  float* unit_g(int u);
  void unit_grads_done(int u);
  BlockCtx block_ctx(int u, bool with_grads, int64_t B, int64_t T);

  // Vocabulary-parallel embedding lookup (tp): this rank's rows (Nl,C) of token + position.
  // The tied head + cross-entropy on the head input `out` (this rank's rows); with dout, writes
  // the gradient of grad_scale * (loss sum) into dout (same rows) and accumulates dwte.
  LossSum head_loss(const Tensor& out, const int32_t* targets, int64_t B, int64_t T,
                    float grad_scale, Tensor* dout);

  ModelConfig cfg_;
  const comm::ProcessGroup* tp_ = nullptr;
  ParamLayout layout_;
  std::vector<UnitRange> units_;
  ParamStore* store_ = nullptr;
  MemoryPool& pool_;
  Precision precision_;
  bool emulated_ = false;  // bf16 emulated on f32 (see bf16_emulated())
  Tensor weights_, grads_, weights_lp_;  // weights_lp_: bf16, or f32 rounded when emulated
  std::vector<Recompute> recompute_;
  std::vector<std::unique_ptr<BlockStash>> stashes_;  // L blocks + query layer
  Tensor final_in_, final_out_, final_mean_, final_rstd_;
  GradReadyHook grad_ready_;
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
