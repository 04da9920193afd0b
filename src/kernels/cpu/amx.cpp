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

bool amx_bf16_usable() {
  static const bool usable = [] {
    if (!LOOM_AMX_KERNELS) return false;
    const char* env = std::getenv("LOOM_AMX");
    if (env && std::strcmp(env, "0") == 0) return false;
#if defined(__x86_64__)
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (__get_cpuid_max(0, nullptr) < 7) return false;
    __cpuid(1, a, b, c, d);
    if (!((c >> 27) & 1)) return false;  // OSXSAVE: xgetbv may be used
    __cpuid_count(7, 0, a, b, c, d);
    const bool tile = (d >> 24) & 1, amx_bf16 = (d >> 22) & 1, avx512f = (b >> 16) & 1,
               avx512bw = (b >> 30) & 1;
    if (!(tile && amx_bf16 && avx512f && avx512bw)) return false;
    __cpuid_count(7, 1, a, b, c, d);
    if (!((a >> 5) & 1)) return false;  // AVX512-BF16
    unsigned lo = 0, hi = 0;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    // XCR0: SSE/AVX (bits 1-2), AVX-512 state (5-7), tile config and data (17-18).
    if ((lo & 0x600e6u) != 0x600e6u) return false;
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
    return false;
#endif
  }();
  return usable;
}

bool avx512_bf16_usable() {
  static const bool usable = [] {
    if (!LOOM_AMX_KERNELS) return false;
    const char* env = std::getenv("LOOM_AVX512_BF16");
    if (env && std::strcmp(env, "0") == 0) return false;
#if defined(__x86_64__)
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (__get_cpuid_max(0, nullptr) < 7) return false;
    __cpuid(1, a, b, c, d);
    if (!((c >> 27) & 1)) return false;  // OSXSAVE: xgetbv may be used
    __cpuid_count(7, 0, a, b, c, d);
    const bool avx512f = (b >> 16) & 1, avx512dq = (b >> 17) & 1, avx512bw = (b >> 30) & 1,
               avx512vl = (b >> 31) & 1;
    if (!(avx512f && avx512dq && avx512bw && avx512vl)) return false;
    __cpuid_count(7, 1, a, b, c, d);
    if (!((a >> 5) & 1)) return false;  // AVX512-BF16
    unsigned lo = 0, hi = 0;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return (lo & 0xe6u) == 0xe6u;  // XCR0: SSE/AVX (bits 1-2), AVX-512 state (5-7)
#else
    return false;
#endif
  }();
  return usable;
}

}  // namespace loom::kernels
