// planner/search.cpp: see search.h.
#include "planner/search.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <set>

#include <fmt/format.h>

#include "core/error.h"

namespace loom::planner {

using parallel::ParallelPlan;
using parallel::Recompute;
using parallel::ScheduleKind;

namespace {

std::vector<int64_t> divisors(int64_t n) {
  std::vector<int64_t> d;
  for (int64_t k = 1; k * k <= n; ++k)
    if (n % k == 0) {
      d.push_back(k);
      if (k != n / k) d.push_back(n / k);
    }
  std::sort(d.begin(), d.end());
  return d;
}

// model::ParamLayout's condition: tp divides the heads, kv heads, d_ff, vocab and a sparse
// model's expert d_ff.
bool tp_fits(const model::ModelConfig& c, int64_t tp) {
  return c.n_heads % tp == 0 && c.n_kv_heads % tp == 0 && c.d_ff % tp == 0 &&
         c.vocab % tp == 0 && (!c.moe.enabled() || c.moe.expert_d_ff % tp == 0);
}

// Training FLOPs per token of one block and of the last stage's extra work (head and query
// layer), the weights of the balanced split (model/config.h's train_flops_per_token, per part).
std::pair<double, double> block_and_head_work(const model::ModelConfig& c, int64_t T) {
  const double C = double(c.d_model), KV = double(c.kv_dim()), F = double(c.d_ff);
  const double block = 6.0 * (2 * C * C + 2 * KV * C + 2 * C * F) + 3.0 * 2.0 * double(T) * C;
  const double head = 6.0 * double(c.vocab) * C + (c.query_layer ? block : 0.0);
  return {block, head};
}

}  // namespace

std::vector<int> auto_ep_sizes(const model::ModelConfig& cfg) {
  if (!cfg.moe.enabled()) return {1};
  std::vector<int> out;
  for (int64_t e : divisors(cfg.moe.experts)) out.push_back(int(e));
  return out;
}

std::vector<int> auto_cp_sizes(int64_t devices, int64_t seq) {
  std::vector<int> out;
  for (int64_t g : divisors(devices))
    if (g == 1 || (seq % (2 * g) == 0 && seq / g >= kMinCpTokens)) out.push_back(int(g));
  return out;
}

int64_t memory_bucket(int64_t bytes, double fraction) {
  if (bytes <= 1) return 0;
  return int64_t(std::floor(std::log(double(bytes)) / std::log1p(fraction)));
}

std::vector<int64_t> balanced_stage_layers(const model::ModelConfig& cfg, int pp, int VS,
                                           int64_t T) {
  const int64_t n = int64_t(pp) * VS, L = cfg.n_layers;
  if (n <= 1 || n > L) return {};
  const auto [cb, ch] = block_and_head_work(cfg, T);
  // Smallest per-stage budget of k blocks such that n-1 stages of at most k blocks plus a last
  // stage of at most k - head/block blocks (it also runs the head) hold all L blocks.
  const double head_in_blocks = ch / cb;
  std::vector<int64_t> out;
  for (int64_t k = 1; k <= L; ++k) {
    const int64_t last = std::min<int64_t>(k, int64_t(std::floor(double(k) - head_in_blocks)));
    if (last < 1) continue;
    if ((n - 1) * k + last < L) continue;
    const int64_t last_n = std::min(last, L - (n - 1));
    const int64_t rest = L - last_n;  // over n-1 stages, each <= k
    out.assign(size_t(n), rest / (n - 1));
    out.back() = last_n;
    // Extra blocks go to the later stages (the first stage keeps the most activations in flight
    // under 1f1b, and holds the embedding).
    for (int64_t e = 0, s = n - 2; e < rest % (n - 1); ++e, --s) out[size_t(s)] += 1;
    break;
  }
  if (out.empty()) return {};
  if (L % n == 0 && std::all_of(out.begin(), out.end(), [&](int64_t x) { return x == L / n; }))
    return {};
  return out;
}

std::vector<int> nearest_valid_device_counts(const model::ModelConfig& cfg, int64_t G, int devices,
                                             int how_many) {
  auto valid = [&](int64_t n) {
    for (int64_t tp : divisors(n))
      if (tp_fits(cfg, tp))
        for (int64_t pp : divisors(n / tp))
          if (pp <= cfg.n_layers && G % (n / tp / pp) == 0) return true;
    return false;
  };
  std::vector<int> out;
  for (int64_t d = 1; int(out.size()) < how_many && d <= 4 * int64_t(devices) + 64; ++d)
    for (int64_t n : {int64_t(devices) - d, int64_t(devices) + d})
      if (n >= 1 && valid(n) && int(out.size()) < how_many) out.push_back(int(n));
  std::sort(out.begin(), out.end());
  return out;
}

nlohmann::json SearchResult::to_json() const {
  return {{"enumerated", enumerated},
          {"timed", timed},
          {"memory_evaluated", memory_evaluated},
          {"pruned_by_memory_bound", pruned_by_bound},
          {"pruned_by_persistent_bound", pruned_by_persistent},
          {"persistent_bounds", persistent_bounds},
          {"dominated", dominated},
          {"rejected", rejected},
          {"frontier_size", frontier.size()},
          {"truncated", truncated},
          {"truncated_why", truncated_why},
          {"memory_oracle_calls", oracle_calls},
          {"memory_replays", oracle_replays},
          {"seconds", seconds}};
}

SearchResult search(const model::ModelConfig& cfg, const Cluster& cluster, const SearchOptions& o) {
  const auto start = std::chrono::steady_clock::now();
  LOOM_CHECK(o.devices >= 1, "devices = {} must be >= 1", o.devices);
  LOOM_CHECK(o.devices <= cluster.total_devices(),
             "devices = {} but cluster '{}' has {} ({} nodes x {}); pass --devices <= {}", o.devices,
             cluster.name, cluster.total_devices(), cluster.nodes, cluster.devices_per_node,
             cluster.total_devices());
  LOOM_CHECK(o.global_batch >= 1, "global batch = {} must be >= 1", o.global_batch);
  LOOM_CHECK(o.seq >= 1 && o.seq <= cfg.max_seq, "seq = {} must be in [1, max_seq = {}]", o.seq,
             cfg.max_seq);
  LOOM_CHECK(o.bucket_fraction > 0 && o.bucket_fraction < 1,
             "bucket fraction = {} must be in (0, 1)", o.bucket_fraction);
  SearchResult res;
  MemoryOracle oracle(cfg, o.seq, o.precision, cluster);
  const CostInputs in{cfg, cluster, o.seq, o.precision};
  const int64_t L = cfg.n_layers, G = o.global_batch, N = o.devices;

  std::vector<Recompute> none(size_t(L), Recompute::none), sel(size_t(L), Recompute::selective),
      full(size_t(L), Recompute::full);
  std::vector<std::vector<Recompute>> recomputes = {none, sel, full};
  if (o.space.recompute_splits)
    for (int64_t k : {L / 4, L / 2, 3 * L / 4}) {
      if (k <= 0 || k >= L) continue;
      std::vector<Recompute> r(size_t(L), Recompute::none);
      std::fill(r.begin(), r.begin() + k, Recompute::full);
      if (std::find(recomputes.begin(), recomputes.end(), r) == recomputes.end())
        recomputes.push_back(r);
    }

  auto reject = [&](const std::string& why, int64_t n = 1) { res.rejected[why] += n; };
  std::vector<Candidate> all;
  bool stop = false;
  const std::vector<int> cps = o.space.cp.empty() ? auto_cp_sizes(N, o.seq) : o.space.cp;
  // ep sizes: given, or every divisor of the experts (a dense model: 1); each must also divide
  // dp, checked per layout below.
  std::vector<int> eps = o.space.ep;
  if (eps.empty()) eps = auto_ep_sizes(cfg);
  for (int cp : cps) {
      ++res.enumerated;
      if (cp < 1 || N % cp != 0) {
        reject(fmt::format("cp must divide the devices {}", N));
        continue;
      }
      if (cp > 1 && o.seq % (2 * cp) != 0) {
        reject(fmt::format("cp: the zigzag layout cuts seq = {} into 2 x cp chunks", o.seq));
        continue;
      }
      if (cp > 1 && cfg.moe.enabled() && cfg.moe.router != model::Router::rre) {
        reject("cp > 1: the topk router does not run under cp");
        continue;
      }
      // Schemes: burst (its backward chosen per layer by bytes; ring is burst with the other
      // backward and never sends fewer bytes) and the two baselines.
      std::vector<std::string> schemes = {"burst"};
      if (cp > 1) schemes = o.space.cp_schemes;
      for (int64_t tp : divisors(N / cp)) {
        if (stop) break;
        ++res.enumerated;
        if (!tp_fits(cfg, tp)) {
          reject(fmt::format("tp must divide n_heads={}, n_kv_heads={}, d_ff={}, vocab={}{}",
                             cfg.n_heads, cfg.n_kv_heads, cfg.d_ff, cfg.vocab,
                             cfg.moe.enabled()
                                 ? fmt::format(", expert_d_ff={}", cfg.moe.expert_d_ff)
                                 : std::string()));
          continue;
        }
        for (int64_t pp : divisors(N / cp / tp)) {
          if (stop) break;
          ++res.enumerated;
          if (pp > L) {
            reject(fmt::format("pp > n_layers={}", L));
            continue;
          }
          const int64_t dp = N / cp / tp / pp;
          if (G % dp != 0) {
            reject(fmt::format("dp must divide the global batch {}", G));
            continue;
          }
          // (schedule, VS, stage_layers) choices.
          struct Layout {
            ScheduleKind kind;
            int VS;
            std::vector<int64_t> stages;
          };
          std::vector<Layout> layouts;
          auto add_layouts = [&](ScheduleKind kind, int VS) {
            const int64_t n = pp * VS;
            if (n > L) {
              reject(fmt::format("pp x virtual stages > n_layers={}", L));
              return;
            }
            std::vector<int64_t> bal =
                o.space.balanced_stages ? balanced_stage_layers(cfg, int(pp), VS, o.seq)
                                        : std::vector<int64_t>{};
            if (L % n == 0) layouts.push_back({kind, VS, {}});
            if (!bal.empty()) layouts.push_back({kind, VS, bal});
            if (L % n != 0 && bal.empty())
              reject("n_layers not divisible by pp x VS and no balanced split");
          };
          add_layouts(ScheduleKind::one_f_one_b, 1);
          if (pp > 1 && o.space.schedules) {
            add_layouts(ScheduleKind::gpipe, 1);
            for (int VS = 2; VS <= o.space.max_virtual_stages; ++VS)
              add_layouts(ScheduleKind::interleaved, VS);
          }
          for (int ep : eps)
          for (int zero : o.space.zero_stages) {
            if (stop) break;
            if (zero == o.space.zero_stages.front()) {
              ++res.enumerated;
              if (ep < 1 || dp % ep != 0) {
                reject(fmt::format("ep must divide dp (ep x (dp/ep) groups)"));
                break;
              }
              if (ep > 1 && (!cfg.moe.enabled() || cfg.moe.experts % ep != 0)) {
                reject(cfg.moe.enabled()
                           ? fmt::format("ep must divide the experts {}", cfg.moe.experts)
                           : std::string("ep > 1: the model has no sparse (MoE) blocks"));
                break;
              }
            }
            if (dp == 1 && zero != 0) continue;  // ZeRO over one rank is ZeRO 0
            for (int64_t M : divisors(G / dp)) {
              if (stop) break;
              if ((G / (dp * M)) * (o.seq / cp) % tp != 0) {
                // train/train_config.cpp: sequence parallelism splits b*T rows over tp.
                reject("tp must divide the micro-batch's rows b*T (sequence parallelism)",
                       int64_t(layouts.size() * recomputes.size()));
                continue;
              }
              for (const Layout& lay : layouts) {
                if (lay.kind == ScheduleKind::interleaved && M % pp != 0) {
                  reject("interleaved needs micro_batches % pp == 0",
                         int64_t(recomputes.size()));
                  continue;
                }
                for (const auto& rc : recomputes)
                 for (const std::string& scheme : schemes) {
                  ++res.enumerated;
                  if (scheme == "ulysses" && (cfg.n_kv_heads / tp) % cp != 0) {
                    reject("cp_scheme ulysses: cp must divide the kv heads of a tp shard");
                    continue;
                  }
                  if (res.timed >= o.max_candidates) {
                    stop = true;
                    res.truncated = true;
                    res.truncated_why = fmt::format("max_candidates = {} reached while timing",
                                                    o.max_candidates);
                    break;
                  }
                  Candidate c;
                  ParallelPlan& p = c.plan;
                  p.dp = int(dp);
                  p.tp = int(tp);
                  p.pp = int(pp);
                  p.cp = cp;
                  p.ep = ep;
                  if (cp > 1) p.cp_scheme = scheme;
                  p.zero = zero;
                  p.recompute = rc;
                  p.micro_batches = M;
                  p.micro_batch_size = G / (dp * M);
                  p.stage_layers = lay.stages;
                  p.virtual_stages = lay.VS;
                  p.schedule = lay.kind;
                  c.key = plan_string(p);
                  c.cost = estimate_time(in, p, oracle);
                  ++res.timed;
                  all.push_back(std::move(c));
                }
              }
            }
          }
        }
      }
    }

  if (all.empty()) {
    std::string why;
    for (const auto& [k, n] : res.rejected) why += fmt::format("\n  {} ({} combinations)", k, n);
    const std::vector<int> near = nearest_valid_device_counts(cfg, G, o.devices, 4);
    LOOM_FAIL("no valid layout of model '{}' on {} devices with global batch {}; constraints that "
              "fail:{}\n  device counts with a valid layout nearby: {}",
              cfg.name, o.devices, G, why, fmt::join(near, ", "));
  }

  std::sort(all.begin(), all.end(), [](const Candidate& a, const Candidate& b) {
    if (a.cost.step_time != b.cost.step_time) return a.cost.step_time < b.cost.step_time;
    return a.key < b.key;
  });
  // Sweep in time order: a candidate joins when its bucket is below every faster one's. Before
  // the whole replay, lower bounds from cheaper prefixes of the same replay (search.h), each
  // cached by what it depends on.
  int64_t best = std::numeric_limits<int64_t>::max();
  std::map<std::string, int64_t> persistent_cache;  // layout (no M, b, recompute) -> bucket
  std::map<std::string, int64_t> bound_cache;       // plan with full recompute -> bound's bucket
  for (Candidate& c : all) {
    const bool pruning = o.prune_with_bound && best != std::numeric_limits<int64_t>::max();
    if (pruning) {
      // 1. Rank 0's persistent buffers (weights, gradients, optimizer state): the same for every
      //    micro-batch count, size, schedule of the same VS, and recompute.
      ParallelPlan lp = c.plan;
      lp.recompute.clear();
      lp.micro_batches = 1;
      lp.schedule = lp.virtual_stages > 1 ? ScheduleKind::interleaved : ScheduleKind::one_f_one_b;
      const std::string pk = plan_string(lp);
      auto pit = persistent_cache.find(pk);
      if (pit == persistent_cache.end()) {
        int64_t m = 0;
        for (int rank : peak_ranks(c.plan, L))
          m = std::max(m, oracle.rank_memory(c.plan, rank, /*bound_backwards=*/0).total());
        ++res.persistent_bounds;
        pit = persistent_cache.emplace(pk, memory_bucket(m, o.bucket_fraction)).first;
      }
      if (pit->second >= best) {
        ++res.pruned_by_bound;
        ++res.pruned_by_persistent;
        continue;
      }
      // 2. Rank 0 with full recompute everywhere (cached across the recompute variants), over
      //    a prefix of its step: through its kBoundBackwards-th backward.
      ParallelPlan lb = c.plan;
      lb.recompute = full;
      const std::string k = plan_string(lb);
      auto it = bound_cache.find(k);
      if (it == bound_cache.end()) {
        if (res.memory_evaluated >= o.max_memory_evals) goto out_of_budget;
        const int64_t m = oracle.rank_memory(lb, 0, kBoundBackwards).total();
        ++res.memory_evaluated;
        it = bound_cache.emplace(k, memory_bucket(m, o.bucket_fraction)).first;
      }
      if (it->second >= best) {
        ++res.pruned_by_bound;
        continue;
      }
    }
    if (res.memory_evaluated >= o.max_memory_evals) goto out_of_budget;
    ++res.memory_evaluated;
    // Rank 0 first: when it alone is not below the best bucket, neither is the plan's peak, and
    // the other stages need no replay.
    if (pruning &&
        memory_bucket(oracle.rank_memory(c.plan, 0).total(), o.bucket_fraction) >= best) {
      ++res.dominated;
      continue;
    }
    add_memory(c.cost, c.plan, oracle);
    c.has_memory = true;
    {
      const int64_t bk = memory_bucket(c.cost.peak_bytes, o.bucket_fraction);
      if (bk < best) {
        best = bk;
        res.frontier.push_back(c);
      } else {
        ++res.dominated;
      }
    }
    continue;
  out_of_budget:
    res.truncated = true;
    res.truncated_why = fmt::format(
        "max_memory_evals = {} reached; the frontier is exact for plans faster than {:.4g} s",
        o.max_memory_evals, c.cost.step_time);
    break;
  }
  // Every frontier member is a plan the engine accepts (the same validation flags get).
  for (const Candidate& c : res.frontier) {
    parallel::ModelShape shape{cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.d_ff, cfg.vocab};
    shape.seq = o.seq;  // by name: ModelShape grows fields
    shape.experts = cfg.moe.enabled() ? cfg.moe.experts : 0;
    const parallel::ParallelPlan v = parallel::make_plan(parse_plan_string(c.key), shape, G,
                                                         o.devices);
    LOOM_ASSERT(v.micro_batch_size == c.plan.micro_batch_size && v.dp == c.plan.dp &&
                    v.cp == c.plan.cp && v.cp_scheme == c.plan.cp_scheme && v.ep == c.plan.ep,
                "planner built plan '{}' that make_plan reads differently", c.key);
  }
  res.evaluated = std::move(all);
  res.oracle_calls = oracle.calls();
  res.oracle_replays = oracle.misses();
  res.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return res;
}

const Candidate* fastest_under(const std::vector<Candidate>& f, int64_t limit) {
  for (const Candidate& c : f)
    if (c.cost.peak_bytes <= limit) return &c;
  return nullptr;
}

const Candidate* smallest_memory(const std::vector<Candidate>& f) {
  return f.empty() ? nullptr : &f.back();
}

}  // namespace loom::planner
