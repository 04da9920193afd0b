// `loom plan --model M.toml --cluster C.toml --devices N --global-batch B --seq T [--dtype]
// [--memory-limit GiB|auto] [--time-target S] [--json] [--svg F] [--emit-config]`: the
// (time, peak memory) frontier of every layout (planner/search.h), the fastest plan under the
// memory limit with its per-term breakdown and why its nearest rivals lost, the smallest-memory
// plan, and for a time target the fewest devices that meet it.
// `loom plan --explain "dp=2,tp=1,pp=2,zero=1,micro_batches=4,schedule=1f1b,recompute=full"`
// costs one plan (the string form every plan is printed in).
#include <algorithm>
#include <cstdio>
#include <fstream>
#include <memory>
#include <optional>
#include <string>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "cli.h"
#include "core/error.h"
#include "model/config.h"
#include "planner/cluster.h"
#include "planner/cost_model.h"
#include "planner/search.h"

namespace {

using namespace loom::planner;
using loom::parallel::ParallelPlan;

constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;

std::string gib(int64_t b) { return fmt::format("{:.3f}", double(b) / kGiB); }

std::string secs(double s) {
  if (s >= 1) return fmt::format("{:.3f} s", s);
  if (s >= 1e-3) return fmt::format("{:.3f} ms", s * 1e3);
  return fmt::format("{:.1f} us", s * 1e6);
}

nlohmann::json plan_json(const Candidate& c) {
  nlohmann::json terms = nlohmann::json::object();
  for (auto [n, v] : c.cost.terms.named()) terms[n] = v;
  nlohmann::json j = {{"plan", c.key},
                      {"describe", c.plan.describe()},
                      {"step_time_s", c.cost.step_time},
                      {"tokens_per_s", c.cost.tokens_per_s},
                      {"terms", terms}};
  if (c.has_memory) {
    j["peak_bytes"] = c.cost.peak_bytes;
    j["cost"] = c.cost.to_json();
  }
  return j;
}

// "+0.81 s bubble, +0.30 s tp, -0.12 s dp": the largest term differences of b against a.
std::string term_diff(const StepCost& a, const StepCost& b) {
  const auto ta = a.terms.named(), tb = b.terms.named();
  std::vector<std::pair<double, const char*>> d;
  for (size_t i = 0; i < ta.size(); ++i) d.emplace_back(tb[i].second - ta[i].second, ta[i].first);
  std::sort(d.begin(), d.end(), [](auto& x, auto& y) {
    return std::abs(x.first) != std::abs(y.first) ? std::abs(x.first) > std::abs(y.first)
                                                  : std::string(x.second) < y.second;
  });
  std::string s;
  for (size_t i = 0; i < 3 && i < d.size(); ++i) {
    if (std::abs(d[i].first) <= 0) break;
    s += fmt::format("{}{}{} {}", s.empty() ? "" : ", ", d[i].first > 0 ? "+" : "-",
                     secs(std::abs(d[i].first)), d[i].second);
  }
  return s.empty() ? "no term differs" : s;
}

void print_terms(const StepCost& c) {
  for (auto [n, v] : c.terms.named())
    if (v > 0) std::printf("    %-10s %12s  %5.1f%%\n", n, secs(v).c_str(), 100 * v / c.step_time);
  if (c.terms.dp_total > c.terms.dp)
    std::printf("    (dp reduction %s in all, %s hidden behind the backward)\n",
                secs(c.terms.dp_total).c_str(), secs(c.terms.dp_total - c.terms.dp).c_str());
}

void print_memory(const StepCost& c) {
  std::printf("    peak %s GiB on rank %d (persistent %s: weights %s, grads %s, optimizer %s; "
              "transient %s: activations %s, workspace %s, comm %s) GiB\n",
              gib(c.peak_bytes).c_str(), c.peak.rank, gib(c.persistent_bytes).c_str(),
              gib(c.peak.weights()).c_str(), gib(c.peak.grads()).c_str(),
              gib(c.peak.optimizer()).c_str(), gib(c.transient_bytes).c_str(),
              gib(c.peak.activations()).c_str(), gib(c.peak.workspace()).c_str(),
              gib(c.peak.comm()).c_str());
  std::printf("    outside the pool (not included): MPI buffers, libraries, code; see "
              "docs/planner.md\n");
}

void write_svg(const std::string& path, const SearchResult& r, const Candidate* chosen,
               std::optional<int64_t> limit) {
  double tmin = 1e300, tmax = 0, mmin = 1e300, mmax = 0;
  std::vector<const Candidate*> pts;
  for (const Candidate& c : r.evaluated)
    if (c.has_memory) pts.push_back(&c);
  for (const Candidate* c : pts) {
    tmin = std::min(tmin, c->cost.step_time);
    tmax = std::max(tmax, c->cost.step_time);
    mmin = std::min(mmin, double(c->cost.peak_bytes) / kGiB);
    mmax = std::max(mmax, double(c->cost.peak_bytes) / kGiB);
  }
  if (pts.empty()) return;
  if (tmax <= tmin) tmax = tmin * 1.1 + 1e-9;
  if (mmax <= mmin) mmax = mmin * 1.1 + 1e-9;
  const double W = 720, H = 480, X0 = 80, Y0 = 30, X1 = W - 30, Y1 = H - 60;
  auto x = [&](double t) { return X0 + (std::log(t) - std::log(tmin)) / (std::log(tmax) - std::log(tmin) + 1e-12) * (X1 - X0); };
  auto y = [&](double m) { return Y1 - (m - mmin) / (mmax - mmin) * (Y1 - Y0); };
  std::string s = fmt::format(
      "<svg xmlns='http://www.w3.org/2000/svg' width='{}' height='{}' font-family='sans-serif' "
      "font-size='12'>\n<rect width='100%' height='100%' fill='white'/>\n"
      "<line x1='{}' y1='{}' x2='{}' y2='{}' stroke='black'/><line x1='{}' y1='{}' x2='{}' "
      "y2='{}' stroke='black'/>\n<text x='{}' y='{}' text-anchor='middle'>predicted step time "
      "(s, log scale) {:.3g} .. {:.3g}</text>\n<text x='15' y='{}' transform='rotate(-90 15 {})' "
      "text-anchor='middle'>peak memory per rank (GiB) {:.3g} .. {:.3g}</text>\n",
      W, H, X0, Y1, X1, Y1, X0, Y0, X0, Y1, (X0 + X1) / 2, H - 20, tmin, tmax, (Y0 + Y1) / 2,
      (Y0 + Y1) / 2, mmin, mmax);
  for (const Candidate* c : pts)
    s += fmt::format("<circle cx='{:.1f}' cy='{:.1f}' r='2' fill='#bbb'/>\n", x(c->cost.step_time),
                     y(double(c->cost.peak_bytes) / kGiB));
  std::string poly;
  for (const Candidate& c : r.frontier)
    poly += fmt::format("{:.1f},{:.1f} ", x(c.cost.step_time), y(double(c.cost.peak_bytes) / kGiB));
  s += fmt::format("<polyline points='{}' fill='none' stroke='#1f77b4' stroke-width='2'/>\n", poly);
  for (const Candidate& c : r.frontier)
    s += fmt::format("<circle cx='{:.1f}' cy='{:.1f}' r='4' fill='#1f77b4'><title>{}</title>"
                     "</circle>\n",
                     x(c.cost.step_time), y(double(c.cost.peak_bytes) / kGiB), c.key);
  if (limit && double(*limit) / kGiB >= mmin && double(*limit) / kGiB <= mmax)
    s += fmt::format("<line x1='{}' x2='{}' y1='{:.1f}' y2='{:.1f}' stroke='red' "
                     "stroke-dasharray='4'/><text x='{}' y='{:.1f}' fill='red'>memory limit</text>\n",
                     X0, X1, y(double(*limit) / kGiB), y(double(*limit) / kGiB), X1 - 90,
                     y(double(*limit) / kGiB) - 4);
  if (chosen)
    s += fmt::format("<circle cx='{:.1f}' cy='{:.1f}' r='7' fill='none' stroke='red' "
                     "stroke-width='2'/>\n",
                     x(chosen->cost.step_time), y(double(chosen->cost.peak_bytes) / kGiB));
  s += "</svg>\n";
  std::ofstream f(path);
  LOOM_CHECK(f.good(), "cannot write --svg file '{}'", path);
  f << s;
}

struct Opts {
  std::string model, cluster, dtype = "f32", memory_limit, explain, svg;
  int devices = 0;
  int64_t batch = 0, seq = 0;
  std::optional<double> time_target;
  bool json = false, emit_config = false;
  int64_t max_candidates = 2'000'000, max_memory_evals = 20'000;
  std::string cp = "auto";  // context-parallel sizes to search: "auto" or "1,2,4"
  std::string ep = "auto";  // expert-parallel sizes to search: "auto" or "1,2,4"
};

void run_plan(const Opts& o, loom::cli::Context& ctx) {
  using loom::model::Precision;
  const loom::model::ModelConfig cfg = loom::model::load_model_config(o.model);
  const Cluster cluster = load_cluster(o.cluster);
  const Precision precision = o.dtype == "bf16" ? Precision::bf16 : Precision::f32;
  const int64_t T = o.seq > 0 ? o.seq : cfg.max_seq;
  if (!cluster.cpu_model.empty() && cluster.cpu_model != this_cpu_model())
    std::fprintf(stderr,
                 "warning: cluster file '%s' was calibrated on '%s' (%s) but this machine is "
                 "'%s'; its figures may not hold here. Recalibrate with: loom calibrate --out %s "
                 "(under mpirun -np N for the collectives)\n",
                 o.cluster.c_str(), cluster.cpu_model.c_str(), cluster.calibrated.c_str(),
                 this_cpu_model().c_str(), o.cluster.c_str());
  std::optional<int64_t> limit;
  if (o.memory_limit == "auto") {
    limit = cluster.host_cores > 0
                ? cluster.memory_bytes / std::max(1, std::min(o.devices, cluster.devices_per_node))
                : cluster.memory_bytes;
  } else if (!o.memory_limit.empty()) {
    double g = 0;
    try {
      size_t used = 0;
      g = std::stod(o.memory_limit, &used);
      LOOM_CHECK(used == o.memory_limit.size(), "x");
    } catch (...) {
      LOOM_FAIL("--memory-limit '{}' must be a number of GiB per rank (e.g. 40) or 'auto' (the "
                "device memory in the cluster file)",
                o.memory_limit);
    }
    LOOM_CHECK(g > 0, "--memory-limit {} GiB must be positive", g);
    limit = int64_t(g * kGiB);
  }

  if (!o.explain.empty()) {
    const loom::parallel::PlanSettings s = parse_plan_string(o.explain);
    const int world = o.devices > 0 ? o.devices : 0;
    LOOM_CHECK(o.batch >= 1, "--explain needs --global-batch (the global batch, sequences)");
    loom::parallel::PlanSettings s2 = s;
    if (!s2.dp) s2.dp = 0;
    loom::parallel::ModelShape shape{cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.d_ff, cfg.vocab, T};
    shape.experts = cfg.moe.enabled() ? cfg.moe.experts : 0;  // ep= is checked against them
    const ParallelPlan plan = loom::parallel::make_plan(s2, shape, o.batch, world);
    MemoryOracle oracle(cfg, T, precision, cluster);
    const StepCost c = estimate_step({cfg, cluster, T, precision}, plan, oracle);
    if (o.json) {
      nlohmann::json j = c.to_json();
      j["plan"] = plan_string(plan);
      j["describe"] = plan.describe();
      j["rank0_bytes"] = oracle.rank_memory(plan, 0).total();
      std::printf("%s\n", j.dump(2).c_str());
    } else {
      std::printf("%s\n  %s\n  predicted step %s (%.0f tokens/s), critical stage %d\n",
                  plan_string(plan).c_str(), plan.describe().c_str(), secs(c.step_time).c_str(),
                  c.tokens_per_s, c.critical_stage);
      print_terms(c);
      print_memory(c);
      if (limit && c.peak_bytes > *limit)
        std::printf("  does NOT fit the memory limit of %s GiB\n", gib(*limit).c_str());
    }
    ctx.exit_code = 0;
    return;
  }

  LOOM_CHECK(o.devices >= 1, "--devices N is required (the number of ranks to plan for)");
  LOOM_CHECK(o.batch >= 1, "--global-batch B is required (sequences per optimizer step)");
  SearchOptions so;
  so.devices = o.devices;
  so.global_batch = o.batch;
  so.seq = T;
  so.precision = precision;
  so.max_candidates = o.max_candidates;
  so.max_memory_evals = o.max_memory_evals;
  if (o.cp != "auto")
    for (int64_t g : loom::parallel::parse_int_list(o.cp, "--cp")) so.space.cp.push_back(int(g));
  if (o.ep != "auto")
    for (int64_t e : loom::parallel::parse_int_list(o.ep, "--ep")) so.space.ep.push_back(int(e));
  const SearchResult r = search(cfg, cluster, so);
  const Candidate* chosen = limit ? fastest_under(r.frontier, *limit) : &r.frontier.front();
  const Candidate* small = smallest_memory(r.frontier);

  // Fewest devices for a time target.
  nlohmann::json fewest;
  std::string fewest_text;
  if (o.time_target) {
    std::vector<int> counts;
    for (int n = 1; n <= o.devices; ++n)
      if ((n & (n - 1)) == 0 || n % cluster.devices_per_node == 0 || n == o.devices)
        counts.push_back(n);
    for (int n : counts) {
      SearchOptions sn = so;
      sn.devices = n;
      try {
        const SearchResult rn = search(cfg, cluster, sn);
        const Candidate* best = limit ? fastest_under(rn.frontier, *limit) : &rn.frontier.front();
        if (best && best->cost.step_time <= *o.time_target) {
          fewest = {{"devices", n}, {"plan", plan_json(*best)}};
          fewest_text = fmt::format("fewest devices meeting {} per step: {} with {} ({})",
                                    secs(*o.time_target), n, best->key, secs(best->cost.step_time));
          break;
        }
      } catch (const loom::Error&) {
        continue;  // no valid layout at n
      }
    }
    if (fewest.is_null())
      fewest_text = fmt::format("no device count up to {} meets {} per step{}", o.devices,
                                secs(*o.time_target), limit ? " under the memory limit" : "");
  }

  // Nearest rivals: the fastest plan of each of the three nearest other shapes.
  std::vector<const Candidate*> rivals;
  MemoryOracle oracle(cfg, T, precision, cluster);
  if (chosen) {
    auto shape = [](const ParallelPlan& p) {
      return fmt::format("{}/{}/{}/{}/{}/{}/{}/{}", p.dp, p.tp, p.pp, p.cp, p.cp_scheme, p.ep,
                         p.zero, int(p.schedule));
    };
    std::vector<std::string> seen = {shape(chosen->plan)};
    for (const Candidate& c : r.evaluated) {
      if (rivals.size() >= 3) break;
      const std::string s = shape(c.plan);
      if (std::find(seen.begin(), seen.end(), s) != seen.end()) continue;
      seen.push_back(s);
      rivals.push_back(&c);
    }
  }
  auto rival_memory = [&](const Candidate& c) {
    if (c.has_memory) return c.cost;
    StepCost m = c.cost;
    add_memory(m, c.plan, oracle);
    return m;
  };

  if (o.json) {
    nlohmann::json front = nlohmann::json::array();
    for (const Candidate& c : r.frontier) front.push_back(plan_json(c));
    nlohmann::json j = {{"model", cfg.name},       {"cluster", cluster.name},
                        {"devices", o.devices},    {"global_batch", o.batch},
                        {"seq", T},                {"dtype", o.dtype},
                        {"frontier", front},       {"search", r.to_json()},
                        {"chosen", chosen ? plan_json(*chosen) : nlohmann::json()},
                        {"smallest_memory", small ? plan_json(*small) : nlohmann::json()}};
    if (limit) j["memory_limit_bytes"] = *limit;
    if (o.time_target) j["fewest_devices"] = fewest;
    nlohmann::json rv = nlohmann::json::array();
    for (const Candidate* c : rivals) {
      const StepCost m = rival_memory(*c);
      rv.push_back({{"plan", c->key},
                    {"step_time_s", c->cost.step_time},
                    {"peak_bytes", m.peak_bytes},
                    {"why", chosen ? term_diff(chosen->cost, c->cost) : ""}});
    }
    j["rivals"] = rv;
    std::printf("%s\n", j.dump(2).c_str());
  } else {
    std::printf("model %s, cluster '%s', %d devices, global batch %ld x %ld tokens, %s\n",
                cfg.name.c_str(), cluster.name.c_str(), o.devices, long(o.batch), long(T),
                o.dtype.c_str());
    std::printf("search: %ld plans timed (states visited), frontier %zu, %ld memory replays (%ld "
                "by the oracle, %ld cached), %ld pruned by memory bounds (%ld by the persistent "
                "bound), %ld dominated, %.2f s%s\n",
                long(r.timed), r.frontier.size(), long(r.memory_evaluated), long(r.oracle_replays),
                long(r.oracle_calls - r.oracle_replays), long(r.pruned_by_bound),
                long(r.pruned_by_persistent), long(r.dominated), r.seconds,
                r.truncated ? (" (TRUNCATED: " + r.truncated_why + ")").c_str() : "");
    for (const auto& [why, n] : r.rejected) std::printf("  rejected %ld: %s\n", long(n), why.c_str());
    std::printf("\nfrontier (%zu plans, fastest first; memory buckets of %.0f%%):\n",
                r.frontier.size(), 100 * so.bucket_fraction);
    std::printf("  %-11s %-9s %-8s %-8s %-8s %-8s %-8s %-8s %-8s %-8s %-8s %-8s %-8s %s\n", "step",
                "peak GiB", "fwd", "bwd", "recomp", "vector", "tp", "cp", "pp", "bubble", "dp",
                "zero", "optim", "plan");
    for (const Candidate& c : r.frontier) {
      const TimeTerms& t = c.cost.terms;
      std::printf("  %-11s %-9s %-8.3g %-8.3g %-8.3g %-8.3g %-8.3g %-8.3g %-8.3g %-8.3g %-8.3g "
                  "%-8.3g %-8.3g %s\n",
                  secs(c.cost.step_time).c_str(), gib(c.cost.peak_bytes).c_str(), t.forward,
                  t.backward, t.recompute, t.vector, t.tp, t.cp, t.pp, t.bubble, t.dp, t.zero,
                  t.optimizer, c.plan.describe().c_str());
    }
    if (!chosen) {
      LOOM_ASSERT(small, "empty frontier");
      LOOM_FAIL("no plan fits the memory limit of {} GiB per rank; the smallest memory any plan "
                "needs is {} GiB: {} ({}). Raise --memory-limit or use more devices",
                gib(*limit), gib(small->cost.peak_bytes), small->key, small->plan.describe());
    }
    std::printf("\nchosen%s: %s\n  %s\n  predicted step %s, %.0f tokens/s, critical stage %d\n",
                limit ? fmt::format(" (fastest under {} GiB)", gib(*limit)).c_str() : " (fastest)",
                chosen->key.c_str(), chosen->plan.describe().c_str(),
                secs(chosen->cost.step_time).c_str(), chosen->cost.tokens_per_s,
                chosen->cost.critical_stage);
    print_terms(chosen->cost);
    print_memory(chosen->cost);
    std::printf("\nwhy it won (nearest rivals of other shapes):\n");
    for (const Candidate* c : rivals) {
      const StepCost m = rival_memory(*c);
      const double rel = 100 * (c->cost.step_time / chosen->cost.step_time - 1);
      if (c->cost.step_time < chosen->cost.step_time)
        std::printf("  %s\n    %.1f%% faster but needs %s GiB > the limit\n", c->key.c_str(), -rel,
                    gib(m.peak_bytes).c_str());
      else
        std::printf("  %s\n    %.1f%% slower (%s), %s GiB peak\n", c->key.c_str(), rel,
                    term_diff(chosen->cost, c->cost).c_str(), gib(m.peak_bytes).c_str());
    }
    std::printf("\nsmallest memory: %s GiB with %s (%s)\n", gib(small->cost.peak_bytes).c_str(),
                small->key.c_str(), secs(small->cost.step_time).c_str());
    if (o.time_target) std::printf("%s\n", fewest_text.c_str());
  }
  if (o.emit_config && chosen) {
    const ParallelPlan& p = chosen->plan;
    std::printf("\n[parallel]\ndp = %d\ntp = %d\npp = %d\nzero = %d\nmicro_batches = %ld\n"
                "schedule = \"%s\"\nvirtual_stages = %d\nrecompute = \"%s\"\n",
                p.dp, p.tp, p.pp, p.zero, long(p.micro_batches),
                std::string(loom::parallel::schedule_name(p.schedule)).c_str(), p.virtual_stages,
                loom::parallel::recompute_spec(p.recompute).empty()
                    ? "none"
                    : loom::parallel::recompute_spec(p.recompute).c_str());
    if (!p.stage_layers.empty())
      std::printf("stage_layers = [%s]\n", fmt::format("{}", fmt::join(p.stage_layers, ", ")).c_str());
    if (p.cp > 1)
      std::printf("cp = %d\ncp_scheme = \"%s\"\ncp_layout = \"%s\"\n", p.cp, p.cp_scheme.c_str(),
                  p.cp_layout.c_str());
    if (p.ep > 1) std::printf("ep = %d\n", p.ep);
  }
  if (!o.svg.empty()) write_svg(o.svg, r, chosen, limit);
  ctx.exit_code = 0;
}

void add_plan(CLI::App& root, loom::cli::Context& ctx) {
  auto o = std::make_shared<Opts>();
  CLI::App* sub = root.add_subcommand(
      "plan", "search the (time, memory) frontier of parallel layouts on a cluster (issue 13)");
  sub->add_option("--model", o->model, "model config (TOML)")->required();
  sub->add_option("--cluster", o->cluster, "cluster description (configs/clusters/*.toml)")
      ->required();
  sub->add_option("--devices", o->devices, "number of ranks (devices) to plan for");
  sub->add_option("--global-batch,--batch", o->batch, "global batch: sequences per step");
  sub->add_option("--seq", o->seq, "sequence length T (default: the model's max_seq)");
  sub->add_option("--dtype", o->dtype, "f32 or bf16")->check(CLI::IsMember({"f32", "bf16"}));
  sub->add_option("--memory-limit", o->memory_limit,
                  "GiB per rank, or auto (the device memory in the cluster file)");
  sub->add_option("--time-target", o->time_target, "seconds per step: report the fewest devices");
  sub->add_option("--explain", o->explain, "cost one plan given as dp=..,tp=..,pp=..,...");
  sub->add_option("--svg", o->svg, "write the frontier plot here");
  sub->add_option("--max-candidates", o->max_candidates, "bound on plans timed");
  sub->add_option("--max-memory-evals", o->max_memory_evals, "bound on memory replays");
  sub->add_option("--cp", o->cp,
                  "context-parallel sizes to search, e.g. 1,2,4 (default auto: 1 and every size "
                  "leaving each rank >= 4096 tokens of a sequence)");
  sub->add_option("--ep", o->ep,
                  "expert-parallel sizes to search for a sparse (MoE) model, e.g. 1,2,4 (default "
                  "auto: every size dividing both dp and the experts)");
  sub->add_flag("--json", o->json, "print one JSON object");
  sub->add_flag("--emit-config", o->emit_config, "print the chosen plan as a [parallel] table");
  sub->callback([o, &ctx] { run_plan(*o, ctx); });
}

}  // namespace

LOOM_REGISTER_COMMAND(plan, add_plan);
