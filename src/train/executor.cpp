// train/executor.cpp: the training executor (see executor.h for the contract).
//
// Glossary: pp pipeline ranks, VS chunks per rank, M micro-batches, B, T, N = B*T, C d_model,
// V vocab, g virtual stage (layer group) = chunk * pp + rank.
#include "train/executor.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <map>
#include <utility>

#include <fmt/format.h>

#include "core/error.h"
#include "kernels/cpu/adamw.h"
#include "kernels/cpu/grad_norm.h"
#include "model/moe.h"

namespace loom::train {

using parallel::Action;
using parallel::ActionKind;

namespace {

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// MPI guarantees tags up to 32767 on every implementation.
constexpr int kMaxTag = 32767;
enum class Stream : int { activation = 0, grad = 1 };

// Tag of the message that virtual stage `sender` sends for micro-batch `mb`: unique per
// (mb, sender, kind), so mismatched pairings cannot silently match.
int p2p_tag(Stream s, int mb, int sender, int n_virtual) {
  return (mb * n_virtual + sender) * 2 + int(s);
}

using Key = std::pair<int, int>;  // (micro-batch, chunk)

Tensor take(std::map<Key, Tensor>& m, Key k, const char* what) {
  auto it = m.find(k);
  LOOM_ASSERT(it != m.end(), "pipeline: no {} for micro-batch {} chunk {} (schedule bug)", what,
              k.first, k.second);
  Tensor t = std::move(it->second);
  m.erase(it);
  return t;
}

// f(local offset, count, packed offset, param) for each tensor's part inside the optimizer's
// ranges of a chunk's buffer (m and v hold those ranges packed).
template <class F>
void for_each_owned(const model::GptStage& stage, const std::vector<optim::Range>& ranges, F&& f) {
  int64_t packed = 0;
  for (const optim::Range& r : ranges) {
    for (const model::StageParam& p : stage.params()) {
      const int64_t b = std::max(r.begin, p.local_offset);
      const int64_t e = std::min(r.end, p.local_offset + p.global.numel);
      if (b < e) f(b, e - b, packed + (b - r.begin), p);
    }
    packed += r.end - r.begin;
  }
}

// Position of local element x in the packed arrays of `ranges` (-1: not there).
int64_t packed_index(const std::vector<optim::Range>& ranges, int64_t x) {
  int64_t packed = 0;
  for (const optim::Range& r : ranges) {
    if (x >= r.begin && x < r.end) return packed + (x - r.begin);
    packed += r.end - r.begin;
  }
  return -1;
}

// f(local offset, count, m, v, param) for every piece of a chunk's optimizer state: AdamW's
// ranges (in the pool), then the ECSS store's expert pieces (if any).
template <class F>
void for_each_moment(const model::GptStage& stage, const optim::AdamW& o,
                     const optim::ExpertStore* z, F&& f) {
  for_each_owned(stage, o.ranges(),
                 [&](int64_t x, int64_t len, int64_t packed, const model::StageParam& p) {
                   f(x, len, o.m() + packed, o.v() + packed, p);
                 });
  if (z)
    for_each_owned(stage, z->ranges(),
                   [&](int64_t x, int64_t len, int64_t packed, const model::StageParam& p) {
                     f(x, len, z->m() + packed, z->v() + packed, p);
                   });
}

// ZeRO-1: dp rank r's equal share of an n-element chunk buffer split over D ranks.
optim::Range zero1_share(int64_t n, int D, int r) {
  const model::UnitRange s = model::zero1_share(n, D, r);
  return {s.begin, s.end};
}

}  // namespace

Executor::Executor(const model::ModelConfig& cfg, const ExecutorConfig& ec, MemoryPool& pool,
                   const comm::ProcessGroup* dp, const comm::ProcessGroup* tp,
                   const comm::ProcessGroup* pp, const comm::ProcessGroup* cp)
    : cfg_(cfg), ec_(ec), pool_(pool) {
  if (dp && dp->valid() && dp->size() > 1) dp_ = *dp;
  if (tp && tp->valid() && tp->size() > 1) tp_ = *tp;
  if (pp && pp->valid() && pp->size() > 1) pp_ = *pp;
  if (cp && cp->valid() && cp->size() > 1) cp_ = *cp;
  const parallel::ParallelPlan& plan = ec_.plan;
  LOOM_CHECK(plan.dp * plan.cp == dp_size() && plan.tp == tp_size() && plan.pp == pp_size() &&
                 plan.cp == cp_size(),
             "the plan is dp {} x tp {} x pp {} x cp {} but the groups given are (dp x cp) {} x "
             "tp {} x pp {} x cp {}; under cp pass the dp x cp group (ProcessGroups::dp_cp) as dp",
             plan.dp, plan.tp, plan.pp, plan.cp, dp_size(), tp_size(), pp_size(), cp_size());
  cfg.check_context_parallel(plan.cp);
  if (cp_.valid()) {
    cp_ctx_ = std::make_unique<attention::CpContext>();
    cp_ctx_->group = cp_;
    cp_ctx_->scheme = attention::cp_scheme_from_name(plan.cp_scheme);
    cp_ctx_->layout = attention::cp_layout_from_name(plan.cp_layout);
    cp_ctx_->ranks_per_node = parallel::cp_ranks_per_node(plan);  // K world ranks -> L of cp
    cp_ctx_->overlap = plan.cp_overlap;
    cp_ctx_->stats = &cp_stats_;
    cp_ctx_->pool = &pool_;  // the kernels' workspace counts in the pool (and the memory model)
  }
  const int n_pp = pp_size(), rank = pp_rank();
  LOOM_CHECK(plan.micro_batches >= 1 && plan.micro_batches <= (1 << 20),
             "micro_batches = {} must be in [1, {}]", plan.micro_batches, 1 << 20);
  // Validate the schedule first: it names the valid micro-batch counts.
  schedule_ = parallel::make_schedule(plan.schedule, n_pp, int(plan.micro_batches),
                                      plan.virtual_stages);
  const int n_virtual = n_pp * plan.virtual_stages;
  LOOM_CHECK(2 * plan.micro_batches * n_virtual <= kMaxTag + 1,
             "{} micro-batches x {} virtual stages need more MPI tags than the guaranteed {}; "
             "use at most {} micro-batches",
             plan.micro_batches, n_virtual, kMaxTag, (kMaxTag + 1) / (2 * n_virtual));
  std::vector<model::StageSpan> spans = model::split_stages(cfg, n_virtual, plan.stage_layers);
  LOOM_CHECK(plan.zero >= 0 && plan.zero <= 3, "ZeRO stage {} does not exist; use 0, 1, 2 or 3",
             plan.zero);
  LOOM_CHECK(plan.recompute.empty() || int64_t(plan.recompute.size()) == cfg.n_layers,
             "the plan's recompute list has {} entries but the model has n_layers = {}",
             plan.recompute.size(), cfg.n_layers);
  if (plan.ep > 1) {
    // Expert parallel inside the gradient-reduction group (dp, under cp dp x cp; its rank is
    // cp + cp_size * dp since cp varies faster): ep groups are `ep` consecutive dp ranks at one
    // cp coordinate, and the ranks holding the same experts (the same ep rank) form the group
    // their gradients reduce over, dp/ep x cp of them (Megatron's expert-data-parallel group).
    LOOM_CHECK(plan.dp % plan.ep == 0 && cfg.moe.enabled() && cfg.moe.experts % plan.ep == 0,
               "ep = {} must divide dp = {} and the {} experts of each sparse block; choose ep "
               "among the common divisors",
               plan.ep, plan.dp, cfg.moe.enabled() ? cfg.moe.experts : 0);
    const int G = plan.cp, P = plan.ep, D = plan.dp;
    std::vector<std::vector<int>> ep_groups, same_experts(static_cast<size_t>(P));
    for (int c = 0; c < G; ++c)
      for (int b = 0; b < D / P; ++b) {
        std::vector<int> grp;
        for (int j = 0; j < P; ++j) grp.push_back(c + G * (b * P + j));
        ep_groups.push_back(grp);
      }
    for (int j = 0; j < P; ++j) {
      for (int b = 0; b < D / P; ++b)
        for (int c = 0; c < G; ++c) same_experts[size_t(j)].push_back(c + G * (b * P + j));
      std::sort(same_experts[size_t(j)].begin(), same_experts[size_t(j)].end());
    }
    ep_ = dp_.split(ep_groups, "ep");
    edp_ = dp_.split(same_experts, "ep_dp");
  }
  // ECSS: validated like make_plan does, for executors built from a hand-made plan.
  const optim::EcssMode ecss = optim::ecss_mode_from_name(plan.ecss);
  if (ecss != optim::EcssMode::off) {
    LOOM_CHECK(cfg.moe.enabled(),
               "ecss = {}: expert storage separation keeps the experts of sparse (MoE) blocks in a "
               "host store, and model '{}' has none; use ecss = off",
               plan.ecss, cfg.name);
    LOOM_CHECK(plan.zero <= 1,
               "ecss = {} with ZeRO stage {}: expert storage separation runs with parallel.zero = "
               "0 or 1 (under ZeRO 2/3 the experts live in the sharded ZeRO store); set zero to 0 "
               "or 1, or ecss = off",
               plan.ecss, plan.zero);
  }
  const comm::ProcessGroup* epp = ep_.valid() ? &ep_ : nullptr;
  const comm::ProcessGroup* tpp = tp_.valid() ? &tp_ : nullptr;
  const model::TpShard shard = tpp ? model::TpShard{tp_.rank(), tp_.size()} : model::TpShard{};
  for (int c = 0; c < plan.virtual_stages; ++c) {
    const model::StageSpan& span = spans[size_t(c * n_pp + rank)];
    if (plan.zero >= 2 && dp_.valid()) {
      // ZeRO-2/3: the chunk's parameters live in a ZeroStore over its own units.
      // Under ep the store shards over the ranks holding the same experts and sums the dense
      // gradients over ep first (train/zero.h).
      const EpShard ep_shard = epp ? EpShard{ep_.rank(), ep_.size()} : EpShard{};
      auto geometry = std::make_shared<const model::StageGeometry>(cfg, span, shard, ep_shard);
      stores_.push_back(std::make_unique<ZeroStore>(plan.zero, stage_zero_space(geometry),
                                                    ec.precision, pool, epp ? edp_ : dp_, tpp,
                                                    epp));
      chunks_.push_back(std::make_unique<model::GptStage>(cfg, span, pool, ec.precision, tpp,
                                                          stores_.back().get(), epp));
      optimizers_.push_back(std::make_unique<optim::AdamW>(
          geometry->local_specs(), geometry->total(), ec.optim, pool, stores_.back()->pieces()));
    } else {
      // ZeRO-1: this dp rank keeps m and v for, and updates, its equal share [lo, hi) of the
      // chunk's buffer; the shares are broadcast after the step.
      // Under ep the expert ranges are shared over the ranks holding the same experts instead
      // (model::zero1_ranges).
      const bool zero1 = plan.zero >= 1 && dp_.valid();
      // ECSS in bf16: the experts' weight matrices have no f32 copy in the pool (their masters
      // are the store's; under ZeRO-1 each rank's store holds its share, broadcast after the
      // update, see broadcast_expert_masters).
      const bool masters_out =
          ecss != optim::EcssMode::off && ec.precision == model::Precision::bf16;
      chunks_.push_back(std::make_unique<model::GptStage>(cfg, span, pool, ec.precision, tpp,
                                                          nullptr, epp, masters_out));
      const int64_t n = chunks_.back()->total();
      std::vector<optim::Range> owned{{0, n}};
      if (zero1) {
        owned.clear();
        for (const model::UnitRange& u :
             model::zero1_ranges(chunks_.back()->geometry(), dp_.size(), dp_.rank(),
                                 edp_.valid() ? edp_.size() : 1, edp_.valid() ? edp_.rank() : 0))
          owned.push_back({u.begin, u.end});
      }
      if (ecss == optim::EcssMode::off) {
        optimizers_.push_back(std::make_unique<optim::AdamW>(
            chunks_.back()->geometry().local_specs(), n, ec.optim, pool, owned));
      } else {
        // ECSS: the experts' masters and moments go to the host store; AdamW keeps the rest.
        const model::StageGeometry& geo = chunks_.back()->geometry();
        std::vector<model::UnitRange> own;
        for (const optim::Range& r : owned) own.push_back({r.begin, r.end});
        const model::EcssSplit split = model::ecss_split(geo, own);
        std::vector<optim::Range> dense;
        for (const model::UnitRange& u : split.dense) dense.push_back({u.begin, u.end});
        if (dense.empty()) dense.push_back({0, 0});
        optimizers_.push_back(
            std::make_unique<optim::AdamW>(geo.local_specs(), n, ec.optim, pool, dense));
        std::vector<int64_t> layers;
        for (size_t b = 0; b < geo.blocks().size(); ++b)
          if (geo.blocks()[b].sparse()) layers.push_back(span.first_layer + int64_t(b));
        if (layers.empty()) {
          ecss_.push_back(nullptr);
        } else {
          std::vector<optim::ExpertPiece> pieces;
          for (const model::EcssSplit::Piece& p : split.experts)
            pieces.push_back({p.layer, p.expert, p.begin, p.end});
          const std::string path =
              ec.ecss_store.empty()
                  ? std::string()
                  : fmt::format("{}.pp{}.dp{}.tp{}.c{}", ec.ecss_store, pp_rank(), dp_rank(),
                                tp_rank(), c);
          ecss_.push_back(std::make_unique<optim::ExpertStore>(
              geo.local_specs(), std::move(pieces), std::move(layers), cfg.moe.experts, ec.optim,
              ecss, path));
          if (chunks_.back()->holes()) {
            // At ZeRO 0 every hole's master is in the store (it holds every held expert whole).
            const optim::ExpertStore* es = ecss_.back().get();
            if (!zero1)
              for (const model::UnitRange& h : chunks_.back()->holes()->holes())
                LOOM_ASSERT(packed_index(es->ranges(), h.begin) >= 0 &&
                                packed_index(es->ranges(), h.end - 1) >= 0,
                            "ECSS hole [{}, {}) outside the expert store", h.begin, h.end);
            optim::ExpertStore* store = ecss_.back().get();
            chunks_.back()->set_hole_masters([store](const float* w) { store->load_masters(w); },
                                             [store](float* w) { store->save_masters(w); });
          }
        }
      }
    }
    if (!plan.recompute.empty()) chunks_.back()->set_recompute(plan.recompute);
    chunks_.back()->set_context_parallel(cp_ctx_.get());
  }
  ready_.resize(chunks_.size());
  LOOM_CHECK(plan.bucket_mb > 0, "bucket_mb = {} must be positive", plan.bucket_mb);
  // Megatron's embedding group: the first and last pp ranks both hold embed.token.weight.
  if (n_pp > 1) embedding_ = pp_.split({{0, n_pp - 1}}, "pp_embedding");
}

Executor::~Executor() = default;

void Executor::split_tokens(const int32_t* tokens, int64_t B, int64_t T,
                            std::vector<int32_t>& inputs, std::vector<int32_t>& targets) const {
  if (!cp_ctx_) {
    model::split_windows(tokens, B, T, inputs, targets);
    return;
  }
  const int G = cp_.size();
  inputs.resize(size_t(B * T / G));
  targets.resize(size_t(B * T / G));
  attention::cp_next_token_split(inputs.data(), targets.data(), tokens, B, cp_ctx_->layout, T, G,
                                 cp_.rank());
}

std::string Executor::where() const {
  for (const comm::ProcessGroup* g : {&pp_, &dp_, &tp_, &cp_})
    if (g->valid()) return g->prefix();
  return "[rank 0/1]";
}

void Executor::init_weights(uint64_t seed) {
  if (!stores_.empty()) {
    for (auto& z : stores_) z->init(seed);
    return;
  }
  for (auto& c : chunks_) c->init_weights(seed);  // with holes: the store's masters too
  for (size_t i = 0; i < ecss_.size(); ++i)
    if (ecss_[i] && !chunks_[i]->holes()) ecss_[i]->load_masters(chunks_[i]->weights());
}

std::map<int64_t, std::vector<int64_t>> Executor::ecss_expert_steps() const {
  std::map<int64_t, std::vector<int64_t>> out;
  for (const auto& z : ecss_)
    if (z)
      for (const auto& [l, v] : z->all_expert_steps()) out[l] = v;
  return out;
}

void Executor::set_ecss_expert_steps(const std::map<int64_t, std::vector<int64_t>>& steps) {
  for (auto& z : ecss_) {
    if (!z) continue;
    for (const auto& [l, v] : z->all_expert_steps()) {
      auto it = steps.find(l);
      if (it == steps.end()) continue;
      LOOM_CHECK(it->second.size() == v.size(),
                 "ECSS expert step counts of block {} have {} entries but the block has {} "
                 "experts",
                 l, it->second.size(), v.size());
      for (size_t e = 0; e < v.size(); ++e) z->set_expert_steps(l, int64_t(e), it->second[e]);
    }
  }
}

void Executor::export_weights(float* global_weights, bool include_tied_copy) const {
  for (size_t i = 0; i < chunks_.size(); ++i) {
    if (stores_.empty() && chunks_[i]->holes() && ec_.plan.zero >= 1 && dp_.valid()) {
      // ZeRO-1 with the experts' masters outside the pool: each store holds its share of them.
      std::vector<float> local(static_cast<size_t>(chunks_[i]->total()));
      chunks_[i]->to_full(local.data());
      broadcast_expert_masters(int(i), [&](int64_t b, int64_t e, const float* w) {
        std::memcpy(local.data() + b, w, size_t(e - b) * sizeof(float));
      });
      chunks_[i]->geometry().to_global(local.data(), global_weights, include_tied_copy);
      continue;
    }
    if (stores_.empty()) {
      chunks_[i]->export_weights(global_weights, include_tied_copy);
      continue;
    }
    std::vector<float> local = stores_[i]->full_weights();  // collective over dp
    chunks_[i]->geometry().to_global(local.data(), global_weights, include_tied_copy);
  }
}

void Executor::broadcast_expert_masters(
    int c, const std::function<void(int64_t, int64_t, const float*)>& take) const {
  // The ranks sharing this rank's experts: under ep those holding the same experts, else dp.
  const comm::ProcessGroup& g = ep_.valid() ? edp_ : dp_;
  if (!g.valid() || g.size() <= 1) return;
  const optim::ExpertStore* es = ecss_.at(size_t(c)).get();
  LOOM_ASSERT(es, "chunk {} has holes but no expert store", c);
  const model::StageGeometry& geo = chunks_[size_t(c)]->geometry();
  std::vector<std::vector<model::UnitRange>> pieces(size_t(g.size()));
  std::vector<int64_t> sizes(size_t(g.size()), 0);
  for (int q = 0; q < g.size(); ++q) {
    pieces[size_t(q)] = model::zero1_expert_pieces(geo, g.size(), q);
    for (const model::UnitRange& p : pieces[size_t(q)]) sizes[size_t(q)] += p.end - p.begin;
  }
  LOOM_ASSERT(sizes[size_t(g.rank())] == es->size(), "expert store holds {} elements, its share {}",
              es->size(), sizes[size_t(g.rank())]);
  Tensor buf = Tensor::empty({std::max<int64_t>(1, *std::max_element(sizes.begin(), sizes.end()))},
                             DType::f32, pool_, MemCategory::comm);
  for (int q = 0; q < g.size(); ++q) {
    if (sizes[size_t(q)] == 0) continue;
    const bool mine = q == g.rank();
    float* data = mine ? es->master() : buf.data<float>();
    g.broadcast(comm::BufferRef(data, sizes[size_t(q)], DType::f32), q).wait();
    if (mine) continue;
    int64_t at = 0;
    for (const model::UnitRange& p : pieces[size_t(q)]) {
      take(p.begin, p.end, data + at);
      at += p.end - p.begin;
    }
  }
}

void Executor::import_weights(const float* global_weights) {
  for (size_t i = 0; i < chunks_.size(); ++i) {
    if (stores_.empty()) {
      chunks_[i]->import_weights(global_weights);  // with holes: the store's masters too
      if (!ecss_.empty() && ecss_[i] && !chunks_[i]->holes())
        ecss_[i]->load_masters(chunks_[i]->weights());
      continue;
    }
    std::vector<float> local(static_cast<size_t>(chunks_[i]->total()));
    chunks_[i]->geometry().to_local(global_weights, local.data());
    stores_[i]->import_full(local.data());
  }
}

void Executor::export_optimizer(float* global_m, float* global_v) const {
  for (size_t i = 0; i < chunks_.size(); ++i) {
    const optim::AdamW& o = *optimizers_[i];
    for_each_moment(*chunks_[i], o, expert_store(int(i)),
                    [&](int64_t lo, int64_t len, float* m, float* v,
                        const model::StageParam& p) {
                      if (p.tied_copy) return;
                      const int64_t g = p.global.offset + (lo - p.local_offset);
                      std::memcpy(global_m + g, m, size_t(len) * sizeof(float));
                      std::memcpy(global_v + g, v, size_t(len) * sizeof(float));
                    });
  }
}

void Executor::export_optimizer_dp_summed(float* global_m, float* global_v) const {
  LOOM_CHECK((global_m == nullptr) == (global_v == nullptr),
             "export_optimizer_dp_summed: pass both m and v, or neither");
  LOOM_CHECK(!ep_.valid(),
             "export_optimizer_dp_summed: under expert parallelism (ep = {}) the ranks of dp hold "
             "different experts; write a sharded checkpoint (for_each_checkpoint_piece) instead",
             ec_.plan.ep);
  for (size_t i = 0; i < chunks_.size(); ++i) {
    const model::GptStage& c = *chunks_[i];
    const optim::AdamW& o = *optimizers_[i];
    std::vector<float> m(size_t(c.total()), 0.f), v(size_t(c.total()), 0.f);  // chunk layout
    for_each_moment(c, o, expert_store(int(i)),
                    [&](int64_t lo, int64_t len, float* mp, float* vp,
                        const model::StageParam&) {
                      std::memcpy(m.data() + lo, mp, size_t(len) * sizeof(float));
                      std::memcpy(v.data() + lo, vp, size_t(len) * sizeof(float));
                    });
    if (dp_.valid()) {
      dp_.all_reduce(comm::BufferRef(m.data(), c.total(), DType::f32)).wait();
      dp_.all_reduce(comm::BufferRef(v.data(), c.total(), DType::f32)).wait();
    }
    if (global_m) {
      c.geometry().to_global(m.data(), global_m, /*include_tied_copy=*/false);
      c.geometry().to_global(v.data(), global_v, /*include_tied_copy=*/false);
    }
  }
}

void Executor::for_each_checkpoint_piece(const PieceFn& f) const {
  const bool share_replicas = ec_.plan.zero == 0 && dp_.valid();
  for (size_t i = 0; i < chunks_.size(); ++i) {
    const model::GptStage& c = *chunks_[i];
    const optim::AdamW& o = *optimizers_[i];
    const ZeroStore* z = stores_.empty() ? nullptr : stores_[i].get();
    // The ranges this rank writes are inside its optimizer's ranges, so a local element x sits
    // at packed position x (ZeRO 0: the optimizer covers the whole chunk) or at the packed
    // offset for_each_owned reports (ZeRO >= 1 writes exactly its optimizer's ranges).
    // ECSS: the experts' masters and moments come from the host store (same format).
    const optim::ExpertStore* es = expert_store(int(i));
    std::vector<optim::Range> mine =
        share_replicas ? std::vector<optim::Range>{zero1_share(c.total(), dp_.size(), dp_.rank())}
                       : o.ranges();
    if (es && !share_replicas) {
      mine.insert(mine.end(), es->ranges().begin(), es->ranges().end());
      std::sort(mine.begin(), mine.end(),
                [](const optim::Range& a, const optim::Range& b) { return a.begin < b.begin; });
    }
    // Where local element x's weight, m and v are.
    auto state = [&](int64_t x, int64_t packed, const float*& w, const float*& m,
                     const float*& v) {
      const int64_t xs = es ? packed_index(es->ranges(), x) : -1;
      if (xs >= 0) {
        w = es->master() + xs;
        m = es->m() + xs;
        v = es->v() + xs;
        return;
      }
      const int64_t opt = packed_index(o.ranges(), x);
      LOOM_ASSERT(opt >= 0, "checkpoint piece at {} outside the optimizer's ranges", x);
      w = z ? z->weights_buffer() + (z->stage() == 3 ? packed : x) : c.master_at(x);
      m = o.m() + opt;
      v = o.v() + opt;
    };
    for_each_owned(c, mine, [&](int64_t x, int64_t len, int64_t packed, const model::StageParam& p) {
      if (p.tied_copy || (p.global.replicated() && tp_rank() != 0)) return;
      if (share_replicas && p.expert && ep_.valid()) return;  // written below
      // ZeRO-2/3 under ep: every ep rank holds the same dense pieces; ep rank 0 writes them.
      if (z && ep_.valid() && !p.expert && ep_.rank() != 0) return;
      const int64_t lo = x - p.local_offset;
      const float *w, *m, *v;
      state(x, packed, w, m, v);
      f("weights", p.global, lo, lo + len, w);
      f("m", p.global, lo, lo + len, m);
      f("v", p.global, lo, lo + len, v);
    });
    // Expert parallel (ZeRO 0): an expert's tensors are replicated over the ranks holding the
    // same experts only; each of them writes an equal share of each tensor.
    if (!share_replicas || !ep_.valid()) continue;
    for (const model::StageParam& p : c.params()) {
      if (!p.expert || (p.global.replicated() && tp_rank() != 0)) continue;
      const model::UnitRange sh =
          edp_.size() > 1 ? model::zero1_share(p.global.numel, edp_.size(), edp_.rank())
                          : model::UnitRange{0, p.global.numel};
      if (sh.end <= sh.begin) continue;
      const int64_t x = p.local_offset + sh.begin;
      const float *w, *m, *v;
      state(x, x, w, m, v);
      f("weights", p.global, sh.begin, sh.end, w);
      f("m", p.global, sh.begin, sh.end, m);
      f("v", p.global, sh.begin, sh.end, v);
    }
  }
}

void Executor::load_checkpoint(const ReadFn& read, bool moments, int64_t step) {
  LOOM_CHECK(step >= 0, "optimizer step count {} must be >= 0", step);
  for (size_t i = 0; i < chunks_.size(); ++i) {
    model::GptStage& c = *chunks_[i];
    optim::AdamW& o = *optimizers_[i];
    ZeroStore* z = stores_.empty() ? nullptr : stores_[i].get();
    // Weights: every element of the chunk, or (ZeRO-3) this rank's pieces, packed. The head's
    // tied copy reads the embedding's tensor (the same logical one).
    const std::vector<optim::Range> held =
        z && z->stage() == 3 ? z->pieces() : std::vector<optim::Range>{{0, c.total()}};
    // A buffer with holes (ECSS in bf16) reads into a whole copy (the current values: `read`
    // may fill only some tensors), handed back with from_full.
    std::vector<float> full;
    if (c.holes()) {
      full.resize(size_t(c.total()));
      c.to_full(full.data());
    }
    for_each_owned(c, held, [&](int64_t x, int64_t len, int64_t packed, const model::StageParam& p) {
      float* w = z ? z->weights_buffer() + (z->stage() == 3 ? packed : x)
                   : (c.holes() ? full.data() + x : c.weights() + x);
      read("weights", p.global, x - p.local_offset, x - p.local_offset + len, w);
    });
    optim::ExpertStore* es = ecss_.empty() ? nullptr : ecss_[i].get();
    if (z)
      z->weights_loaded();
    else if (c.holes())
      c.from_full(full.data());  // the store's masters too
    else
      c.sync_low_precision_weights();
    if (es && !c.holes()) es->load_masters(c.weights());
    if (!moments) continue;
    for_each_moment(c, o, es,
                    [&](int64_t x, int64_t len, float* m, float* v,
                        const model::StageParam& p) {
                      read("m", p.global, x - p.local_offset, x - p.local_offset + len,
                           m);
                      read("v", p.global, x - p.local_offset, x - p.local_offset + len,
                           v);
                    });
    o.set_step_count(step);
    // Per-expert counts default to the step (a checkpoint without them, or ECSS dense);
    // Trainer::resume sets lazy runs' saved counts afterwards.
    if (es) es->set_all_expert_steps(step);
  }
  if (moments) step_ = step;
}

void Executor::import_optimizer(const float* global_m, const float* global_v,
                                        int64_t step) {
  LOOM_CHECK(step >= 0, "optimizer step count {} must be >= 0", step);
  for (size_t i = 0; i < chunks_.size(); ++i) {
    optim::AdamW& o = *optimizers_[i];
    // The head's tied copy takes the embedding's entries (same global offsets).
    for_each_moment(*chunks_[i], o, expert_store(int(i)),
                    [&](int64_t lo, int64_t len, float* m, float* v,
                        const model::StageParam& p) {
                      const int64_t g = p.global.offset + (lo - p.local_offset);
                      std::memcpy(m, global_m + g, size_t(len) * sizeof(float));
                      std::memcpy(v, global_v + g, size_t(len) * sizeof(float));
                    });
    o.set_step_count(step);
    if (!ecss_.empty() && ecss_[i]) ecss_[i]->set_all_expert_steps(step);
  }
  step_ = step;
}

void Executor::reduce_range(int c, int64_t begin, int64_t end) {
  float* grads = chunks_[size_t(c)]->grads();
  auto reduce = [&](const comm::ProcessGroup& g, int64_t b, int64_t e) {
    if (e > b && g.valid() && g.size() > 1)
      reductions_.push_back(g.all_reduce(comm::BufferRef(grads + b, e - b, DType::f32)));
  };
  if (!ep_.valid()) {
    reduce(dp_, begin, end);
    return;
  }
  // Expert parallel: the experts' gradients sum over the ranks holding the same experts only.
  int64_t x = begin;
  for (const model::UnitRange& r : chunks_[size_t(c)]->geometry().expert_ranges()) {
    if (r.end <= x || r.begin >= end) continue;
    reduce(dp_, x, std::max(x, r.begin));
    reduce(edp_, std::max(x, r.begin), std::min(end, r.end));
    x = std::min(end, r.end);
  }
  reduce(dp_, x, end);
}

void Executor::grad_ready(int c, int64_t begin, int64_t end) {
  // Merge [begin, end) with the ready ranges it touches (it overlaps none: each unit is
  // reported once per step).
  auto& ready = ready_[size_t(c)];
  auto next = ready.lower_bound(begin);
  if (next != ready.begin()) {
    auto prev = std::prev(next);
    LOOM_ASSERT(prev->second <= begin, "gradient range [{}, {}) reported twice", begin, end);
    if (prev->second == begin) {
      begin = prev->first;
      ready.erase(prev);
    }
  }
  if (next != ready.end() && next->first == end) {
    end = next->second;
    ready.erase(next);
  }
  const int64_t bucket_elems = std::max<int64_t>(1, int64_t(ec_.plan.bucket_mb * (1 << 20) / 4));
  if (end - begin >= bucket_elems)
    reduce_range(c, begin, end);
  else
    ready[begin] = end;
  // MPI progresses only inside MPI calls: poke the reductions in flight between layers.
  for (auto& w : reductions_) w.test();
}

StepResult Executor::train_step(const int32_t* tokens, int64_t B, int64_t T,
                                const int32_t* domains) {
  const int n_pp = pp_size(), rank = pp_rank(), VS = ec_.plan.virtual_stages;
  const int M = ec_.plan.micro_batches, n_virtual = n_pp * VS;
  const int n_tp = tp_.valid() ? tp_.size() : 1;
  if (cp_ctx_) attention::check_cp_layout(cp_ctx_->layout, T, cp_size());
  const int64_t Tl = T / cp_size();  // this rank's rows of every sequence
  LOOM_CHECK((B * Tl) % n_tp == 0, "tensor parallel needs B*T/cp = {} divisible by tp = {}",
             B * Tl, n_tp);
  const int64_t N = B * Tl / n_tp, C = cfg_.d_model;  // rows of the messages here
  // 1 / (tokens of the global batch): dp_ is the dp x cp group under cp.
  const float grad_scale = 1.0f / float(B * T * M * ec_.plan.dp);
  bool needs_tokens = false;
  for (auto& c : chunks_)
    needs_tokens |= c->span().has_embedding || c->span().has_head || c->has_sparse_blocks();
  LOOM_CHECK(!needs_tokens || tokens != nullptr,
             "{} holds the embedding, the head or sparse blocks and needs the step's tokens (M={}, "
             "B={}, T+1={})",
             where(), M, B, T + 1);

  // Split (M, B, T+1) windows into per-micro-batch inputs (B,T) and targets (B,T); domains
  // likewise (their input part; the target part is dropped).
  std::vector<std::vector<int32_t>> inputs(static_cast<size_t>(M)), targets(static_cast<size_t>(M));
  std::vector<std::vector<int32_t>> dom_in(static_cast<size_t>(M)), dom_unused(static_cast<size_t>(M));
  if (needs_tokens)
    for (int mb = 0; mb < M; ++mb) {
      split_tokens(tokens + int64_t(mb) * B * (T + 1), B, T, inputs[size_t(mb)],
                   targets[size_t(mb)]);
      // The domains go through the same cp-aware split, so they land on the inputs' local rows.
      if (domains)
        split_tokens(domains + int64_t(mb) * B * (T + 1), B, T, dom_in[size_t(mb)],
                     dom_unused[size_t(mb)]);
    }

  for (auto& c : chunks_) c->zero_grads();
  for (auto& z : stores_) z->zero_grads();
  // ECSS lazy: each sparse block's per-expert loads before this step's forwards.
  std::vector<std::map<int64_t, std::vector<int64_t>>> loads_before;
  for (size_t i = 0; i < ecss_.size(); ++i)
    loads_before.push_back(ecss_[i] && ecss_[i]->mode() == optim::EcssMode::lazy
                               ? chunks_[i]->moe_stats().layer_load
                               : std::map<int64_t, std::vector<int64_t>>{});
  cp_stats_ = attention::CpStats{};
  std::map<Key, Tensor> act_in, grad_in, act_out, grad_out;
  std::vector<comm::Work> pending_recvs, sends;
  std::vector<Tensor> send_buffers;  // every message sent this step, released after the last wait
  // Before each compute action its inputs must have arrived (the schedule's contract).
  auto wait_recvs = [&] {
    for (auto& w : pending_recvs) w.wait();
    pending_recvs.clear();
  };
  // A message leaves from its own (N,C) comm buffer, held until the end of the step, and the
  // tensor it copies is released at the send action. So every buffer's lifetime is fixed by the
  // schedule, never by when MPI finished a transfer, and the pool's peaks per category are the
  // same in every run (a finished send used to be released at the next compute action, which
  // made the activation peak depend on timing).
  auto send = [&](Tensor t, int peer, int tag) {
    Tensor msg = Tensor::empty(t.shape(), DType::f32, pool_, MemCategory::comm);  // (N,C)
    std::memcpy(msg.data<float>(), t.data<float>(), size_t(t.numel()) * sizeof(float));
    t = Tensor();
    // Held here, not only by the Work (which drops it when MPI reports completion, a moment that
    // depends on timing).
    send_buffers.push_back(msg);
    sends.push_back(pp_.isend(msg, peer, tag));
  };
  double loss_sum = 0;
  int64_t count = 0;
  // dp (ZeRO 0/1): a chunk's gradients are final during its last micro-batch (every schedule
  // runs a chunk's micro-batches in order): reduce them in buckets as they become ready.
  const bool overlap = dp_.valid() && stores_.empty();
  auto arm_hook = [&](model::GptStage& st, int c, int mb) {
    if (overlap && mb == M - 1)
      st.set_grad_ready_hook([this, c](int64_t b, int64_t e) { grad_ready(c, b, e); });
  };
  double dp_wait_s = 0;

  for (const Action& a : schedule_.stages[size_t(rank)]) {
    const int mb = a.micro_batch, c = a.chunk;
    const int g = schedule_.virtual_stage(rank, c);
    const Key key{mb, c};
    model::GptStage& stage = *chunks_[size_t(c)];
    switch (a.kind) {
      case ActionKind::recv_activation: {
        LOOM_ASSERT(g > 0 && a.peer == (g - 1) % n_pp, "RecvAct at virtual stage {} from {}", g,
                    a.peer);
        Tensor buf = Tensor::empty({N, C}, DType::f32, pool_, MemCategory::comm);  // (N,C)
        pending_recvs.push_back(
            pp_.irecv(buf, a.peer, p2p_tag(Stream::activation, mb, g - 1, n_virtual)));
        act_in[key] = buf;
        break;
      }
      case ActionKind::recv_grad: {
        LOOM_ASSERT(g + 1 < n_virtual && a.peer == (g + 1) % n_pp, "RecvGrad at {} from {}", g,
                    a.peer);
        Tensor buf = Tensor::empty({N, C}, DType::f32, pool_, MemCategory::comm);  // (N,C)
        pending_recvs.push_back(
            pp_.irecv(buf, a.peer, p2p_tag(Stream::grad, mb, g + 1, n_virtual)));
        grad_in[key] = buf;
        break;
      }
      case ActionKind::forward: {
        wait_recvs();
        arm_hook(stage, c, mb);
        Tensor x = g > 0 ? take(act_in, key, "input activation") : Tensor();
        model::LossSum l;
        Tensor y = stage.forward(mb, inputs[size_t(mb)].data(), targets[size_t(mb)].data(), x, B,
                                 Tl, grad_scale, &l,
                                 dom_in[size_t(mb)].empty() ? nullptr : dom_in[size_t(mb)].data());
        stage.set_grad_ready_hook(nullptr);
        if (g + 1 < n_virtual) {
          act_out[key] = y;
        } else {
          // Micro-batches reach the last stage in order in every schedule, so this sums in
          // the serial trainer's order.
          loss_sum += l.sum;
          count += l.count;
        }
        break;
      }
      case ActionKind::backward: {
        wait_recvs();
        arm_hook(stage, c, mb);
        Tensor dy = g + 1 < n_virtual ? take(grad_in, key, "output gradient") : Tensor();
        Tensor dx = stage.backward(mb, dy);
        stage.set_grad_ready_hook(nullptr);
        if (g > 0) grad_out[key] = dx;
        break;
      }
      case ActionKind::send_activation: {
        LOOM_ASSERT(a.peer == (g + 1) % n_pp, "SendAct at {} to {}", g, a.peer);
        send(take(act_out, key, "activation to send"), a.peer,
             p2p_tag(Stream::activation, mb, g, n_virtual));
        break;
      }
      case ActionKind::send_grad: {
        LOOM_ASSERT(a.peer == (g - 1) % n_pp, "SendGrad at {} to {}", g, a.peer);
        send(take(grad_out, key, "gradient to send"), a.peer,
             p2p_tag(Stream::grad, mb, g, n_virtual));
        break;
      }
    }
  }
  wait_recvs();
  for (auto& w : sends) w.wait();
  send_buffers.clear();
  LOOM_ASSERT(act_in.empty() && grad_in.empty() && act_out.empty() && grad_out.empty(),
              "{} pipeline step left tensors unconsumed (schedule bug)", where());
  for (auto& c : chunks_)
    LOOM_ASSERT(c->in_flight() == 0, "{} chunk left {} micro-batches without backward",
                where(), c->in_flight());

  const int64_t VC = chunks_[0]->global_layout().specs()[0].numel;  // (V/tp) x C
  double squares = 0, expert_squares = 0;
  if (!stores_.empty()) {
    // ZeRO-2/3: every unit's gradient was reduce-scattered over dp during the backward (tp's
    // replicated tensors summed first); collect the last ones.
    for (auto& z : stores_) z->finish_micro_batch();
    // Tied embedding: the embedding's and the head's copies have identical units, so their
    // pieces match element for element: sum them.
    if (embedding_.valid())
      for (size_t i = 0; i < chunks_.size(); ++i) {
        const int u = chunks_[i]->token_unit();
        if (u < 0) continue;
        const optim::Range& piece = stores_[i]->pieces()[size_t(u)];
        embedding_
            .all_reduce(comm::BufferRef(stores_[i]->packed_grads() + stores_[i]->packed_offset(u),
                                        piece.end - piece.begin, DType::f32))
            .wait();
      }
    for (auto& z : stores_) squares += z->local_grad_sum_squares();
    dp_.all_reduce(comm::BufferRef(&squares, 1, DType::f64)).wait();
  } else {
    // Data parallel: every chunk's gradient summed over dp; most buckets started during the
    // last micro-batch, the rest start now.
    const auto t_wait = std::chrono::steady_clock::now();
    if (dp_.valid()) {
      for (size_t c = 0; c < chunks_.size(); ++c) {
        for (auto [b, e] : ready_[c]) reduce_range(int(c), b, e);
        ready_[c].clear();
      }
      for (auto& w : reductions_) w.wait();
      reductions_.clear();
    }
    dp_wait_s = seconds_since(t_wait);

    // Tied embedding: sum the embedding's and the head's gradient contributions.
    if (embedding_.valid()) {
      for (auto& c : chunks_)
        if (c->span().has_embedding || c->span().has_head)
          embedding_.all_reduce(comm::BufferRef(c->grads() + c->token_embedding(), VC, DType::f32))
              .wait();
    }

    // Tensor parallel: replicated tensors' partial gradients (from each rank's rows) summed.
    if (tp_.valid())
      for (auto& c : chunks_)
        model::sum_replicated_grads(c->geometry().local_specs(), c->grads(), 0, c->total(), tp_);

    // This rank's squares in chunk order (the head's tied copy, which is the first VC elements
    // of its buffer, skipped; under tp replicated tensors counted on tp rank 0 only).
    for (auto& c : chunks_) {
      if (tp_.valid()) {
        for (const model::StageParam& p : c->params())
          if (!p.tied_copy && (!p.global.replicated() || tp_.rank() == 0))
            (p.expert && ep_.valid() ? expert_squares : squares) +=
                kernels::sum_squares(c->grads() + p.local_offset, p.global.numel);
        continue;
      }
      int64_t skip = 0;
      if (c->span().has_head && !c->span().has_embedding) {
        LOOM_ASSERT(c->token_embedding() == 0, "tied copy expected at offset 0, got {}",
                    c->token_embedding());
        skip = VC;
      }
      if (!ep_.valid()) {
        squares += kernels::sum_squares(c->grads() + skip, c->total() - skip);
        continue;
      }
      // Expert parallel: the experts' squares are this rank's share, summed over ep below.
      int64_t x = skip;
      for (const model::UnitRange& r : c->geometry().expert_ranges()) {
        squares += kernels::sum_squares(c->grads() + x, r.begin - x);
        expert_squares += kernels::sum_squares(c->grads() + r.begin, r.end - r.begin);
        x = r.end;
      }
      squares += kernels::sum_squares(c->grads() + x, c->total() - x);
    }
    if (ep_.valid()) {
      ep_.all_reduce(comm::BufferRef(&expert_squares, 1, DType::f64)).wait();
      squares += expert_squares;
    }
  }
  // Global grad norm: summed over pp (and tp; and dp above under ZeRO-2/3).
  if (pp_.valid()) pp_.all_reduce(comm::BufferRef(&squares, 1, DType::f64)).wait();
  if (tp_.valid()) tp_.all_reduce(comm::BufferRef(&squares, 1, DType::f64)).wait();
  const double norm = std::sqrt(squares);
  const float factor = ec_.optim.clip > 0 ? kernels::clip_factor(norm, ec_.optim.clip) : 1.0f;

  // ECSS lazy: which experts got tokens this step. Loads are counted where the tokens are
  // routed (every expert, held or not), so their sum over the gradient-reduction group (dp, or
  // dp x cp; it contains the ep group) is the global batch's load, the same on every rank.
  std::vector<std::map<int64_t, std::vector<int64_t>>> step_loads(ecss_.size());
  {
    std::vector<int64_t> flat;
    for (size_t i = 0; i < ecss_.size(); ++i) {
      if (!ecss_[i] || ecss_[i]->mode() != optim::EcssMode::lazy) continue;
      const auto& now = chunks_[i]->moe_stats().layer_load;
      for (const auto& [l, counts] : ecss_[i]->all_expert_steps()) {
        std::vector<int64_t>& d = step_loads[i][l];
        d.assign(counts.size(), 0);
        auto a = now.find(l);
        auto b = loads_before[i].find(l);
        for (size_t e = 0; e < d.size(); ++e) {
          if (a != now.end() && e < a->second.size()) d[e] += a->second[e];
          if (b != loads_before[i].end() && e < b->second.size()) d[e] -= b->second[e];
        }
        flat.insert(flat.end(), d.begin(), d.end());
      }
    }
    if (!flat.empty() && dp_.valid()) {
      dp_.all_reduce(comm::BufferRef(flat.data(), int64_t(flat.size()), DType::i64)).wait();
      size_t at = 0;
      for (auto& per_chunk : step_loads)
        for (auto& [l, d] : per_chunk)
          for (int64_t& x : d) x = flat[at++];
    }
  }

  ++step_;
  StepResult s;
  s.lr = optim::lr_at(ec_.optim, step_);
  for (size_t i = 0; i < chunks_.size(); ++i) {
    LOOM_ASSERT(optimizers_[i]->step_count() + 1 == step_, "chunk optimizer at step {}, executor {}",
                optimizers_[i]->step_count(), step_ - 1);
    const auto t_opt = std::chrono::steady_clock::now();
    if (!stores_.empty()) {
      stores_[i]->step(*optimizers_[i], factor);  // updates pieces (stage 2: re-gathers units)
      s.optimizer_s += seconds_since(t_opt);
      continue;
    }
    model::GptStage& chunk = *chunks_[i];
    if (chunk.holes())
      optimizers_[i]->step_at([&](int64_t x) { return chunk.master_at(x); }, chunk.grads(), factor);
    else
      optimizers_[i]->step(chunk.weights(), chunk.grads(), factor);
    if (!ecss_.empty() && ecss_[i]) {
      const auto& loads = step_loads[i];
      ecss_[i]->step(
          [&](int64_t b, int64_t e, const float* w) { return chunk.write_compute(b, e, w); },
          chunk.grads(), factor, step_,
          [&](int64_t l, int64_t e) { return loads.at(l).at(size_t(e)) > 0; });
      const optim::EcssTransfers& t = ecss_[i]->last_step();
      s.ecss.to_store_bytes += t.to_store_bytes;
      s.ecss.to_pool_bytes += t.to_pool_bytes;
      s.ecss.pieces_updated += t.pieces_updated;
      s.ecss.elements_updated += t.elements_updated;
    }
    s.optimizer_s += seconds_since(t_opt);
    const auto t_gather = std::chrono::steady_clock::now();
    if (ec_.plan.zero >= 1 && dp_.valid() && chunk.holes()) {
      // ZeRO-1 with the experts' masters outside the pool: the dense shares in f32 over dp, and
      // each store's updated masters to the ranks sharing its experts, into their compute copies.
      std::vector<comm::Work> works;
      for (int r = 0; r < dp_.size(); ++r)
        for (const model::UnitRange& u :
             model::ecss_split(chunk.geometry(),
                               model::zero1_dense_ranges(chunk.geometry(), dp_.size(), r))
                 .dense)
          works.push_back(dp_.broadcast(
              comm::BufferRef(chunk.master_at(u.begin), u.end - u.begin, DType::f32), r));
      for (auto& w : works) w.wait();
      broadcast_expert_masters(int(i), [&](int64_t b, int64_t e, const float* w) {
        chunk.write_compute(b, e, w);
      });
    } else if (ec_.plan.zero >= 1 && dp_.valid()) {
      // ZeRO-1: every dp rank's updated share to the others (under ep the dense part over dp,
      // each expert range's shares over the ranks holding the same experts).
      float* weights = chunks_[i]->weights();
      LOOM_ASSERT(weights, "ZeRO-1 gather needs the whole f32 buffer");
      const model::StageGeometry& geo = chunks_[i]->geometry();
      if (geo.ep().size <= 1) {
        // Without ep the shares are adjacent pieces in rank order (zero1_share): one
        // all-gather over the buffer, which moves each piece once per rank (a broadcast per
        // rank took ~1.5x as long at dp 8 here, docs/planner.md "Session 14").
        std::vector<int64_t> offsets(size_t(dp_.size()) + 1, geo.total());
        for (int r = 0; r < dp_.size(); ++r)
          offsets[size_t(r)] = model::zero1_share(geo.total(), dp_.size(), r).begin;
        dp_.all_gather_in_place(comm::BufferRef(weights, geo.total(), DType::f32), offsets)
            .wait();
        s.zero_gather_s += seconds_since(t_gather);
        chunks_[i]->sync_low_precision_weights();
        continue;
      }
      std::vector<comm::Work> works;
      for (int r = 0; r < dp_.size(); ++r)
        for (const model::UnitRange& u : model::zero1_dense_ranges(chunks_[i]->geometry(), dp_.size(), r))
          if (u.end > u.begin)
            works.push_back(dp_.broadcast(
                comm::BufferRef(weights + u.begin, u.end - u.begin, DType::f32), r));
      if (edp_.valid() && edp_.size() > 1)
        for (const model::UnitRange& e : chunks_[i]->geometry().expert_ranges())
          for (int r = 0; r < edp_.size(); ++r) {
            const model::UnitRange sh = model::zero1_share(e.end - e.begin, edp_.size(), r);
            if (sh.end > sh.begin)
              works.push_back(edp_.broadcast(
                  comm::BufferRef(weights + e.begin + sh.begin, sh.end - sh.begin, DType::f32), r));
          }
      for (auto& w : works) w.wait();
    }
    if (ec_.plan.zero >= 1 && dp_.valid()) s.zero_gather_s += seconds_since(t_gather);
    chunks_[i]->sync_low_precision_weights();
  }

  // The loss lives on the rank of the last virtual stage (pp-1); every pp rank logs it.
  double loss_buf[2] = {loss_sum, double(count)};
  if (pp_.valid()) pp_.broadcast(comm::BufferRef(loss_buf, 2, DType::f64), n_pp - 1).wait();
  if (dp_.valid()) dp_.all_reduce(comm::BufferRef(loss_buf, 2, DType::f64)).wait();
  s.step = step_;
  s.loss_sum = loss_buf[0];
  s.tokens = int64_t(loss_buf[1]);
  s.loss = s.tokens ? s.loss_sum / double(s.tokens) : 0.0;
  s.grad_norm = norm;
  s.dp_wait_s = dp_wait_s;
  s.cp_workspace_bytes = cp_stats_.peak_workspace_bytes;
  s.cp_wait_s = cp_stats_.forward_wait_s + cp_stats_.backward_wait_s;
  return s;
}

double Executor::eval_loss(const int32_t* tokens, int64_t n_batches, int64_t B, int64_t T,
                           const int32_t* domains) {
  const int n_pp = pp_size(), rank = pp_rank();
  const int n_virtual = n_pp * ec_.plan.virtual_stages;
  const int n_tp = tp_.valid() ? tp_.size() : 1;
  if (cp_ctx_) attention::check_cp_layout(cp_ctx_->layout, T, cp_size());
  const int64_t Tl = T / cp_size();  // this rank's rows of every sequence
  LOOM_CHECK((B * Tl) % n_tp == 0, "tensor parallel needs B*T/cp = {} divisible by tp = {}",
             B * Tl, n_tp);
  const int64_t N = B * Tl / n_tp, C = cfg_.d_model;  // rows of the messages here
  bool needs_tokens = false;
  for (auto& c : chunks_)
    needs_tokens |= c->span().has_embedding || c->span().has_head || c->has_sparse_blocks();
  LOOM_CHECK(!needs_tokens || tokens != nullptr,
             "{} holds the embedding, the head or sparse blocks and needs the evaluation tokens "
             "({} x {} x {})",
             where(), n_batches, B, T + 1);
  std::vector<int32_t> inputs, targets;  // (B,T) each; empty (unread) without embedding or head
  std::vector<int32_t> dom_in, dom_unused;  // (B,T) MoE domains of the inputs
  double loss_buf[2] = {0, 0};  // loss sum, tokens (on the last virtual stage's rank)
  for (int64_t i = 0; i < n_batches; ++i) {
    if (needs_tokens) split_tokens(tokens + i * B * (T + 1), B, T, inputs, targets);
    if (needs_tokens && domains) split_tokens(domains + i * B * (T + 1), B, T, dom_in, dom_unused);
    // Virtual stage g runs on pp rank g % n_pp as chunk g / n_pp; each window goes through
    // them in order, so every send meets a receive that is already due (no cycle).
    for (int c = 0; c < num_chunks(); ++c) {
      const int g = schedule_.virtual_stage(rank, c);
      Tensor x;
      if (g > 0) {
        x = Tensor::empty({N, C}, DType::f32, pool_, MemCategory::comm);  // (N,C)
        pp_.irecv(x, (g - 1) % n_pp, p2p_tag(Stream::activation, int(i), g - 1, n_virtual)).wait();
      }
      model::LossSum l;
      Tensor y = chunks_[size_t(c)]->forward_eval(inputs.data(), targets.data(), x, B, Tl, &l,
                                                  dom_in.empty() ? nullptr : dom_in.data());
      if (g + 1 < n_virtual) {
        pp_.isend(y, (g + 1) % n_pp, p2p_tag(Stream::activation, int(i), g, n_virtual)).wait();
      } else {
        loss_buf[0] += l.sum;
        loss_buf[1] += double(l.count);
      }
    }
  }
  if (pp_.valid()) pp_.broadcast(comm::BufferRef(loss_buf, 2, DType::f64), n_pp - 1).wait();
  // cp: each rank scored its share of every window's tokens.
  if (cp_.valid()) cp_.all_reduce(comm::BufferRef(loss_buf, 2, DType::f64)).wait();
  return loss_buf[1] > 0 ? loss_buf[0] / loss_buf[1] : 0.0;
}

}  // namespace loom::train
