// model/block.h: one pre-LN transformer block (or the top query layer) with explicit forward
// and backward, shared by the whole-model trainer (model/gpt.h) and pipeline stages.
//
// Glossary: B batch, T sequence, N = B*T rows, C d_model, NH heads, NKV kv heads, HD head dim,
// KV = NKV*HD, F d_ff.
#pragma once

#include <cstdint>

#include "core/memory_pool.h"
#include "core/tensor.h"
#include "model/config.h"
#include "model/gpt.h"
#include "model/params.h"

namespace loom::model {

// What a block keeps for its backward. Which fields are set depends on the recompute mode (see
// gpt.h). Tensors named *_mm are matmul inputs: bf16 in bf16 mode, else the f32 tensor itself.
struct BlockStash {
  Recompute mode = Recompute::none;
  Tensor x;                          // (N,C) block input
  Tensor ln1_mm;                     // (N,C)
  Tensor mean1, rstd1;               // (N)
  Tensor qkv;                        // (N, C+2KV) ordinary block: q, k, v side by side
  Tensor q, kv;                      // query layer: (N,C) and (N,2KV)
  Tensor att, att_mm;                // (N,C) attention output (f32 for D) and its matmul copy
  Tensor lse;                        // (B,NH,T)
  Tensor mid;                        // (N,C) residual after attention
  Tensor ln2_mm;                     // (N,C)
  Tensor mean2, rstd2;               // (N)
  Tensor pre;                        // (N,F) up-projection + bias, before the activation
  Tensor act_mm;                     // (N,F)
};


// Everything a block needs to run.
struct BlockCtx {
  const ModelConfig& cfg;
  MemoryPool& pool;
  bool bf;          // bf16 matmul inputs
  const float* W;   // f32 master weights (flat layout)
  const bf16* Wl;   // bf16 weights (bf16 mode)
  float* G;         // grads (flat layout), accumulated into
  int64_t B, T;
};

// Forward of one block. `qin` (N,C) is the query input of the top query layer (its rows are the
// query layer's position table) or null for an ordinary block. Fills `st` according to `mode`
// and returns the block output (N,C).
Tensor block_forward(const BlockCtx& c, const BlockOffsets& o, const Tensor& x, const Tensor* qin,
                     BlockStash& st, Recompute mode);
// Backward: from dout (N,C) (whose buffer it reuses), ACCUMULATES parameter grads and returns
// dx (N,C). Consumes the stash; for the query layer, leaves d(qin) in st.q.
Tensor block_backward(const BlockCtx& c, const BlockOffsets& o, Tensor& dout, const Tensor* qin,
                      BlockStash& st);

}  // namespace loom::model
