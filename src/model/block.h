// model/block.h: one pre-LN transformer block (or the top query layer) with explicit forward
// and backward, shared by the whole-model trainer (model/gpt.h) and pipeline stages.
//
// Glossary: B batch, T sequence, N = B*T rows, C d_model, NH heads, NKV kv heads, HD head dim,
// KV = NKV*HD, F d_ff.
#pragma once

#include <cstdint>

#include "attention/context_parallel.h"
#include "comm/process_group.h"
#include "core/memory_pool.h"
#include "core/tensor.h"
#include "model/config.h"
#include "model/moe.h"
#include "model/stage.h"
#include "model/params.h"

namespace loom::model {

// What a block keeps for its backward. Which fields are set depends on the recompute mode (see
// gpt.h). Tensors named *_mm are matmul inputs: bf16 in bf16 mode (f32 holding bf16 values on
// the emulated path, see BlockCtx::Wr), else the f32 tensor itself.
// Under tp: x, mid, mean/rstd hold this rank's local rows; ln1_mm/ln2_mm are all rows
// (gathered); q/k/v, att and act cover all rows but only this rank's heads / ffn columns.
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
  // Sparse blocks (model/moe.h): pre and act_mm are the packed (S,Fe) with S = N*k slots.
  Tensor moe_meta;                   // (3,S) int32: slot -> row, (row,j) -> slot or -1 if
                                     // dropped, (row,j) -> expert
  Tensor moe_w;                      // (N,k) f32 combine weights (rre: 1)
  Tensor moe_probs;                  // topk: (N,E) gate softmax
  Tensor moe_xs;                     // (S,C) the dispatched rows (matmul dtype)
  Tensor moe_y;                      // topk: (S,C) expert outputs
  std::vector<int64_t> moe_offsets;  // (E+1) expert e's slots [moe_offsets[e], moe_offsets[e+1])
  std::vector<double> moe_frac;      // topk: (E) f_e, fraction of choices per expert
  // Expert parallel (BlockCtx::ep): rows this rank received from each ep rank for each of its
  // experts (ep * El, peer-major); moe_xs, pre and act_mm then hold the R = ep*S received rows.
  std::vector<int64_t> moe_recv;
  float moe_aux_scale = 0;           // topk: weight of the aux loss's gradient
};


// Everything a block needs to run.
//
// Tensor parallel (tp != null, size P): the weights are this rank's shards (ParamLayout with
// TpShard), and the block runs Megatron's column/row split with sequence parallelism: the
// residual stream, norms and biases of attn.out / ffn.down work on this rank's N/P rows (rows
// [r*N/P, (r+1)*N/P) of the (B*T) rows); each norm output is all-gathered to all N rows before
// the column-parallel q/k/v and ffn.up products (over this rank's NH/P heads and F/P columns), and
// the row-parallel attn.out and ffn.down partial sums are reduce-scattered back to N/P rows. The
// backward mirrors it (all-gather <-> reduce-scatter). Replicated parameters (norms, out/down
// biases) get partial gradients from this rank's rows: the caller sums them over tp.
struct BlockCtx {
  const ModelConfig& cfg;
  MemoryPool& pool;
  bool bf;          // bf16 matmul inputs
  const float* W;   // f32 master weights (flat layout)
  const bf16* Wl;   // bf16 weights (bf16 mode)
  float* G;         // grads (flat layout), accumulated into
  int64_t B, T;
  const comm::ProcessGroup* tp = nullptr;  // tensor-parallel group, or null
  // bf16 mode on the widened path (kernels::bf16_matmul_path() == widen): instead of bf16
  // copies, the matmul inputs are f32 tensors holding bf16 values (rounded), and Wr the weights
  // rounded likewise, so the f32 kernel runs on them directly: the same numbers the widened
  // bf16 matmul computes, without widening operands on every call. Null: bf16 tensors and Wl.
  const float* Wr = nullptr;
  // Context parallel over a cp group of G ranks (null: none). B and T are then this rank's
  // share: T = T_global / G rows of every sequence, in the layout's order (cp_layout.h), and
  // pos (T) holds their global positions (for the position tables). Attention runs over the cp
  // group (cp_attention_forward/backward, causal over global positions) on this rank's heads;
  // everything else in the block is per row and unchanged. Composes with tp: the sequence-
  // parallel rows are this rank's N/P rows of the B*T local rows.
  const attention::CpContext* cp = nullptr;
  const int64_t* pos = nullptr;  // (T) global position of local row t; null: t
  // Sparse blocks (model/moe.h): the micro-batch's input token ids and domains (N) int32 (rre
  // routes by them; domains may be null for topk), the weight of the topk aux loss's gradient
  // (grad_scale * N, so it averages like the loss), and counters to add to (null: none).
  const int32_t* tokens = nullptr;
  const int32_t* domains = nullptr;
  float moe_aux_scale = 0;
  MoeStats* moe_stats = nullptr;
  int64_t moe_layer = -1;  // the block's index in the model (MoeStats::layer_load)
  // Expert parallel group (null: none): this rank holds experts [r*E/P, (r+1)*E/P) (the
  // BlockOffsets' moe_expert0 / moe_n_experts) and exchanges dispatched rows with the group.
  const comm::ProcessGroup* ep = nullptr;
  // ECSS in bf16 (GptStage's expert_masters_outside): W is packed without the experts' weight
  // matrices (HoleyLayout `wmap`; this unit starts at element w_begin of the stage's buffer), so
  // what lies beyond the first hole (experts' biases, the rre table) is read with w_at().
  const HoleyLayout* wmap = nullptr;
  int64_t w_begin = 0;

  int64_t position(int64_t t) const { return pos ? pos[t] : t; }
  int tp_size() const { return tp ? tp->size() : 1; }
  int64_t rows() const { return B * T; }                     // N
  int64_t local_rows() const { return B * T / tp_size(); }   // rows of the residual stream here
};

// The f32 weight at offset `off` of the block's unit (the dense tensors before the experts are
// at W + off either way).
inline const float* w_at(const BlockCtx& c, int64_t off) {
  return c.wmap ? c.W + (c.wmap->at(c.w_begin + off) - c.wmap->at(c.w_begin)) : c.W + off;
}

// Attention in bf16 training: where this process can run the native bf16 attention kernel
// (attention::native_bf16_attention_usable: AMX tiles, or AVX512-BF16 instructions) and
// LOOM_NATIVE_ATTENTION is not 0, a bf16 block's local attention (not cp's ring, which runs the
// f32 kernel) multiplies q, k, v rounded to bf16 (flash_attention_forward /
// backward_bf16_native: bf16 products, f32 softmax and accumulation, P and dS rounded to bf16)
// instead of the f32 kernel on f32 q, k, v: 1.7-1.9x faster (docs/context_parallel.md). f32
// blocks are unchanged.
bool native_attention_available();
// Below this sequence length the f32 kernel is as fast or faster on AMX (loom calibrate, one core:
// T 128 forward 0.31 ms on AMX against 0.24 ms f32, backward equal; from T 256 AMX 1.4-1.6x
// faster). On AVX512-BF16 (AMD Zen 4) the native kernel is faster from T 128 (1.4x, forward and
// backward); one threshold serves both.
constexpr int64_t kNativeAttentionMinSeq = 256;
// Whether a block of this precision, under cp or not, with sequence length T runs it, where the
// host can (`available`: this process, or what a cluster file or MemoryOptions says): the one
// predicate of block.cpp, the memory model and the planner.
inline bool native_attention_used(bool bf16, bool cp, int64_t T,
                                  bool available = native_attention_available()) {
  return bf16 && !cp && T >= kNativeAttentionMinSeq && available;
}
// Tests: 0 the f32 kernel, 1 the native kernel where usable, -1 (default) as the environment says.
void set_native_attention_for_testing(int mode);
// Bytes of the pool workspace such a call takes (category workspace, freed when it returns):
// q|k|v as bf16 (N, S) with S = Cq + 2 KV (backward: and dout (N, Cq) as bf16), then the
// kernel's packed operands (attention::flash_attention_native_workspace_bytes). model/memory.cpp
// prices the same bytes.
int64_t native_attention_workspace_bytes(bool backward, int64_t N, int64_t Cq, int64_t KV,
                                         const attention::AttentionShape& s);

// Sequence parallel helpers (identity without tp): this rank's rows (Nl, C) -> all N rows, as the
// matmul input (bf16 in bf16 mode) when `as_mm`, else f32; and partial sums (N, C) -> this rank's
// rows (Nl, C) of their sum over tp.
Tensor gather_rows(const BlockCtx& c, const Tensor& local, bool as_mm, MemCategory cat);
Tensor scatter_rows_sum(const BlockCtx& c, const Tensor& partial, MemCategory cat);

// Forward of one block. `x` is (local_rows, C). `qin` (N,C), all rows, is the query input of the top query layer (its rows are the
// query layer's position table) or null for an ordinary block. Fills `st` according to `mode`
// and returns the block output (local_rows, C).
Tensor block_forward(const BlockCtx& c, const BlockOffsets& o, const Tensor& x, const Tensor* qin,
                     BlockStash& st, Recompute mode);
// Backward: from dout (local_rows,C) (whose buffer it reuses), ACCUMULATES parameter grads and
// returns dx (local_rows,C). Consumes the stash; for the query layer, leaves d(qin) (N,C) in st.q
// (under tp, this rank's partial sum: its heads' contribution).
Tensor block_backward(const BlockCtx& c, const BlockOffsets& o, Tensor& dout, const Tensor* qin,
                      BlockStash& st);

}  // namespace loom::model
