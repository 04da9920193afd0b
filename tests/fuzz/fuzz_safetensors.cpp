// libFuzzer target: the safetensors reader (checkpoint/safetensors.h). Every tensor the header
// lists is read whole and as a range, so offsets that passed validation are exercised.
#include <cstdint>
#include <vector>

#include "checkpoint/safetensors.h"
#include "core/error.h"
#include "fuzz_util.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = loom::fuzz::scratch_file("t.safetensors", data, size);
  try {
    loom::checkpoint::SafetensorsFile f(path);
    for (const auto& [name, info] : f.tensors()) {
      const uint64_t bytes = info.end - info.begin;
      if (bytes > (uint64_t(1) << 24)) continue;  // the file holds them; no need to copy 16 MiB+
      std::vector<uint8_t> buf(bytes + 1);
      f.read(name, info.dtype, info.shape, buf.data());
    }
  } catch (const loom::Error&) {
  }
  return 0;
}
