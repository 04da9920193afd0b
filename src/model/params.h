// model/params.h: the named parameter tensors of a model, laid out in one flat f32 buffer.
//
// Every parameter is a view of one flat buffer (llm.c style), which makes the optimizer, the
// gradient all-reduce, ZeRO sharding and checkpointing loops over one range. Names and shapes are
// fixed by the checkpoint format (linear weights are (out, in)). Inside a block, q, k and v
// weights are adjacent, so together they form one (C+2KV, C) matrix and q/k/v is one matmul;
// likewise their biases.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "core/param_spec.h"
#include "core/tensor.h"
#include "model/config.h"

namespace loom::model {

// ParamSpec, InitKind and for_each_global_run live in core/param_spec.h (optim/ and checkpoint/
// use them without seeing the model).
using loom::for_each_global_run;
using loom::InitKind;
using loom::ParamSpec;
using loom::TpShard;

// Offsets (into the flat buffer) of one block's tensors, in the fixed order below.
struct BlockOffsets {
  int64_t norm1_w, norm1_b;
  int64_t w_qkv;   // q (C,C) then k (KV,C) then v (KV,C): one (C+2KV, C) matrix
  int64_t b_qkv;   // (C+2KV)
  int64_t w_out, b_out;
  int64_t norm2_w, norm2_b;
  int64_t w_up, b_up;      // (F,C), (F)
  int64_t w_down, b_down;  // (C,F), (C)
  // Sparse (MoE) blocks (model/moe.h) have no dense FFN: w_up, b_up, w_down, b_down are -1 and
  // the experts lie contiguous from moe_experts, expert e at moe_experts + e * stride with
  // stride = moe_expert_stride(cfg): up.weight (Fe,C), up.bias (Fe), down.weight (C,Fe),
  // down.bias (C). moe_gate: topk gate weight (E,C); moe_table: rre table (D,V), frozen.
  // Absent ones are -1. Under expert parallelism (StageGeometry with EpShard) a stage holds only
  // experts [moe_expert0, moe_expert0 + moe_n_experts): moe_experts is then where expert
  // moe_expert0 starts and expert e lies at moe_experts + (e - moe_expert0) * stride. The whole
  // model's layout holds all: moe_expert0 = 0, moe_n_experts = E.
  int64_t moe_experts = -1, moe_gate = -1, moe_table = -1;
  int64_t moe_expert0 = 0, moe_n_experts = 0;
  // Elements of one expert's tensors in this layout: 2*Fl*C + Fl + C with Fl = expert_d_ff / tp
  // (under tp an expert's up projection is column-split and its down projection row-split like
  // the dense FFN; the down bias is replicated).
  int64_t moe_stride = 0;
  bool sparse() const { return moe_experts >= 0; }
};

// Elements of one expert's tensors at tp size `tp`: 2*Fl*C + Fl + C, Fl = Fe / tp.
inline int64_t moe_expert_stride(const ModelConfig& cfg, int tp = 1) {
  const int64_t Fl = cfg.moe.expert_d_ff / tp;
  return 2 * Fl * cfg.d_model + Fl + cfg.d_model;
}

// One past the block's last element (its tensors are contiguous from norm1_w).
inline int64_t block_end(const BlockOffsets& o, const ModelConfig& cfg) {
  if (!o.sparse()) return o.b_down + cfg.d_model;
  if (o.moe_table >= 0) return o.moe_table + cfg.moe.num_domains() * cfg.vocab;
  return o.moe_experts + o.moe_n_experts * o.moe_stride;
}

// Offset of expert e's first tensor (up.weight); e must be one of the held experts.
inline int64_t moe_expert_offset(const BlockOffsets& o, int64_t e) {
  return o.moe_experts + (e - o.moe_expert0) * o.moe_stride;
}

// Every offset of `o` passed through f (e.g. rebasing, or global -> stage-local).
template <class F>
BlockOffsets map_offsets(const BlockOffsets& o, F&& f) {
  BlockOffsets r = o;
  for (int64_t* x : {&r.norm1_w, &r.norm1_b, &r.w_qkv, &r.b_qkv, &r.w_out, &r.b_out, &r.norm2_w,
                     &r.norm2_b, &r.w_up, &r.b_up, &r.w_down, &r.b_down, &r.moe_experts,
                     &r.moe_gate, &r.moe_table})
    if (*x >= 0) *x = f(*x);  // -1: absent (dense FFN of a sparse block, MoE of a dense one)
  return r;
}

// The same offsets relative to `base` (for weights and grads of a unit that starts at base).
inline BlockOffsets rebased(const BlockOffsets& o, int64_t base) {
  return map_offsets(o, [base](int64_t x) { return x - base; });
}

class ParamLayout {
 public:
  // The whole model (tp.size = 1), or tp rank tp.rank's shards: q/k/v rows (its heads and kv
  // heads), ffn.up rows and the token embedding's vocabulary rows (column-parallel), attn.out and
  // ffn.down columns (row-parallel); norms, position tables and the out/down biases replicated.
  // Sparse blocks: each expert's up rows and down columns likewise; the gate, the rre table and
  // the experts' down biases replicated.
  // Throws naming the valid tp sizes unless tp.size divides n_heads, n_kv_heads, d_ff and vocab
  // (and a sparse model's expert_d_ff).
  explicit ParamLayout(const ModelConfig& cfg, TpShard tp = {});

  const std::vector<ParamSpec>& specs() const { return specs_; }
  int64_t total() const { return total_; }
  const TpShard& tp() const { return tp_; }
  // Throws loom::Error if no parameter has that name.
  const ParamSpec& find(const std::string& name) const;

  int64_t token_embedding() const { return tok_; }     // (V,C)
  int64_t position_embedding() const { return pos_; }  // (S,C)
  const BlockOffsets& block(int64_t i) const { return blocks_.at(size_t(i)); }
  int64_t final_norm_w() const { return fnw_; }
  int64_t final_norm_b() const { return fnb_; }
  bool has_query_layer() const { return has_ql_; }
  int64_t query_position() const { return qpos_; }  // (S,C)
  const BlockOffsets& query_block() const { return qblock_; }

 private:
  // Adds a tensor of logical shape `shape`, split on `shard_dim` over tp (or replicated: -1).
  int64_t add(const std::string& name, Shape shape, InitKind init, int shard_dim = -1);
  BlockOffsets add_block(const std::string& prefix, const ModelConfig& cfg, bool sparse);

  std::vector<ParamSpec> specs_;
  TpShard tp_;
  int64_t total_ = 0;
  int64_t tok_ = 0, pos_ = 0, fnw_ = 0, fnb_ = 0, qpos_ = 0;
  bool has_ql_ = false;
  std::vector<BlockOffsets> blocks_;
  BlockOffsets qblock_{};
};

// Fills `weights` (layout.total() floats) with loom's initialisation: normal(0, 0.02) for
// matrices and embeddings, 0.02/sqrt(2*(L+query layer)) for attn.out and ffn.down (GPT-2 /
// PanGu-α), zeros for biases, ones for norm weights. Each tensor draws from its own Philox stream
// (named by the parameter) at its logical element offsets, so any layout (tp shards included)
// initialises the same logical weights.
void init_params(const ParamLayout& layout, const ModelConfig& cfg, float* weights, uint64_t seed);
// The same values for elements [begin, end) of the flat buffer only, into dst (end-begin floats).
void init_params_range(const ParamLayout& layout, const ModelConfig& cfg, float* dst,
                       int64_t begin, int64_t end, uint64_t seed);

// The tp sizes a config admits (divisors of n_heads that also divide n_kv_heads, d_ff, vocab).
std::vector<int> valid_tp_sizes(const ModelConfig& cfg);

}  // namespace loom::model
