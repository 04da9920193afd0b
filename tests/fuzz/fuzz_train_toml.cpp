// libFuzzer target: training config TOML (train/train_config.h, load_train_config), with and
// without a --set override taken from the input's first line.
#include <cstdint>
#include <string>
#include <vector>

#include "core/error.h"
#include "fuzz_util.h"
#include "train/train_config.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = loom::fuzz::scratch_file("train.toml", data, size);
  const std::string text(reinterpret_cast<const char*>(data), size);
  std::vector<std::string> overrides;
  const size_t nl = text.find('\n');
  if (nl != std::string::npos && text.rfind("#set ", 0) == 0) overrides.push_back(text.substr(5, nl - 5));
  try {
    (void)loom::train::load_train_config(path, overrides);
  } catch (const loom::Error&) {
  }
  return 0;
}
