// attention/flash_attention.h: local (single-process) exact attention, tiled with online softmax.
//
// Glossary: B batch, Tq query length, Tk key length, NH query heads, NKV key/value heads
// (NKV divides NH; query head h uses kv head h / (NH/NKV)), HD head dim.
// Layout: q (B, Tq, NH, HD) with row stride q_stride elements between consecutive positions
// t (q_stride >= NH*HD, so q can be a slice of a fused qkv buffer); k, v (B, Tk, NKV, HD) with
// strides k_stride, v_stride; out (B, Tq, NH, HD) with stride o_stride; lse (B, NH, Tq) f32.
// Batch b starts at b*Tq*q_stride (resp. b*Tk*k_stride; out and dout at b*Tq*o_stride).
//
// Contract shared by every function here:
// - The caller owns every buffer. Only the (B, T, heads, HD) elements are read or written; the
//   gaps between heads*HD and the row stride are never touched, so q/k/v may be column slices of
//   one fused (B, T, (NH + 2*NKV)*HD) buffer.
// - No Tq x Tk score matrix is ever stored. Extra memory: the forward and the two-pass backward
//   use O(threads * tile) (~150 KiB per thread at HD = 64, plus, for the 8 query blocks a
//   forward task shares K/V tiles among, 256 KiB); the fused backward (chosen when
//   B*NKV >= 2*threads) adds a (NH/NKV, Tq, HD rounded up to 16) f32 dQ accumulator per thread,
//   linear in Tq, and the tiles of the 8 key blocks a task handles at once (640 KiB per thread at
//   HD = 64). Both backward paths give bit-identical results.
// - Bad shapes (non-positive sizes, NKV not dividing NH, strides narrower than a row, non-finite
//   or non-positive scale) throw loom::Error before anything is written.
// - Deterministic: every output element is produced by one thread in a fixed order, so the result
//   is bit-identical for the same inputs regardless of the OpenMP thread count.
// - Called from inside an OpenMP parallel region the functions run on the calling thread only
//   (nested parallelism is off), which is what a caller that parallelises itself wants.
#pragma once

#include <cstdint>

#include "core/dtype.h"
#include "kernels/cpu/amx.h"

namespace loom::attention {

struct AttentionShape {
  int64_t B, Tq, Tk, NH, NKV, HD;
  int64_t q_stride, k_stride, v_stride, o_stride;
  bool causal;
  // Global positions for causal masking across blocks: query i is at q_offset+i, key j at
  // k_offset+j; key j is visible to query i iff !causal || k_offset+j <= q_offset+i.
  int64_t q_offset = 0, k_offset = 0;
  float scale;  // usually 1/sqrt(HD)
};

// Forward: out = softmax(scale * q k^T + mask) v, tiled with online softmax, O(T) extra memory.
// lse[b,h,i] = log sum_j exp(scale*q_i.k_j) over visible j (natural log, of the SCALED scores);
// a query row with no visible key gets out = 0 and lse = -inf. Overwrites out and lse.
void flash_attention_forward(float* out, float* lse, const float* q, const float* k,
                             const float* v, const AttentionShape& s);

// D[b,h,i] = sum_d dout[b,i,h,d] * out[b,i,h,d]  (B, NH, Tq). Overwrites D. dout and out use
// o_stride.
void attention_backward_preprocess(float* D, const float* dout, const float* out,
                                   const AttentionShape& s);

// Backward given lse and D from the FULL attention (so BurstAttention can call it per key or
// query block with the global lse/D). ACCUMULATES: dq += ..., dk += ..., dv += ... (dq has q's
// layout and stride, dk/dv have k/v's layout and strides; dout has o_stride). Rows whose lse is
// -inf (no visible key) contribute nothing. Deterministic without atomics: dk/dv are produced by
// one task per (b, kv head, key block) looping over its query heads and query blocks in order,
// dq by one task per (b, head, query block) looping over key blocks in order; or, when there are
// at least 2 tasks per thread, both by one task per (b, kv head) in the same orders.
void flash_attention_backward(float* dq, float* dk, float* dv, const float* dout,
                              const float* q, const float* k, const float* v, const float* lse,
                              const float* D, const AttentionShape& s);

// bf16 q/k/v inputs with f32 accumulation and f32 outputs (same semantics). The inputs are
// widened to f32 exactly as they are loaded, so the result is bit-identical to
// flash_attention_forward on the widened inputs.
void flash_attention_forward_bf16(float* out, float* lse, const bf16* q, const bf16* k,
                                  const bf16* v, const AttentionShape& s);

// ---------------------------------------------------------------------------------------------
// Native bf16 (flash_attention_bf16.cpp): bf16 q/k/v (and dout) multiply as bf16 with f32
// accumulation; the softmax runs in f32; P and dS are rounded to bf16 before they multiply V, dO,
// Q and K (as FlashAttention does on GPUs), so results differ from the f32 kernel's by bf16
// rounding of those factors (documented bounds in tests/unit/attention). Same shapes, strides,
// masks, lse convention, accumulation (dq/dk/dv +=) and determinism as the f32 functions; out,
// lse, D and the gradients are f32, the gradients in q's / k's / v's strides.
// Two backends share everything but the products: Intel AMX tiles (TDPBF16PS), and AVX512-BF16
// instructions (VDPBF16PS: twice the f32 FMA rate on CPUs that run it at full width, such as AMD
// Zen 4; on Intel Sapphire Rapids it runs at half the f32 rate and AMX is used). Their f32 sums of
// the same products differ only in order (last bits). `best` picks AMX where this process can run
// it, else AVX512-BF16; a backend that cannot run throws loom::Error naming what is missing.
// The backward runs in one pass (5 tile products per tile; per thread a dQ^T buffer of
// (NH/NKV) x Tq x HD f32, Tq padded to 64 and HD to 32) when B * NKV gives every thread two
// tasks, else in two passes (7 products; `fused` false forces them); both give the same bits.
// Extra memory: the operands repacked once per call (forward 2, backward 3 copies of K/V and 4 of
// Q/dO, in bf16, padded to 64 rows and HD to 32: flash_attention_native_workspace_bytes), taken
// from `workspace` (64-byte aligned, at least that many bytes) or, when it is null, allocated by
// the call; plus ~100 KiB per thread of tiles, allocated by the call.

// True when this process can run AMX tiles (kernels/cpu/amx.h; LOOM_AMX=0 says no).
using kernels::amx_bf16_usable;
enum class Bf16Backend { best, amx, avx512 };
// Whether the native bf16 kernels can run on `backend` (best: on either).
bool native_bf16_attention_usable(Bf16Backend backend = Bf16Backend::best);
// "amx", "avx512_bf16" or "none": what `best` runs on in this process.
const char* native_bf16_attention_backend();

int64_t flash_attention_native_workspace_bytes(bool backward, const AttentionShape& s);
void flash_attention_forward_bf16_native(float* out, float* lse, const bf16* q, const bf16* k,
                                         const bf16* v, const AttentionShape& s,
                                         void* workspace = nullptr,
                                         Bf16Backend backend = Bf16Backend::best);
void flash_attention_backward_bf16_native(float* dq, float* dk, float* dv, const bf16* dout,
                                          const bf16* q, const bf16* k, const bf16* v,
                                          const float* lse, const float* D,
                                          const AttentionShape& s, void* workspace = nullptr,
                                          Bf16Backend backend = Bf16Backend::best,
                                          bool fused = true);
// D = rowsum(dout * out) with bf16 dout (widened exactly).
void attention_backward_preprocess(float* D, const bf16* dout, const float* out,
                                   const AttentionShape& s);

}  // namespace loom::attention
