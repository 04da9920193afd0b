// libFuzzer target: model config TOML (model/config.h, model_config_from_toml).
#include <cstdint>
#include <string>

#include "core/error.h"
#include "model/config.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  try {
    const loom::model::ModelConfig c = loom::model::model_config_from_toml(text, "fuzz.toml");
    // A config that passed validation must be usable: its sizes computed without overflow.
    (void)c.num_params();
    (void)c.sequence_activation_bytes();
    (void)c.to_toml();
  } catch (const loom::Error&) {
  }
  return 0;
}
