// attention/context_parallel.h: exact attention over a cp group of G ranks, each holding T/G
// tokens of every sequence (ring / BurstAttention, and the all-gather and Ulysses baselines).
//
// Glossary: B batch, T global sequence length, G cp group size, Tl = T/G local tokens, NH query
// heads, NKV kv heads (NKV divides NH), g = NH/NKV, HD head dim, N nodes and L ranks per node of
// the double ring (G = N*L), b bytes per element of q/k/v/dout (4 f32, 2 bf16).
//
// Local layout (as in flash_attention.h, with Tq = Tk = Tl): q (B, Tl, NH, HD) row stride
// q_stride; k, v (B, Tl, NKV, HD) strides k_stride, v_stride; out, dout (B, Tl, NH, HD) stride
// o_stride; lse, D (B, NH, Tl) f32. Local row i of cp rank r sits at global position
// cp_global_position(ctx.layout, T, G, r, i) (cp_layout.h); the causal mask uses global positions.
// The `local` AttentionShape must have Tq == Tk == Tl and q_offset == k_offset == 0.
//
// Schemes (CpScheme):
//   burst      ring forward (Q stays, K/V travel); backward chosen per call by
//              choose_cp_backward(): Burst (K/V stay; Q, dO, D, LSE and an f32 dQ travel, dQ
//              comes home) or ring (K, V and f32 dK, dV travel). ctx.backward forces either.
//   ring       ring forward and ring backward.
//   allgather  Megatron-CP style: all_gather K/V, local attention, reduce_scatter f32 dK/dV.
//   ulysses    DeepSpeed-Ulysses: all_to_all from sequence- to head-sharded, full-sequence local
//              attention on NH/G heads, all_to_all back. G must divide NKV.
// The ring schemes run as a double ring when the group spans several nodes (ctx.ranks_per_node
// or the group's node info): an intra-node ring of L steps inside an inter-node ring of N steps
// over ranks with the same local index, so each inter-node transfer has L compute steps to hide
// behind. Flat ring = (N=1, L=G). Bytes sent are the same as the flat ring's.
//
// Numerics: the running (O, LSE) state of the forward is kept in f32 across ring steps and merged
// in the overflow-free form (lse' = max + log1p(exp(-|a-b|)), weights exp(x - lse') <= 1); it is
// never rounded to the input dtype. Travelling dQ / dK / dV partial sums are f32. Summation order
// is fixed by the ring order, so results are bit-identical run to run for one (G, layout,
// scheme, topology).
//
// Communication per rank per call (elements, batch B; closed forms in cp_*_bytes below):
//   forward (ring, allgather)  2*B*T*NKV*HD*(G-1)/G             in dtype
//   backward burst             B*T*(G-1)/G * (NH*HD*(2b + 4) + 8*NH) bytes  (Q, dO in dtype;
//                              dQ, D, LSE in f32)
//   backward ring / allgather  B*T*(G-1)/G * NKV*HD*(2b + 8)   bytes   (K, V in dtype; dK, dV f32)
//
// Contract:
// - The caller owns every buffer. Inputs are read only; every rank of ctx.group must call with the
//   same shape and ctx (a collective).
// - Forward OVERWRITES out (B, Tl, NH, HD) f32 and lse (B, NH, Tl) f32 (global LSE of the full
//   sequence: a transformer block keeps it for the backward, as with flash attention).
// - Backward ACCUMULATES into dq, dk, dv (f32; layouts and strides of q, k, v), like
//   flash_attention_backward, given this rank's out and lse from the forward.
// - Workspace (travelling K/V or Q|dO|D|LSE blocks and their receive buffers, partial gradient
//   sums, per-segment LSE/D slices, packed and widened copies) is allocated per call from
//   ctx.pool (category workspace; a pool of the call's own when null) and freed before return.
//   Every buffer lives until the call returns, so the call's peak is their sum, which
//   cp_workspace_bytes() gives exactly (each call asserts it; CpStats reports it). The local
//   flash kernel's own per-thread tiles (flash_attention.h) are not part of it.
// - Bad shapes, a layout that does not split T, or a Ulysses degree that does not divide NKV
//   throw loom::Error before any communication. Communication failures throw loom::Error /
//   loom::TimeoutError (every wait has the group's timeout); the outputs are then undefined and
//   the group should be treated as broken.
#pragma once

#include <cstdint>
#include <string_view>

#include "attention/cp_layout.h"
#include "attention/flash_attention.h"
#include "comm/process_group.h"
#include "core/dtype.h"
#include "core/memory_pool.h"

namespace loom::attention {

enum class CpScheme : uint8_t { burst, ring, allgather, ulysses };
std::string_view cp_scheme_name(CpScheme s);  // "burst", "ring", "allgather", "ulysses"
CpScheme cp_scheme_from_name(std::string_view name);  // throws loom::Error listing the names

enum class CpBackward : uint8_t { auto_select, burst, ring };
std::string_view cp_backward_name(CpBackward b);  // "auto", "burst", "ring"
CpBackward cp_backward_from_name(std::string_view name);

// Optional counters a caller can hand in (ctx.stats); each call adds to them.
struct CpStats {
  int64_t forward_bytes_sent = 0;   // from ctx.group's counters, all ops
  int64_t backward_bytes_sent = 0;
  int64_t peak_workspace_bytes = 0;  // largest per-call workspace (= cp_workspace_bytes)
  double forward_wait_s = 0;         // time spent blocked in Work::wait (exposed communication)
  double backward_wait_s = 0;
  CpBackward last_backward = CpBackward::auto_select;  // what the last backward ran
};

struct CpContext {
  comm::ProcessGroup group;  // the cp group; group rank r holds layout rank r's tokens
  CpScheme scheme = CpScheme::burst;
  CpBackward backward = CpBackward::auto_select;  // forces the backward of burst; ring ignores it
  CpLayout layout = CpLayout::zigzag;
  bool overlap = true;  // post the next block's transfer before computing on the current one
  // Double ring: 0 = nodes from group.member_nodes() (GroupOptions::ranks_per_node emulates them);
  // L > 0 = every L consecutive group ranks form a node (L must divide G). double_ring = false
  // forces the flat ring.
  int ranks_per_node = 0;
  bool double_ring = true;
  CpStats* stats = nullptr;  // caller-owned, may be null
  // Where each call's workspace comes from (caller-owned; null: a pool of the call's own). A
  // training executor passes its working pool, so the scratch is in its peaks and the memory
  // model (model/memory.h) prices it.
  MemoryPool* pool = nullptr;
};

// out, lse <- attention of this rank's queries over the whole sequence. q, k, v in `dtype`
// (f32 or bf16), see the layout above.
void cp_attention_forward(float* out, float* lse, const void* q, const void* k, const void* v,
                          DType dtype, const AttentionShape& local, const CpContext& ctx);

// dq, dk, dv += gradients of sum(dout * out). q, k, v, dout in `dtype`; out, lse from the forward.
void cp_attention_backward(float* dq, float* dk, float* dv, const void* dout, const void* q,
                           const void* k, const void* v, const float* out, const float* lse,
                           DType dtype, const AttentionShape& local, const CpContext& ctx);

// The backward that sends fewer bytes for these heads and dtype (Burst wins only for g < ~1.5).
CpBackward choose_cp_backward(int64_t NH, int64_t NKV, int64_t HD, DType dtype);

// Closed forms of the bytes one rank sends per call (see above), for tests and benchmarks.
int64_t cp_forward_bytes(int64_t B, int64_t T, int G, int64_t NKV, int64_t HD, DType dtype);
int64_t cp_backward_bytes(CpBackward kind, int64_t B, int64_t T, int G, int64_t NH, int64_t NKV,
                          int64_t HD, DType dtype);

// Ulysses: all_to_all of q, k, v (dtype) and back of out, lse (f32) in the forward; of q, k, v, dout
// (dtype), D, lse (f32) and back of dq, dk, dv (f32) in the backward. Per rank:
//   forward   B*Tl*(G-1)/G * ((NH + 2 NKV)*HD*b + 4*NH*HD + 4*NH)
//   backward  B*Tl*(G-1)/G * ((2 NH + 2 NKV)*HD*b + 8*NH + 4*(NH + 2 NKV)*HD)
int64_t cp_ulysses_bytes(bool backward, int64_t B, int64_t T, int G, int64_t NH, int64_t NKV,
                         int64_t HD, DType dtype);

// Bytes of workspace one forward (backward = false) or backward call allocates, all live until it
// returns: its exact peak. `nodes` N of the double ring (1: flat ring; G/N ranks per node); for
// the burst scheme `kind` auto_select means choose_cp_backward's choice. Depends on the shapes,
// the dtype (bf16 adds widened f32 copies), the scheme and the ring's levels (a double ring keeps
// receive buffers on both), not on overlap (both modes keep two receive buffers per ring level:
// a block is sent while the next one arrives) nor on the layout.
int64_t cp_workspace_bytes(bool backward, const AttentionShape& local, DType dtype, CpScheme scheme,
                           CpBackward kind, int G, int nodes = 1);
// The same for the ring `ctx` runs (its group size, scheme, forced backward and nodes).
int64_t cp_workspace_bytes(bool backward, const AttentionShape& local, DType dtype,
                           const CpContext& ctx);

// Throws loom::Error if `ctx` cannot run `local` (layout vs T, Ulysses degree vs NKV, ranks per
// node vs G, strides). Called by the two functions above; cheap.
void check_cp_attention(const AttentionShape& local, DType dtype, const CpContext& ctx);

}  // namespace loom::attention
