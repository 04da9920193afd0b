// kernels/cpu/weight_matmul.h: y = x @ W^T (+ bias) for inference, with W stored as f32, bf16 or
// int8 per output row (weight-only quantization), read directly in its storage format.
//
// Glossary: M rows of x (batch of tokens), K = W's columns (input features), N = W's rows
// (output features). W is stored (N, K) row-major, as loom stores every linear weight
// (model/params.h: "attn.q.weight" is (C_out, C_in)) and as the tied LM head's embedding (V, C).
//
// Contract
// - x (M, K) f32 row-major with row stride K; y (M, N) f32 with row stride ldy >= N (ldy 0 means
//   N); bias (N) f32 or null. y is overwritten, never read.
// - int8: W_q (N, K) int8 in [-127, 127] and scales (N) f32: W[n, k] = scales[n] * W_q[n, k].
//   quantize_rows_int8 makes them (symmetric per row: scale = max|W[n,:]| / 127, q = round(W /
//   scale), so |W - scale*q| <= scale/2 elementwise; an all-zero row gets scale 0 and q 0).
// - bf16: W holds bf16 values; x is used as f32 (products accumulate in f32).
// - Arithmetic, f32 and bf16: every output is acc = fma(x[m][k], W[n][k], acc) for k ascending
//   from acc = 0 (f32, with W widened exactly), then + bias[n]. The reference loop defines it and
//   the AVX-512 kernel computes it bit for bit.
// - Arithmetic, int8 (the integer form of x): a row of x whose values are all finite is held as
//   integers X[k] = round(x[m][k] * 2^e), ties to even, with e = 29 - floor(log2(max_k
//   |x[m][k]|)) (e = 0 for a zero row), so |X| < 2^30: each x within 2^-31 of its row's largest
//   magnitude (f32 rounding of the largest element is 2^-24 of it). Then acc = sum_k X[k] *
//   q[n][k] exactly (int64), and y = f32(f64(acc) * (f64(scales[n]) * 2^-e)), then + bias[n] in
//   f32. The sum is exact, so nothing in it depends on order, tile or thread. A row holding a NaN
//   or an infinity takes the f32 formula instead (fma chain of x with q, then * scales[n], then
//   + bias[n]), so NaN and Inf propagate. The reference loop defines this too; the VNNI kernel
//   computes it bit for bit (K <= 65536; a larger K runs the reference loop).
// - Batch invariance: so row m of y depends only on row m of x and on W, whatever M, the other
//   rows of the call and the thread count. Deterministic. (bf16 in AMX tile order: one row
//   alone differs in its last bits from the same row among others, unless the view sets
//   batch_invariant; see AMX below.)
// - Parallel over N inside (OpenMP); do not call from inside a parallel region.
// - Bad sizes (negative, ldy < N, null data with non-zero size) throw loom::Error.
//
// Layouts (WeightLayout): the weights' order in memory. `rows` is W as loom stores it; the fast
// CPU kernels read `panels` (pack_panels; the inference weights are stored so at load): W^T in
// panels of 16 output columns, each panel k-major, so one vector load holds 16 outputs' weights
// at one k (int8: at four consecutive k, 4 bytes per column), panels grouped in spans that a
// tile reads as one stream (see panels_index). On CPUs with
// AVX-512 (F, BW, VL; checked at run time, so the build does not need -march=native), an f32 or
// bf16 panel view runs tiles of up to 8 rows of x by up to 8 panels: each weight vector is loaded
// and widened once per tile and multiplied into every row of it (x broadcast), so decode at
// small M reads W once at the machine's read bandwidth and batches of 8 or more run near the FMA
// peak (bench/kernels/bench_weight_matmul.cpp). An int8 panel view runs on AVX-512 VNNI (and DQ):
// vpdpbusd multiplies 64 weights by a byte plane of the integer form of x per instruction.
// weight_matmul_panels_fast says which. Any other view (a `rows` view, or a CPU without them)
// runs weight_matmul_reference: the same bits, slower.
// AMX: bf16 weights stored in tile order (WeightLayout::amx_tiles, made by pack_amx_tiles; the
// inference weights do this at load where amx_tiles_available) run on AMX tiles at every M >= 2
// (weight_matmul_amx.cpp): x is split into three bf16 parts that together hold its 24 bits, so x
// is still not rounded; products are exact and accumulate in f32. One kernel for every M >= 2, so
// batch invariance holds among them, but its summation order is its own (bits differ from the
// reference's). It flushes denormal parts of x to zero and turns an infinite x into NaN. One row
// (M = 1: batch-1 decode) reads the tile-order weights with AVX-512 vector loads instead, which
// read them faster than tile loads (~0.93 of the read bandwidth against ~0.87), and computes the
// reference's bits; so a row computed alone and among others differ in their last bits (both are
// the f32-accumulated product of f32 x with the bf16 weights). WeightView::batch_invariant = true
// keeps M = 1 on the tiles too: every row's bits then are independent of M. On a CPU without AMX
// a tile-order view runs weight_matmul_reference.
#pragma once

#include <cstdint>

#include "core/dtype.h"                // bf16
#include "kernels/cpu/activation.h"  // GeluKind

namespace loom::kernels {

enum class WeightFormat : uint8_t { f32, bf16, int8_row };

// How the (N, K) elements lie in memory: `rows` row-major (row n at n * K); `amx_tiles` (bf16
// only, K a multiple of 32) in AMX tile order, rows padded with zeros to a multiple of 32: see
// amx_tiles_index; `panels` (any format) in 16-column panels: see panels_index.
enum class WeightLayout : uint8_t { rows, amx_tiles, panels };

// A read-only view of one (N, K) weight in its storage format. `data` points at float, bf16 or
// int8_t elements according to `format`; `scales` (N) only for int8_row.
struct WeightView {
  WeightFormat format = WeightFormat::f32;
  int64_t N = 0, K = 0;
  const void* data = nullptr;
  const float* scales = nullptr;
  WeightLayout layout = WeightLayout::rows;
  // Panels only: the view's first column within the span that `data` points at (a multiple of
  // 16): a view of rows [r0, r0 + N) of a larger weight (panels_view_rows).
  int64_t col0 = 0;
  // AMX tile order only: run M = 1 on the tiles as every other M, so that a row's bits never
  // depend on M (batch-invariant bf16), at the tiles' slower batch-1 read (see AMX above). The
  // other layouts are batch invariant whatever this says.
  bool batch_invariant = false;
};

// y (M, N) = x (M, K) @ W^T + bias.
void weight_matmul(float* y, int64_t ldy, const float* x, int64_t M, const WeightView& w,
                   const float* bias);

// What weight_matmul does to each output after acc + bias, in this order (each optional):
// + residual[m * ld_residual + n], one f32 add (bitwise what add_inplace(y, residual) after the
// call gives), then the GELU of `gelu_kind` (bitwise bias_gelu_forward's `out` for the same acc
// and bias; activation.h gelu_row). The fast panel kernels apply it to each tile while its
// outputs are in registers and L1, the AMX kernel to each row's 32 outputs of a weight block as
// it finishes them (calls of up to 16 rows: into a per-thread staging buffer that is then copied
// into y, session 26) (the inference decoder's attn.out + residual, ffn.up + GELU and ffn.down +
// residual: no separate pass over y, no parallel region of its own); the other paths (int8,
// the reference) apply it after the product.
struct MatmulEpilogue {
  const float* residual = nullptr;  // (M, N) f32; must not overlap y
  int64_t ld_residual = 0;          // residual's row stride; 0 means N
  bool gelu = false;
  GeluKind gelu_kind = GeluKind::tanh;
};

// y (M, N) = epilogue(x (M, K) @ W^T + bias).
void weight_matmul(float* y, int64_t ldy, const float* x, int64_t M, const WeightView& w,
                   const float* bias, const MatmulEpilogue& epilogue);

// The readable version of weight_matmul, same contract, any layout: one fma chain (int8: one
// integer sum) per (m, n) over k ascending. The fallback without AVX-512 or for a view not in
// panels, and the plain implementation that the tests hold the fast kernels against bit for bit.
void weight_matmul_reference(float* y, int64_t ldy, const float* x, int64_t M,
                             const WeightView& w, const float* bias);
void weight_matmul_reference(float* y, int64_t ldy, const float* x, int64_t M,
                             const WeightView& w, const float* bias,
                             const MatmulEpilogue& epilogue);

// True when weight_matmul runs f32 and bf16 panel-layout views on the AVX-512 kernel on this CPU
// (F, BW and VL present), false when it runs weight_matmul_reference for them.
bool weight_matmul_uses_avx512();
// True when weight_matmul runs panel-layout views of `format` on a fast kernel on this CPU:
// weight_matmul_uses_avx512() for f32 and bf16; AVX-512 with DQ and VNNI for int8.
bool weight_matmul_panels_fast(WeightFormat format);

// True when weight_matmul runs `w` on the AMX kernel (weight_matmul_amx.cpp: AMX tiles, and at
// M = 1 vector loads, unless w.batch_invariant): a tile-order bf16 view and amx_bf16_usable()
// (kernels/cpu/amx.h; LOOM_AMX=0 turns every AMX path off).
bool weight_matmul_uses_amx(const WeightView& w);

// Whether a bf16 weight with K columns should be stored in tile order: K a non-zero multiple of
// 32, amx_bf16_usable(), and LOOM_AMX_WEIGHTS is not "0" (which keeps bf16 weights in panels on
// the AVX-512 path, to compare the two).
bool amx_tiles_available(int64_t K);

// Tile order: elements of the (N, K) weight in pack_amx_tiles' layout (N rounded up to 32, times
// K), and where element (n, k) lies in it. 32-row block b = n / 32, chunk c = k / 32: two 16 x 16
// tiles of k pairs, (b * K/32 + c) * 1024 + t * 512 + r * 32 + (n % 16) * 2 + k % 2 with t =
// (n % 32) / 16 and r = (k % 32) / 2: each block's weights are one contiguous stream.
int64_t amx_tiles_elements(int64_t N, int64_t K);
int64_t amx_tiles_index(int64_t n, int64_t k, int64_t K);
// W (N, K) bf16 row-major -> dst (amx_tiles_elements) in tile order; K a positive multiple of 32.
void pack_amx_tiles(bf16* dst, const bf16* W, int64_t N, int64_t K);

// Panel order: elements of the (N, K) weight in pack_panels' layout and where element (n, k)
// lies in it. Panels of 16 columns are grouped in spans, interleaved so that a span is one
// contiguous stream for a tile that reads all its panels. f32: one panel a span, N rounded up
// to 16, times K; (n / 16) * 16 * K + k * 16 + n % 16. bf16: spans of 8 panels (128 columns),
// N rounded up to 128, times K; (n / 128) * 128 * K + k * 128 + n % 128 (a span's row at one k:
// its 8 panels' 16 weights each). int8: spans of 4 panels (64 columns), N rounded up
// to 64, times K rounded up to 4 (K4); (n / 64) * 64 * K4 + (k / 4) * 256 + (n % 64) * 4 + k % 4
// (64 bytes hold one panel's 16 columns at 4 consecutive k, one 32-bit lane a column).
// Element (n, k) of a view lies at panels_index(format, n + col0, k, K) from its data.
int64_t panels_elements(WeightFormat format, int64_t N, int64_t K);
int64_t panels_index(WeightFormat format, int64_t n, int64_t k, int64_t K);
// Rows [r0, r0 + n) of a panel-order view, as a view (r0 a multiple of 16: whole panels).
WeightView panels_view_rows(const WeightView& w, int64_t r0, int64_t n);
// W (N, K) row-major, elements of `format` (float, bf16 or int8_t) -> dst (panels_elements of
// them) in panel order, the padding columns zero. int8 scales stay per row (N), as they are.
void pack_panels(void* dst, const void* W, WeightFormat format, int64_t N, int64_t K);
// Where element (n, k) of `w` lies in w.data, in w's layout.
int64_t weight_element_index(const WeightView& w, int64_t n, int64_t k);

namespace detail {
// The AMX kernel itself (weight_matmul_amx.cpp; M = 1 on vector loads unless w.batch_invariant),
// for any M: false (nothing written) unless
// weight_matmul_uses_amx(w). Same contract as weight_matmul; the epilogue is applied to each
// 32-column block of a row as it is finished (checked by the caller).
bool weight_matmul_amx(float* y, int64_t ldy, const float* x, int64_t M, const WeightView& w,
                       const float* bias, const MatmulEpilogue& epilogue);
}  // namespace detail

// Quantizes W (N, K) f32 into q (N, K) and scales (N) as described above.
void quantize_rows_int8(int8_t* q, float* scales, const float* W, int64_t N, int64_t K);

}  // namespace loom::kernels
