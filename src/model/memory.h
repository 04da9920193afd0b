// model/memory.h: the bytes one training rank allocates, by MemoryPool category, as a function of
// (ModelConfig, ParallelPlan, rank, sequence length, precision). This is what `loom info` prints
// and what the planner prices; tests/dist/train/test_memory_model.cpp checks it against the
// pool's measured peaks on every rank of many plans.
//
// Glossary: dp tp pp cp the plan's axes (ranks ordered tp fastest, then cp, dp, pp:
// "tp-cp-dp-pp"; cp = G splits every sequence, so a rank's rows are B*T/G and the ZeRO group is
// dp x cp: activations and workspace per rank fall as 1/G at fixed T),
// VS virtual stages (chunks) per pp rank, M micro-batches per step, B micro-batch size, T
// sequence, N = B*T rows of a micro-batch, Nl = N/tp rows of the residual stream on a rank, C
// d_model, V vocab, D = dp, unit a ZeRO / bucket unit of a chunk (model/geometry.h).
//
// How it is computed (memory.cpp): nothing is allocated. The function builds the rank's chunks'
// StageGeometry (model::split_stages), sizes their persistent buffers with the engine's own
// arithmetic (model::zero1_share, model::zero_piece), then replays one training step: the rank's
// action list from parallel::make_schedule, and for each action the sequence of buffers the
// engine allocates and frees (train::Executor's messages, GptStage::forward/backward,
// block_forward/block_backward, the tied head, ZeRO-2/3's gathered units and gradient
// reduce-scatters), each with its byte size and category, in program order, with the same
// lifetimes (reference-counted, as Tensors are). Each category's peak is the maximum of its
// running sum. A second step repeats the first (everything transient is freed at its end), so
// this is the peak of any number of steps, construction included.
//
// What it depends on besides its arguments: whether bf16 is emulated (bf16 copies are then f32,
// see model/stage.h): by default model::bf16_emulated(), as the engine on this machine runs;
// MemoryOptions overrides it. What it leaves out:
// buffers outside the executor's pool (the communication library's own staging, the local
// flash-attention kernel's per-thread tiles, the data loader) and evaluation
// (GptStage::forward_eval). The cp attention kernels' workspace (travelling K/V or Q|dO|D|LSE
// blocks, their receive buffers, f32 partial gradients) is in the pool and priced: with
// plan.ranks_per_node = 0 the cp group is taken to sit on one node (a flat ring).
#pragma once

#include <array>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <tuple>
#include <vector>

#include "core/memory_pool.h"
#include "core/param_spec.h"
#include "model/config.h"
#include "model/stage.h"
#include "parallel/plan.h"

namespace loom::model {

struct RankMemory {
  int rank = 0;
  int dp = 0, tp = 0, pp = 0, cp = 0;  // coordinates of the rank
  // Peak bytes per category (MemCategory order: weights, grads, optimizer, activations,
  // workspace, comm). weights/grads/optimizer are the persistent buffers, plus under ZeRO-3 the
  // units gathered just in time (weights) and under ZeRO-2/3 the unit gradients being filled or
  // reduce-scattered (grads).
  std::array<int64_t, kNumMemCategories> bytes{};
  // Outside the pool: ECSS's host expert stores (optim/expert_store.h: f32 master, m and v of
  // every expert piece this rank's optimizer owns, 12 B per element; host memory or the
  // ecss_store file). Not in total().
  int64_t host_store = 0;

  int64_t operator[](MemCategory c) const { return bytes[size_t(c)]; }
  int64_t weights() const { return (*this)[MemCategory::weights]; }
  int64_t grads() const { return (*this)[MemCategory::grads]; }
  int64_t optimizer() const { return (*this)[MemCategory::optimizer]; }
  int64_t activations() const { return (*this)[MemCategory::activations]; }
  int64_t workspace() const { return (*this)[MemCategory::workspace]; }
  int64_t comm() const { return (*this)[MemCategory::comm]; }
  // Sum of the category peaks: an upper bound of the pool's total peak (the categories need not
  // peak at the same moment).
  int64_t total() const;
  // Same bytes in every category (coordinates aside): `loom info` groups such ranks.
  bool same_bytes(const RankMemory& o) const { return bytes == o.bytes && host_store == o.host_store; }
};

struct MemoryOptions {
  // bf16 copies stored as f32 (emulated bf16, see model/stage.h) or as bf16. Unset: as the
  // engine runs on this machine (model::bf16_emulated()); set it to price another machine.
  std::optional<bool> bf16_emulated;
  // bf16 blocks' attention on the native bf16 kernel (model/block.h, native_attention_available), whose packed
  // operands take pool workspace. Unset: as the engine runs on this machine.
  std::optional<bool> native_attention;
  // A lower bound instead of the peak, from less work: -1 (default) the exact peaks; k > 0 the
  // forward and backward work is replayed only through the rank's k-th backward action, then
  // what it holds is dropped and only the pipeline messages and the step's end are replayed
  // (the whole step when the rank has fewer); 0 none of the step: the persistent buffers alone.
  // Every allocation of a bound is one the whole step makes, in the same order, freed no later,
  // so at every point each category's running sum, and hence its peak, is at most the whole
  // step's. The planner prunes with it (planner/search.h) before paying for a whole replay.
  int bound_backwards = -1;
};

// Peak bytes per category of world rank `rank` (0 <= rank < plan.world_size()) training `cfg`
// with `plan` (as parallel::make_plan returns it: micro_batch_size, micro_batches, stage_layers,
// recompute, ...) at sequence length T in `precision`. Throws loom::Error for a rank outside the
// world, T outside [1, max_seq], or a plan the model does not admit (the engine's messages).
RankMemory memory_per_rank(const ModelConfig& cfg, const parallel::ParallelPlan& plan, int rank,
                           int64_t T, Precision precision, const MemoryOptions& options = {});

class StageGeometry;
class ParamLayout;
struct StageSpan;

// memory_per_rank for many plans of one model: repeated calls share the whole model's layout
// per tp shard and the stages' geometry (at most `max_geometries` of them, 0: no bound), which
// the planner needs to price thousands of plans. Not thread-safe; `cfg` must outlive it.
// memory_per_rank is one call of a fresh one.
class MemoryReplayer {
 public:
  explicit MemoryReplayer(const ModelConfig& cfg, size_t max_geometries = 4096);
  ~MemoryReplayer();
  MemoryReplayer(const MemoryReplayer&) = delete;
  MemoryReplayer& operator=(const MemoryReplayer&) = delete;
  RankMemory rank_memory(const parallel::ParallelPlan& plan, int rank, int64_t T,
                         Precision precision, const MemoryOptions& options = {});
  // StageGeometry(cfg, span, tp, ep), cached. The reference lives until the next call.
  const StageGeometry& geometry(const StageSpan& span, TpShard tp, EpShard ep = {});

 private:
  using GeometryKey = std::tuple<int64_t, int64_t, bool, bool, int, int, int, int>;
  const ModelConfig& cfg_;
  size_t max_geometries_;
  std::map<std::pair<int, int>, std::shared_ptr<const ParamLayout>> layouts_;  // by tp shard
  std::map<GeometryKey, std::unique_ptr<StageGeometry>> geometries_;
};

// Every rank's, in rank order.
std::vector<RankMemory> memory_all_ranks(const ModelConfig& cfg, const parallel::ParallelPlan& plan,
                                         int64_t T, Precision precision,
                                         const MemoryOptions& options = {});

}  // namespace loom::model
