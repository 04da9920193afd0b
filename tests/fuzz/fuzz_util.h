// tests/fuzz/fuzz_util.h: helpers shared by the libFuzzer targets.
//
// Every target feeds one reader bytes it did not write and accepts exactly two outcomes: the
// reader returns, or it throws loom::Error (a clear refusal). Anything else -- a crash, a
// sanitizer report, another exception type escaping, a hang -- is a finding.
#pragma once

#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

namespace loom::fuzz {

// A file holding `data`, for readers that take a path (mmap-based ones included). One per
// process, rewritten for every input; in /dev/shm when it exists so no disk is touched.
inline std::string scratch_file(const char* name, const uint8_t* data, size_t size) {
  const char* dir = access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp";
  const std::string path = std::string(dir) + "/loom-fuzz-" + std::to_string(getpid()) + "-" + name;
  std::FILE* f = std::fopen(path.c_str(), "wb");
  if (f == nullptr) std::abort();
  if (size > 0 && std::fwrite(data, 1, size, f) != size) std::abort();
  std::fclose(f);
  return path;
}

}  // namespace loom::fuzz
