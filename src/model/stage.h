// model/stage.h: one pipeline stage of the GPT (a contiguous range of blocks, plus the embedding
// on the first stage and the final norm, query layer and tied head + loss on the last stage),
// owning only its own parameters.
//
// Glossary: B batch, T sequence, N = B*T rows, C d_model, V vocab, L blocks, pp pipeline stages,
// VS virtual stages per rank (interleaving; "chunks"), mb micro-batch index, layer group one
// contiguous range of blocks held by one virtual stage.
//
// Parameters: the stage allocates ONE flat f32 buffer (and grads, and a bf16 copy in bf16 mode)
// holding only the tensors it uses, in the global ParamLayout's order. Each tensor keeps its
// global name, shape, global offset and init rule (StageParam), so checkpoints and tests can
// move weights by name between layouts. The tied token embedding is the exception: both the
// first stage (embedding) and the last stage (LM head) hold a copy; their gradients must be
// summed across the two before the optimizer step (Megatron's embedding group), after which
// the two copies stay bit-identical.
//
// Units (for a ParamStore, model/gpt.h): the stage's buffer is tiled by units in order: the
// token embedding (on the embedding stage, or the head stage's tied copy), the position
// embedding (embedding stage), one unit per block, and the head (final norm and query layer).
// With a store (ZeRO-2/3, train/zero.h) the stage allocates no weights or grads: it acquires
// each unit just before use and reports each unit's gradient complete. The tied token
// embedding's gradient is reported complete after the head's contribution (in forward) and
// again after the embedding's (in backward), so no unit stays open across micro-batches.
//
// Numerics: the same kernels in the same order as model::Gpt, so a pipeline's activations and
// per-micro-batch gradients are bit-identical to the serial model's; only the order in which
// micro-batch gradients of the tied embedding are summed differs.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "core/memory_pool.h"
#include "core/tensor.h"
#include "model/config.h"
#include "model/gpt.h"
#include "model/params.h"

namespace loom::model {

struct BlockStash;  // model/block.h
struct BlockCtx;    // model/block.h

// The part of the model one (virtual) stage holds.
struct StageSpan {
  int64_t first_layer = 0;  // blocks [first_layer, last_layer)
  int64_t last_layer = 0;
  bool has_embedding = false;  // token + position embedding (the first virtual stage)
  bool has_head = false;       // final norm, query layer, tied head + loss (the last one)
  bool operator==(const StageSpan&) const = default;
};

// Splits the L blocks into `n_stages` spans in order. `stage_layers` (size n_stages, each >= 1,
// summing to L) gives uneven splits; empty means an even split, which needs n_stages | L.
// Throws loom::Error naming the bad entry and the valid values.
std::vector<StageSpan> split_stages(const ModelConfig& cfg, int64_t n_stages,
                                    const std::vector<int64_t>& stage_layers = {});

// One parameter tensor of a stage: its global spec (name, shape, global offset, init, decay)
// and where it lives in the stage's own flat buffer.
struct StageParam {
  ParamSpec global;
  int64_t local_offset = 0;
  // True for the last stage's copy of embed.token.weight when another stage holds the
  // embedding: its gradient is summed across the two, and it is counted once in norms and
  // checkpoints (the first stage's copy is the one that counts).
  bool tied_copy = false;
};

class GptStage {
 public:
  // Allocates this span's weights (f32, plus bf16 in bf16 mode) and zeroed grads from `pool`.
  // Weights are uninitialised until init_weights() or import_weights(). Throws loom::Error for
  // a span outside [0, L) or an embedding / head on a span that does not start at 0 / end at L.
  //
  // `tp` (optional): tensor parallel as model::Gpt (this rank's shards; the "global layout"
  // below is then this tp rank's layout, ParamLayout(cfg, TpShard), and activations in and out
  // are this rank's N/tp rows).
  //
  // `store` (optional): the parameters live there (units as above); weights() and grads() are
  // then null and init/import/export/zero_grads are the store's owner's business.
  GptStage(const ModelConfig& cfg, const StageSpan& span, MemoryPool& pool, Precision precision,
           const comm::ProcessGroup* tp = nullptr, ParamStore* store = nullptr);
  ~GptStage();
  GptStage(const GptStage&) = delete;
  GptStage& operator=(const GptStage&) = delete;

  const ModelConfig& config() const { return cfg_; }
  const StageSpan& span() const { return span_; }
  const ParamLayout& global_layout() const { return global_; }
  const comm::ProcessGroup* tp() const { return tp_; }
  const std::vector<StageParam>& params() const { return params_; }
  const StageParam& find(const std::string& name) const;     // throws naming the stage's span
  int64_t total() const { return total_; }                   // elements of the stage's flat buffer
  // The ascending ranges [begin, end) of the global flat buffer this stage holds.
  std::vector<std::pair<int64_t, int64_t>> held_ranges() const;
  // The units tiling [0, total()) (see above), in order.
  const std::vector<UnitRange>& units() const { return units_; }
  // Unit index of the token embedding (or the head's tied copy); -1 if neither is held.
  int token_unit() const { return u_tok_; }
  float* weights() const { return weights_.data<float>(); }  // (total())
  float* grads() const { return grads_.data<float>(); }      // (total())
  // Local offset of embed.token.weight (V,C); -1 if the stage holds neither end.
  int64_t token_embedding() const { return tok_; }

  void zero_grads();
  // Same logical initial weights as Gpt::init_weights(seed) (each tensor's Philox stream is
  // named by its global name). Uses a temporary (layout().total()) f32 workspace buffer.
  void init_weights(uint64_t seed);
  // Copies this stage's tensors from / to a full flat buffer in the global layout. export skips
  // tied copies unless `include_tied_copy`.
  void import_weights(const float* global_weights);
  void export_weights(float* global_weights, bool include_tied_copy = false) const;
  // The same between a full global-layout buffer and a buffer in this stage's layout (total()).
  void to_local(const float* global_buffer, float* local_buffer) const;
  void to_global(const float* local_buffer, float* global_buffer, bool include_tied_copy) const;
  // Initial values of elements [begin, end) of this stage's buffer (as init_weights) into dst.
  void init_range(float* dst, int64_t begin, int64_t end, uint64_t seed) const;
  void sync_low_precision_weights();
  void set_recompute(Recompute mode) { recompute_ = mode; }
  // Without a store: called with [begin, end) of this stage's buffer each time a unit's gradient
  // got its last contribution of the running forward (the head's tied copy) or backward, so a
  // caller can start reducing it (null: none). Ranges of one micro-batch tile the buffer.
  using GradReadyHook = std::function<void(int64_t begin, int64_t end)>;
  void set_grad_ready_hook(GradReadyHook hook) { grad_ready_ = std::move(hook); }

  // Forward of micro-batch `mb`. inputs (B,T) int32 are read on the embedding stage (and kept
  // for its backward); otherwise `x` (N,C) is the previous stage's output. On the head stage
  // `targets` (B,T) (< 0 ignored) give the loss: the fused head + cross-entropy also runs its
  // backward at once (as Gpt does), accumulating grad_scale * d(loss sum) into the tied
  // embedding's grad and keeping d(head input) for backward(mb); it returns an undefined
  // tensor and writes *loss. Otherwise returns the stage output (N,C). Stashes what backward
  // needs under `mb`; a micro-batch id already in flight is an error.
  Tensor forward(int mb, const int32_t* inputs, const int32_t* targets, const Tensor& x, int64_t B,
                 int64_t T, float grad_scale, LossSum* loss);
  // Evaluation: the same forward without a stash or any gradient (the head stage only scores
  // the targets into *loss). Needs no backward; any micro-batch may be in flight meanwhile.
  Tensor forward_eval(const int32_t* inputs, const int32_t* targets, const Tensor& x, int64_t B,
                      int64_t T, LossSum* loss);
  // Backward of micro-batch `mb`: `dy` (N,C) is the gradient of the stage output (ignored on
  // the head stage, which uses its stash; its buffer is reused). ACCUMULATES parameter grads,
  // frees the stash and returns d(input) (N,C), or an undefined tensor on the embedding stage.
  Tensor backward(int mb, Tensor& dy);
  int in_flight() const { return int(stash_.size()); }

 private:
  struct MicroStash;
  Tensor forward_impl(int mb, const int32_t* inputs, const int32_t* targets, const Tensor& x,
                      int64_t B, int64_t T, float grad_scale, LossSum* loss, bool train);
  int64_t local(int64_t global_offset) const;  // LOOM_ASSERTs the offset is held
  BlockOffsets local_block(const BlockOffsets& g) const;
  // Unit access, direct or through the store (as model::Gpt).
  const float* unit_w(int u);
  const bf16* unit_wl(int u);
  void unit_release(int u);
  float* unit_g(int u);
  // A contribution to unit u's gradient is complete; `final`: the micro-batch adds no more.
  void unit_grads_done(int u, bool final = true);
  BlockCtx ctx(int u, bool with_grads, int64_t B, int64_t T);
  BlockCtx plain_ctx(int64_t B, int64_t T) const;  // no weights: tp, pool and sizes only

  ModelConfig cfg_;
  const comm::ProcessGroup* tp_ = nullptr;
  ParamStore* store_ = nullptr;
  ParamLayout global_;
  StageSpan span_;
  MemoryPool& pool_;
  Precision precision_;
  Recompute recompute_ = Recompute::none;
  std::vector<StageParam> params_;
  struct Segment {
    int64_t global_begin, global_end, local_begin;
  };
  std::vector<Segment> segments_;  // ascending global ranges held, packed in order
  int64_t total_ = 0;
  int64_t tok_ = -1, pos_ = -1, fnw_ = -1, fnb_ = -1, qpos_ = -1;
  std::vector<BlockOffsets> blocks_;  // local offsets, blocks first_layer..last_layer-1
  BlockOffsets qblock_{};
  std::vector<UnitRange> units_;
  int u_tok_ = -1, u_pos_ = -1, u_block0_ = 0, u_head_ = -1;
  Tensor weights_, grads_, weights_lp_;
  std::map<int, std::unique_ptr<MicroStash>> stash_;
  GradReadyHook grad_ready_;
};

}  // namespace loom::model
