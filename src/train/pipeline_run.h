// train/pipeline_run.h: `loom train` with pipeline parallelism (pp = world size, dp = 1): the
// same loop, metrics and checkpoints as run_training(), over a PipelineExecutor.
#pragma once

#include <string>

#include "comm/process_group.h"
#include "train/train_config.h"
#include "train/trainer.h"

namespace loom::train {

// Checkpoints hold logical (unsharded) tensors, so they load at any layout: the stages' weights
// and AdamW moments are gathered by name on rank 0 to save, and each rank imports its own
// tensors on resume.
StepStats run_pipeline_training(const TrainConfig& cfg, const std::string& resume_dir,
                                const comm::ProcessGroup& world);

}  // namespace loom::train
