// planner/cost_model.h: the predicted time of one training step of a ParallelPlan on a Cluster,
// term by term, and its memory from the engine's own model (model::memory_per_rank).
//
// Glossary: dp tp pp the plan's axes, VS virtual stages, M micro-batches, b micro-batch size, T
// sequence, N = b*T rows of a micro-batch, C d_model, KV k/v width, F d_ff, V vocab, L blocks,
// P_c parameters (elements) of one rank's chunk (its tp shard).
//
// Model (each term is seconds on the critical pp stage, the one with the largest time per
// micro-batch; step_time is their sum):
// - forward / backward: matmul FLOPs of the rank's blocks (q/k/v, attention, out, up, down),
//   the query layer and the head, each product timed as flops / (peak * efficiency(its size)).
//   Backward = 2x forward for weight products (input and weight gradients); flash attention's
//   backward = 2.5x its forward (dq, dk, dv, dP plus recomputing the scores: the FLOP convention
//   of the FlashAttention papers).
// - recompute: full recompute runs each block's forward again in its backward (+ its tp
//   collectives); selective rebuilds norm and activation outputs (their elementwise passes).
// - vector: elementwise passes (norms, activation, bias and residual adds, cross-entropy) as
//   f32 bytes moved / memory bandwidth.
// - tp: sequence-parallel blocks (model/block.h) all-gather the two norm outputs (N, C) and
//   reduce-scatter the two row-parallel outputs per block forward, the mirror in the backward;
//   blocking, not overlapped. The vocab-parallel loss adds two small all-reduces of (N) floats.
// - cp (context parallel, cp = G > 1): a rank holds Tl = T/G tokens of every sequence, so every
//   row count above is b*Tl and its attention is Tl queries against the T keys (causal, zigzag
//   balanced: G visiting blocks of Tl x Tl each). The cp term is the exposed transfer time of the
//   scheme, from attention/context_parallel.h's closed byte counts: burst / ring send G-1 blocks,
//   each posted before the compute on the current block, so only max(0, transfer - (G-1)/G of
//   the attention) shows (forward; backward likewise with burst's per-layer choice of backward);
//   allgather (all-gather K, V; backward gathers again and reduce-scatters f32 dK, dV) and ulysses
//   (all-to-all of q, k, v and back) block. Full recompute repeats the forward's transfers.
//   Gradients reduce and ZeRO shards over the dp x cp group. A cp group that spans nodes is
//   priced at the inter-node link for every step (conservative: the engine's double ring hides
//   inter-node transfers behind L steps).
// - sparse (MoE) blocks and ep (expert parallel, docs/moe.md): a sparse block's FFN runs on the
//   N k routed rows at the expert width (topk adds its gate). Under ep > 1 the ep term is the
//   blocking all-to-all exchange per sparse block and micro-batch: the per-expert counts, the
//   routed rows out and the expert outputs back forward, d(out) out and d(x) back backward (a
//   rank's buffer is its N k rows, (ep-1)/ep of it leaving under uniform routing: RRE's closed
//   form, 4 x rows x C x bytes x (ep-1)/ep), again in a full recompute. Expert gradients reduce,
//   and ZeRO-1 shards them, over the ep_dp group (dp x cp / ep ranks holding the same experts).
// - pp: per micro-batch and chunk boundary one (N/tp, C) f32 activation forward and its gradient
//   back, on the critical path (receives block the next compute action).
// - bubble: 1f1b and gpipe: makespan = sum_s t_s + (M - 1) max_s t_s; interleaved:
//   (sum_s t_s - max_s t_s) / VS + M max_s t_s (Megatron's (pp-1)/(VS*M) for equal stages).
//   The term is makespan - M * max_s t_s.
// - dp: ZeRO 0/1 all-reduce the f32 gradients in buckets that start during the chunk's last
//   micro-batch (train/executor.h): exposed = max(0, all-reduce - that backward); ZeRO-1 then
//   broadcasts the updated shares (an all-gather). ZeRO-2/3 reduce-scatter each unit's gradient
//   every micro-batch while the backward runs (train/zero.h), exposed where it is longer than
//   the backward, and all-gather the weights after the step (2) or just in time before each
//   unit's forward and backward (3, blocking).
// - sync: the tied embedding's gradient all-reduce between the first and last stage (pp > 1)
//   and the grad-norm all-reduce (latency).
// - overhead: kernel calls x Cluster::op_overhead_s (per block forward: 2 norms, 4 weight
//   products, attention, 2 residual adds, the activation = 10 calls; backward twice that; head
//   and loss 5 forward, 10 backward), stretched by ranks / cores when ranks outnumber cores.
// - optimizer: AdamW reads w, g, m, v and writes w, m, v (f32), writes the bf16 copy, zeroes
//   the gradients and reads them for the norm: bytes / memory bandwidth.
// - Hosts whose ranks share cores (Cluster::host_cores > 0): the host's figures are divided
//   evenly among the ranks on it (each gets the share of its threads, see core/threads.h).
//
// Memory: model::memory_per_rank for rank (dp 0, tp 0) of every pp stage that can hold the peak
// (the first, the last, and any holding more blocks than all stages before it; dp and tp ranks
// hold equal shares up to rounding). peak_bytes is the largest rank's sum of category peaks, the
// bound the engine's pool can reach. What lies outside the pool (MPI's buffers, libraries, code)
// is not in it: see docs/planner.md for its measured size.
#pragma once

#include <array>
#include <cstdint>
#include <map>
#include <string>

#include <nlohmann/json.hpp>

#include "model/config.h"
#include "model/memory.h"
#include "parallel/plan.h"
#include "planner/cluster.h"

namespace loom::planner {

// Caches model::memory_per_rank by (plan, rank): the search prices thousands of plans whose
// memory-relevant parts repeat. Not thread-safe.
class MemoryOracle {
 public:
  // The engine's memory as it runs on `cluster`'s hosts (bf16 emulated or not, bf16 attention
  // on AMX tiles or not).
  MemoryOracle(const model::ModelConfig& cfg, int64_t T, model::Precision precision,
               const Cluster& cluster);
  // `bound_backwards` as model::MemoryOptions::bound_backwards: -1 the whole step, else a
  // lower bound from a prefix of it.
  const model::RankMemory& rank_memory(const parallel::ParallelPlan& plan, int rank,
                                       int bound_backwards = -1);
  // Parameter elements held by each pp rank (its chunks, tp rank 0's shard, ep rank 0's
  // experts), from the engine's geometry (model::StageGeometry), cached by (tp, ep, pp, VS,
  // stage_layers); `expert` of them in expert tensors (reduced over the ep_dp group under ep).
  struct Params {
    std::vector<int64_t> total, expert;
  };
  const Params& params(const parallel::ParallelPlan& plan);
  const std::vector<int64_t>& rank_params(const parallel::ParallelPlan& plan) {
    return params(plan).total;
  }
  const model::ModelConfig& config() const { return cfg_; }
  int64_t calls() const { return calls_; }
  int64_t misses() const { return misses_; }

 private:
  const model::ModelConfig& cfg_;
  int64_t T_;
  model::Precision precision_;
  model::MemoryOptions options_;
  model::MemoryReplayer replayer_;
  std::map<std::string, model::RankMemory> cache_;
  std::map<std::string, Params> params_;
  int64_t calls_ = 0, misses_ = 0;
};

struct TimeTerms {
  double forward = 0, backward = 0, recompute = 0, vector = 0;  // compute, critical stage
  double tp = 0, cp = 0, ep = 0, pp = 0, zero = 0;  // per-micro-batch comm (zero: ZeRO-2/3)
  double bubble = 0;  // pipeline fill/drain; negative on an oversubscribed shared host, where
                      // idle stages' cores are absorbed (cost_model.cpp)
  double dp = 0;          // exposed dp gradient reduction (+ ZeRO weight gathers after the step)
  double dp_total = 0;    // the same reduction's full time (informational, not summed)
  double sync = 0, optimizer = 0;
  double overhead = 0;    // kernel-call overhead, critical stage
  double total() const {
    return forward + backward + recompute + vector + overhead + tp + cp + ep + pp + zero + bubble +
           dp + sync + optimizer;
  }
  // (name, seconds) of every summed term, in a fixed order.
  std::array<std::pair<const char*, double>, 14> named() const;
};

struct StepCost {
  TimeTerms terms;
  double step_time = 0;            // seconds, terms.total()
  int critical_stage = 0;          // pp stage with the largest per-micro-batch time
  double model_flops = 0;          // training FLOPs of the step (all ranks, no recompute)
  double tokens_per_s = 0;
  model::RankMemory peak;          // the rank with the largest peak
  int64_t peak_bytes = 0;          // peak.total()
  int64_t persistent_bytes = 0;    // weights + grads + optimizer of that rank
  int64_t transient_bytes = 0;     // activations + workspace + comm of that rank
  nlohmann::json to_json() const;
};

struct CostInputs {
  const model::ModelConfig& cfg;
  const Cluster& cluster;
  int64_t T = 0;
  model::Precision precision = model::Precision::f32;
};

// Time only (cheap: closed forms, no memory replay). Throws loom::Error if the plan's world does
// not fit the cluster.
StepCost estimate_time(const CostInputs& in, const parallel::ParallelPlan& plan,
                       MemoryOracle& oracle);
// Time and memory.
StepCost estimate_step(const CostInputs& in, const parallel::ParallelPlan& plan,
                       MemoryOracle& memory);
// The ranks whose memory can be the plan's peak (the memory paragraph above): (dp 0, tp 0, cp 0)
// of the first stage, the last, and any holding more blocks than every stage before it.
std::vector<int> peak_ranks(const parallel::ParallelPlan& plan, int64_t n_layers);
// Fills memory fields of `cost` for `plan`.
void add_memory(StepCost& cost, const parallel::ParallelPlan& plan, MemoryOracle& memory);

// Seconds of one training step of `cfg` (one rank, micro-batch `batch` x `T`, dp 1) on exactly
// one core of `cluster`'s host by its per-op figures, none of its concurrency tables: what loom
// calibrate sets beside its step probe's measured one-thread time (Cluster::step_unit). Needs a
// CPU host (cluster.host_cores > 0).
double one_core_step_price(const model::ModelConfig& cfg, const Cluster& cluster, int64_t batch,
                           int64_t T, model::Precision precision);

// Pipeline makespan in units of the per-micro-batch stage times `stage_time` (s), for the plan's
// schedule, M and VS (see the bubble term above).
double pipeline_makespan(const std::vector<double>& stage_time, int64_t micro_batches,
                         parallel::ScheduleKind kind, int virtual_stages);

// The plan's string form: "dp=2,tp=1,pp=2,zero=1,micro_batches=4,schedule=1f1b,recompute=full"
// (+ cp, cp_scheme, cp_layout when cp > 1, virtual_stages, stage_layers when set), and its
// inverse into PlanSettings.
std::string plan_string(const parallel::ParallelPlan& p);
parallel::PlanSettings parse_plan_string(const std::string& s);

}  // namespace loom::planner
