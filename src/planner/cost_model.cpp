// planner/cost_model.cpp: see cost_model.h for the model; this file is its arithmetic.
//
// Glossary: as in cost_model.h. t tp size, Nl = N/t local rows (sequence parallel), NHl = NH/t.
#include "planner/cost_model.h"

#include <algorithm>
#include <cmath>

#include <fmt/format.h>

#include "core/error.h"
#include "attention/context_parallel.h"
#include "model/block.h"
#include "model/geometry.h"

namespace loom::planner {

using parallel::ParallelPlan;
using parallel::Recompute;
using parallel::ScheduleKind;

// ---------------------------------------------------------------------------------------------
// Memory and geometry oracle.

MemoryOracle::MemoryOracle(const model::ModelConfig& cfg, int64_t T, model::Precision precision,
                           const Cluster& cluster)
    : cfg_(cfg), T_(T), precision_(precision), replayer_(cfg) {
  options_.bf16_emulated = cluster.bf16_emulated;
  // bf16 attention on the native bf16 kernel, with its pool workspace, where the cluster's kernels were
  // measured with it; a file without [kernels] (a preset, or written before these tables
  // existed) says nothing about it: then as this machine runs.
  if (cluster.kernels.measured)
    options_.native_attention = !cluster.kernels.attention_fwd_bf16.points.empty();
}

const model::RankMemory& MemoryOracle::rank_memory(const ParallelPlan& plan, int rank,
                                                   int bound_backwards) {
  ++calls_;
  // Every field memory_per_rank reads: the plan string's and the micro-batch size.
  std::string key = plan_string(plan);
  key += fmt::format("#b{}#r{}#k{}", plan.micro_batch_size, rank, bound_backwards);
  auto it = cache_.find(key);
  if (it != cache_.end()) return it->second;
  ++misses_;
  model::MemoryOptions options = options_;
  options.bound_backwards = bound_backwards;
  return cache_.emplace(key, replayer_.rank_memory(plan, rank, T_, precision_, options))
      .first->second;
}

const MemoryOracle::Params& MemoryOracle::params(const ParallelPlan& plan) {
  std::string key = fmt::format("{}/{}/{}/{}/", plan.tp, plan.ep, plan.pp, plan.virtual_stages);
  for (int64_t n : plan.stage_layers) key += fmt::format("{},", n);
  auto it = params_.find(key);
  if (it != params_.end()) return it->second;
  const int n_virtual = plan.pp * plan.virtual_stages;
  const std::vector<model::StageSpan> spans = model::split_stages(cfg_, n_virtual, plan.stage_layers);
  Params p;
  p.total.assign(size_t(plan.pp), 0);
  p.expert.assign(size_t(plan.pp), 0);
  const EpShard ep = plan.ep > 1 ? EpShard{0, plan.ep} : EpShard{};
  for (int g = 0; g < n_virtual; ++g) {
    const model::StageGeometry& geo = replayer_.geometry(spans[size_t(g)], TpShard{0, plan.tp}, ep);
    p.total[size_t(g % plan.pp)] += geo.total();
    for (const model::UnitRange& r : geo.expert_ranges())
      p.expert[size_t(g % plan.pp)] += r.end - r.begin;
  }
  return params_.emplace(key, std::move(p)).first->second;
}

// ---------------------------------------------------------------------------------------------
// Pipeline.

double pipeline_makespan(const std::vector<double>& t, int64_t M, ScheduleKind kind, int VS) {
  LOOM_ASSERT(!t.empty() && M >= 1 && VS >= 1, "bad pipeline arguments");
  double sum = 0, most = 0;
  for (double x : t) {
    sum += x;
    most = std::max(most, x);
  }
  // Every micro-batch passes the slowest stage once (M * most); filling and draining the other
  // stages adds their time once (1f1b / gpipe), or a 1/VS share of it when each stage's work is
  // cut into VS chunks that flow through the pipeline separately (interleaved, Narayanan et al.
  // SC'21 section 2.2.2: bubble (pp-1)/(VS*M) of the ideal time for equal stages).
  const double fill = sum - most;
  if (kind == ScheduleKind::interleaved) return fill / double(VS) + double(M) * most;
  return fill + double(M) * most;
}

// ---------------------------------------------------------------------------------------------
// Step time.

namespace {

struct Rates {
  double flops = 0;                // FLOP/s of one rank
  double bytes = 0;                // memory bytes/s of one rank
  const EfficiencyTable* eff = nullptr;
  // Seconds for `count` products of `flops_each` FLOPs.
  double mm(double flops_each, double count = 1) const {
    return count * flops_each / (flops * eff->at(flops_each));
  }
  // Seconds for one (m x k) @ (k x n) product: its FLOPs, plus, where the cluster says the
  // operands' memory traffic is not hidden (cluster.h matmul_memory_efficiency), reading both
  // operands and writing the result at the achieved bandwidth.
  const EfficiencyTable* mem_eff = nullptr;  // null: traffic hidden
  double elem_bytes = 4;                     // bytes per matmul operand element
  double gemm(double m, double n, double k) const {
    double s = mm(2 * m * n * k);
    if (mem_eff) {
      const double moved = (m * k + k * n + m * n) * elem_bytes;
      s += moved / (bytes * mem_eff->at_units(moved / 1e6));
    }
    return s;
  }
  // Measured kernels (cluster.h [kernels]) or null: then products are priced by the matmul table
  // alone, attention as products and elementwise passes by bytes at the memory bandwidth.
  const KernelCosts* k = nullptr;
  double core_s = 1;        // seconds on this rank per second of one core's work
  double mem_s = 1;         // the same for memory-bound work (Cluster::memory_share)
  double core_peak = 0;     // one core's f32 peak, FLOP/s
  std::pair<double, double> layout{1, 1};  // (nt, tn) rates over the table's plain products
  // A weight product of a forward (x @ W^T) and its backward (dY @ W and dY^T @ X accumulating).
  double weight_fwd(double m, double n, double kk) const { return gemm(m, n, kk) / layout.first; }
  double weight_bwd(double m, double n, double kk) const {
    return gemm(m, n, kk) * (1 + 1 / layout.second);
  }
  // Seconds for `n` elements of an elementwise kernel costing `ns` seconds each on one core
  // (memory-bound: the ranks of a host share its memory).
  double elems(double ns, double n) const { return ns * n * mem_s; }
};

// Per micro-batch of one pp rank, seconds by term (before the pipeline model).
struct StageWork {
  double fwd = 0, bwd = 0, recompute = 0, vector = 0, overhead = 0, tp = 0, cp = 0, ep = 0,
         pp = 0, zero = 0;
  double bwd_compute = 0;  // backward compute only (the window dp / ZeRO traffic overlaps)
  double total() const {
    return fwd + bwd + recompute + vector + overhead + tp + cp + ep + pp + zero;
  }
};

// The link level a group crosses: intra when all its ranks sit in one node. Ranks are ordered
// tp fastest, then cp, then dp, then pp (parallel/plan.h), so a group of `size` ranks at
// `stride` spans stride * size consecutive ranks.
const LinkLevel& level(const Cluster& c, int64_t stride, int64_t size) {
  return stride * size <= c.devices_per_node ? c.intra : c.inter;
}

}  // namespace

std::array<std::pair<const char*, double>, 14> TimeTerms::named() const {
  return {{{"forward", forward},
           {"backward", backward},
           {"recompute", recompute},
           {"vector", vector},
           {"overhead", overhead},
           {"tp", tp},
           {"cp", cp},
           {"ep", ep},
           {"pp", pp},
           {"zero", zero},
           {"bubble", bubble},
           {"dp", dp},
           {"sync", sync},
           {"optimizer", optimizer}}};
}

double one_core_step_price(const model::ModelConfig& cfg, const Cluster& cluster, int64_t batch,
                           int64_t T, model::Precision precision) {
  LOOM_CHECK(cluster.host_cores > 0, "cluster '{}' has no [host] cores: a one-core price needs a "
             "CPU host", cluster.name);
  Cluster one = cluster;
  one.concurrency = {{1, 1.0}};  // rank_share(1) = 1 core; memory_share falls back to it
  one.memory_concurrency.clear();
  one.step_concurrency.clear();
  one.step_unit = 1;
  parallel::PlanSettings s;
  s.dp = 1;
  s.tp = 1;
  s.pp = 1;
  s.micro_batches = 1;
  parallel::ModelShape shape{cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.d_ff, cfg.vocab, T};
  const ParallelPlan plan = parallel::make_plan(s, shape, batch, 1);
  MemoryOracle oracle(cfg, T, precision, one);
  return estimate_time({cfg, one, T, precision}, plan, oracle).step_time;
}

StepCost estimate_time(const CostInputs& in, const ParallelPlan& plan, MemoryOracle& oracle) {
  const model::ModelConfig& cfg = in.cfg;
  const Cluster& cl = in.cluster;
  const int world = plan.world_size();
  LOOM_CHECK(world <= cl.total_devices(),
             "the plan needs {} ranks but cluster '{}' has {} nodes x {} devices = {}", world,
             cl.name, cl.nodes, cl.devices_per_node, cl.total_devices());
  const bool bf = in.precision == model::Precision::bf16;
  // Ranks sharing one host's cores split its throughput (cluster.h): the host figures are for
  // all its cores; a rank gets rank_share() cores' worth of them.
  const int host_ranks = std::min(world, cl.devices_per_node);
  const double share =
      cl.host_cores > 0 ? double(cl.host_cores) / cl.rank_share(host_ranks) : 1.0;
  Rates r;
  r.flops = cl.peak_flops(in.precision) / share;
  r.bytes = cl.memory_bandwidth_Bps / share;
  r.eff = &cl.efficiency(in.precision);
  if (!cl.matmul_memory_eff.points.empty()) r.mem_eff = &cl.matmul_memory_eff;
  if (cl.kernels.measured && cl.host_cores > 0) {
    r.k = &cl.kernels;
    r.core_s = 1 / cl.rank_share(host_ranks);
    r.mem_s = 1 / cl.memory_share(host_ranks);
    r.core_peak = cl.peak_flops_f32 / cl.host_cores;
    r.layout = cl.kernels.layout(in.precision);
  }

  const double t = plan.tp, b = double(plan.micro_batch_size), T = double(in.T);
  const int G = plan.cp;
  const double Tl = T / G;  // tokens of every sequence on this rank (cp)
  const double N = b * Tl, C = double(cfg.d_model), KV = double(cfg.kv_dim()), F = double(cfg.d_ff),
               V = double(cfg.vocab), NH = double(cfg.n_heads), HD = double(cfg.head_dim());
  const double f32 = 4, mm_bytes = bf && !cl.bf16_emulated ? 2 : 4;  // bytes per element
  r.elem_bytes = mm_bytes;

  // One block (or the query layer: the same products), one micro-batch, this rank's shard.
  // Attention: q.k and p.v of each head, the causal half of 2*T*T*HD. Under cp a rank's Tl
  // queries meet the T keys as G visiting Tl x Tl blocks (burst, ring; zigzag balances the causal
  // work), one Tl x T product (allgather) or, with NH/G heads, the whole sequence (ulysses).
  const bool ulysses = G > 1 && plan.cp_scheme == "ulysses";
  const bool allgather = G > 1 && plan.cp_scheme == "allgather";
  double attn_each = Tl * Tl * HD, attn_count = b * NH / t * 2 * G;
  if (ulysses) {
    attn_each = T * T * HD;
    attn_count = b * NH / t / G * 2;
  } else if (allgather) {
    attn_each = Tl * T * HD;
    attn_count = b * NH / t * 2;
  }
  // Sparse (MoE) blocks (docs/moe.md): the FFN runs on the N k routed rows (k choices per
  // token) at the expert width Fe/t instead of the N rows at F/t; with uniform routing each ep
  // rank's experts receive N k rows per micro-batch on average. topk adds its gate (N, E).
  const bool moe = cfg.moe.enabled();
  const double Nk = moe ? N * double(cfg.moe.k()) : N, Fe = moe ? double(cfg.moe.expert_d_ff) : F;
  const double gate_fwd =
      moe && cfg.moe.router == model::Router::topk ? r.gemm(N, double(cfg.moe.experts), C) : 0;
  const double attn_proj_fwd = r.weight_fwd(N, (C + 2 * KV) / t, C) + r.weight_fwd(N, C, C / t);
  const double attn_proj_bwd = r.weight_bwd(N, (C + 2 * KV) / t, C) + r.weight_bwd(N, C, C / t);
  // The attention kernel: priced as products (backward 2.5x the forward: S and dP again, dV,
  // dQ, dK), or by its measured efficiency (which includes its softmax, masks and tiling).
  // bf16 blocks without cp run the native bf16 kernel where the host has it (AMX tiles or
  // AVX512-BF16: model/block.h), priced by its own table over one core's bf16 peak.
  const bool native_attn =
      r.k && model::native_attention_used(bf, G > 1, in.T, !r.k->attention_fwd_bf16.points.empty());
  const double attn_peak = native_attn ? cl.peak_flops_bf16 / cl.host_cores : r.core_peak;
  const EfficiencyTable* attn_fwd_eff =
      r.k ? (native_attn ? &r.k->attention_fwd_bf16 : &r.k->attention_fwd) : nullptr;
  const EfficiencyTable* attn_bwd_eff =
      r.k ? (native_attn ? &r.k->attention_bwd_bf16 : &r.k->attention_bwd) : nullptr;
  const double block_attn_fwd =
      r.k ? attn_each * attn_count * r.core_s / (attn_peak * attn_fwd_eff->at(attn_each))
          : r.mm(attn_each, attn_count);
  const double block_attn_bwd =
      r.k ? 2.5 * attn_each * attn_count * r.core_s / (attn_peak * attn_bwd_eff->at(attn_each))
          : 2.5 * block_attn_fwd;
  // Elementwise f32 passes per block forward, counted per row from block.cpp's structure: two
  // norms on the local rows (read C, write C and its matmul copy C), two residual adds (read 2C,
  // write C), the activation over all rows (read F/t, write the pre-activation and its matmul
  // copy). The backward passes over each about twice (read the saved input and the gradient,
  // write the gradient).
  const double Nl = N / t;
  const double norm_bytes = 2 * 3 * C * Nl * f32;
  struct BlockCost {
    double fwd, bwd, vec_fwd, vec_bwd, selective_vec;
  };
  auto block_cost = [&](double rows, double width, double gate) {
    const double weights_fwd = attn_proj_fwd + r.weight_fwd(rows, width / t, C) +
                               r.weight_fwd(rows, C, width / t) + gate;
    const double weights_bwd = attn_proj_bwd + r.weight_bwd(rows, width / t, C) +
                               r.weight_bwd(rows, C, width / t) + 2 * gate;
    const double act_bytes = 3 * (width / t) * rows * f32;
    BlockCost b;
    b.fwd = weights_fwd + block_attn_fwd;
    b.bwd = weights_bwd + block_attn_bwd;
    if (r.k) {
      // block.cpp's passes, element by element: forward two norms (Nl rows), the qkv, output
      // and down-projection biases, two residual adds, the bias-fused activation; backward two
      // norms (their residual sums included), four bias gradients, the activation's
      // gradient and the zeroed dqkv.
      const KernelCosts& k = *r.k;
      const size_t act = size_t(cfg.activation);  // KernelCosts::act_* order
      const double qkv = N * (C + 2 * KV) / t, wide = rows * width / t;
      b.vec_fwd = r.elems(k.layernorm_fwd, 2 * Nl * C) + r.elems(k.bias_add, qkv + 2 * Nl * C) +
                  r.elems(k.add, 2 * Nl * C) + r.elems(k.act_fwd[act], wide);
      b.vec_bwd = r.elems(k.layernorm_bwd, 2 * Nl * C) +
                  r.elems(k.bias_bwd, qkv + 2 * Nl * C + wide) +
                  r.elems(k.act_bwd[act], wide) + r.elems(k.zero, qkv);
      b.selective_vec = r.elems(k.layernorm_fwd, 2 * Nl * C) + r.elems(k.act_fwd[act], wide);
    } else {
      b.vec_fwd = (norm_bytes + 2 * 3 * C * Nl * f32 + act_bytes) / r.bytes;
      b.vec_bwd = 2 * b.vec_fwd;
      b.selective_vec = (norm_bytes + act_bytes) / r.bytes;
    }
    return b;
  };
  const BlockCost dense_block = block_cost(N, F, 0);
  const BlockCost sparse_block = moe ? block_cost(Nk, Fe, gate_fwd) : dense_block;
  const double block_fwd = dense_block.fwd, block_bwd = dense_block.bwd;
  const double block_vec_fwd = dense_block.vec_fwd, block_vec_bwd = dense_block.vec_bwd;
  // Sequence-parallel tp collectives of one block forward: all-gather both norm outputs (as
  // matmul inputs), reduce-scatter both row-parallel partial sums (f32). The backward mirrors.
  const LinkLevel& tp_link = level(cl, 1, plan.tp);
  const double block_tp_fwd =
      plan.tp > 1 ? 2 * tp_link.time(Collective::all_gather, N * C * mm_bytes, plan.tp) +
                        2 * tp_link.time(Collective::reduce_scatter, N * C * f32, plan.tp)
                  : 0;
  const double block_tp_bwd = block_tp_fwd;
  // Context-parallel transfers of one block (cost_model.h), exposed seconds forward / backward.
  double block_cp_fwd = 0, block_cp_bwd = 0;
  if (G > 1) {
    const int64_t Bi = plan.micro_batch_size, Ti = in.T, NHl = cfg.n_heads / plan.tp,
                  NKVl = cfg.n_kv_heads / plan.tp, HDi = cfg.head_dim();
    const DType dt = mm_bytes == 2 ? DType::bf16 : DType::f32;
    const LinkLevel& cp_link = level(cl, plan.tp, G);
    const double steps = double(G - 1);
    if (ulysses) {
      // cp_ulysses_bytes is what one rank sends, (G-1)/G of its buffer.
      auto a2a = [&](bool backward) {
        const double sent = double(attention::cp_ulysses_bytes(backward, Bi, Ti, G, NHl, NKVl, HDi, dt));
        return cp_link.time(Collective::all_to_all, sent * G / steps, G);
      };
      block_cp_fwd = a2a(false);
      block_cp_bwd = a2a(true);
    } else if (allgather) {
      const double kv_bytes = 2 * b * T * double(NKVl * HDi);  // K and V of the whole sequence
      const double gather = cp_link.time(Collective::all_gather, kv_bytes * mm_bytes, G);
      block_cp_fwd = gather;
      block_cp_bwd = gather + cp_link.time(Collective::reduce_scatter, kv_bytes * f32, G);
    } else {
      const attention::CpBackward kind =
          plan.cp_scheme == "ring" ? attention::CpBackward::ring
                                   : attention::choose_cp_backward(NHl, NKVl, HDi, dt);
      const double fwd_bytes = double(attention::cp_forward_bytes(Bi, Ti, G, NKVl, HDi, dt));
      const double bwd_bytes =
          double(attention::cp_backward_bytes(kind, Bi, Ti, G, NHl, NKVl, HDi, dt));
      const double fwd_comm = steps * cp_link.time(Collective::send, fwd_bytes / steps, 2);
      const double bwd_comm = steps * cp_link.time(Collective::send, bwd_bytes / steps, 2);
      block_cp_fwd = std::max(0.0, fwd_comm - block_attn_fwd * steps / G);
      block_cp_bwd = std::max(0.0, bwd_comm - block_attn_bwd * steps / G);
    }
  }
  // Expert-parallel exchange of one sparse block (model/moe.cpp, docs/moe.md), blocking: the
  // per-expert counts (E int64), the routed rows out (the matmul copy) and the expert outputs
  // back (f32) forward; d(out) out and d(x) back (f32) backward. Each rank's buffer holds its
  // N k rows of every row of the micro-batch (under tp every tp rank exchanges all N rows over
  // its own ep group); with uniform routing (ep-1)/ep of it leaves the rank, which is
  // all_to_all's (p-1)/p. The ep group is ep consecutive dp ranks.
  double sparse_ep_fwd = 0, sparse_ep_bwd = 0;
  if (moe && plan.ep > 1) {
    const LinkLevel& ep_link = level(cl, int64_t(plan.tp) * G, plan.ep);
    const double rows_bytes = Nk * C;
    sparse_ep_fwd = ep_link.time(Collective::all_to_all, double(cfg.moe.experts) * 8, plan.ep) +
                    ep_link.time(Collective::all_to_all, rows_bytes * mm_bytes, plan.ep) +
                    ep_link.time(Collective::all_to_all, rows_bytes * f32, plan.ep);
    sparse_ep_bwd = 2 * ep_link.time(Collective::all_to_all, rows_bytes * f32, plan.ep);
  }
  // Head: tied vocab-parallel logits (N, V/t) forward, two products backward; cross-entropy
  // reads and writes the logits about three times; two (N) all-reduces (max, sum of exp).
  const double head_fwd = r.weight_fwd(N, V / t, C), head_bwd = r.weight_bwd(N, V / t, C);
  const double head_vec = r.k ? r.elems(r.k->cross_entropy, N * (V / t)) +
                                    r.elems(r.k->layernorm_fwd + r.k->layernorm_bwd, Nl * C)
                              : 3 * N * (V / t) * f32 / r.bytes;
  const double head_tp = plan.tp > 1 ? 2 * tp_link.time(Collective::all_reduce, N * f32, plan.tp) : 0;
  // Pipeline messages: (Nl, C) f32 per chunk boundary and direction.
  const LinkLevel& pp_link = level(cl, int64_t(plan.tp) * G * plan.dp, plan.pp);
  const double pp_msg = plan.pp > 1 ? pp_link.time(Collective::send, Nl * C * f32, 2) : 0;
  // Kernel-call overhead (cost_model.h's counts), stretched when ranks outnumber cores.
  const double stretch = cl.host_cores > 0 ? std::max(1.0, 1.0 / cl.rank_share(host_ranks)) : 1.0;
  const double call = cl.op_overhead_s * stretch;
  const double block_calls_fwd = 10, head_calls_fwd = 5;

  const int n_virtual = plan.pp * plan.virtual_stages;
  std::vector<int64_t> layers_of_virtual(static_cast<size_t>(n_virtual));
  for (int g = 0; g < n_virtual; ++g)
    layers_of_virtual[size_t(g)] = plan.stage_layers.empty() ? cfg.n_layers / n_virtual
                                                             : plan.stage_layers[size_t(g)];
  const MemoryOracle::Params& held = oracle.params(plan);
  const std::vector<int64_t>& params = held.total;
  // On a CPU host (cluster [host]) the ranks' own cores move the bytes of a collective, inside
  // their MPI calls (Open MPI's shared-memory transport, no progress thread), and ranks fill
  // the cores: the dp / ZeRO reductions that start during the backward cannot hide under it.
  // Measured here (docs/planner.md, session 11): two 1-thread ranks training apart take 112 ms a
  // step, as dp 2 127 ms, the 8.9 ms all-reduce of their gradients included.
  const bool cpu_host = cl.host_cores > 0;
  // Gradients reduce (and ZeRO shards) over the dp x cp ranks, which hold the same weights.
  const int dpc = plan.dp_cp();
  const LinkLevel& dp_link = level(cl, plan.tp, dpc);

  std::vector<StageWork> work(size_t(plan.pp));
  std::vector<double> stage_time(size_t(plan.pp));
  int64_t first_layer = 0;
  std::vector<int64_t> first_of_virtual(static_cast<size_t>(n_virtual));
  for (int g = 0; g < n_virtual; ++g) {
    first_of_virtual[size_t(g)] = first_layer;
    first_layer += layers_of_virtual[size_t(g)];
  }
  for (int g = 0; g < n_virtual; ++g) {
    StageWork& w = work[size_t(g % plan.pp)];
    for (int64_t l = first_of_virtual[size_t(g)]; l < first_of_virtual[size_t(g)] + layers_of_virtual[size_t(g)]; ++l) {
      const bool sparse = moe && cfg.moe.is_sparse(l);
      const BlockCost& bc = sparse ? sparse_block : dense_block;
      const double ep_fwd = sparse ? sparse_ep_fwd : 0, ep_bwd = sparse ? sparse_ep_bwd : 0;
      w.fwd += bc.fwd;
      w.bwd += bc.bwd;
      w.vector += bc.vec_fwd + bc.vec_bwd;
      w.tp += block_tp_fwd + block_tp_bwd;
      w.cp += block_cp_fwd + block_cp_bwd;
      w.ep += ep_fwd + ep_bwd;
      w.overhead += 3 * block_calls_fwd * call;
      switch (plan.recompute_of(l)) {
        case Recompute::full:  // the forward again, its exchanges included
          w.recompute += bc.fwd + bc.vec_fwd + block_tp_fwd + block_cp_fwd + block_calls_fwd * call;
          w.ep += ep_fwd;
          break;
        case Recompute::selective: w.recompute += bc.selective_vec; break;
        case Recompute::none: break;
      }
    }
    if (g == n_virtual - 1) {  // final norm, query layer (a block's products), tied head
      const int64_t ql = cfg.query_layer ? 1 : 0;
      w.fwd += head_fwd + double(ql) * block_fwd;
      w.bwd += head_bwd + double(ql) * block_bwd;
      w.vector += head_vec + double(ql) * (block_vec_fwd + block_vec_bwd);
      w.tp += head_tp + double(ql) * (block_tp_fwd + block_tp_bwd);
      w.cp += double(ql) * (block_cp_fwd + block_cp_bwd);
      w.overhead += 3 * (head_calls_fwd + double(ql) * block_calls_fwd) * call;
    }
    if (g > 0) w.pp += pp_msg;               // receive the activation
    if (g < n_virtual - 1) w.pp += pp_msg;   // receive the gradient
  }
  for (int s = 0; s < plan.pp; ++s) {
    StageWork& w = work[size_t(s)];
    w.bwd_compute = w.bwd + w.recompute;
    const double unit_bytes = double(params[size_t(s)]) * f32;  // the rank's f32 gradients
    if (plan.zero >= 2 && dpc > 1) {
      // Each micro-batch reduce-scatters the rank's gradients while its backward runs. Under ep
      // the store shards over the ep_dp ranks holding the same experts, after a blocking
      // all-reduce of the dense gradients over ep (train/zero.h).
      const int shard = plan.ep > 1 ? dpc / plan.ep : dpc;
      const double rs = shard > 1 ? dp_link.time(Collective::reduce_scatter, unit_bytes, shard) : 0;
      w.zero += cpu_host ? rs : std::max(0.0, rs - w.bwd_compute);
      if (plan.ep > 1) {
        const double dense = double(params[size_t(s)] - held.expert[size_t(s)]) * f32;
        w.zero += level(cl, int64_t(plan.tp) * G, plan.ep)
                      .time(Collective::all_reduce, dense, plan.ep);
      }
      if (plan.zero == 3 && shard > 1)  // weights gathered just in time before each forward
        // and backward (a recomputed forward runs inside the backward, on the weights gathered
        // for it)
        w.zero += 2 * dp_link.time(Collective::all_gather, unit_bytes, shard);
    }
    stage_time[size_t(s)] = w.total();
  }
  const int crit = int(std::max_element(stage_time.begin(), stage_time.end()) - stage_time.begin());
  const double makespan =
      pipeline_makespan(stage_time, plan.micro_batches, plan.schedule, plan.virtual_stages);

  StepCost out;
  out.critical_stage = crit;
  TimeTerms& tt = out.terms;
  const double M = double(plan.micro_batches);
  const StageWork& cw = work[size_t(crit)];
  tt.forward = M * cw.fwd;
  tt.backward = M * cw.bwd;
  tt.recompute = M * cw.recompute;
  tt.vector = M * cw.vector;
  tt.overhead = M * cw.overhead;
  tt.tp = M * cw.tp;
  tt.cp = M * cw.cp;
  tt.ep = M * cw.ep;
  tt.pp = M * cw.pp;
  tt.zero = M * cw.zero;
  // Shared host with more ranks than cores (cluster.h [host]): a rank idling in the pipeline's
  // fill or drain hands its core to the busy ones (work-conserving scheduling), so the pipeline
  // takes the larger of two bounds: all stages' work at the shared rate spread over the ranks
  // that run at once (total work / host throughput), and the schedule's makespan at the faster
  // rate ranks get when only as many run as there are cores. `bubble` is then that minus the
  // critical stage's work, negative when the other stages' idle time is absorbed. Measured on the
  // 2-core development host (docs/planner.md, run 6): 4-rank pp 2 and pp 4 plans went from 0.54-0.61
  // of the full-price prediction to within 5%. Communication scales with compute here, an
  // approximation (small on one host).
  double pipeline = makespan;
  if (cl.host_cores > 0 && host_ranks > cl.host_cores && plan.pp > 1) {
    const double faster = cl.rank_share(host_ranks) / cl.rank_share(cl.host_cores);  // < 1
    double work = 0;  // all stages' work at the shared rate over the ranks running at once
    for (double st : stage_time) work += M * st;
    pipeline = std::max(work / double(plan.pp), makespan * faster);
  }
  tt.bubble = pipeline - M * stage_time[size_t(crit)];

  // After the pipeline drains: dp reduction, sync, optimizer (the slowest rank's).
  double dp_exposed = 0, dp_total = 0, opt = 0;
  // Under ep the expert tensors reduce (and ZeRO-1 shards them) over the ep_dp group, the
  // (dp/ep) x cp ranks holding the same experts (train/executor.cpp), the rest over dp x cp.
  const int ep_dp = dpc / plan.ep;
  for (int s = 0; s < plan.pp; ++s) {
    const double p = double(params[size_t(s)]);
    const double pe = plan.ep > 1 ? double(held.expert[size_t(s)]) : 0, pd = p - pe;
    auto both = [&](Collective k) {
      return dp_link.time(k, pd * f32, dpc) + (pe > 0 ? dp_link.time(k, pe * f32, ep_dp) : 0);
    };
    double exposed = 0, total = 0;
    if (dpc > 1) {
      if (plan.zero <= 1) {
        total = both(Collective::all_reduce);
        // Buckets start during the chunk's last micro-batch backward (train/executor.h), and
        // hide under it where something else moves the bytes (a NIC, a GPU's copy engines).
        exposed = cpu_host ? total
                           : std::max(0.0, total - work[size_t(s)].bwd_compute / plan.virtual_stages);
        if (plan.zero == 1) {  // updated shares all-gathered to every dp rank (train/executor.cpp)
          const double ag = both(Collective::all_gather);
          total += ag;
          exposed += ag;
        }
      } else if (plan.zero == 2) {
        // Updated pieces all-gathered over the store's group (ep_dp under ep).
        total = plan.ep > 1 ? (ep_dp > 1 ? dp_link.time(Collective::all_gather, p * f32, ep_dp) : 0)
                            : dp_link.time(Collective::all_gather, p * f32, dpc);
        exposed = total;
      }
    }
    dp_exposed = std::max(dp_exposed, exposed);
    dp_total = std::max(dp_total, total);
    // ZeRO-2/3 under ep: each rank's store holds its share (over ep_dp) of the dense tensors and
    // its experts.
    const double owned = plan.zero >= 2 && plan.ep > 1 ? p / ep_dp
                         : plan.zero >= 1               ? pd / dpc + pe / ep_dp
                                                        : p;
    // AdamW: read w g m v, write w m v (7 x 4 bytes), the matmul copy (bf16 or its f32
    // emulation), zero the gradient and read it for the norm (2 x 4 bytes).
    const double copy = bf ? mm_bytes : 0;
    // Measured: the optimizer pass per parameter, and in bf16 the matmul copy written (priced
    // as one more write per parameter, like zeroing).
    opt = std::max(opt, r.k ? r.elems(r.k->optimizer + (bf ? r.k->zero : 0), owned)
                            : owned * (7 * f32 + copy + 2 * f32) / r.bytes);
  }
  tt.dp = dp_exposed;
  tt.dp_total = dp_total;
  tt.optimizer = opt;
  if (plan.pp > 1)
    tt.sync += pp_link.time(Collective::all_reduce, V / t * C * f32, 2);
  tt.sync += level(cl, 1, world).time(Collective::all_reduce, 8, std::max(1, plan.tp * plan.pp));

  out.step_time = tt.total();
  const double tokens = double(plan.global_batch()) * T;
  out.model_flops = tokens * cfg.train_flops_per_token(in.T);
  out.tokens_per_s = out.step_time > 0 ? tokens / out.step_time : 0;
  return out;
}

std::vector<int> peak_ranks(const ParallelPlan& plan, int64_t n_layers) {
  // Candidate stages for the peak (cost_model.h): the first, the last, and any holding more
  // blocks than every stage before it; their (tp 0, cp 0, dp 0) rank.
  const int n_virtual = plan.pp * plan.virtual_stages;
  const int64_t L = n_layers;
  std::vector<int64_t> layers(size_t(plan.pp), 0);
  for (int g = 0; g < n_virtual; ++g)
    layers[size_t(g % plan.pp)] +=
        plan.stage_layers.empty() ? L / n_virtual : plan.stage_layers[size_t(g)];
  std::vector<int> ranks = {0};
  int64_t most = layers[0];
  for (int s = 1; s < plan.pp; ++s)
    if (s == plan.pp - 1 || layers[size_t(s)] > most) {
      ranks.push_back(s * plan.tp * plan.cp * plan.dp);
      most = std::max(most, layers[size_t(s)]);
    }
  return ranks;
}

void add_memory(StepCost& cost, const ParallelPlan& plan, MemoryOracle& oracle) {
  // Candidate stages for the peak (cost_model.h): the first, the last, and any holding more
  // blocks than every stage before it.
  const int n_virtual = plan.pp * plan.virtual_stages;
  const int64_t L = oracle.config().n_layers;
  std::vector<int64_t> layers(size_t(plan.pp), 0);
  for (int g = 0; g < n_virtual; ++g)
    layers[size_t(g % plan.pp)] +=
        plan.stage_layers.empty() ? L / n_virtual : plan.stage_layers[size_t(g)];
  std::vector<int> stages = {0};
  int64_t most = layers[0];
  for (int s = 1; s < plan.pp; ++s)
    if (s == plan.pp - 1 || layers[size_t(s)] > most) {
      stages.push_back(s);
      most = std::max(most, layers[size_t(s)]);
    }
  cost.peak_bytes = -1;
  for (int s : stages) {
    const int rank = s * plan.tp * plan.cp * plan.dp;  // (tp 0, cp 0, dp 0) of stage s
    const model::RankMemory& m = oracle.rank_memory(plan, rank);
    if (m.total() > cost.peak_bytes) {
      cost.peak = m;
      cost.peak_bytes = m.total();
    }
  }
  cost.persistent_bytes = cost.peak.weights() + cost.peak.grads() + cost.peak.optimizer();
  cost.transient_bytes = cost.peak.activations() + cost.peak.workspace() + cost.peak.comm();
}

StepCost estimate_step(const CostInputs& in, const ParallelPlan& plan, MemoryOracle& oracle) {
  StepCost c = estimate_time(in, plan, oracle);
  add_memory(c, plan, oracle);
  return c;
}

nlohmann::json StepCost::to_json() const {
  nlohmann::json terms_j = nlohmann::json::object();
  for (auto [name, v] : terms.named()) terms_j[name] = v;
  nlohmann::json mem = nlohmann::json::object();
  for (size_t c = 0; c < kNumMemCategories; ++c)
    mem[std::string(mem_category_name(MemCategory(c)))] = peak.bytes[c];
  return {{"step_time_s", step_time},
          {"terms", terms_j},
          {"dp_reduction_total_s", terms.dp_total},
          {"critical_stage", critical_stage},
          {"tokens_per_s", tokens_per_s},
          {"model_flops", model_flops},
          {"peak_bytes", peak_bytes},
          {"peak_rank", peak.rank},
          {"persistent_bytes", persistent_bytes},
          {"transient_bytes", transient_bytes},
          {"peak_by_category", mem}};
}

// ---------------------------------------------------------------------------------------------
// Plan strings.

std::string plan_string(const ParallelPlan& p) {
  std::string s = fmt::format("dp={},tp={},pp={},", p.dp, p.tp, p.pp);
  if (p.cp > 1) s += fmt::format("cp={},cp_scheme={},cp_layout={},", p.cp, p.cp_scheme, p.cp_layout);
  if (p.ep > 1) s += fmt::format("ep={},", p.ep);
  s += fmt::format("zero={},micro_batches={},schedule={}", p.zero, p.micro_batches,
                   parallel::schedule_name(p.schedule));
  if (p.virtual_stages > 1) s += fmt::format(",virtual_stages={}", p.virtual_stages);
  const std::string rc = parallel::recompute_spec(p.recompute);
  s += ",recompute=" + (rc.empty() ? std::string("none") : rc);
  if (!p.stage_layers.empty()) {
    s += ",stage_layers=";
    for (size_t i = 0; i < p.stage_layers.size(); ++i)
      s += fmt::format("{}{}", i ? "," : "", p.stage_layers[i]);
  }
  return s;
}

parallel::PlanSettings parse_plan_string(const std::string& text) {
  // key=value items separated by commas; an item without '=' continues the previous value
  // (recompute lists and stage_layers contain commas themselves).
  std::vector<std::pair<std::string, std::string>> items;
  size_t pos = 0;
  while (pos <= text.size()) {
    size_t end = text.find(',', pos);
    if (end == std::string::npos) end = text.size();
    std::string item = text.substr(pos, end - pos);
    pos = end + 1;
    if (item.empty()) continue;
    const size_t eq = item.find('=');
    if (eq == std::string::npos) {
      LOOM_CHECK(!items.empty(), "plan '{}': item '{}' is not key=value", text, item);
      items.back().second += "," + item;
    } else {
      items.emplace_back(item.substr(0, eq), item.substr(eq + 1));
    }
  }
  parallel::PlanSettings s;
  auto as_int = [&](const std::string& k, const std::string& v) {
    const std::vector<int64_t> x = parallel::parse_int_list(v, k);
    LOOM_CHECK(x.size() == 1, "plan '{}': {} = '{}' must be one integer", text, k, v);
    return x[0];
  };
  for (const auto& [k, v] : items) {
    if (k == "dp") s.dp = int(as_int(k, v));
    else if (k == "tp") s.tp = int(as_int(k, v));
    else if (k == "pp") s.pp = int(as_int(k, v));
    else if (k == "cp") s.cp = int(as_int(k, v));
    else if (k == "ep") s.ep = int(as_int(k, v));
    else if (k == "zero") s.zero = int(as_int(k, v));
    else if (k == "micro_batches") s.micro_batches = as_int(k, v);
    else if (k == "virtual_stages") s.virtual_stages = int(as_int(k, v));
    else if (k == "schedule") s.schedule = v;
    else if (k == "cp_scheme") s.cp_scheme = v;
    else if (k == "cp_layout") s.cp_layout = v;
    else if (k == "recompute") s.recompute = v;
    else if (k == "stage_layers") s.stage_layers = v;
    else
      LOOM_FAIL("plan '{}': unknown key '{}'; keys: dp, tp, pp, cp, cp_scheme, cp_layout, ep, "
                "zero, micro_batches, virtual_stages, schedule, recompute, stage_layers",
                text, k);
  }
  return s;
}

}  // namespace loom::planner
