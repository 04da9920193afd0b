#include "train/zero.h"

#include <algorithm>
#include <cstring>

#include "core/error.h"
#include "kernels/cpu/grad_norm.h"

namespace loom::train {

ZeroSpace stage_zero_space(std::shared_ptr<const model::StageGeometry> geometry) {
  ZeroSpace z;
  z.specs = geometry->local_specs();
  for (const model::StageParam& p : geometry->params()) z.counted.push_back(!p.tied_copy);
  z.units = geometry->units();
  z.total = geometry->total();
  z.experts = geometry->expert_ranges();
  z.init = [geometry](float* dst, int64_t b, int64_t e, uint64_t seed) {
    geometry->init_range(dst, b, e, seed);
  };
  return z;
}

ZeroStore::ZeroStore(int stage, ZeroSpace space, model::Precision precision, MemoryPool& pool,
                     const comm::ProcessGroup& dp, const comm::ProcessGroup* tp,
                     const comm::ProcessGroup* ep)
    : stage_(stage),
      space_(std::move(space)),
      bf_(precision == model::Precision::bf16),
      pool_(pool),
      dp_(dp) {
  if (tp && tp->size() > 1) tp_ = *tp;
  if (ep && ep->size() > 1) ep_ = *ep;
  LOOM_CHECK(stage == 2 || stage == 3, "ZeroStore handles ZeRO stages 2 and 3, not {}", stage);
  LOOM_ASSERT(space_.counted.size() == space_.specs.size() && space_.init,
              "ZeroSpace needs a counted flag per tensor and an init function");
  int64_t next = 0;
  for (const auto& u : space_.units) {
    LOOM_ASSERT(u.begin == next && u.end >= u.begin, "ZeroSpace units do not tile the buffer");
    next = u.end;
  }
  LOOM_ASSERT(next == space_.total, "ZeroSpace units end at {}, not {}", next, space_.total);
  const int64_t P = dp_.size(), r = dp_.rank();
  for (const auto& u : space_.units) {
    const model::UnitRange piece = model::zero_piece(u, int(P), int(r));
    n_.push_back(model::zero_piece_stride(u, int(P)));
    packed_off_.push_back(shard_);
    pieces_.push_back({piece.begin, piece.end});
    shard_ += piece.end - piece.begin;
  }
  live_.resize(space_.units.size());
  gshard_ = Tensor::zeros({shard_}, DType::f32, pool_, MemCategory::grads);
  if (stage_ == 2) {
    wfull_ = Tensor::empty({space_.total}, DType::f32, pool_, MemCategory::weights);
    if (bf_) wfull_lp_ = Tensor::empty({space_.total}, DType::bf16, pool_, MemCategory::weights);
  } else {
    wshard_ = Tensor::empty({shard_}, DType::f32, pool_, MemCategory::weights);
  }
}

void ZeroStore::gather_unit(size_t u, const float* packed, float* out) const {
  const int64_t n = n_[u], len = piece_len(u);
  float* mine = out + int64_t(dp_.rank()) * n;
  std::memcpy(mine, packed + packed_off_[u], size_t(len) * 4);
  std::fill(mine + len, mine + n, 0.f);  // the last pieces may be short
  dp_.all_gather(comm::BufferRef(mine, n, DType::f32), comm::BufferRef(out, n * dp_.size(), DType::f32))
      .wait();
}

const float* ZeroStore::weights(int u) {
  const auto& unit = space_.units[size_t(u)];
  if (stage_ == 2) return wfull_.data<float>() + unit.begin;
  Live& l = live_[size_t(u)];
  if (l.refs++ == 0) {
    l.w = Tensor::empty({n_[size_t(u)] * dp_.size()}, DType::f32, pool_, MemCategory::weights);
    gather_unit(size_t(u), wshard_.data<float>(), l.w.data<float>());
  }
  return l.w.data<float>();
}

const bf16* ZeroStore::weights_lp(int u) {
  const auto& unit = space_.units[size_t(u)];
  LOOM_ASSERT(bf_, "weights_lp in f32 mode");
  if (stage_ == 2) return wfull_lp_.data<bf16>() + unit.begin;
  Live& l = live_[size_t(u)];
  LOOM_ASSERT(l.refs > 0, "weights_lp({}) before weights({})", u, u);
  if (!l.wl.defined()) {
    const int64_t len = unit.end - unit.begin;
    l.wl = Tensor::empty({len}, DType::bf16, pool_, MemCategory::weights);
    convert_f32_to_bf16(l.w.data<float>(), l.wl.data<bf16>(), size_t(len));
  }
  return l.wl.data<bf16>();
}

void ZeroStore::release(int u) {
  if (stage_ == 2) return;
  Live& l = live_[size_t(u)];
  LOOM_ASSERT(l.refs > 0, "release({}) without weights({})", u, u);
  if (--l.refs == 0) {
    l.w = Tensor();
    l.wl = Tensor();
  }
}

float* ZeroStore::grads(int u) {
  Live& l = live_[size_t(u)];
  if (!l.g.defined())
    l.g = Tensor::zeros({n_[size_t(u)] * dp_.size()}, DType::f32, pool_, MemCategory::grads);
  return l.g.data<float>();
}

void ZeroStore::grads_done(int u) {
  Live& l = live_[size_t(u)];
  LOOM_ASSERT(l.g.defined(), "grads_done({}) without grads({})", u, u);
  if (tp_.valid()) {
    // Replicated tensors got partial gradients from this rank's rows: sum them over tp before
    // the dp reduction.
    const auto& unit = space_.units[size_t(u)];
    model::sum_replicated_grads(space_.specs, l.g.data<float>(), unit.begin, unit.end, tp_);
  }
  if (ep_.valid()) {
    const auto& unit = space_.units[size_t(u)];
    sum_dense_over_ep(l.g.data<float>(), unit.begin, unit.end);
  }
  Tensor out = Tensor::empty({n_[size_t(u)]}, DType::f32, pool_, MemCategory::grads);
  // The entry holds the unit buffer and its result until it retires, in order, when more than
  // kMaxInFlight are pending (or at finish_micro_batch): so gradient memory is the shard plus a
  // few units at points the step defines, never at the moment MPI reports completion (the
  // memory model, model/memory.h, counts exactly this).
  pending_.push_back({dp_.reduce_scatter(comm::BufferRef(l.g), comm::BufferRef(out)), u, l.g, out});
  l.g = Tensor();
  // MPI progresses only inside MPI calls: poke the reductions in flight between layers.
  for (auto& p : pending_) p.work.test();
  while (int(pending_.size()) > kMaxInFlight) {
    pending_.front().work.wait();
    accumulate(pending_.front());
    pending_.erase(pending_.begin());
  }
}

void ZeroStore::sum_dense_over_ep(float* g, int64_t begin, int64_t end) const {
  // g holds elements [begin, end) of the space; reduce its dense gaps between expert ranges.
  int64_t at = begin;
  auto reduce = [&](int64_t lo, int64_t hi) {
    if (hi > lo) ep_.all_reduce(comm::BufferRef(g + (lo - begin), hi - lo, DType::f32)).wait();
  };
  for (const model::UnitRange& e : space_.experts) {
    if (e.end <= at || e.begin >= end) continue;
    reduce(at, std::max(at, e.begin));
    at = std::min(end, std::max(at, e.end));
  }
  reduce(at, end);
}

void ZeroStore::accumulate(const Pending& p) {
  const size_t u = size_t(p.unit);
  float* acc = gshard_.data<float>() + packed_off_[u];
  const float* got = p.out.data<float>();
  for (int64_t i = 0; i < piece_len(u); ++i) acc[i] += got[i];
}

void ZeroStore::finish_micro_batch() {
  for (auto& p : pending_) {
    p.work.wait();
    accumulate(p);
  }
  pending_.clear();
}

void ZeroStore::zero_grads() { gshard_.fill_zero(); }

double ZeroStore::local_grad_sum_squares() const {
  // Under ep a spec is an expert's when it lies inside an expert range (ranges hold whole
  // tensors).
  auto expert = [&](const model::ParamSpec& s) {
    for (const model::UnitRange& e : space_.experts)
      if (s.offset >= e.begin && s.offset + s.numel <= e.end) return true;
    return false;
  };
  auto counts = [&](size_t i) {
    const auto& s = space_.specs[i];
    return space_.counted[i] && (!tp_.valid() || !s.replicated() || tp_.rank() == 0) &&
           (!ep_.valid() || ep_.rank() == 0 || expert(s));
  };
  bool all = true;
  for (size_t i = 0; i < space_.specs.size(); ++i)
    all = all && counts(i) && (!tp_.valid() || !space_.specs[i].replicated()) && !ep_.valid();
  if (all) return kernels::sum_squares(gshard_.data<float>(), shard_);
  // Shards are disjoint across tp; replicated tensors count on tp rank 0 only, and under ep the
  // dense ones (held by every ep rank) on ep rank 0 only.
  double ss = 0;
  for (size_t u = 0; u < space_.units.size(); ++u)
    for (size_t i = 0; i < space_.specs.size(); ++i) {
      const auto& s = space_.specs[i];
      const int64_t lo = std::max(s.offset, pieces_[u].begin);
      const int64_t hi = std::min(s.offset + s.numel, pieces_[u].end);
      if (lo < hi && counts(i))
        ss += kernels::sum_squares(gshard_.data<float>() + packed_off_[u] + (lo - pieces_[u].begin),
                                   hi - lo);
    }
  return ss;
}

double ZeroStore::grad_sum_squares() const {
  double ss = local_grad_sum_squares();
  dp_.all_reduce(comm::BufferRef(&ss, 1, DType::f64)).wait();
  if (ep_.valid()) ep_.all_reduce(comm::BufferRef(&ss, 1, DType::f64)).wait();
  if (tp_.valid()) tp_.all_reduce(comm::BufferRef(&ss, 1, DType::f64)).wait();
  return ss;
}

void ZeroStore::step(optim::AdamW& opt, float grad_scale) {
  if (stage_ == 3) {
    opt.step_compact(wshard_.data<float>(), gshard_.data<float>(), grad_scale);
    return;
  }
  // Stage 2: update this rank's pieces of the full weights, then all-gather every unit.
  Tensor packed = Tensor::empty({shard_}, DType::f32, pool_, MemCategory::workspace);
  float* w = wfull_.data<float>();
  for (size_t u = 0; u < space_.units.size(); ++u)
    std::memcpy(packed.data<float>() + packed_off_[u], w + pieces_[u].begin, size_t(piece_len(u)) * 4);
  opt.step_compact(packed.data<float>(), gshard_.data<float>(), grad_scale);
  for (size_t u = 0; u < space_.units.size(); ++u) {
    Tensor buf = Tensor::empty({n_[u] * dp_.size()}, DType::f32, pool_, MemCategory::workspace);
    gather_unit(u, packed.data<float>(), buf.data<float>());
    std::memcpy(w + space_.units[u].begin, buf.data<float>(),
                size_t(space_.units[u].end - space_.units[u].begin) * 4);
  }
  if (bf_) convert_f32_to_bf16(w, wfull_lp_.data<bf16>(), size_t(space_.total));
}

void ZeroStore::init(uint64_t seed) {
  if (stage_ == 2) {
    space_.init(wfull_.data<float>(), 0, space_.total, seed);
    if (bf_) convert_f32_to_bf16(wfull_.data<float>(), wfull_lp_.data<bf16>(), size_t(space_.total));
    return;
  }
  for (size_t u = 0; u < space_.units.size(); ++u)
    if (piece_len(u) > 0)
      space_.init(wshard_.data<float>() + packed_off_[u], pieces_[u].begin, pieces_[u].end, seed);
}

void ZeroStore::weights_loaded() {
  if (stage_ == 2 && bf_)
    convert_f32_to_bf16(wfull_.data<float>(), wfull_lp_.data<bf16>(), size_t(space_.total));
}

void ZeroStore::import_full(const float* full) {
  if (stage_ == 2) {
    std::memcpy(wfull_.data<float>(), full, size_t(space_.total) * 4);
    if (bf_) convert_f32_to_bf16(wfull_.data<float>(), wfull_lp_.data<bf16>(), size_t(space_.total));
    return;
  }
  for (size_t u = 0; u < space_.units.size(); ++u)
    std::memcpy(wshard_.data<float>() + packed_off_[u], full + pieces_[u].begin,
                size_t(piece_len(u)) * 4);
}

std::vector<float> ZeroStore::gather_packed(const float* packed) const {
  std::vector<float> full(size_t(space_.total));
  for (size_t u = 0; u < space_.units.size(); ++u) {
    std::vector<float> buf(static_cast<size_t>(n_[u] * dp_.size()));
    gather_unit(u, packed, buf.data());
    std::copy(buf.begin(), buf.begin() + (space_.units[u].end - space_.units[u].begin),
              full.begin() + space_.units[u].begin);
  }
  return full;
}

std::vector<float> ZeroStore::full_weights() const {
  if (stage_ == 2)
    return std::vector<float>(wfull_.data<float>(), wfull_.data<float>() + space_.total);
  return gather_packed(wshard_.data<float>());
}

}  // namespace loom::train
