// parallel/plan.cpp: see plan.h. Every check of a layout lives in make_plan().
#include "parallel/plan.h"

#include <charconv>
#include <fmt/format.h>
#include <fmt/ranges.h>

#include "core/error.h"
#include "parallel/topology.h"

namespace loom::parallel {

const char* recompute_name(Recompute r) {
  switch (r) {
    case Recompute::none: return "none";
    case Recompute::selective: return "selective";
    case Recompute::full: return "full";
  }
  return "?";
}

Recompute recompute_from_name(std::string_view s) {
  if (s == "none") return Recompute::none;
  if (s == "selective") return Recompute::selective;
  if (s == "full") return Recompute::full;
  LOOM_FAIL("recompute = '{}' is not a mode; choose none, selective or full (or a per-layer list "
            "such as full:0-11,selective:12-23)",
            s);
}

namespace {

int64_t parse_int(std::string_view s, std::string_view what) {
  int64_t v = 0;
  auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  LOOM_CHECK(ec == std::errc() && p == s.data() + s.size() && !s.empty(),
             "{}: '{}' is not an integer", what, s);
  return v;
}

std::vector<std::string_view> split(std::string_view s, char sep) {
  std::vector<std::string_view> out;
  size_t start = 0;
  while (true) {
    size_t i = s.find(sep, start);
    out.push_back(s.substr(start, i == std::string_view::npos ? i : i - start));
    if (i == std::string_view::npos) break;
    start = i + 1;
  }
  return out;
}

std::string list_near(const std::vector<int64_t>& ok) { return fmt::format("{}", fmt::join(ok, ", ")); }

}  // namespace

std::vector<int64_t> parse_int_list(std::string_view s, std::string_view what) {
  std::vector<int64_t> out;
  if (s.empty()) return out;
  for (std::string_view e : split(s, ',')) out.push_back(parse_int(e, what));
  return out;
}

std::vector<Recompute> parse_recompute(std::string_view spec, int64_t n_layers) {
  LOOM_CHECK(n_layers >= 0, "n_layers = {} must be >= 0", n_layers);
  if (spec.find(':') == std::string_view::npos)
    return std::vector<Recompute>(size_t(n_layers), recompute_from_name(spec));
  std::vector<Recompute> out(size_t(n_layers), Recompute::none);
  std::vector<bool> named(size_t(n_layers), false);
  for (std::string_view entry : split(spec, ',')) {
    const size_t colon = entry.find(':');
    LOOM_CHECK(colon != std::string_view::npos,
               "recompute list entry '{}' in '{}' needs the form mode:first[-last], e.g. "
               "full:0-11",
               entry, spec);
    const Recompute mode = recompute_from_name(entry.substr(0, colon));
    std::string_view range = entry.substr(colon + 1);
    const size_t dash = range.find('-');
    const int64_t first = parse_int(range.substr(0, dash), "recompute layer");
    const int64_t last =
        dash == std::string_view::npos ? first : parse_int(range.substr(dash + 1), "recompute layer");
    LOOM_CHECK(0 <= first && first <= last && last < n_layers,
               "recompute list entry '{}': layers {}-{} are outside the model's blocks 0-{}", entry,
               first, last, n_layers - 1);
    for (int64_t l = first; l <= last; ++l) {
      LOOM_CHECK(!named[size_t(l)], "recompute list '{}' names layer {} twice", spec, l);
      named[size_t(l)] = true;
      out[size_t(l)] = mode;
    }
  }
  return out;
}

std::string recompute_spec(const std::vector<Recompute>& per_layer) {
  if (per_layer.empty()) return "none";
  bool uniform = true;
  for (Recompute r : per_layer) uniform &= r == per_layer[0];
  if (uniform) return recompute_name(per_layer[0]);
  std::string out;
  for (size_t i = 0; i < per_layer.size();) {
    size_t j = i;
    while (j + 1 < per_layer.size() && per_layer[j + 1] == per_layer[i]) ++j;
    if (per_layer[i] != Recompute::none) {
      if (!out.empty()) out += ',';
      out += fmt::format("{}:{}", recompute_name(per_layer[i]), i);
      if (j > i) out += fmt::format("-{}", j);
    }
    i = j + 1;
  }
  return out;
}

std::string ParallelPlan::describe() const {
  std::string s = fmt::format("dp {} x tp {} x pp {}", dp, tp, pp);
  if (cp > 1)
    s += fmt::format(" x cp {} ({}, {}{})", cp, cp_scheme, cp_layout,
                     cp_overlap ? "" : ", no overlap");
  if (ep > 1) s += fmt::format(" (ep {})", ep);
  if (ecss != "off") s += fmt::format(" (ecss {})", ecss);
  s += fmt::format(" (zero {}, {} schedule", zero, schedule_name(schedule));
  if (virtual_stages > 1) s += fmt::format(" x {} virtual stages", virtual_stages);
  s += fmt::format(", {} micro-batch(es) of {} sequence(s) per dp rank, global batch {}, "
                   "recompute {})",
                   micro_batches, micro_batch_size, global_batch(), recompute_spec(recompute));
  return s;
}

nlohmann::json ParallelPlan::to_json() const {
  return {{"dp", dp},
          {"tp", tp},
          {"pp", pp},
          {"cp", cp},
          {"ep", ep},
          {"zero", zero},
          {"recompute", recompute_spec(recompute)},
          {"n_layers", recompute.size()},
          {"micro_batch_size", micro_batch_size},
          {"micro_batches", micro_batches},
          {"global_batch", global_batch()},
          {"stage_layers", stage_layers},
          {"virtual_stages", virtual_stages},
          {"schedule", std::string(schedule_name(schedule))},
          {"ranks_per_node", ranks_per_node},
          {"bucket_mb", bucket_mb},
          {"cp_scheme", cp_scheme},
          {"cp_layout", cp_layout},
          {"ecss", ecss},
          {"cp_overlap", cp_overlap}};
}

ParallelPlan ParallelPlan::from_json(const nlohmann::json& j) {
  ParallelPlan p;
  auto get = [&](const char* key, auto& out) {
    LOOM_CHECK(j.is_object() && j.contains(key), "parallel plan: missing key '{}'", key);
    try {
      j.at(key).get_to(out);
    } catch (const std::exception& e) {
      LOOM_FAIL("parallel plan: key '{}' has the wrong type ({})", key, e.what());
    }
  };
  get("dp", p.dp);
  get("tp", p.tp);
  get("pp", p.pp);
  get("cp", p.cp);
  get("ep", p.ep);
  get("zero", p.zero);
  std::string rc, sched;
  int64_t n_layers = 0;
  get("recompute", rc);
  get("n_layers", n_layers);
  p.recompute = parse_recompute(rc, n_layers);
  get("micro_batch_size", p.micro_batch_size);
  get("micro_batches", p.micro_batches);
  get("stage_layers", p.stage_layers);
  get("virtual_stages", p.virtual_stages);
  get("schedule", sched);
  p.schedule = schedule_from_name(sched);
  get("ranks_per_node", p.ranks_per_node);
  get("bucket_mb", p.bucket_mb);
  // Written since cp training; older plans are cp = 1 and take the defaults.
  if (j.contains("cp_scheme")) get("cp_scheme", p.cp_scheme);
  if (j.contains("cp_layout")) get("cp_layout", p.cp_layout);
  if (j.contains("ecss")) get("ecss", p.ecss);  // written since ECSS; older plans are "off"
  if (j.contains("cp_overlap")) get("cp_overlap", p.cp_overlap);
  return p;
}

void PlanSettings::override_with(const PlanSettings& o) {
  auto take = [](auto& mine, const auto& theirs) {
    if (theirs) mine = theirs;
  };
  take(dp, o.dp);
  take(tp, o.tp);
  take(pp, o.pp);
  take(cp, o.cp);
  take(ep, o.ep);
  take(zero, o.zero);
  take(virtual_stages, o.virtual_stages);
  take(ranks_per_node, o.ranks_per_node);
  take(micro_batches, o.micro_batches);
  take(schedule, o.schedule);
  take(recompute, o.recompute);
  take(cp_scheme, o.cp_scheme);
  take(cp_layout, o.cp_layout);
  take(ecss, o.ecss);
  take(stage_layers, o.stage_layers);
  take(bucket_mb, o.bucket_mb);
  take(cp_overlap, o.cp_overlap);
}

int cp_ranks_per_node(const ParallelPlan& p) {
  const int K = p.ranks_per_node;
  if (K <= 0 || p.cp <= 1) return 0;
  if (K % (p.tp * p.cp) == 0) return p.cp;
  if (K % p.tp == 0 && p.cp % (K / p.tp) == 0) return K / p.tp;
  return 0;
}

ParallelPlan make_plan(const PlanSettings& s, const ModelShape& m, int64_t global_batch,
                       int world_size) {
  ParallelPlan p;
  p.tp = s.tp.value_or(1);
  p.pp = s.pp.value_or(1);
  p.cp = s.cp.value_or(1);
  p.ep = s.ep.value_or(1);
  p.zero = s.zero.value_or(0);
  p.virtual_stages = s.virtual_stages.value_or(1);
  p.ranks_per_node = s.ranks_per_node.value_or(0);
  p.micro_batches = s.micro_batches.value_or(1);
  p.bucket_mb = s.bucket_mb.value_or(4.0);
  p.schedule = schedule_from_name(s.schedule.value_or("1f1b"));
  p.stage_layers = parse_int_list(s.stage_layers.value_or(""), "stage_layers");
  p.recompute = parse_recompute(s.recompute.value_or("none"), m.n_layers);

  // Sizes of the axes.
  for (auto [name, v] : {std::pair{"tp", p.tp}, {"pp", p.pp}, {"cp", p.cp}, {"ep", p.ep}})
    LOOM_CHECK(v >= 1, "{} = {} must be >= 1", name, v);
  p.cp_scheme = s.cp_scheme.value_or("burst");
  p.cp_layout = s.cp_layout.value_or("zigzag");
  p.cp_overlap = s.cp_overlap.value_or(true);
  LOOM_CHECK(p.cp_scheme == "burst" || p.cp_scheme == "ring" || p.cp_scheme == "allgather" ||
                 p.cp_scheme == "ulysses",
             "cp_scheme = '{}' is not a context-parallel scheme; use burst, ring, allgather or "
             "ulysses",
             p.cp_scheme);
  LOOM_CHECK(p.cp_layout == "zigzag" || p.cp_layout == "striped",
             "cp_layout = '{}' is not a context-parallel layout; use zigzag or striped",
             p.cp_layout);
  if (p.cp > 1 && m.seq > 0) {
    // zigzag cuts every sequence into 2*cp chunks; striped deals positions round-robin.
    const int64_t parts = p.cp_layout == "zigzag" ? 2 * int64_t(p.cp) : int64_t(p.cp);
    if (m.seq % parts != 0) {
      std::vector<int> ok;
      for (int g = 2; g <= 64; ++g)
        if (m.seq % (p.cp_layout == "zigzag" ? 2 * g : g) == 0) ok.push_back(g);
      const int64_t lo = m.seq / parts * parts;
      LOOM_FAIL("cp = {} with the {} layout splits every sequence into {} {}, but seq = {} is not "
                "divisible by {}; use seq = {} or {}{}",
                p.cp, p.cp_layout, parts, p.cp_layout == "zigzag" ? "chunks (2 x cp)" : "stripes",
                m.seq, parts, lo > 0 ? lo : parts, lo + parts,
                ok.empty() ? std::string()
                           : fmt::format(", or cp in {{{}}}", fmt::join(ok, ", ")));
    }
  }
  if (p.cp > 1 && p.cp_scheme == "ulysses") {
    // Ulysses puts n_kv_heads / tp / cp kv heads of every tp shard on each cp rank.
    const int64_t kv = m.n_kv_heads / std::max(1, p.tp);
    std::vector<int> ok;
    for (int d : divisors(int(std::max<int64_t>(1, kv)))) ok.push_back(d);
    LOOM_CHECK(kv % p.cp == 0,
               "cp = {} with the ulysses scheme must divide the kv heads of a tp shard "
               "(n_kv_heads = {} / tp = {} = {}); use cp in {{{}}}, or cp_scheme burst, ring or "
               "allgather",
               p.cp, m.n_kv_heads, p.tp, kv, fmt::join(ok, ", "));
  }
  LOOM_CHECK(p.zero >= 0 && p.zero <= 3, "zero = {}: ZeRO stages are 0, 1, 2 and 3", p.zero);
  {
    std::vector<int> ok;
    for (int d : divisors(int(std::min<int64_t>(m.n_heads, 1 << 20))))
      if (m.n_kv_heads % d == 0 && m.d_ff % d == 0 && m.vocab % d == 0) ok.push_back(d);
    LOOM_CHECK(m.n_heads % p.tp == 0 && m.n_kv_heads % p.tp == 0 && m.d_ff % p.tp == 0 &&
                   m.vocab % p.tp == 0,
               "tp = {} must divide n_heads = {}, n_kv_heads = {}, d_ff = {} and vocab = {}; "
               "tp sizes that work: {}",
               p.tp, m.n_heads, m.n_kv_heads, m.d_ff, m.vocab, fmt::join(ok, ", "));
  }
  const int per_replica = p.tp * p.pp * p.cp;
  if (s.dp && *s.dp > 0) {
    p.dp = *s.dp;
    LOOM_CHECK(world_size <= 0 || p.dp * per_replica == world_size,
               "dp = {} x tp = {} x pp = {} x cp = {} is {} ranks, but {} were launched; use dp = "
               "{} (or dp = 0: every rank not used by tp, pp and cp), or launch {} ranks",
               p.dp, p.tp, p.pp, p.cp, p.dp * per_replica, world_size,
               world_size % per_replica == 0 ? world_size / per_replica : 0, p.dp * per_replica);
  } else {
    LOOM_CHECK(!s.dp || *s.dp == 0, "dp = {} must be >= 1 (or 0: every rank not used by tp, pp "
                                    "and cp)",
               *s.dp);
    LOOM_CHECK(world_size > 0, "dp = 0 (automatic) needs the number of ranks");
    LOOM_CHECK(world_size % per_replica == 0,
               "tp = {} x pp = {} x cp = {} = {} does not divide the {} launched ranks; products "
               "that divide it: {}",
               p.tp, p.pp, p.cp, per_replica, world_size, fmt::join(divisors(world_size), ", "));
    p.dp = world_size / per_replica;
  }
  LOOM_CHECK(p.ep == 1 || p.dp % p.ep == 0,
             "ep = {} must divide dp = {} (the experts are split over ep ranks inside each dp "
             "group); use ep in {{{}}} or a dp that is a multiple of {}",
             p.ep, p.dp, fmt::join(divisors(p.dp), ", "), p.ep);
  if (p.ep > 1) {
    LOOM_CHECK(m.experts > 0,
               "ep = {}: expert parallelism splits the experts of sparse (MoE) blocks, and this model "
               "has none; use ep = 1 (or add a [moe] table to the model)",
               p.ep);
    std::vector<int64_t> ok;
    for (int64_t e = 1; e <= m.experts && e <= p.dp; ++e)
      if (m.experts % e == 0 && p.dp % e == 0) ok.push_back(e);
    LOOM_CHECK(m.experts % p.ep == 0,
               "ep = {} must divide the {} experts of each sparse block (each ep rank holds "
               "experts / ep of them); valid ep here (dividing experts and dp = {}): {}",
               p.ep, m.experts, p.dp, fmt::join(ok, ", "));
  }
  p.ecss = s.ecss.value_or("off");
  LOOM_CHECK(p.ecss == "off" || p.ecss == "dense" || p.ecss == "lazy",
             "ecss = '{}' is not an ECSS mode; use off, dense (every expert updated as plain "
             "AdamW) or lazy (only experts that received tokens)",
             p.ecss);
  if (p.ecss != "off") {
    LOOM_CHECK(m.experts > 0,
               "ecss = {}: expert storage separation keeps the experts of sparse (MoE) blocks in "
               "a host store, and this model has none; use ecss = off (or add a [moe] table to "
               "the model)",
               p.ecss);
    LOOM_CHECK(p.zero <= 1,
               "ecss = {} with zero = {}: expert storage separation runs with ZeRO stage 0 or 1 "
               "(under ZeRO 2/3 the experts' weights live in the sharded ZeRO store, which has "
               "no host tier yet); set zero = 0 or 1, or ecss = off",
               p.ecss, p.zero);
  }

  // Pipeline: stages, layer split and schedule.
  const int64_t n_virtual = int64_t(p.pp) * p.virtual_stages;
  LOOM_CHECK(n_virtual <= m.n_layers,
             "pp = {} x virtual stages = {} = {} pipeline stages for n_layers = {}: every stage "
             "needs at least one block",
             p.pp, p.virtual_stages, n_virtual, m.n_layers);
  if (p.stage_layers.empty()) {
    std::vector<int64_t> ok;
    for (int d : divisors(int(m.n_layers)))
      if (d % p.virtual_stages == 0) ok.push_back(d / p.virtual_stages);
    LOOM_CHECK(m.n_layers % n_virtual == 0,
               "n_layers = {} does not split evenly into pp = {} x {} virtual stage(s); use pp in "
               "{{{}}} or give stage_layers ({} entries summing to {})",
               m.n_layers, p.pp, p.virtual_stages, list_near(ok), n_virtual, m.n_layers);
  } else {
    LOOM_CHECK(int64_t(p.stage_layers.size()) == n_virtual,
               "stage_layers has {} entries but there are pp = {} x {} virtual stage(s) = {}; give "
               "exactly {} entries",
               p.stage_layers.size(), p.pp, p.virtual_stages, n_virtual, n_virtual);
    int64_t sum = 0;
    for (size_t i = 0; i < p.stage_layers.size(); ++i) {
      LOOM_CHECK(p.stage_layers[i] >= 1, "stage_layers[{}] = {}: every stage needs at least one "
                                         "block",
                 i, p.stage_layers[i]);
      sum += p.stage_layers[i];
    }
    LOOM_CHECK(sum == m.n_layers, "stage_layers sum to {} but the model has n_layers = {}", sum,
               m.n_layers);
  }
  make_schedule(p.schedule, p.pp, int(std::min<int64_t>(p.micro_batches, 1 << 30)),
                p.virtual_stages);  // throws naming the valid micro-batch counts

  // Batch: the global batch splits into dp ranks x M micro-batches of b sequences.
  LOOM_CHECK(p.micro_batches >= 1, "micro_batches = {} must be >= 1", p.micro_batches);
  LOOM_CHECK(global_batch >= 1, "train.batch = {} (the global batch, sequences per optimizer "
                                "step) must be >= 1",
             global_batch);
  if (global_batch % (int64_t(p.dp) * p.micro_batches) != 0) {
    std::vector<int64_t> ok_m;
    if (global_batch % p.dp == 0)
      for (int d : divisors(int(std::min<int64_t>(global_batch / p.dp, 1 << 20)))) ok_m.push_back(d);
    std::vector<int64_t> ok_b;
    for (int64_t k = 1; ok_b.size() < 4 && k <= 64; ++k) ok_b.push_back(k * p.dp * p.micro_batches);
    LOOM_FAIL("train.batch = {} (the global batch) does not split into dp = {} ranks x {} "
              "micro-batches; {}use a batch that is a multiple of {} (e.g. {})",
              global_batch, p.dp, p.micro_batches,
              ok_m.empty() ? std::string()
                           : fmt::format("use --micro-batches in {{{}}}, or ", list_near(ok_m)),
              int64_t(p.dp) * p.micro_batches, list_near(ok_b));
  }
  p.micro_batch_size = global_batch / (int64_t(p.dp) * p.micro_batches);
  LOOM_CHECK(p.bucket_mb > 0, "bucket_mb = {} must be positive", p.bucket_mb);
  LOOM_CHECK(p.ranks_per_node >= 0, "ranks_per_node = {} must be >= 0 (0: MPI's shared-memory "
                                    "islands)",
             p.ranks_per_node);
  return p;
}

}  // namespace loom::parallel
