// infer/weights.h: a model's weights prepared for inference, each linear in its storage format.
//
// Glossary: V vocab, L blocks, C d_model, KV kv width, F d_ff, S max_seq.
// Every linear of the decoder (q|k|v as one (C+2KV, C) matrix, attn.out (C,C), ffn.up (F,C),
// ffn.down (C,F), of every block and of the query layer) is stored as f32, bf16 or int8 per
// output row (kernels/cpu/weight_matmul.h), and so is the tied LM head (a second copy of the
// (V,C) token embedding in the head's format). Each is stored in the layout its kernel reads: bf16
// in AMX tile order (WeightLayout::amx_tiles) where kernels::amx_tiles_available says so, else in
// 16-column panels (WeightLayout::panels) where the AVX-512 kernel runs, except a view that
// weight_rows would slice off a 32-row (tiles) or 16-row (panels) boundary (the query layer's
// q|k|v at C/P), which stays in row order (the reference loop; a warning says so). Embedding and
// position tables,
// norms and biases stay f32 in one compact buffer; their offsets are the model's ParamLayout
// offsets (model/params.h) remapped into that buffer, so no layout is derived here.
//
// Tensor parallel (TpShard of size P > 1): the weights of tp rank r only, as model/params.h
// shards them (Megatron): q|k|v rows of its NH/P heads and NKV/P kv heads ((C+2KV)/P, C),
// attn.out columns (C, C/P), ffn.up rows (F/P, C), ffn.down columns (C, F/P), the token
// embedding's and the head's vocabulary rows (V/P, C); norms, position tables and the
// attn.out / ffn.down biases are replicated.
//
// Loading a checkpoint reads tensor by tensor (never the whole model in f32): the small tensors
// into their buffer, each linear into a one-linear f32 buffer that is then converted. A checkpoint
// written by `loom quantize` (checkpoint/sharded.h: I8 linears with F32 row scales) is loaded as
// stored: the linears are int8 whatever format is asked for (a warning says so if another is),
// with exactly the bytes and scales that quantizing its f32 source at load time gives, so its
// logits are bit-identical to the f32 source's loaded with --int8 (tp 1; under tp a column shard
// of attn.out / ffn.down keeps its whole rows' scales, where load-time quantization uses the
// shard's). BF16 / F16 checkpoints widen exactly and are then stored in the asked format.
//
// Sparse (MoE) blocks with the rre router: every expert's up and down linear is stored like the
// dense ones (BlockExperts); the routing table stays f32 with the norms. The topk router is
// refused (see the constructor).
//
// Ownership: ModelWeights owns every buffer; the views point into them (move-only).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "core/aligned.h"
#include "kernels/cpu/weight_matmul.h"
#include "model/config.h"
#include "model/params.h"

namespace loom::infer {

using kernels::WeightFormat;
using kernels::WeightView;

// True for the linear weights of the decoder: the (out, in) matrices of attn.q/k/v/out and
// ffn.up/down of every block and of the query layer (what --int8 and `loom quantize` quantize).
bool is_linear_weight(const std::string& name);

struct QuantizeResult {
  int64_t tensors = 0, quantized = 0;     // parameters written, of which linears converted
  int64_t linear_bytes_in = 0, linear_bytes_out = 0;  // the linears' stored bytes (+ scales)
  int64_t weight_bytes_in = 0, weight_bytes_out = 0;  // all weights' stored bytes (+ scales)
  uint64_t file_bytes_out = 0;                         // out_dir/model.safetensors
};
// `loom quantize`: writes the checkpoint at `checkpoint_dir` (flat or sharded, any layout) to
// `out_dir` (a flat checkpoint, streamed one tensor at a time, atomic) with every linear weight
// stored as `linears` (int8: I8 rows + F32 scales by kernels::quantize_rows_int8, the rule
// ModelWeights applies at load time; bf16: BF16, rounded to nearest even) and everything else as
// stored; config.toml and tokenizer/ copied, trainer_state.json records {"quantized": {"from",
// "linears"}}, optimizer state dropped. rre MoE models: every expert's up / down linear is
// converted like a dense linear (per output row), the routing table kept. Throws naming the
// problem (an already int8 source, f32 as the target, a topk MoE model).
QuantizeResult quantize_checkpoint(const std::string& checkpoint_dir, const std::string& out_dir,
                                   WeightFormat linears);

// "f32", "bf16", "int8"; weight_format_from_name throws naming the accepted names.
const char* weight_format_name(WeightFormat f);
WeightFormat weight_format_from_name(const std::string& name);

// The storage flags `loom generate`, `loom serve`, `loom eval loss` and `loom eval humaneval-x`
// share: --dtype f32|bf16 stores the linears and the tied head; --int8 puts the block linears and
// the head's copy of the token embedding in int8 rows (the embedding lookup keeps the f32 table);
// --head-dtype f32|bf16|int8 stores the head otherwise (auto: int8 with --int8, else --dtype's).
// --int8-head (kept from session 17, when the head stayed in --dtype under --int8) is
// --head-dtype int8 and needs --int8. `base` is --dtype's format (what --kv-dtype auto follows).
// Throws naming the flag for --dtype int8 (int8 is --int8), for --int8-head without --int8 and
// for --int8-head with another --head-dtype.
struct WeightFormats {
  WeightFormat linears = WeightFormat::f32, head = WeightFormat::f32, base = WeightFormat::f32;
  // --head-dtype auto: the head goes to int8 with the linears, also when they are int8 because
  // the checkpoint is (`loom quantize`), so that an int8 checkpoint runs as --int8 does.
  bool head_auto = false;
  // --batch-invariant: ModelWeights::set_batch_invariant (bf16 on AMX: batch 1 keeps the tiles).
  bool batch_invariant = false;
};
WeightFormats weight_formats_from_flags(const std::string& dtype, bool int8,
                                        bool int8_head = false,
                                        const std::string& head_dtype = "auto");

// The linears of one block: qkv (C+2KV, C) with q rows [0, C) and k, v rows after; out (C, C);
// up (F, C); down (C, F).
struct BlockLinears {
  WeightView qkv, out, up, down;
};

// The experts of a sparse (MoE, rre router) block: expert e's up (Fe, C) and down (C, Fe)
// linears in the linears' format, its up (Fe) and down (C) biases as offsets into
// ModelWeights::f32(), and the routing table (D, V) (f32 integers) at `table`. Empty for a dense
// block.
struct BlockExperts {
  std::vector<WeightView> up, down;
  std::vector<int64_t> up_b, down_b;
  int64_t table = -1;
  bool sparse() const { return !up.empty(); }
};

// Rows [r0, r0+n) of an (N, K) view as an (n, K) view.
WeightView weight_rows(const WeightView& w, int64_t r0, int64_t n);

class ModelWeights {
 public:
  // From the flat f32 buffer of ParamLayout(cfg, tp) (the whole model when tp.size == 1).
  ModelWeights(const model::ModelConfig& cfg, const float* flat, WeightFormat linears,
               WeightFormat head, model::TpShard tp = {});
  ModelWeights(ModelWeights&&) = default;
  ModelWeights& operator=(ModelWeights&&) = default;
  ModelWeights(const ModelWeights&) = delete;

  // Reads a loom checkpoint (interop::CheckpointReader: flat or sharded, checksums verified).
  // Under tp, reads only this rank's shard of every tensor.
  static ModelWeights load(const std::string& checkpoint_dir, WeightFormat linears,
                           WeightFormat head, model::TpShard tp = {});
  // The same with the flags' formats (weight_formats_from_flags): an int8 checkpoint under
  // head_auto stores the head in int8 too.
  static ModelWeights load(const std::string& checkpoint_dir, const WeightFormats& formats,
                           model::TpShard tp = {});

  const model::ModelConfig& config() const { return cfg_; }
  const model::TpShard& tp() const { return tp_; }
  WeightFormat linear_format() const { return linear_format_; }
  WeightFormat head_format() const { return head_.format; }

  // f32 tensors by their remapped offsets.
  const float* f32(int64_t offset) const { return small_.data() + offset; }
  const float* token_embedding() const { return f32(tok_); }     // (V/P,C) rows from V/P*rank
  const float* position_embedding() const { return f32(pos_); }  // (S,C)
  const float* final_norm_w() const { return f32(fnw_); }        // (C)
  const float* final_norm_b() const { return f32(fnb_); }        // (C)
  const float* query_position() const { return f32(qpos_); }     // (S,C), query layer only
  // Norm and bias offsets of block i into f32() (the w_* members are unused: -1).
  const model::BlockOffsets& block(int64_t i) const { return blocks_.at(size_t(i)); }
  const BlockLinears& block_linears(int64_t i) const { return linears_.at(size_t(i)); }
  // A sparse block's experts (MoE, rre only); BlockExperts::sparse() is false for dense blocks.
  const BlockExperts& block_experts(int64_t i) const { return experts_.at(size_t(i)); }
  const model::BlockOffsets& query_block() const { return qblock_; }
  const BlockLinears& query_linears() const { return qlinears_; }
  const WeightView& head() const { return head_; }  // (V/P,C)

  // Batch invariance of bf16 weights stored in AMX tile order (kernels::WeightView::
  // batch_invariant; f32, int8 and panel-order bf16 are batch invariant anyway). Off (the
  // default): a batch of one row reads them with vector loads, ~4% faster at batch-1 decode, and
  // its logits differ in the last bits from the same sequence's in a batch of two or more (within
  // bf16's tolerance); on: every row's bits are the same whatever the batch, so a seeded request
  // samples the same tokens alone or in company (what f32 always does). Sets every view's flag.
  void set_batch_invariant(bool on);
  bool batch_invariant() const { return head_.batch_invariant; }

  // Bytes a decode step reads from the linears and the head (each weight once; MoE: every
  // expert counted, an upper bound, since a step reads only the experts its tokens reach).
  int64_t matmul_weight_bytes() const { return matmul_bytes_; }

 private:
  // Where the weights come from: `f32(lo, hi, dst)` fills elements [lo, hi) of the flat f32
  // buffer of ParamLayout(cfg, tp); `int8(spec, q, scales)`, when set, gives a linear stored as
  // int8 rows (every linear then is).
  struct Source {
    std::function<void(int64_t lo, int64_t hi, float* dst)> f32;
    std::function<void(const model::ParamSpec&, int8_t*, float*)> int8;
  };
  ModelWeights(const model::ModelConfig& cfg, const Source& src, WeightFormat linears,
               WeightFormat head, model::TpShard tp);

  model::ModelConfig cfg_;
  model::TpShard tp_;
  WeightFormat linear_format_ = WeightFormat::f32;
  std::vector<float> small_;       // embeddings, norms, biases (f32)
  // The linears stream through the kernels every step: 64-byte (cache-line) aligned, 2 MiB
  // aligned when large (core/aligned.h).
  AlignedVector<float> lin_f32_;     // linears + head, f32 format
  AlignedVector<bf16> lin_bf16_;     // ... bf16 format
  AlignedVector<int8_t> lin_i8_;     // ... int8 format
  AlignedVector<float> lin_scales_;  // int8 row scales
  int64_t tok_ = 0, pos_ = 0, fnw_ = 0, fnb_ = 0, qpos_ = 0;
  std::vector<model::BlockOffsets> blocks_;
  std::vector<BlockLinears> linears_;
  std::vector<BlockExperts> experts_;  // (L), empty entries for dense blocks
  model::BlockOffsets qblock_{};
  BlockLinears qlinears_{};
  WeightView head_;
  int64_t matmul_bytes_ = 0;
};

}  // namespace loom::infer
