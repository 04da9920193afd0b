// core/memory_pool.h: every allocation loom makes, tagged by category and counted.
//
// The pool records current and peak bytes per category. These numbers are what the planner
// predicts and what the tests compare against, so every buffer that matters goes through a pool.
// A pool is a value passed to whoever allocates (no global pool). Counters are atomic: kernels
// may allocate workspace from OpenMP threads.
#pragma once

#include <array>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace loom {

enum class MemCategory : uint8_t { weights, grads, optimizer, activations, workspace, comm };
constexpr size_t kNumMemCategories = 6;
std::string_view mem_category_name(MemCategory c);

// glibc hands freed memory back to the OS by default (chunks above the dynamic mmap threshold
// are munmap()ed, a free heap top is trimmed), so a training step that frees and reallocates
// its activations page-faults them all back in (measured: ~85K minor faults, ~330 MB zeroed by
// the kernel per gpt2-124m step at 4 x 256; 8% of the step). This keeps them in the process:
// no per-allocation mmap, no trimming under 1 GiB. Every buffer goes through a MemoryPool, so
// its peak still bounds what is kept. Idempotent; LOOM_MALLOC_TUNE=0 leaves malloc alone.
void keep_freed_memory_in_process();

// Asks the kernel to back [p, p + bytes) with 2 MiB transparent huge pages where the host's
// policy is "madvise" (Debian's default): the 2 MiB-aligned interior of the range gets
// madvise(MADV_HUGEPAGE). Call it before the range is first written (pages already touched stay
// 4 KiB until the kernel's background collapse). For large buffers read in full every step
// (inference weights, the KV cache; MemoryPool::allocate does it for buffers of 4 MiB and more,
// memory glibc then keeps in the process, see above): one TLB entry covers 512 times as much,
// and streaming reads stall less on page walks (measured on gpt2-124m decode, 8 paired runs,
// each faster with it: 0-5% a step at batch 1 and 8, f32 and bf16). A hint: errors are
// ignored. LOOM_HUGE_PAGES=0 turns it off.
void advise_huge_pages(void* p, size_t bytes);

class MemoryPool {
 public:
  static constexpr size_t kAlignment = 64;

  // The first pool of the process also tunes glibc malloc to keep freed memory (see
  // keep_freed_memory_in_process).
  MemoryPool();
  MemoryPool(const MemoryPool&) = delete;
  MemoryPool& operator=(const MemoryPool&) = delete;

  // Returns kAlignment-aligned, uninitialised memory of `bytes` bytes (bytes may be 0: a valid
  // unique pointer is still returned). Throws loom::Error naming the size and category when the
  // system is out of memory.
  void* allocate(size_t bytes, MemCategory cat);
  // `bytes` and `cat` must be those given to allocate().
  void release(void* ptr, size_t bytes, MemCategory cat);

  int64_t current(MemCategory c) const { return stats_[size_t(c)].current.load(); }
  int64_t peak(MemCategory c) const { return stats_[size_t(c)].peak.load(); }
  int64_t current_total() const { return total_current_.load(); }
  int64_t peak_total() const { return total_peak_.load(); }
  // Sets every peak to its current value (start of a measured region).
  void reset_peaks();
  // {"weights": bytes, ...} for peaks, as a JSON object text.
  std::string peaks_json() const;

 private:
  struct Stat {
    std::atomic<int64_t> current{0};
    std::atomic<int64_t> peak{0};
  };
  std::array<Stat, kNumMemCategories> stats_;
  std::atomic<int64_t> total_current_{0};
  std::atomic<int64_t> total_peak_{0};
};

}  // namespace loom
