// kernels/cpu/amx.h: whether this process can run Intel AMX-BF16 tile instructions, and the tile
// configuration loom's AMX kernels share (attention/flash_attention_bf16.cpp,
// kernels/cpu/weight_matmul_amx.cpp).
//
// amx_bf16_usable() is true when the CPU has AMX-TILE, AMX-BF16 and AVX-512 (F, DQ, BW, VL,
// BF16: the kernels' f32 <-> bf16 conversions), the OS saves the tile state (XCR0 bits 17-18),
// Linux granted this process the tile data (arch_prctl ARCH_REQ_XCOMP_PERM), and LOOM_AMX is not
// "0" (LOOM_AMX=0 turns every AMX path off, to compare against the AVX-512 ones), and this build
// compiled the kernels (LOOM_AMX_KERNELS). Checked once.
#pragma once

#include <cstdint>

// Whether this build compiles the AMX kernels at all. Not under clang when the build's base target
// lacks AVX-512F: clang rejects the 512-bit vector calls between the kernels (compiled for AMX
// and AVX-512) and the base-target vector helpers they use, where GCC inlines them. Such builds
// report AMX as unusable. (loom builds with -march=native: on CPUs with AMX the base has AVX-512.)
#if defined(__clang__) && !defined(__AVX512F__)
#define LOOM_AMX_KERNELS 0
#else
#define LOOM_AMX_KERNELS 1
#endif

// LOOM_AMX_BEGIN ... LOOM_AMX_END: functions defined between them are compiled for AMX and
// AVX-512 whatever the build's -march (GCC: a target pragma; clang, which has none, applies the
// target attribute to every function in the region). Keep inside only functions with internal
// linkage and no standard-library templates, include every header before LOOM_AMX_BEGIN, and
// call them only after amx_bf16_usable(): then none of that code runs or is shared elsewhere.
#if defined(__clang__)
#define LOOM_AMX_BEGIN                                                                  \
  _Pragma("clang attribute push(__attribute__((target(\"avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,amx-tile,amx-bf16\"))), apply_to = function)")
#define LOOM_AMX_END _Pragma("clang attribute pop")
#else
#define LOOM_AMX_BEGIN \
  _Pragma("GCC push_options")                                                           \
  _Pragma("GCC target(\"avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,amx-tile,amx-bf16\")")
#define LOOM_AMX_END _Pragma("GCC pop_options")
#endif

namespace loom::kernels {

bool amx_bf16_usable();

// True when the CPU has AVX-512 F, BW, VL, DQ and BF16 (VDPBF16PS: 32 bf16 products summed
// pairwise into 16 f32 lanes per instruction), the OS saves the AVX-512 state (XCR0 bits 5-7),
// this build compiled the kernels (LOOM_AMX_KERNELS, whose target region also enables these), and
// LOOM_AVX512_BF16 is not "0". Checked once. Code built in the LOOM_AMX_BEGIN region that uses
// no tile instruction may run when this alone is true.
bool avx512_bf16_usable();

// The 64-byte tile configuration LDTILECFG reads (palette 1).
struct alignas(64) AmxTileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// tmm0-7 all 16 rows x 64 bytes (16 f32, 32 bf16 or 16 bf16 pairs per row): the shape every loom
// AMX kernel uses. The caller loads it with _tile_loadconfig in each thread.
inline AmxTileConfig amx_tiles_16x64() {
  AmxTileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  return cfg;
}

}  // namespace loom::kernels
