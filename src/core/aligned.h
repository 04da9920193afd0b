// core/aligned.h: std::vector storage aligned for streaming kernels.
//
// glibc's malloc serves large blocks with mmap and returns the page start + 16 bytes, so a plain
// std::vector of inference weights or KV cache starts 16 bytes past a cache line: every 64-byte
// vector load and every 64-byte row of an AMX tile load then spans two lines. Measured on the
// 2-core Xeon with AMX (session 22), one thread, an L2-resident 1024 x 768 bf16 weight: the tile
// kernel with its x parts 16 bytes off a line against aligned, M = 1 34-35 -> 32 us, M = 8 51 ->
// 43 us, M = 16 80-82 -> 63-64 us (docs/infer.md "Session 22").
//
// AlignedVector<T> is a std::vector whose data() is 64-byte aligned, and 2 MiB aligned from
// 4 MiB up (whole transparent huge pages: advise_huge_pages covers all of it, not only its
// 2 MiB-aligned interior).
#pragma once

#include <cstddef>
#include <cstdlib>
#include <new>
#include <vector>

namespace loom {

template <typename T>
struct AlignedAllocator {
  using value_type = T;
  static constexpr size_t kLine = 64;
  static constexpr size_t kHugePage = size_t(2) << 20;

  AlignedAllocator() noexcept = default;
  template <typename U>
  AlignedAllocator(const AlignedAllocator<U>&) noexcept {}

  static size_t alignment_for(size_t bytes) { return bytes >= 2 * kHugePage ? kHugePage : kLine; }

  T* allocate(size_t n) {
    if (n > size_t(-1) / sizeof(T)) throw std::bad_array_new_length();
    const size_t bytes = n * sizeof(T), align = alignment_for(bytes);
    // aligned_alloc wants a size that is a multiple of the alignment.
    void* p = std::aligned_alloc(align, bytes == 0 ? align : (bytes + align - 1) / align * align);
    if (!p) throw std::bad_alloc();
    return static_cast<T*>(p);
  }
  void deallocate(T* p, size_t) noexcept { std::free(p); }

  template <typename U>
  bool operator==(const AlignedAllocator<U>&) const noexcept { return true; }
};

template <typename T>
using AlignedVector = std::vector<T, AlignedAllocator<T>>;

}  // namespace loom
