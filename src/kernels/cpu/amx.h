// kernels/cpu/amx.h: whether this process can run Intel AMX-BF16 tile instructions, and the tile
// configuration loom's AMX kernels share (attention/flash_attention_amx.cpp,
// kernels/cpu/weight_matmul_amx.cpp).
//
// amx_bf16_usable() is true when the CPU has AMX-TILE, AMX-BF16 and AVX-512 (F, BW, BF16: the
// kernels' f32 <-> bf16 conversions), the OS saves the tile state (XCR0 bits 17-18), Linux
// granted this process the tile data (arch_prctl ARCH_REQ_XCOMP_PERM), and LOOM_AMX is not "0"
// (LOOM_AMX=0 turns every AMX path off, to compare against the AVX-512 ones). Checked once.
#pragma once

namespace loom::kernels {

bool amx_bf16_usable();

}  // namespace loom::kernels
