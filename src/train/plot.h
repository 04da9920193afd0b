// train/plot.h: the loss plot of a run, as a self-contained SVG written by loom.
#pragma once

#include <string>

namespace loom::train {

// Reads `metrics_jsonl` (one JSON object per step with "step", "loss" and optionally
// "val_loss") and writes an SVG with the train curve and the validation points/curve.
// Returns false (writing nothing) if the file has no steps.
bool write_loss_plot(const std::string& metrics_jsonl, const std::string& svg_path);

}  // namespace loom::train
