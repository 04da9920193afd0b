// model/moe.h: the sparse mixture-of-experts FFN of a sparse block (PanGu-Σ's Random Routed
// Experts, or a learned top-k gate), its routing, and the rre routing tables. The router's
// definitions and citations are in model/config.h (MoeConfig).
//
// Glossary: N = B*T token rows of a micro-batch, C d_model, E experts, Fe expert d_ff, k experts
// per token (rre: 1), S = N*k packed slots, D domains, G experts per domain, V vocab.
//
// Dispatch layout: a token's j-th choice occupies one "slot" of packed buffers (S rows), grouped
// by expert (expert e's slots are [offsets[e], offsets[e+1])) and, inside an expert, in
// ascending (row, j) order. Every packed buffer has S = N*k rows whatever the routing (topk's
// dropped slots sit unused at the end), so allocation sizes do not depend on the data and the
// memory model (model/memory.h) prices them exactly. Every sum runs in a fixed order (rows
// ascending, then j): results are bit-identical for a given routing.
//
// Expert parallel (BlockCtx::ep, P ranks, El = E/P experts each): the slots of ep rank q's
// experts are contiguous, so one all_to_all_v sends them there (after one all_to_all of the
// per-expert counts); the experts run on the R = P*S rows a rank can receive at most (buffers
// sized R whatever the routing), the outputs go back by the reverse exchange, and the backward
// does the same with the gradients. Tensor parallel (BlockCtx::tp): each expert's d_ff is split
// like the dense FFN's and the FFN returns partial sums (the block reduce-scatters them).
#pragma once

#include <cstdint>
#include <limits>
#include <map>
#include <vector>

#include "core/tensor.h"
#include "model/config.h"
#include "model/params.h"
#include "parallel/plan.h"

namespace loom::model {

struct BlockCtx;    // model/block.h
struct BlockStash;  // model/block.h

// Counters of the sparse blocks a stage ran (training forwards only; recompute not counted).
struct MoeStats {
  double aux_loss_sum = 0;        // topk: sum over sparse blocks and micro-batches of aux loss
  int64_t routed = 0;             // token choices routed (N*k per sparse block per micro-batch)
  int64_t dropped = 0;            // topk: choices dropped by the capacity limit
  int64_t blocks = 0;             // sparse block forwards counted
  std::vector<int64_t> load;      // (E) slots each expert processed, summed over blocks
  // The same per sparse block: model layer index -> (E) slots of each (global) expert. ECSS lazy
  // mode (optim/expert_store.h) updates the experts whose summed load over the step is > 0.
  std::map<int64_t, std::vector<int64_t>> layer_load;
  // topk: the router's smallest score margin, min over rows of p_(j) - p_(j+1) for j = 1..k
  // (p_(j) a row's j-th largest router probability; j = k is the selection boundary, which
  // only exists when E > k), computed in the forward. A margin well above rounding (1e-4; layouts
  // differ by ~1e-7) means no layout can route a token to other experts, or in another order,
  // than the serial run does; tests/dist/train/test_moe_layouts.cpp checks it. +inf when
  // nothing was routed by topk.
  double min_margin = std::numeric_limits<double>::infinity();
  void add(const MoeStats& o);
};

// rre: expert (global index in [0, E)) of every token row: domain d's group offset d*G plus the
// table entry table[d, token]. tokens, domains (N) int32; table (D, V) f32 holding integers.
// Throws loom::Error naming the row for a domain outside [0, D), a token outside [0, V) or a
// table entry outside [0, G) (a table that does not match this model).
std::vector<int32_t> rre_experts(const ModelConfig& cfg, const float* table, const int32_t* tokens,
                                 const int32_t* domains, int64_t N);
// rre dispatch counts (E): known from the tokens and domains alone, before any forward.
std::vector<int64_t> rre_dispatch_counts(const ModelConfig& cfg, const float* table,
                                         const int32_t* tokens, const int32_t* domains, int64_t N);

// The dispatch layout (see the top of this file) of N rows with k choices each: row_expert
// (N*k) the expert of choice (n, j), or < 0 for a dropped choice. Fills offsets (E+1: expert e's
// slots are [offsets[e], offsets[e+1])), slot_row (N*k: each slot's row, -1 for unused slots)
// and row_slot (N*k: each choice's slot, -1 if dropped). A counting sort: slots of one expert in
// ascending (row, j) order. Training (moe_ffn_forward) and the inference decoder both use it.
void moe_pack_slots(const int32_t* row_expert, int64_t N, int64_t k, int64_t E,
                    std::vector<int64_t>& offsets, int32_t* slot_row, int32_t* row_slot);

// A frequency-balanced rre table (D, V) of in-group indices: per domain, tokens in descending
// count order (ties by id) each go to the group's expert with the least expected load so far
// (ties: lowest index): Graham's longest-processing-time greedy (max load <= 4/3 optimum and <=
// mean + the largest single token count). counts (D, V) token counts per domain.
std::vector<int32_t> balanced_rre_table(const std::vector<int64_t>& counts, int64_t D, int64_t V,
                                        int64_t G);
// A table's expected load imbalance from counts (D, V): per domain, the largest expected load of
// an expert of its group over the group's mean load; the worst domain (domains without tokens
// skipped). 1 is perfectly even.
double rre_table_max_over_mean(const std::vector<int32_t>& table,
                               const std::vector<int64_t>& counts, int64_t D, int64_t V, int64_t G);
// Writes `table` (D, V) into every sparse block's moe.rre_table of a full flat weight buffer in
// `layout` (tp = 1). Throws unless table.size() == D*V and every entry is in [0, G).
void set_rre_tables(const ModelConfig& cfg, const ParamLayout& layout, float* weights,
                    const std::vector<int32_t>& table);

// The MoE FFN of a sparse block (block.cpp calls these in place of the dense FFN). Forward:
// ln2_mm (N,C) the normalised rows in the matmul dtype; returns the FFN output (N,C) f32
// (activations category; the caller adds the residual). Fills st's moe fields per `mode` (see
// block.h) and, when c.moe_stats is set, adds to it.
Tensor moe_ffn_forward(const BlockCtx& c, const BlockOffsets& o, const Tensor& ln2_mm,
                       BlockStash& st, parallel::Recompute mode);
// Selective recompute: rebuilds st.moe_xs and st.act_mm from st.ln2_mm, st.pre and the routing.
void moe_ffn_recompute(const BlockCtx& c, const BlockOffsets& o, BlockStash& st);
// Backward: dout (N,C) f32 the FFN output's gradient; ACCUMULATES the
// experts' (and gate's) grads and returns d(ln2) (N,C) f32 (workspace). Consumes the moe fields
// of st (ln2_mm stays for the caller).
Tensor moe_ffn_backward(const BlockCtx& c, const BlockOffsets& o, const Tensor& dout,
                        BlockStash& st);

}  // namespace loom::model
