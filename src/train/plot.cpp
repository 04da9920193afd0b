#include "train/plot.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>
#include <vector>

#include "core/error.h"

namespace loom::train {

namespace {

using Series = std::vector<std::pair<double, double>>;

// (train, val) points of a metrics.jsonl.
std::pair<Series, Series> read_metrics(const std::string& metrics_jsonl) {
  std::ifstream in(metrics_jsonl);
  Series train, val;
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty()) continue;
    auto j = nlohmann::json::parse(line, nullptr, false);
    if (j.is_discarded() || !j.contains("step") || !j.contains("loss")) continue;
    train.emplace_back(j["step"].get<double>(), j["loss"].get<double>());
    if (j.contains("val_loss")) val.emplace_back(j["step"].get<double>(), j["val_loss"].get<double>());
  }
  return {train, val};
}

struct Curve {
  const Series* points;
  std::string colour;
  double width;
  bool dots;
  double opacity;
};

// Axes over every curve, the curves, and `title` at the top.
void write_svg(const std::vector<Curve>& curves, const std::string& title,
               const std::string& svg_path) {
  double x0 = 1e300, x1 = -1e300, y0 = 1e300, y1 = -1e300;
  for (const Curve& c : curves)
    for (auto& [x, y] : *c.points) {
      x0 = std::min(x0, x);
      x1 = std::max(x1, x);
      y0 = std::min(y0, y);
      y1 = std::max(y1, y);
    }
  if (x1 <= x0) x1 = x0 + 1;
  if (y1 <= y0) y1 = y0 + 1;
  const double W = 720, H = 420, L = 60, R = 20, T = 30, B = 45;
  auto px = [&](double x) { return L + (x - x0) / (x1 - x0) * (W - L - R); };
  auto py = [&](double y) { return T + (y1 - y) / (y1 - y0) * (H - T - B); };
  auto path = [&](const Series& s) {
    std::string d;
    for (size_t i = 0; i < s.size(); ++i)
      d += fmt::format("{}{:.1f},{:.1f}", i ? " L" : "M", px(s[i].first), py(s[i].second));
    return d;
  };
  std::ofstream o(svg_path);
  LOOM_CHECK(o.good(), "cannot write the loss plot '{}'", svg_path);
  o << fmt::format("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{}\" "
                   "font-family=\"sans-serif\" font-size=\"12\">\n", W, H);
  o << "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n";
  o << fmt::format("<line x1=\"{0}\" y1=\"{1}\" x2=\"{2}\" y2=\"{1}\" stroke=\"black\"/>\n", L,
                   H - B, W - R);
  o << fmt::format("<line x1=\"{0}\" y1=\"{1}\" x2=\"{0}\" y2=\"{2}\" stroke=\"black\"/>\n", L, T,
                   H - B);
  for (int i = 0; i <= 4; ++i) {
    double y = y0 + (y1 - y0) * i / 4.0, x = x0 + (x1 - x0) * i / 4.0;
    o << fmt::format("<text x=\"{}\" y=\"{:.1f}\" text-anchor=\"end\">{:.2f}</text>\n", L - 5,
                     py(y) + 4, y);
    o << fmt::format("<text x=\"{:.1f}\" y=\"{}\" text-anchor=\"middle\">{:.0f}</text>\n", px(x),
                     H - B + 16, x);
  }
  o << fmt::format("<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">step</text>\n", (L + W - R) / 2,
                   H - 8);
  o << fmt::format("<text x=\"{}\" y=\"18\">{}</text>\n", L, title);
  for (const Curve& c : curves) {
    if (c.points->empty()) continue;
    o << "<path d=\"" << path(*c.points) << "\" fill=\"none\" stroke=\"" << c.colour
      << "\" stroke-width=\"" << c.width << "\" stroke-opacity=\"" << c.opacity << "\"/>\n";
    if (c.dots)
      for (auto& [x, y] : *c.points)
        o << fmt::format("<circle cx=\"{:.1f}\" cy=\"{:.1f}\" r=\"3\" fill=\"{}\"/>\n", px(x),
                         py(y), c.colour);
  }
  o << "</svg>\n";
}

}  // namespace

bool write_loss_plot(const std::string& metrics_jsonl, const std::string& svg_path) {
  const auto [train, val] = read_metrics(metrics_jsonl);
  if (train.empty()) return false;
  write_svg({{&train, "#1f77b4", 1.5, false, 1.0}, {&val, "#ff7f0e", 2, true, 1.0}},
            "loss (nats/token): train (blue), validation (orange)", svg_path);
  return true;
}

void write_loss_comparison(const std::vector<LossRun>& runs, const std::string& svg_path) {
  static const char* kColours[] = {"#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"};
  LOOM_CHECK(!runs.empty(), "no runs to plot");
  std::vector<std::pair<Series, Series>> data;
  for (const LossRun& r : runs) {
    data.push_back(read_metrics(r.metrics_jsonl));
    LOOM_CHECK(!data.back().first.empty(), "run '{}': '{}' holds no training steps", r.label,
               r.metrics_jsonl);
  }
  std::vector<Curve> curves;
  std::string title = "validation loss (nats/token; pale: train):";
  for (size_t i = 0; i < runs.size(); ++i) {
    const std::string c = kColours[i % 5];
    curves.push_back({&data[i].first, c, 1, false, 0.3});
    curves.push_back({&data[i].second, c, 2, true, 1.0});
    title += fmt::format(" <tspan fill=\"{}\">{}</tspan>", c, runs[i].label);
  }
  write_svg(curves, title, svg_path);
}

}  // namespace loom::train
