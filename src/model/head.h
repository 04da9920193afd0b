// model/head.h: the token embedding and the tied LM head + cross-entropy, serial or
// vocabulary-parallel (tp), shared by the whole model (model/gpt.h) and pipeline stages
// (model/stage.h).
//
// Glossary: B batch, T sequence, N = B*T rows, Nl = N/tp this rank's rows (sequence parallel),
// C d_model, V vocab, Vl = V/tp this rank's vocabulary rows [v0, v0+Vl).
//
// Vocabulary parallel (c.tp set): the embedding looks up only this rank's vocabulary rows (zero
// elsewhere) and reduce-scatters the partial (N,C) sum to this rank's rows, then adds the
// position rows; the head all-gathers the head input, scores this rank's vocabulary rows and
// combines the per-rank row max, sum of exponentials and target logit by all-reduces of O(rows)
// floats (logits are never gathered), and reduce-scatters the partial d(head input).
#pragma once

#include <cstdint>

#include "core/tensor.h"
#include "model/block.h"
#include "model/stage.h"
#include "model/params.h"

namespace loom::model {

// Rows of the fused head + cross-entropy per block. Each block reads and accumulates the whole
// (V,C) dwte once, so fewer, larger blocks cut that traffic (GPT-2: 154 MB per pass); the price
// is a (rows, V) f32 logits workspace (256 x 50304 x 4 B = 51 MB).
constexpr int64_t kHeadRowsPerBlock = 256;

struct HeadWeights {
  const ParamSpec* tok = nullptr;  // embed.token.weight's spec (its tp slice: v0, Vl)
  const float* wte = nullptr;      // (Vl,C) f32
  const bf16* wte_lp = nullptr;    // (Vl,C) bf16 (bf16 mode)
  float* dwte = nullptr;           // (Vl,C) gradient, accumulated; null: no backward
  const float* wte_r = nullptr;    // (Vl,C) f32 rounded to bf16 values (emulated bf16 mode)
};

// Loss of the head input `out` (this rank's rows, C) against targets (B*T, < 0 ignored).
// With dout (same shape as out): writes grad_scale * d(loss sum)/d(out) and accumulates dwte.
LossSum tied_head_loss(const BlockCtx& c, const HeadWeights& hw, const Tensor& out,
                       const int32_t* targets, float grad_scale, Tensor* dout,
                       int64_t rows_per_block = kHeadRowsPerBlock);

// Vocabulary-parallel embedding (c.tp set): this rank's rows (Nl,C) of wte[tokens] + wpe[pos].
Tensor vocab_parallel_embedding(const BlockCtx& c, const ParamSpec& tok, const float* wte,
                                const float* wpe, const int32_t* inputs);
// Its backward from dh (Nl,C): dwpe for this rank's rows, dwte for its vocabulary rows.
void vocab_parallel_embedding_backward(const BlockCtx& c, const ParamSpec& tok, float* dwte,
                                       float* dwpe, const Tensor& dh, const int32_t* inputs);

}  // namespace loom::model
