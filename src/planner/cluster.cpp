// planner/cluster.cpp: see cluster.h. Strict TOML reading: every key is checked against the
// keys its table allows, and every number against its unit's valid range.
#include "planner/cluster.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <set>
#include <sstream>

#include <fmt/format.h>
#include <toml++/toml.h>

#include "core/config_file.h"
#include "core/error.h"

namespace loom::planner {

const char* collective_name(Collective c) {
  switch (c) {
    case Collective::all_reduce: return "all_reduce";
    case Collective::all_gather: return "all_gather";
    case Collective::reduce_scatter: return "reduce_scatter";
    case Collective::send: return "send";
    case Collective::all_to_all: return "all_to_all";
  }
  return "?";
}

double LinkLevel::time(Collective c, double bytes, int p) const {
  if (p <= 1 && c != Collective::send) return 0;
  const auto [a, b] = factors[size_t(c)];
  const double beta = bandwidth_Bps * efficiency;  // bytes/s actually reached
  if (c == Collective::send) return a * latency_s + b * bytes / beta;
  const double steps = double(p - 1);
  return a * steps * latency_s + b * (steps / double(p)) * bytes / beta;
}

double EfficiencyTable::at_units(double x) const {
  LOOM_ASSERT(!points.empty(), "efficiency table is empty");
  const double g = std::max(x, 1e-12);
  if (g <= points.front().first) return points.front().second;
  if (g >= points.back().first) return points.back().second;
  for (size_t i = 1; i < points.size(); ++i)
    if (g <= points[i].first) {
      // Linear in log(size): efficiency curves of GEMM libraries rise roughly logarithmically
      // with problem size until they saturate (a modelling choice, stated in cluster.h).
      const auto [x0, y0] = points[i - 1];
      const auto [x1, y1] = points[i];
      const double t = (std::log(g) - std::log(x0)) / (std::log(x1) - std::log(x0));
      return y0 + t * (y1 - y0);
    }
  return points.back().second;
}

namespace {

struct Reader {
  std::string source;

  void only_keys(const toml::table& t, const std::string& where,
                 const std::set<std::string>& allowed) const {
    for (auto&& [k, v] : t) {
      const std::string key(k.str());
      if (!allowed.count(key)) {
        std::string list;
        for (const auto& a : allowed) list += (list.empty() ? "" : ", ") + a;
        LOOM_FAIL("{}: unknown key '{}{}'; allowed keys here: {}", source, where, key, list);
      }
    }
  }
  double number(const toml::table& t, const std::string& where, const std::string& key,
                const char* unit, double lo, double hi, std::optional<double> dflt = {}) const {
    const toml::node* n = t.get(key);
    if (!n) {
      LOOM_CHECK(dflt.has_value(), "{}: missing key '{}{}' ({})", source, where, key, unit);
      return *dflt;
    }
    std::optional<double> v = n->value<double>();
    LOOM_CHECK(v.has_value() && (n->is_integer() || n->is_floating_point()),
               "{}: key '{}{}' must be a number in {}", source, where, key, unit);
    LOOM_CHECK(std::isfinite(*v) && *v >= lo && *v <= hi,
               "{}: key '{}{}' = {} is outside [{}, {}] ({})", source, where, key, *v, lo, hi, unit);
    return *v;
  }
  int integer(const toml::table& t, const std::string& where, const std::string& key,
              const char* unit, int64_t lo, int64_t hi) const {
    const toml::node* n = t.get(key);
    LOOM_CHECK(n, "{}: missing key '{}{}' ({})", source, where, key, unit);
    LOOM_CHECK(n->is_integer(), "{}: key '{}{}' must be an integer ({})", source, where, key, unit);
    const int64_t v = *n->value<int64_t>();
    LOOM_CHECK(v >= lo && v <= hi, "{}: key '{}{}' = {} is outside [{}, {}] ({})", source, where,
               key, v, lo, hi, unit);
    return int(v);
  }
  std::string string(const toml::table& t, const std::string& where, const std::string& key,
                     std::optional<std::string> dflt = {}) const {
    const toml::node* n = t.get(key);
    if (!n) {
      LOOM_CHECK(dflt.has_value(), "{}: missing key '{}{}' (a string)", source, where, key);
      return *dflt;
    }
    LOOM_CHECK(n->is_string(), "{}: key '{}{}' must be a string", source, where, key);
    return *n->value<std::string>();
  }
  const toml::table& table(const toml::table& t, const std::string& where,
                           const std::string& key) const {
    const toml::node* n = t.get(key);
    LOOM_CHECK(n && n->is_table(), "{}: missing table [{}{}]", source, where, key);
    return *n->as_table();
  }
  std::pair<double, double> pair(const toml::table& t, const std::string& where,
                                 const std::string& key) const {
    const toml::node* n = t.get(key);
    LOOM_CHECK(n, "{}: missing key '{}{}' ([latency factor, bandwidth factor], dimensionless)",
               source, where, key);
    const toml::array* a = n->as_array();
    LOOM_CHECK(a && a->size() == 2 && (*a)[0].value<double>() && (*a)[1].value<double>(),
               "{}: key '{}{}' must be [latency factor, bandwidth factor] (two numbers, "
               "dimensionless; a ring all-reduce is [2, 2])",
               source, where, key);
    const double x = *(*a)[0].value<double>(), y = *(*a)[1].value<double>();
    LOOM_CHECK(x >= 0 && y > 0 && x < 1e6 && y < 1e6,
               "{}: key '{}{}' = [{}, {}]: factors must be >= 0 (latency) and > 0 (bandwidth)",
               source, where, key, x, y);
    return {x, y};
  }
  // [a, b]: two positive numbers in (0, 10], dimensionless ratios (what `meaning` says).
  std::pair<double, double> ratios(const toml::table& t, const std::string& where,
                                   const std::string& key, const char* meaning) const {
    const toml::array* a = t.get(key) ? t.get(key)->as_array() : nullptr;
    LOOM_CHECK(a && a->size() == 2 && (*a)[0].value<double>() && (*a)[1].value<double>(),
               "{}: key '{}{}' must be two numbers ({})", source, where, key, meaning);
    const double x = *(*a)[0].value<double>(), y = *(*a)[1].value<double>();
    LOOM_CHECK(x > 0 && y > 0 && x <= 10 && y <= 10,
               "{}: key '{}{}' = [{}, {}]: both must be in (0, 10] ({})", source, where, key, x,
               y, meaning);
    return {x, y};
  }
  // [[size, efficiency], ...]: `unit` names the size (gflop: 1e9 FLOPs of one product; MB: 1e6
  // bytes moved), `meaning` what an entry says.
  EfficiencyTable efficiency(const toml::table& t, const std::string& where, const std::string& key,
                             const char* unit = "gflop",
                             const char* meaning = "a matmul of gflop*1e9 FLOPs reaches that "
                                                   "fraction of peak") const {
    const toml::node* n = t.get(key);
    LOOM_CHECK(n, "{}: missing key '{}{}' ([[{}, efficiency], ...]: {})", source, where, key, unit,
               meaning);
    const toml::array* a = n->as_array();
    LOOM_CHECK(a && !a->empty(), "{}: key '{}{}' must be a non-empty list of [{}, efficiency]",
               source, where, key, unit);
    EfficiencyTable e;
    for (size_t i = 0; i < a->size(); ++i) {
      const toml::array* p = (*a)[i].as_array();
      LOOM_CHECK(p && p->size() == 2 && (*p)[0].value<double>() && (*p)[1].value<double>(),
                 "{}: key '{}{}' entry {} must be [{}, efficiency] (two numbers)", source, where,
                 key, i, unit);
      const double g = *(*p)[0].value<double>(), f = *(*p)[1].value<double>();
      LOOM_CHECK(g > 0 && f > 0 && f <= 1,
                 "{}: key '{}{}' entry {} = [{}, {}]: {} must be > 0 and efficiency in (0, 1] "
                 "({})",
                 source, where, key, i, g, f, unit, meaning);
      LOOM_CHECK(e.points.empty() || g > e.points.back().first,
                 "{}: key '{}{}' entry {}: {} = {} must be larger than the previous entry's {}",
                 source, where, key, i, unit, g, e.points.back().first);
      e.points.emplace_back(g, f);
    }
    return e;
  }
  // [[ranks, cores' worth per rank], ...]: ranks integers >= 1 increasing, worth > 0.
  EfficiencyTable efficiency_like(const toml::table& t, const std::string& where,
                                  const std::string& key) const {
    const toml::array* a = t.get(key)->as_array();
    LOOM_CHECK(a && !a->empty(), "{}: key '{}{}' must be a list of [ranks, cores per rank]",
               source, where, key);
    EfficiencyTable e;
    for (size_t i = 0; i < a->size(); ++i) {
      const toml::array* p = (*a)[i].as_array();
      LOOM_CHECK(p && p->size() == 2 && (*p)[0].is_integer() && (*p)[1].value<double>(),
                 "{}: key '{}{}' entry {} must be [ranks (integer), cores per rank (number)]",
                 source, where, key, i);
      const double k = double(*(*p)[0].value<int64_t>()), v = *(*p)[1].value<double>();
      LOOM_CHECK(k >= 1 && v > 0 && v < 1e6 && (e.points.empty() || k > e.points.back().first),
                 "{}: key '{}{}' entry {} = [{}, {}]: ranks must be >= 1 and increasing, cores "
                 "per rank > 0",
                 source, where, key, i, k, v);
      e.points.emplace_back(k, v);
    }
    return e;
  }
  LinkLevel link(const toml::table& links, const std::string& level) const {
    const std::string where = "links." + level + ".";
    const toml::table& t = table(links, "links.", level);
    only_keys(t, where, {"latency_us", "bandwidth_GBps", "efficiency", "all_reduce", "all_gather",
                         "reduce_scatter", "send", "all_to_all"});
    LinkLevel l;
    l.latency_s = number(t, where, "latency_us", "microseconds", 0, 1e6) * 1e-6;
    l.bandwidth_Bps = number(t, where, "bandwidth_GBps", "GB/s = 1e9 bytes/s per rank and "
                                                         "direction", 1e-6, 1e6) * 1e9;
    l.efficiency = number(t, where, "efficiency", "fraction of bandwidth_GBps, in (0, 1]", 1e-3, 1);
    for (Collective c : {Collective::all_reduce, Collective::all_gather,
                         Collective::reduce_scatter, Collective::send})
      l.factors[size_t(c)] = pair(t, where, collective_name(c));
    if (t.get("all_to_all"))  // optional: files written before cp / ep keep the default [1, 1]
      l.factors[size_t(Collective::all_to_all)] = pair(t, where, "all_to_all");
    return l;
  }
};

}  // namespace

Cluster cluster_from_toml(const std::string& text, const std::string& source) {
  toml::table tbl;
  try {
    tbl = toml::parse(text, source);
  } catch (const toml::parse_error& e) {
    LOOM_FAIL("{}: TOML syntax error at line {}: {}", source, e.source().begin.line,
              std::string(e.description()));
  }
  Reader r{source};
  r.only_keys(tbl, "", {"name", "nodes", "devices_per_node", "device", "host", "kernels", "links"});
  Cluster c;
  c.source = source;
  c.name = r.string(tbl, "", "name");
  c.nodes = r.integer(tbl, "", "nodes", "a count of nodes", 1, 1 << 20);
  c.devices_per_node = r.integer(tbl, "", "devices_per_node", "ranks per node", 1, 1 << 12);
  const toml::table& d = r.table(tbl, "", "device");
  r.only_keys(d, "device.", {"peak_tflops_f32", "peak_tflops_bf16", "memory_GiB",
                             "memory_bandwidth_GBps", "matmul_efficiency_f32",
                             "matmul_efficiency_bf16", "bf16_emulated", "op_overhead_us",
                             "matmul_memory_efficiency"});
  c.peak_flops_f32 = r.number(d, "device.", "peak_tflops_f32", "1e12 FLOP/s", 1e-9, 1e6) * 1e12;
  c.peak_flops_bf16 = r.number(d, "device.", "peak_tflops_bf16", "1e12 FLOP/s", 1e-9, 1e6) * 1e12;
  c.memory_bytes = int64_t(r.number(d, "device.", "memory_GiB", "GiB = 2^30 bytes", 1e-6, 1e7) *
                           double(int64_t(1) << 30));
  c.memory_bandwidth_Bps =
      r.number(d, "device.", "memory_bandwidth_GBps", "GB/s = 1e9 bytes/s", 1e-6, 1e6) * 1e9;
  c.eff_f32 = r.efficiency(d, "device.", "matmul_efficiency_f32");
  c.eff_bf16 = r.efficiency(d, "device.", "matmul_efficiency_bf16");
  c.op_overhead_s =
      r.number(d, "device.", "op_overhead_us", "microseconds per kernel call", 0, 1e6, 0.0) * 1e-6;
  if (d.get("matmul_memory_efficiency"))
    c.matmul_memory_eff =
        r.efficiency(d, "device.", "matmul_memory_efficiency", "MB",
                     "a product moving MB*1e6 bytes reaches that fraction of memory_bandwidth");
  if (const toml::node* n = d.get("bf16_emulated")) {
    LOOM_CHECK(n->is_boolean(), "{}: key 'device.bf16_emulated' must be true or false", source);
    c.bf16_emulated = *n->value<bool>();
  }
  if (const toml::node* n = tbl.get("host")) {
    LOOM_CHECK(n->is_table(), "{}: 'host' must be a table", source);
    const toml::table& h = *n->as_table();
    r.only_keys(h, "host.", {"cores", "cpu_model", "calibrated", "concurrency", "memory_concurrency",
                             "step_concurrency", "step_unit"});
    c.host_cores = r.integer(h, "host.", "cores", "cores per host", 1, 1 << 16);
    c.cpu_model = r.string(h, "host.", "cpu_model", std::string());
    c.calibrated = r.string(h, "host.", "calibrated", std::string());
    if (h.get("concurrency")) {
      const EfficiencyTable t = r.efficiency_like(h, "host.", "concurrency");
      for (auto [k, v] : t.points) c.concurrency.emplace_back(int(k), v);
    }
    if (h.get("memory_concurrency")) {
      const EfficiencyTable t = r.efficiency_like(h, "host.", "memory_concurrency");
      for (auto [k, v] : t.points) c.memory_concurrency.emplace_back(int(k), v);
    }
    if (h.get("step_concurrency")) {
      const EfficiencyTable t = r.efficiency_like(h, "host.", "step_concurrency");
      for (auto [k, v] : t.points) c.step_concurrency.emplace_back(int(k), v);
    }
    if (h.get("step_unit")) {
      LOOM_CHECK(!c.step_concurrency.empty(), "{}: key 'host.step_unit' converts "
                 "'host.step_concurrency', which the file does not have: add the table or drop "
                 "the key (loom calibrate writes both)", source);
      c.step_unit_read = true;
    }
    c.step_unit = r.number(h, "host.", "step_unit",
                           "cores' worth of the cost model's price that one thread's training "
                           "step alone runs at (a ratio, 0.1 to 10)",
                           0.1, 10, 1.0);
  }
  if (const toml::node* n = tbl.get("kernels")) {
    LOOM_CHECK(n->is_table(), "{}: 'kernels' must be a table", source);
    const toml::table& k = *n->as_table();
    r.only_keys(k, "kernels.", {"matmul_layout_f32", "matmul_layout_bf16", "attention_fwd",
                                "attention_bwd", "attention_fwd_bf16", "attention_bwd_bf16",
                                "ns_per_element"});
    KernelCosts& kc = c.kernels;
    kc.measured = true;
    const char* layout = "[nt, tn]: the rate of x @ W^T and of dY^T @ X over that of dY @ W";
    kc.layout_f32 = r.ratios(k, "kernels.", "matmul_layout_f32", layout);
    kc.layout_bf16 = r.ratios(k, "kernels.", "matmul_layout_bf16", layout);
    const char* att = "the flash-attention kernel with products of gflop*1e9 FLOPs per (batch, "
                      "head) reaches that fraction of one core's f32 peak";
    kc.attention_fwd = r.efficiency(k, "kernels.", "attention_fwd", "gflop", att);
    kc.attention_bwd = r.efficiency(k, "kernels.", "attention_bwd", "gflop", att);
    const char* att16 = "bf16 attention on AMX tiles with products of gflop*1e9 FLOPs per (batch, "
                        "head) reaches that fraction of one core's bf16 peak";
    LOOM_CHECK(!k.get("attention_fwd_bf16") == !k.get("attention_bwd_bf16"),
               "{}: keys 'kernels.attention_fwd_bf16' and 'kernels.attention_bwd_bf16' come "
               "together (give both or neither)",
               source);
    if (k.get("attention_fwd_bf16")) {
      kc.attention_fwd_bf16 = r.efficiency(k, "kernels.", "attention_fwd_bf16", "gflop", att16);
      kc.attention_bwd_bf16 = r.efficiency(k, "kernels.", "attention_bwd_bf16", "gflop", att16);
    }
    const toml::table& e = r.table(k, "kernels.", "ns_per_element");
    const std::string w = "kernels.ns_per_element.";
    r.only_keys(e, w, {"layernorm_fwd", "layernorm_bwd", "bias_add", "add", "bias_bwd", "zero",
                       "gelu_fwd", "gelu_bwd", "fast_gelu_fwd", "fast_gelu_bwd", "gelu_erf_fwd",
                       "gelu_erf_bwd", "cross_entropy", "optimizer"});
    auto ns = [&](const char* key) {
      return r.number(e, w, key, "nanoseconds per element on one core", 0, 1e6) * 1e-9;
    };
    kc.layernorm_fwd = ns("layernorm_fwd");
    kc.layernorm_bwd = ns("layernorm_bwd");
    kc.bias_add = ns("bias_add");
    kc.add = ns("add");
    kc.bias_bwd = ns("bias_bwd");
    kc.zero = ns("zero");
    kc.cross_entropy = ns("cross_entropy");
    kc.optimizer = ns("optimizer");
    const char* acts[3] = {"gelu", "fast_gelu", "gelu_erf"};  // model::Activation order
    for (int a = 0; a < 3; ++a) {
      kc.act_fwd[size_t(a)] = ns(fmt::format("{}_fwd", acts[a]).c_str());
      kc.act_bwd[size_t(a)] = ns(fmt::format("{}_bwd", acts[a]).c_str());
    }
  }
  const toml::table& links = r.table(tbl, "", "links");
  r.only_keys(links, "links.", {"intra", "inter"});
  c.intra = r.link(links, "intra");
  c.inter = r.link(links, "inter");
  return c;
}

Cluster load_cluster(const std::string& path) {
  return cluster_from_toml(read_config_file(path, "cluster file"), path);
}

double Cluster::rank_share(int ranks) const {
  LOOM_ASSERT(ranks >= 1, "ranks = {}", ranks);
  // The training-step probe where present (cluster.h use_step_table): at every rank count in
  // files calibrated since session 17. Before, it priced only ranks >= cores, because its
  // one-rank entry (two threads here) read 1.06-1.42 steps alone where the products read 1.9,
  // which looked like a property of its small model; it was oneDNN primitives built in the
  // one-thread windows running the two-thread ones on one thread (kernels/cpu/matmul.cpp).
  // Measured right it reads 1.75, as codegeex-small's step does on two threads (1.745),
  // against the products' 1.85-1.93.
  const std::vector<std::pair<int, double>>& table =
      use_step_table(ranks) ? step_concurrency : concurrency;
  if (table.empty()) return double(std::max(host_cores, 1)) / ranks;
  const std::pair<int, double>* at = &table.front();
  for (const auto& e : table)
    if (e.first <= ranks) at = &e;
  // Beyond the table (or below its first entry) the ranks split what that entry's ranks had.
  // Ranks computing at once cannot together get more than the host's cores: an entry above
  // cores/ranks (its one-core unit read low, or a turbo clock with fewer cores busy) is capped
  // there (loom calibrate on a quiet 2-core host read 2 ranks at 1.14 cores' worth each).
  const double measured = at->second * double(at->first) / double(ranks);
  const double capped = std::min(measured, double(std::max(host_cores, 1)) / double(ranks));
  // The step table counts in one thread's steps alone; the cost model prices in cores. Their
  // ratio (step_unit: the probe step's one-core price over its measured time alone) converts,
  // after the cap, which is a bound in the table's own unit (ranks at once cannot together run
  // more steps than the cores run alone).
  return &table == &step_concurrency ? capped * step_unit : capped;
}

double Cluster::memory_share(int ranks) const {
  LOOM_ASSERT(ranks >= 1, "ranks = {}", ranks);
  if (memory_concurrency.empty() || use_step_table(ranks)) return rank_share(ranks);
  const std::pair<int, double>* at = &memory_concurrency.front();
  for (const auto& e : memory_concurrency)
    if (e.first <= ranks) at = &e;
  return at->second * double(at->first) / double(ranks);
}

std::string Cluster::to_toml() const {
  auto table = [](const EfficiencyTable& e) {
    std::string s = "[";
    for (size_t i = 0; i < e.points.size(); ++i)
      s += fmt::format("{}[{:.6g}, {:.4f}]", i ? ", " : "", e.points[i].first, e.points[i].second);
    return s + "]";
  };
  auto link = [](const LinkLevel& l, const char* level) {
    std::string s = fmt::format("[links.{}]\nlatency_us = {:.6g}\nbandwidth_GBps = {:.6g}\n"
                                "efficiency = {:.4g}\n",
                                level, l.latency_s * 1e6, l.bandwidth_Bps / 1e9, l.efficiency);
    for (int c = 0; c < kNumCollectives; ++c)
      s += fmt::format("{} = [{:.4g}, {:.4g}]\n", collective_name(Collective(c)),
                       l.factors[size_t(c)].first, l.factors[size_t(c)].second);
    return s;
  };
  std::string s = fmt::format("name = \"{}\"\nnodes = {}\ndevices_per_node = {}\n\n[device]\n", name,
                              nodes, devices_per_node);
  s += fmt::format("peak_tflops_f32 = {:.6g}\npeak_tflops_bf16 = {:.6g}\nmemory_GiB = {:.6g}\n"
                   "memory_bandwidth_GBps = {:.6g}\nmatmul_efficiency_f32 = {}\n"
                   "matmul_efficiency_bf16 = {}\nbf16_emulated = {}\nop_overhead_us = {:.4g}\n",
                   peak_flops_f32 / 1e12, peak_flops_bf16 / 1e12,
                   double(memory_bytes) / double(int64_t(1) << 30), memory_bandwidth_Bps / 1e9,
                   table(eff_f32), table(eff_bf16), bf16_emulated ? "true" : "false", op_overhead_s * 1e6);
  if (!matmul_memory_eff.points.empty())
    s += fmt::format("matmul_memory_efficiency = {}\n", table(matmul_memory_eff));
  if (host_cores > 0) {
    s += fmt::format("\n[host]\ncores = {}\ncpu_model = \"{}\"\ncalibrated = \"{}\"\n", host_cores,
                     cpu_model, calibrated);
    auto per_ranks = [&s](const char* key, const std::vector<std::pair<int, double>>& t) {
      if (t.empty()) return;
      s += fmt::format("{} = [", key);
      for (size_t i = 0; i < t.size(); ++i)
        s += fmt::format("{}[{}, {:.4f}]", i ? ", " : "", t[i].first, t[i].second);
      s += "]\n";
    };
    per_ranks("concurrency", concurrency);
    per_ranks("memory_concurrency", memory_concurrency);
    per_ranks("step_concurrency", step_concurrency);
    if (step_unit_read || step_unit != 1) s += fmt::format("step_unit = {:.4f}\n", step_unit);
  }
  if (kernels.measured) {
    const KernelCosts& k = kernels;
    s += fmt::format("\n[kernels]\nmatmul_layout_f32 = [{:.4f}, {:.4f}]\n"
                     "matmul_layout_bf16 = [{:.4f}, {:.4f}]\nattention_fwd = {}\n"
                     "attention_bwd = {}\n",
                     k.layout_f32.first, k.layout_f32.second, k.layout_bf16.first,
                     k.layout_bf16.second, table(k.attention_fwd), table(k.attention_bwd));
    if (!k.attention_fwd_bf16.points.empty())
      s += fmt::format("attention_fwd_bf16 = {}\nattention_bwd_bf16 = {}\n",
                       table(k.attention_fwd_bf16), table(k.attention_bwd_bf16));
    s += "\n[kernels.ns_per_element]\n";
    auto ns = [&](const char* key, double v) { s += fmt::format("{} = {:.4g}\n", key, v * 1e9); };
    ns("layernorm_fwd", k.layernorm_fwd);
    ns("layernorm_bwd", k.layernorm_bwd);
    ns("bias_add", k.bias_add);
    ns("add", k.add);
    ns("bias_bwd", k.bias_bwd);
    ns("zero", k.zero);
    const char* acts[3] = {"gelu", "fast_gelu", "gelu_erf"};
    for (int a = 0; a < 3; ++a) {
      ns(fmt::format("{}_fwd", acts[a]).c_str(), k.act_fwd[size_t(a)]);
      ns(fmt::format("{}_bwd", acts[a]).c_str(), k.act_bwd[size_t(a)]);
    }
    ns("cross_entropy", k.cross_entropy);
    ns("optimizer", k.optimizer);
  }
  s += '\n';
  s += link(intra, "intra");
  s += '\n';
  s += link(inter, "inter");
  return s;
}

std::string this_cpu_model() {
  // The model name alone does not identify a CPU: virtual machines often report a generic
  // "Intel(R) Xeon(R) Processor" for different generations (sessions 8 and 10 of this project
  // ran on two such CPUs with 2x different speeds and different vector units). So the string
  // also carries the family/model numbers, the vector and matrix extensions that change the
  // measured peaks, and the L3 size.
  std::ifstream f("/proc/cpuinfo");
  std::string line, name = "unknown", family, model, flags;
  auto value = [](const std::string& l) {
    const size_t colon = l.find(':');
    if (colon == std::string::npos) return std::string();
    std::string v = l.substr(colon + 1);
    v.erase(0, v.find_first_not_of(" \t"));
    return v;
  };
  while (std::getline(f, line)) {
    if (line.rfind("model name", 0) == 0 && name == "unknown") name = value(line);
    else if (line.rfind("cpu family", 0) == 0 && family.empty()) family = value(line);
    else if (line.rfind("model", 0) == 0 && line.rfind("model name", 0) != 0 && model.empty())
      model = value(line);
    else if (line.rfind("flags", 0) == 0 && flags.empty()) flags = fmt::format(" {} ", value(line));
    if (!flags.empty() && !model.empty() && !family.empty() && name != "unknown") break;
  }
  std::string isa;
  for (const char* fl : {"avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16"})
    if (flags.find(fmt::format(" {} ", fl)) != std::string::npos) {
      if (!isa.empty()) isa += ' ';
      isa += fl;
    }
  std::string l3;
  std::ifstream c("/sys/devices/system/cpu/cpu0/cache/index3/size");
  if (c && std::getline(c, l3)) l3 = "; L3 " + l3;
  else l3.clear();
  if (family.empty() && model.empty() && isa.empty()) return name;
  return fmt::format("{} [family {} model {}; {}{}]", name, family, model,
                     isa.empty() ? "no avx2" : isa, l3);
}

}  // namespace loom::planner
