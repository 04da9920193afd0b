// parallel/plan.h: ParallelPlan, the one description of how a training run is laid out over
// ranks. The planner produces it, the CLI and the train config's [parallel] table fill it, the
// trainer executes it, the memory model prices it, and it is written into trainer_state.json
// and the run log.
//
// Glossary: dp data parallel, tp tensor parallel, pp pipeline stages, cp context parallel
// (sequence split), ep expert parallel (a divisor of dp: experts are split over ep ranks inside
// each dp group, as in Megatron and DeepSpeed), M micro-batches per step, b micro-batch size
// (sequences per micro-batch on one dp rank), G = dp * M * b the global batch (sequences per
// optimizer step), L model blocks, VS virtual stages (model chunks) per pp rank.
//
// World size = dp * tp * pp * cp. Ranks are ordered tp fastest, then cp, then dp, then pp
// ("tp-cp-dp-pp"; with cp = 1 this is the older "tp-dp-pp").
//
// Context parallel (cp = G > 1): every sequence of T tokens is split over the G ranks of a cp
// group (cp_layout: zigzag, 2G chunks of T/(2G), rank r holding chunks r and 2G-1-r; or striped,
// positions t with t mod G = r), attention runs over the group (cp_scheme, see
// attention/context_parallel.h), and the cp ranks are replicas of the weights like dp ranks:
// gradients reduce, and ZeRO shards, over the dp x cp group (Megatron's "dp-cp" group).
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "parallel/schedule.h"

namespace loom::parallel {

// What a block keeps for its backward (see model/stage.h): everything, everything but what
// elementwise ops rebuild cheaply, or only its input (the forward runs again in the backward).
enum class Recompute : uint8_t { none, selective, full };
const char* recompute_name(Recompute r);
// "none" | "selective" | "full"; throws loom::Error naming the valid values.
Recompute recompute_from_name(std::string_view s);
// A per-layer recompute list from `spec`: one mode for every layer ("full"), or a comma list of
// mode:ranges ("full:0-11,selective:12-23", "full:0,2,4-5" is not allowed: each entry is
// mode:first[-last]); layers not named get `none`. The query layer (if any) follows the last
// block. Throws naming the entry and the valid layer range [0, n_layers).
std::vector<Recompute> parse_recompute(std::string_view spec, int64_t n_layers);
// The shortest spec that parse_recompute turns back into `per_layer`.
std::string recompute_spec(const std::vector<Recompute>& per_layer);

// The model dimensions a plan must fit (a lower layer cannot see model::ModelConfig).
struct ModelShape {
  int64_t n_layers = 0, n_heads = 0, n_kv_heads = 0, d_ff = 0, vocab = 0;
  int64_t seq = 0;  // training sequence length T (0: not known; cp's split is then unchecked)
  int64_t experts = 0;  // per sparse (MoE) block; 0: a dense model
};

struct ParallelPlan {
  int dp = 1, tp = 1, pp = 1, cp = 1, ep = 1;
  int zero = 0;                       // ZeRO stage over dp (x cp): 0, 1, 2, 3
  std::vector<Recompute> recompute;   // per block (size L); empty = none everywhere
  int64_t micro_batch_size = 1;       // b: sequences per micro-batch on one dp rank
  int64_t micro_batches = 1;          // M
  std::vector<int64_t> stage_layers;  // blocks per virtual stage (pp*VS entries); empty = even
  int virtual_stages = 1;             // VS (interleaved schedule)
  ScheduleKind schedule = ScheduleKind::one_f_one_b;
  int ranks_per_node = 0;             // 0: MPI's shared-memory islands; K: K consecutive ranks
  double bucket_mb = 4.0;             // dp gradient bucket (ZeRO 0/1)
  std::string cp_scheme = "burst";    // burst | ring | allgather | ulysses (cp > 1)
  std::string cp_layout = "zigzag";   // zigzag | striped (cp > 1)
  // Expert Computation and Storage Separation (PanGu-Σ; docs/moe.md): "off", "dense" (every
  // expert updated as plain AdamW) or "lazy" (only experts that got tokens this step). When on,
  // the experts' f32 masters and AdamW moments live in a host store outside the pool.
  std::string ecss = "off";
  bool cp_overlap = true;             // cp: post the next block's transfer before computing

  int world_size() const { return dp * tp * pp * cp; }
  // The gradient-reduction (and ZeRO) group: dp x cp ranks hold the same weights.
  int dp_cp() const { return dp * cp; }
  int64_t global_batch() const { return int64_t(dp) * micro_batches * micro_batch_size; }
  Recompute recompute_of(int64_t layer) const {
    return recompute.empty() ? Recompute::none : recompute.at(size_t(layer));
  }
  // "dp 2 x tp 2 x pp 2 (zero 1, 1f1b, 4 micro-batches of 2, recompute full)"
  std::string describe() const;
  nlohmann::json to_json() const;
  static ParallelPlan from_json(const nlohmann::json& j);  // throws naming the bad key
  bool operator==(const ParallelPlan&) const = default;
};

// Values given on the command line or in a config; unset ones leave the plan as it is. dp = 0
// means "every rank not used by tp, pp and cp".
struct PlanSettings {
  std::optional<int> dp, tp, pp, cp, ep, zero, virtual_stages, ranks_per_node;
  std::optional<int64_t> micro_batches;
  std::optional<std::string> schedule, recompute, stage_layers, cp_scheme, cp_layout, ecss;
  std::optional<double> bucket_mb;
  std::optional<bool> cp_overlap;
  // Every value set in `over` replaces this one's (flags override the config).
  void override_with(const PlanSettings& over);
};

// The plan for a global batch of `global_batch` sequences on `world_size` ranks (0: not known
// yet; dp must then be given). Validates everything in one place; each error names the bad
// value and lists the values that would work.
ParallelPlan make_plan(const PlanSettings& s, const ModelShape& model, int64_t global_batch,
                       int world_size);

// Parses "5,6,6,5"; throws naming the entry.
std::vector<int64_t> parse_int_list(std::string_view s, std::string_view what);

// The double ring's node size inside one cp group (attention::CpContext::ranks_per_node: L
// consecutive group ranks per node) for plan.ranks_per_node = K consecutive WORLD ranks per
// node. A cp group's members are tp apart in the world (rank order tp-cp-dp-pp), so: cp when
// tp x cp divides K (every group inside one node: a flat ring); K / tp when tp divides K and
// K / tp divides cp (every group spread evenly over cp / (K / tp) nodes); otherwise 0, and the
// group's own node information decides (GroupOptions::ranks_per_node emulates it). 0 when K is.
int cp_ranks_per_node(const ParallelPlan& p);

}  // namespace loom::parallel
