// train/plot.h: the loss plot of a run, as a self-contained SVG written by loom.
#pragma once

#include <string>
#include <vector>

namespace loom::train {

// Reads `metrics_jsonl` (one JSON object per step with "step", "loss" and optionally
// "val_loss") and writes an SVG with the train curve and the validation points/curve.
// Returns false (writing nothing) if the file has no steps.
bool write_loss_plot(const std::string& metrics_jsonl, const std::string& svg_path);

// Several runs in one SVG (`loom plot`, bench/moe/run.sh): each run's validation curve (points
// joined) in its own colour, its train curve thin and pale in the same colour, with a legend.
// Throws loom::Error naming a run whose metrics file has no steps.
struct LossRun {
  std::string label;
  std::string metrics_jsonl;
};
void write_loss_comparison(const std::vector<LossRun>& runs, const std::string& svg_path);

}  // namespace loom::train
