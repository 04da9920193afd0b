// kernels/cpu/weight_matmul_amx.cpp: weight_matmul for bf16 weights on Intel
// AMX tiles (weight_matmul.h, "AMX").
//
// Glossary as in weight_matmul.h: x (M, K) f32, W (N, K) bf16 row-major, y (M,
// N). A "pair" is two bf16 in one 32-bit word, the form of a tile product's
// second operand.
//
// The tile product TDPBF16PS C += A B (C 16 x 16 f32, A 16 rows of 32 bf16, B
// 16 rows of 16 pairs) multiplies bf16 exactly and accumulates in f32. It runs
// y^T = W x^T: A is 16 rows of W read in place (32 consecutive k of each row,
// the row stride K), B is x^T as pairs over k, packed once per call, C holds 16
// outputs n x 16 rows m.
//
// x stays f32 (the contract: a weight-only format does not round activations).
// Each row of x is split into three bf16 parts, x = hi + mid + lo (hi =
// bf16(x), mid = bf16(x - hi), lo = bf16(x - hi - mid); the two subtractions
// are exact), which together carry x's 24 significant bits, and C accumulates A
// hi + A mid + A lo. Every product is exact, so the result is the dot product
// of f32 x with the bf16 weights up to f32 accumulation rounding, as in the
// AVX-512 path (their summation orders differ, so their bits do). Exceptions:
// the tiles flush denormals, so a part below 2^-126 counts as 0 (an absolute
// error under 1e-38 per product), and an infinite x gives NaN (inf - inf in the
// split), where the AVX-512 path gives +-inf or NaN.
//
// Batch invariance: output (m, n) is accumulated in one C tile element, k in
// ascending chunks of 32, in each chunk hi then mid then lo, whatever M, the
// tile's other rows and columns, or the thread (threads split N). Bias is added
// last in f32.
//
// Opt-in (LOOM_AMX_WEIGHTS=1), because its sums differ from the AVX-512 path's
// in the last bits and weight_matmul uses it only for M >= 16: a bf16 row would
// then get different bits alone (decode, M < 16) and in a large prefill, and
// loom's decoder promises bf16 batch invariance (tests/unit/infer:
// Decoder.BatchInvariantBitwise). Using it for every M keeps invariance but is
// slower at decode sizes, as measured below; weights packed in tile order at
// load would fix that (not done). Speed, and why only M >= 16 (kAmxMinRows in
// weight_matmul.h): loading a weight tile (16 rows, each 64 bytes from a
// different row of W) stalls when W is not in L1/L2, and below 16 rows of x a
// tile is used once. Measured on GPT-2 124M's fc layer
// (bench_kernels_weight_matmul, bf16, 2 threads): M = 1 0.220 ms vs 0.201 ms
// for the AVX-512 path, M = 8 0.261 vs 0.234, M = 16 0.288 vs 0.426, M = 32
// 0.425 vs 0.769. So decode sizes keep the AVX-512 path.
#include <immintrin.h>
#include <omp.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "kernels/cpu/amx.h"
#include "kernels/cpu/weight_matmul.h"

namespace loom::kernels {
namespace {

constexpr int64_t kTileK = 32;  // k per tile product
constexpr int64_t kParts = 3;   // hi, mid, lo

// x (M, K) f32 -> parts (mblocks, 3, K/2, 16) pairs: part p of rows [16*mb,
// 16*mb + 16) as x^T pairs over k; rows past M are zero.
void pack_x(uint32_t* dst, const float* x, int64_t M, int64_t K) {
  const int64_t mblocks = (M + 15) / 16, per_part = K / 2 * 16;
  std::memset(dst, 0, size_t(mblocks * kParts * per_part) * 4);
  for (int64_t m = 0; m < M; ++m) {
    uint32_t* blk = dst + (m / 16) * kParts * per_part + (m % 16);
    const float* xr = x + m * K;
    for (int64_t k = 0; k < K; ++k) {
      float r = xr[k];
      const int shift = int(k & 1) * 16;
      for (int64_t p = 0; p < kParts; ++p) {
        const bf16 part = f32_to_bf16(r);
        r -= bf16_to_f32(part);
        blk[p * per_part + (k / 2) * 16] |= uint32_t(part.bits) << shift;
      }
    }
  }
}

}  // namespace

// Code built for AMX and AVX-512 (kernels/cpu/amx.h, LOOM_AMX_BEGIN).
#if LOOM_AMX_KERNELS
LOOM_AMX_BEGIN
namespace {

// Tiles: tmm0-3 C (n block 0/1 x m block 0/1), tmm4-5 A (two 16-row blocks of
// W), tmm6-7 B.
void configure_tiles() {
  const AmxTileConfig cfg = amx_tiles_16x64();
  _tile_loadconfig(&cfg);
}

// C for 32 weight rows (w, stride K bf16) x MB m blocks (1 or 2) starting at xp
// (the m block's packed parts), stored into c (32 x 32 f32, row = n, column =
// m).
template <int MB>
void tile_block(float* c, const uint16_t* w, int64_t K, const uint32_t* xp, int64_t per_part) {
  _tile_zero(0);
  _tile_zero(2);
  if constexpr (MB == 2) {
    _tile_zero(1);
    _tile_zero(3);
  }
  const int64_t ws = K * 2, mb_stride = kParts * per_part;
  for (int64_t k = 0; k < K; k += kTileK) {
    _tile_loadd(4, w + k, ws);
    _tile_loadd(5, w + 16 * K + k, ws);
    for (int64_t p = 0; p < kParts; ++p) {
      const uint32_t* b = xp + p * per_part + (k / 2) * 16;
      _tile_loadd(6, b, 64);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(2, 5, 6);
      if constexpr (MB == 2) {
        _tile_loadd(7, b + mb_stride, 64);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(3, 5, 7);
      }
    }
  }
  _tile_stored(0, c, 128);
  _tile_stored(2, c + 16 * 32, 128);
  if constexpr (MB == 2) {
    _tile_stored(1, c + 16, 128);
    _tile_stored(3, c + 16 * 32 + 16, 128);
  }
}

inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// tails: 32 * K bf16 per thread, for the last, partial block of weight rows.
// One thread of run_amx's parallel region (a function of its own so that clang,
// whose OpenMP outlining drops target attributes, compiles the tile code with
// them).
void run_amx_thread(float* y, int64_t ldy, int64_t M, const WeightView& w, const float* bias,
                    const uint32_t* xp, uint16_t* tails) {
  const int64_t N = w.N, K = w.K, per_part = K / 2 * 16;
  const int64_t mblocks = (M + 15) / 16, nblocks = (N + 31) / 32;
  const uint16_t* W = static_cast<const uint16_t*>(w.data);
  configure_tiles();
  alignas(64) float c[32 * 32];
  uint16_t* tail = tails + omp_get_thread_num() * 32 * K;
#pragma omp for schedule(dynamic, 4)
  for (int64_t nb = 0; nb < nblocks; ++nb) {
    const int64_t n0 = nb * 32, nn = min64(32, N - n0);
    const uint16_t* wb = W + n0 * K;
    if (nn < 32) {  // tile loads read 32 whole rows: never past W's end
      std::memset(tail, 0, size_t(32 * K) * 2);
      std::memcpy(tail, wb, size_t(nn * K) * 2);
      wb = tail;
    }
    for (int64_t mb = 0; mb < mblocks; mb += 2) {
      const int pair = mb + 1 < mblocks ? 2 : 1;
      const uint32_t* xb = xp + mb * kParts * per_part;
      if (pair == 2)
        tile_block<2>(c, wb, K, xb, per_part);
      else
        tile_block<1>(c, wb, K, xb, per_part);
      const int64_t m_end = min64(M, (mb + pair) * 16);
      for (int64_t m = mb * 16; m < m_end; ++m) {
        float* yr = y + m * ldy + n0;
        const int64_t col = m - mb * 16;
        for (int64_t n = 0; n < nn; ++n) yr[n] = c[n * 32 + col] + (bias ? bias[n0 + n] : 0.f);
      }
    }
  }
  _tile_release();
}

void run_amx(float* y, int64_t ldy, int64_t M, const WeightView& w, const float* bias,
             const uint32_t* xp, uint16_t* tails) {
#pragma omp parallel
  run_amx_thread(y, ldy, M, w, bias, xp, tails);
}

}  // namespace
LOOM_AMX_END
#endif  // LOOM_AMX_KERNELS

namespace detail {

bool weight_matmul_amx(float* y, int64_t ldy, const float* x, int64_t M, const WeightView& w,
                       const float* bias) {
  if (!(w.format == WeightFormat::bf16 && w.K > 0 && w.K % kTileK == 0 && amx_bf16_usable()))
    return false;
  if (ldy == 0) ldy = w.N;  // as weight_matmul
  if (M == 0 || w.N == 0) return true;
  const int64_t mblocks = (M + 15) / 16;
  std::vector<uint32_t> xp(size_t(mblocks * kParts * (w.K / 2) * 16));
  pack_x(xp.data(), x, M, w.K);
  const bool partial = w.N % 32 != 0;
  std::vector<uint16_t> tails(partial ? size_t(omp_get_max_threads() * 32 * w.K) : 0);
#if LOOM_AMX_KERNELS  // else amx_bf16_usable() was false above
  run_amx(y, ldy, M, w, bias, xp.data(), tails.data());
#else
  (void)y;
  (void)bias;
#endif
  return true;
}

}  // namespace detail

bool weight_matmul_uses_amx(const WeightView& w, int64_t M) {
  static const bool opted_in = [] {
    const char* env = std::getenv("LOOM_AMX_WEIGHTS");
    return env && std::strcmp(env, "1") == 0;
  }();
  return opted_in && M >= kAmxMinRows && w.format == WeightFormat::bf16 && w.K > 0 &&
         w.K % kTileK == 0 && amx_bf16_usable();
}

}  // namespace loom::kernels
