// kernels/cpu/bandwidth.h: a memory read-bandwidth probe, the yardstick for memory-bound kernels
// (weight_matmul at decode batch sizes reads each weight once per token, so its speed limit is
// the rate at which the machine can stream bytes from DRAM).
#pragma once

#include <cstddef>

namespace loom::kernels {

// Streams a freshly allocated buffer of `bytes` (default 512 MiB, well above the last-level
// cache of the development machines) with `threads` OpenMP threads, each summing its own
// contiguous slice with vector loads, and returns the best rate over `repeats` passes in GB/s
// (1e9 bytes per second of bytes read). The first pass (page faults) is not timed.
// threads <= 0 means omp_get_max_threads(). Throws loom::Error if bytes < 1 MiB or repeats < 1.
// Allocates and frees the buffer; no state is kept (ReadBandwidthProbe keeps it).
double measure_read_bandwidth_gbs(int threads, size_t bytes = size_t(512) << 20, int repeats = 5);

// The same probe with its buffer kept, for benchmarks that measure the ceiling several times
// beside the work they compare with it (machines shared with other tenants drift within
// seconds): the constructor allocates and first-touches the buffer (page faults outside every
// timed pass), measure(repeats) returns the best of `repeats` timed passes in GB/s.
class ReadBandwidthProbe {
 public:
  explicit ReadBandwidthProbe(int threads, size_t bytes = size_t(512) << 20);
  ~ReadBandwidthProbe();
  ReadBandwidthProbe(const ReadBandwidthProbe&) = delete;
  ReadBandwidthProbe& operator=(const ReadBandwidthProbe&) = delete;
  double measure(int repeats = 5);

 private:
  int threads_ = 0;
  size_t per_thread_ = 0;  // floats each thread reads
  float* buf_ = nullptr;
};

}  // namespace loom::kernels
