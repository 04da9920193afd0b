// model/memory.h: bytes a training rank allocates, by category, as a function of the model and
// the run settings. The engine (model/gpt.cpp) allocates exactly these buffers and the tests
// compare this prediction with what the MemoryPool measures, so the planner can trust it.
#pragma once

#include <cstdint>

#include "model/config.h"
#include "model/stage.h"

namespace loom::model {

struct MemoryEstimate {
  int64_t weights = 0;      // f32 master (+ bf16 copy in bf16 mode)
  int64_t grads = 0;        // f32
  int64_t optimizer = 0;    // AdamW m and v, f32
  int64_t activations = 0;  // peak of saved activations over one micro-batch's forward+backward
};

MemoryEstimate estimate_training_memory(const ModelConfig& cfg, int64_t B, int64_t T,
                                        Precision precision, Recompute recompute);

}  // namespace loom::model
