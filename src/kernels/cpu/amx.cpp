// kernels/cpu/amx.cpp: see amx.h.
#include "kernels/cpu/amx.h"

#include <sys/syscall.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>

#if defined(__x86_64__)
#include <cpuid.h>
#endif

namespace loom::kernels {

namespace {

// What CPUID and XCR0 say about AVX-512 (F, DQ, BW, VL, BF16) and AMX (TILE, BF16), read once.
struct X86Features {
  bool avx512_bf16 = false;  // AVX-512 F/DQ/BW/VL/BF16 and the OS saves the AVX-512 state
  bool amx_bf16 = false;     // AMX-TILE/BF16 too, and the OS saves the tile state
};
const X86Features& x86_features() {
  static const X86Features f = [] {
    X86Features r;
#if defined(__x86_64__)
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (__get_cpuid_max(0, nullptr) < 7) return r;
    __cpuid(1, a, b, c, d);
    if (!((c >> 27) & 1)) return r;  // OSXSAVE: xgetbv may be used
    __cpuid_count(7, 0, a, b, c, d);
    const bool avx512 = ((b >> 16) & 1) && ((b >> 17) & 1) && ((b >> 30) & 1) && ((b >> 31) & 1);
    const bool tile = ((d >> 24) & 1) && ((d >> 22) & 1);  // AMX-TILE, AMX-BF16
    __cpuid_count(7, 1, a, b, c, d);
    const bool bf16 = (a >> 5) & 1;  // AVX512-BF16
    unsigned lo = 0, hi = 0;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    // XCR0: SSE/AVX (bits 1-2), AVX-512 state (5-7), tile config and data (17-18).
    r.avx512_bf16 = avx512 && bf16 && (lo & 0xe6u) == 0xe6u;
    r.amx_bf16 = r.avx512_bf16 && tile && (lo & 0x60000u) == 0x60000u;
#endif
    return r;
  }();
  return f;
}

bool env_off(const char* name) {
  const char* env = std::getenv(name);
  return env && std::strcmp(env, "0") == 0;
}

}  // namespace

bool amx_bf16_usable() {
  static const bool usable = [] {
    if (!LOOM_AMX_KERNELS || env_off("LOOM_AMX") || !x86_features().amx_bf16) return false;
#if defined(__x86_64__)
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
    return false;
#endif
  }();
  return usable;
}

bool avx512_bf16_usable() {
  static const bool usable =
      LOOM_AMX_KERNELS && !env_off("LOOM_AVX512_BF16") && x86_features().avx512_bf16;
  return usable;
}

}  // namespace loom::kernels
