#include "train/plot.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>
#include <vector>

#include "core/error.h"

namespace loom::train {

bool write_loss_plot(const std::string& metrics_jsonl, const std::string& svg_path) {
  std::ifstream in(metrics_jsonl);
  std::vector<std::pair<double, double>> train, val;
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty()) continue;
    auto j = nlohmann::json::parse(line, nullptr, false);
    if (j.is_discarded() || !j.contains("step") || !j.contains("loss")) continue;
    train.emplace_back(j["step"].get<double>(), j["loss"].get<double>());
    if (j.contains("val_loss")) val.emplace_back(j["step"].get<double>(), j["val_loss"].get<double>());
  }
  if (train.empty()) return false;
  double x0 = train.front().first, x1 = train.back().first;
  double y0 = 1e300, y1 = -1e300;
  for (auto* s : {&train, &val})
    for (auto& [x, y] : *s) {
      y0 = std::min(y0, y);
      y1 = std::max(y1, y);
    }
  if (x1 <= x0) x1 = x0 + 1;
  if (y1 <= y0) y1 = y0 + 1;
  const double W = 720, H = 420, L = 60, R = 20, T = 30, B = 45;
  auto px = [&](double x) { return L + (x - x0) / (x1 - x0) * (W - L - R); };
  auto py = [&](double y) { return T + (y1 - y) / (y1 - y0) * (H - T - B); };
  auto path = [&](const std::vector<std::pair<double, double>>& s) {
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
  o << fmt::format("<text x=\"{}\" y=\"18\">loss (nats/token): train (blue), validation (orange)"
                   "</text>\n", L);
  o << "<path d=\"" << path(train) << "\" fill=\"none\" stroke=\"#1f77b4\" stroke-width=\"1.5\"/>\n";
  if (!val.empty()) {
    o << "<path d=\"" << path(val) << "\" fill=\"none\" stroke=\"#ff7f0e\" stroke-width=\"2\"/>\n";
    for (auto& [x, y] : val)
      o << fmt::format("<circle cx=\"{:.1f}\" cy=\"{:.1f}\" r=\"3\" fill=\"#ff7f0e\"/>\n", px(x), py(y));
  }
  o << "</svg>\n";
  return true;
}

}  // namespace loom::train
