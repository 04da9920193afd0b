// model/params.h: the named parameter tensors of a model, laid out in one flat f32 buffer.
//
// Every parameter is a view of one flat buffer (llm.c style), which makes the optimizer, the
// gradient all-reduce, ZeRO sharding and checkpointing loops over one range. Names and shapes are
// fixed by the checkpoint format (linear weights are (out, in)). Inside a block, q, k and v
// weights are adjacent, so together they form one (C+2KV, C) matrix and q/k/v is one matmul;
// likewise their biases.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/tensor.h"
#include "model/config.h"

namespace loom::model {

enum class InitKind { normal, normal_residual, zeros, ones };

struct ParamSpec {
  std::string name;
  Shape shape;
  int64_t offset = 0;  // elements into the flat buffer
  int64_t numel = 0;
  InitKind init = InitKind::normal;
  bool weight_decay = false;  // AdamW decay only on matrices (ndim >= 2), never biases or norms
};

// Offsets (into the flat buffer) of one block's tensors, in the fixed order below.
struct BlockOffsets {
  int64_t norm1_w, norm1_b;
  int64_t w_qkv;   // q (C,C) then k (KV,C) then v (KV,C): one (C+2KV, C) matrix
  int64_t b_qkv;   // (C+2KV)
  int64_t w_out, b_out;
  int64_t norm2_w, norm2_b;
  int64_t w_up, b_up;      // (F,C), (F)
  int64_t w_down, b_down;  // (C,F), (C)
};

class ParamLayout {
 public:
  explicit ParamLayout(const ModelConfig& cfg);

  const std::vector<ParamSpec>& specs() const { return specs_; }
  int64_t total() const { return total_; }
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
  int64_t add(const std::string& name, Shape shape, InitKind init);
  BlockOffsets add_block(const std::string& prefix, const ModelConfig& cfg);

  std::vector<ParamSpec> specs_;
  int64_t total_ = 0;
  int64_t tok_ = 0, pos_ = 0, fnw_ = 0, fnb_ = 0, qpos_ = 0;
  bool has_ql_ = false;
  std::vector<BlockOffsets> blocks_;
  BlockOffsets qblock_{};
};

// Fills `weights` (layout.total() floats) with loom's initialisation: normal(0, 0.02) for
// matrices and embeddings, 0.02/sqrt(2*(L+query layer)) for attn.out and ffn.down (GPT-2 /
// PanGu-α), zeros for biases, ones for norm weights. Each tensor draws from its own Philox stream
// (named by the parameter) at its logical element offsets, so any layout initialises the same
// logical weights.
void init_params(const ParamLayout& layout, const ModelConfig& cfg, float* weights, uint64_t seed);

}  // namespace loom::model
