// tests/dist/train/train_helpers.h: helpers shared by the distributed trainer tests.
#pragma once

#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <string>

#include "comm/process_group.h"

namespace loom::train_test {

// ||a-b|| / ||b|| over the whole parameter vector. (Not the max over elements: AdamW divides
// each gradient by its own RMS, so an element whose gradient is near zero moves by about lr in
// the direction of its rounding noise, and a few such elements differ by ~lr*1e-2 between
// summation orders; measured max |a-b|/max|b| here ~1.4e-5.)
inline double relative_l2(const float* a, const float* b, int64_t n) {
  double e = 0, s = 0;
  for (int64_t i = 0; i < n; ++i) {
    e += (double(a[i]) - double(b[i])) * (double(a[i]) - double(b[i]));
    s += double(b[i]) * double(b[i]);
  }
  return std::sqrt(e / s);
}

// One directory for all ranks (rank 0's pid), so a checkpoint written by rank 0 is found.
inline std::string shared_dir(const comm::ProcessGroup& world, const std::string& name) {
  int64_t pid = world.rank() == 0 ? int64_t(::getpid()) : 0;
  world.all_reduce(comm::BufferRef(&pid, 1, DType::i64)).wait();
  return (std::filesystem::temp_directory_path() / ("loom_" + name + "_" + std::to_string(pid)))
      .string();
}

}  // namespace loom::train_test
