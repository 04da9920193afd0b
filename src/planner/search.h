// planner/search.h: the (time, peak memory) frontier of every plan for a model on N devices
// (TensorOpt's FT idea, arXiv 2004.10856: a set of strategies, not one), by bounded enumeration.
//
// Space: tp (divisors of N that divide heads, kv heads, d_ff and vocab), pp (divisors of N/tp,
// at most L), dp = N/(tp*pp) (must divide the global batch), ZeRO 0-3 (0 only when dp = 1),
// micro-batch count M (every divisor of G/dp; b = G/(dp*M)), schedule 1f1b and gpipe, and
// interleaved with VS in 2..max_virtual_stages (M % pp == 0), stage boundaries even (when L
// divides) and balanced (first and last stages lighter by the embedding and head work, see
// search.cpp), recompute none / selective / full for every block, and full on the first k
// blocks for k in {L/4, L/2, 3L/4} (the first blocks hold the most in-flight activations under
// 1f1b), cp (auto_cp_sizes or the given list; dp = N/(tp*pp*cp)) with the schemes burst,
// allgather and ulysses (cp must divide a tp shard's kv heads), zigzag layout, and for sparse
// (MoE) models ep (auto_ep_sizes or the given list; ep divides dp and the experts, ZeRO 0/1).
//
// Algorithm: every candidate gets its time (closed form, cheap). Candidates are then visited in
// order of (time, plan string); a candidate joins the frontier when its memory bucket is below
// every faster one's. Memory (model::memory_per_rank, a replay of one step) is the expensive
// part, so before it lower bounds are tried, cheapest first, each from the same replay doing
// less (model::MemoryOptions::bound_backwards, a lower bound in every category):
//   1. rank 0's persistent buffers alone (no step replayed), cached by layout (the same for
//      every micro-batch count, schedule of the same VS, and recompute);
//   2. rank 0 with full recompute everywhere (cached across the recompute variants), replaying
//      the forward and backward work only through its kBoundBackwards-th backward, then only the
//      messages and the step's end;
//   3. rank 0's own whole replay, before the other stages'.
// When a bound's bucket is not below the best so far, the candidate cannot join and its memory
// is never computed ("pruned by memory bound"). Bound 2 relies on full recompute never needing
// more memory than another mode at the same layout; tests/unit/planner checks the pruned search
// against the unpruned one (brute force), tests/unit/model that every bound is a lower bound.
// Memory is bucketed: bucket(m) = floor(log(m) / log(1 + bucket_fraction)), so points closer
// than the fraction count as equal memory and the faster one wins; equal times are broken by
// the plan string, so the result is deterministic.
// Bounds: at most max_candidates time evaluations and max_memory_evals memory replays; when
// either is reached the search stops and says so (truncated), never hangs.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "model/config.h"
#include "parallel/plan.h"
#include "planner/cluster.h"
#include "planner/cost_model.h"

namespace loom::planner {

struct SearchSpace {
  std::vector<int> zero_stages = {0, 1, 2, 3};
  bool schedules = true;         // also gpipe and interleaved (else 1f1b only)
  int max_virtual_stages = 4;
  bool recompute_splits = true;  // full on the first k blocks
  bool balanced_stages = true;   // non-uniform stage boundaries
  // Context-parallel sizes; empty: auto_cp_sizes(devices, seq). Schemes tried for cp > 1.
  std::vector<int> cp;
  std::vector<std::string> cp_schemes = {"burst", "allgather", "ulysses"};
  // Expert-parallel sizes; empty: auto_ep_sizes(model). Each must divide dp and the experts;
  // Every ZeRO stage runs under ep (ZeRO-2/3 shard over ep_dp, train/zero.h).
  std::vector<int> ep;
};

struct SearchOptions {
  int devices = 1;
  int64_t global_batch = 1;
  int64_t seq = 0;
  model::Precision precision = model::Precision::f32;
  SearchSpace space;
  double bucket_fraction = 0.01;
  int64_t max_candidates = 2'000'000;
  int64_t max_memory_evals = 20'000;
  bool prune_with_bound = true;
};

struct Candidate {
  parallel::ParallelPlan plan;
  std::string key;       // plan_string(plan)
  StepCost cost;         // memory fields set when has_memory
  bool has_memory = false;
};

struct SearchResult {
  std::vector<Candidate> frontier;   // by increasing time (and decreasing memory)
  std::vector<Candidate> evaluated;  // every candidate timed, by (time, key); memory where computed
  int64_t enumerated = 0;            // combinations of the axes looked at
  int64_t timed = 0;                 // valid candidates whose time was computed
  int64_t memory_evaluated = 0;      // candidates whose memory was computed
  int64_t pruned_by_bound = 0;       // skipped: memory lower bound already dominated
  int64_t pruned_by_persistent = 0;  // of those, by the persistent-buffer bound alone
  int64_t persistent_bounds = 0;     // persistent-buffer bounds computed (no step replayed)
  int64_t dominated = 0;             // memory computed, not on the frontier
  std::map<std::string, int64_t> rejected;  // reason -> count (divisibility, batch, ...)
  bool truncated = false;
  std::string truncated_why;
  int64_t oracle_calls = 0, oracle_replays = 0;
  double seconds = 0;
  nlohmann::json to_json() const;    // counts and reasons (not the plans)
};

// Throws loom::Error when no plan exists, naming each failing constraint (heads, layers, batch)
// and the nearest device counts that have a valid layout.
SearchResult search(const model::ModelConfig& cfg, const Cluster& cluster, const SearchOptions& o);

int64_t memory_bucket(int64_t bytes, double fraction);

// The cp sizes the search tries by default: 1, and every divisor g of `devices` that the zigzag
// layout can cut seq by (seq % 2g == 0) while each rank keeps at least kMinCpTokens tokens of a
// sequence. A bound on the search, not a claim about speed: every cp size multiplies the plans
// to time and replay by about 3 (its schemes), and at a few thousand tokens per sequence tp with
// sequence parallelism and recompute already bound the activations (context parallelism is
// used from 8K-128K tokens in published runs). With 1024 the 1T / 2048-token search grew from
// 48K to 199K plans and ran out of its memory-replay budget. Pass the sizes explicitly
// (loom plan --cp 1,2,4) to search them at any length.
inline constexpr int64_t kMinCpTokens = 4096;
// The full-recompute bound replays rank 0's forward and backward work through its
// kBoundBackwards-th backward (model::MemoryOptions::bound_backwards). Valid for any value; the
// value only sets how tight it is: by then 1f1b, gpipe and interleaved have had their most
// micro-batches in flight and run a backward, so it is usually the exact peak (the unit test
// counts how often) at a fraction of a 256-micro-batch replay.
inline constexpr int kBoundBackwards = 2;
std::vector<int> auto_cp_sizes(int64_t devices, int64_t seq);
// The ep sizes the search tries by default: every divisor of a sparse model's experts (those
// dividing dp are kept per layout); {1} for a dense model.
std::vector<int> auto_ep_sizes(const model::ModelConfig& cfg);

// Queries on a frontier (null when none qualifies).
const Candidate* fastest_under(const std::vector<Candidate>& frontier, int64_t memory_limit);
const Candidate* smallest_memory(const std::vector<Candidate>& frontier);

// Device counts with at least one valid layout near `devices` (for error messages).
std::vector<int> nearest_valid_device_counts(const model::ModelConfig& cfg, int64_t global_batch,
                                             int devices, int how_many);

// Balanced stage boundaries for pp*VS virtual stages (see search.cpp); empty when the even split
// is already balanced.
std::vector<int64_t> balanced_stage_layers(const model::ModelConfig& cfg, int pp, int VS,
                                           int64_t T);

}  // namespace loom::planner
