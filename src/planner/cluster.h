// planner/cluster.h: a cluster as the cost model sees it, read from configs/clusters/*.toml.
//
// Units (TOML key suffixes say them): seconds for time (latency_us in the file is microseconds),
// bytes/s for bandwidth (bandwidth_GBps in the file is 1e9 bytes/s), FLOP/s for compute
// (peak_tflops_* in the file is 1e12 FLOP/s), bytes for memory (memory_GiB in the file is 2^30).
//
// File layout (every key required unless marked optional; unknown keys are errors naming the key):
//   name = "..."                         free text
//   nodes = 256                          nodes in the cluster
//   devices_per_node = 8                 ranks (devices) per node
//   [device]
//   peak_tflops_f32, peak_tflops_bf16    dense matmul peak per device, 1e12 FLOP/s
//   memory_GiB                           memory per device
//   memory_bandwidth_GBps                device memory bandwidth (vector ops, optimizer)
//   matmul_efficiency_f32 / _bf16        [[gflop, efficiency], ...]: fraction of peak reached by a
//                                        product of 2*M*N*K = gflop*1e9 FLOPs; interpolated linearly
//                                        in log(gflop), clamped at both ends
//   bf16_emulated = false                (optional) bf16 copies stored as f32 (CPUs without AMX)
//   op_overhead_us = 0                   (optional) fixed time of one kernel call (dispatch, thread
//                                        fork/join; a GPU's launch latency), microseconds
//   matmul_memory_efficiency             (optional) [[MB, efficiency], ...]: when present, a
//                                        product's operand traffic ((M*K + K*N + M*N) elements)
//                                        at memory_bandwidth x this efficiency (by the MB it moves,
//                                        interpolated like the matmul table) adds to its compute
//                                        time instead of hiding under it (Calculon's "no_overlap"
//                                        processing mode); absent: hidden (measured tables, as
//                                        loom calibrate writes, include it)
//   [host]                               (optional) ranks of a node share its cores (CPU hosts):
//   cores = 2                            the device figures above are then the whole host's, and
//   cpu_model = "...", calibrated = "..." a rank running alone gets max(1, cores/ranks) cores' share
//   concurrency = [[1, 2.0], [4, 0.4]]  (optional) per-rank compute rate when that many ranks
//                                        compute at once, in units of one core alone (measured by
//                                        calibrate: other processes' load and oversubscription);
//                                        without it a rank gets cores/ranks cores
//   memory_concurrency = [[1, 1.5], ...] (optional) the same for a memory-bound pass, in units of
//                                        one thread's stream alone: prices [kernels]' elementwise
//                                        and optimizer work (a host's ranks share its memory
//                                        bandwidth and caches); without it, as concurrency
//   step_concurrency = [[1, 1.7], ...]   (optional) the same for loom's own training step on a
//                                        small model (2+ ranks meeting once a step, as a job's
//                                        ranks do), in units of one thread's steps alone: where
//                                        present it prices everything (products, kernels,
//                                        memory) at every rank count, since it sees what ranks
//                                        sharing a host lose that neither probe above does
//                                        (caches, time slices) and, for fewer ranks than cores,
//                                        what a step loses on several threads (cold operands
//                                        sharing memory, short kernels' barriers)
//   step_unit = 0.88                     (optional, default 1) the step probe's price by this
//                                        file's figures (one rank, one core) over its measured
//                                        time on one thread alone: converts step_concurrency's
//                                        unit (one thread's steps alone) into cores of the cost
//                                        model's price; below 1 where the model prices loom's
//                                        own step low (what the per-op tables miss: caches
//                                        between ops, allocation, the step's glue)
//   [kernels]                            (optional; loom calibrate writes it on CPU hosts) loom's
//                                        own kernels as measured on one core of the host, priced
//                                        by these instead of peak x matmul table / bandwidth:
//   matmul_layout_f32 / _bf16 = [nt, tn] rate of a product with B transposed (x @ W^T: every
//                                        forward) and of one with A transposed accumulating
//                                        (dY^T @ X: every weight gradient) over the plain product
//                                        (dY @ W: every input gradient), which the matmul table
//                                        measures; at the engine's row-heavy shapes
//   attention_fwd / attention_bwd        [[gflop, efficiency], ...] of the flash-attention kernel:
//                                        FLOPs of one product of one (batch, head) (the causal half
//                                        of 2*T*T*HD; two products forward, 2.5x that backward
//                                        incl. its preprocess) over one core's f32 peak
//                                        (peak_tflops_f32 / cores)
//   attention_fwd_bf16 / _bwd_bf16       (optional) the same for bf16 training's attention on
//                                        the native bf16 kernel (model/block.h: q, k, v and dout
//                                        rounded to bf16, then AMX tiles or AVX512-BF16) over one
//                                        core's bf16 peak (peak_tflops_bf16 / cores); absent where
//                                        the host has neither: bf16 plans then price attention by
//                                        the f32 tables
//                                        (a run with LOOM_NATIVE_ATTENTION=0 is not what they price)
//   [kernels.ns_per_element]             one core's nanoseconds per element: layernorm_fwd,
//                                        layernorm_bwd (per element of the normalised rows),
//                                        bias_add, add, bias_bwd, zero (per element written),
//                                        gelu_fwd / gelu_bwd, gelu_erf_fwd / _bwd, fast_gelu_fwd /
//                                        _bwd (the bias-fused forward and the backward of each
//                                        activation, per element), cross_entropy (per logit: the
//                                        fused head's softmax and gradient, its products
//                                        excluded), optimizer (per parameter: AdamW, the gradient
//                                        norm and zeroing the gradient)
//   [links.intra], [links.inter]         within a node / across nodes:
//   latency_us, bandwidth_GBps           alpha (per message step) and beta (per rank, one direction)
//   efficiency                           fraction of bandwidth_GBps a collective reaches
//   all_reduce, all_gather, reduce_scatter, send  algorithm factors [latency, bandwidth]:
//     time(collective of n bytes over p ranks) = a*(p-1)*alpha + b*(p-1)/p * n/(beta*efficiency)
//     with n the full (gathered / reduced) buffer; a ring has all_reduce = [2, 2], all_gather =
//     reduce_scatter = [1, 1]. send: time = a*alpha + b*n/(beta*efficiency).
//   all_to_all                           (optional, default [1, 1]) pairwise exchange: n is one
//                                        rank's buffer, of which it sends (p-1)/p; same formula
//                                        (cp's Ulysses scheme, ep's token dispatch)
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "model/stage.h"

namespace loom::planner {

enum class Collective : uint8_t { all_reduce, all_gather, reduce_scatter, send, all_to_all };
inline constexpr int kNumCollectives = 5;
const char* collective_name(Collective c);

struct LinkLevel {
  double latency_s = 0;       // alpha
  double bandwidth_Bps = 0;   // beta, per rank and direction
  double efficiency = 1;      // achieved fraction of beta
  // (latency factor, bandwidth factor) per Collective, in enum order.
  std::array<std::pair<double, double>, kNumCollectives> factors{
      {{2, 2}, {1, 1}, {1, 1}, {1, 1}, {1, 1}}};

  // Seconds for `c` moving `bytes` (the full buffer) over a group of `p` ranks on this level.
  double time(Collective c, double bytes, int p) const;
};

// Fraction of peak by matmul size (FLOPs of one product).
struct EfficiencyTable {
  std::vector<std::pair<double, double>> points;  // (gflop, efficiency), sorted by gflop
  double at(double flops) const { return at_units(flops / 1e9); }
  // The same lookup with the argument in the table's own unit (gflop, MB, ...).
  double at_units(double x) const;
};

// Measured costs of loom's own kernels on one core of a CPU host (the [kernels] table).
struct KernelCosts {
  bool measured = false;  // false: the cost model prices by peak, matmul table and bandwidth
  std::pair<double, double> layout_f32{1, 1}, layout_bf16{1, 1};  // (nt, tn) over nn
  EfficiencyTable attention_fwd, attention_bwd;  // fraction of one core's f32 peak
  // bf16 attention on the native bf16 kernel, fraction of one core's bf16 peak; empty: none here.
  EfficiencyTable attention_fwd_bf16, attention_bwd_bf16;
  // Seconds per element on one core.
  double layernorm_fwd = 0, layernorm_bwd = 0, bias_add = 0, add = 0, bias_bwd = 0, zero = 0,
         cross_entropy = 0, optimizer = 0;
  std::array<double, 3> act_fwd{}, act_bwd{};  // by model::Activation: gelu, fast_gelu, gelu_erf
  const std::pair<double, double>& layout(model::Precision p) const {
    return p == model::Precision::bf16 ? layout_bf16 : layout_f32;
  }
};

struct Cluster {
  std::string name, source;  // source: the file it came from
  int nodes = 1, devices_per_node = 1;
  double peak_flops_f32 = 0, peak_flops_bf16 = 0;  // FLOP/s per device (per host if host_cores)
  EfficiencyTable eff_f32, eff_bf16;
  int64_t memory_bytes = 0;       // per device (per host if host_cores)
  double memory_bandwidth_Bps = 0;
  bool bf16_emulated = false;
  double op_overhead_s = 0;       // per kernel call
  EfficiencyTable matmul_memory_eff;  // empty: products' operand traffic hidden under compute
  int host_cores = 0;             // 0: devices do not share; >0: ranks share this many cores
  std::vector<std::pair<int, double>> concurrency;  // (ranks, cores' worth per rank), by ranks
  // (ranks, one thread's memory stream alone per rank), by ranks; empty: as concurrency
  std::vector<std::pair<int, double>> memory_concurrency;
  // (ranks, one thread's training steps alone per rank), by ranks: when present, what a rank
  // gets for everything (rank_share and memory_share both read it)
  std::vector<std::pair<int, double>> step_concurrency;
  double step_unit = 1;  // step_concurrency's unit in priced cores (see the file layout above)
  // Cores' worth of compute one of `ranks` ranks gets on a shared host: the measured table
  // (step_concurrency where use_step_table, else concurrency; nearest entry at or below, the
  // last one beyond it scaled by last/ranks; capped at cores/ranks in the table's unit, then,
  // for the step table, times step_unit), else cores/ranks.
  double rank_share(int ranks) const;
  // One thread's memory streams' worth one of `ranks` ranks gets (memory_concurrency, looked up
  // like rank_share; not capped at cores/ranks: memory is shared differently), else rank_share.
  double memory_share(int ranks) const;
  // The step table prices ranks that fill the cores; fewer ranks only in files that carry a
  // step_unit (calibrated since session 17: before, the one-rank entry was measured with
  // oneDNN primitives stuck at one thread, kernels/cpu/matmul.cpp, and read 1.06-1.42).
  bool use_step_table(int ranks) const {
    return !step_concurrency.empty() && host_cores > 0 && (ranks >= host_cores || step_unit_read);
  }
  bool step_unit_read = false;  // the file had [host] step_unit
  std::string cpu_model, calibrated;
  KernelCosts kernels;
  LinkLevel intra, inter;

  int total_devices() const { return nodes * devices_per_node; }
  double peak_flops(model::Precision p) const {
    return p == model::Precision::bf16 ? peak_flops_bf16 : peak_flops_f32;
  }
  const EfficiencyTable& efficiency(model::Precision p) const {
    return p == model::Precision::bf16 ? eff_bf16 : eff_f32;
  }
  std::string to_toml() const;  // the file form (what calibrate writes; every table round-trips)
};

// Parses a cluster file. Errors name the file, the key and the expected unit.
Cluster cluster_from_toml(const std::string& text, const std::string& source);
Cluster load_cluster(const std::string& path);

// This CPU, as calibration records it and plan/train compare it: /proc/cpuinfo's model name
// plus family/model numbers, the AVX2/AVX-512/BF16/FP16/AMX extensions present and the L3 size
// (a generic model name can hide different CPUs), e.g. "Intel(R) Xeon(R) Processor [family 6
// model 143; avx2 avx512f avx512_bf16 avx512_fp16 amx_bf16; L3 491520K]"; "unknown" without
// /proc/cpuinfo.
std::string this_cpu_model();

}  // namespace loom::planner
