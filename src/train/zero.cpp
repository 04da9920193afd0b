#include "train/zero.h"

#include <algorithm>
#include <cstring>

#include "checkpoint/checkpoint.h"
#include "core/error.h"
#include "kernels/cpu/grad_norm.h"

namespace loom::train {

ZeroStore::ZeroStore(int stage, const model::ModelConfig& cfg, model::Precision precision,
                     MemoryPool& pool, const comm::ProcessGroup& dp, const comm::ProcessGroup* tp)
    : stage_(stage),
      cfg_(cfg),
      layout_(cfg, tp && tp->size() > 1 ? model::TpShard{tp->rank(), tp->size()} : model::TpShard{}),
      bf_(precision == model::Precision::bf16),
      pool_(pool),
      dp_(dp) {
  if (tp && tp->size() > 1) tp_ = *tp;
  LOOM_CHECK(stage == 2 || stage == 3, "ZeroStore handles ZeRO stages 2 and 3, not {}", stage);
  units_ = model::param_units(cfg_, layout_);
  const int64_t P = dp_.size(), r = dp_.rank();
  for (const auto& u : units_) {
    const int64_t len = u.end - u.begin, n = (len + P - 1) / P;
    const int64_t lo = std::min(u.end, u.begin + r * n), hi = std::min(u.end, lo + n);
    n_.push_back(n);
    packed_off_.push_back(shard_);
    pieces_.push_back({lo, hi});
    shard_ += hi - lo;
  }
  live_.resize(units_.size());
  gshard_ = Tensor::zeros({shard_}, DType::f32, pool_, MemCategory::grads);
  if (stage_ == 2) {
    wfull_ = Tensor::empty({layout_.total()}, DType::f32, pool_, MemCategory::weights);
    if (bf_) wfull_lp_ = Tensor::empty({layout_.total()}, DType::bf16, pool_, MemCategory::weights);
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
  const auto& unit = units_[size_t(u)];
  if (stage_ == 2) return wfull_.data<float>() + unit.begin;
  Live& l = live_[size_t(u)];
  if (l.refs++ == 0) {
    l.w = Tensor::empty({n_[size_t(u)] * dp_.size()}, DType::f32, pool_, MemCategory::weights);
    gather_unit(size_t(u), wshard_.data<float>(), l.w.data<float>());
  }
  return l.w.data<float>();
}

const bf16* ZeroStore::weights_lp(int u) {
  const auto& unit = units_[size_t(u)];
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
    // Replicated tensors (norms, position tables, out/down biases) got partial gradients from
    // this rank's rows: sum them over tp before the dp reduction.
    const auto& unit = units_[size_t(u)];
    std::vector<float> buf;
    for (const auto& s : layout_.specs())
      if (s.replicated() && s.offset >= unit.begin && s.offset < unit.end)
        buf.insert(buf.end(), l.g.data<float>() + (s.offset - unit.begin),
                   l.g.data<float>() + (s.offset - unit.begin) + s.numel);
    if (!buf.empty()) {
      tp_.all_reduce(comm::BufferRef(buf.data(), int64_t(buf.size()), DType::f32)).wait();
      const float* q = buf.data();
      for (const auto& s : layout_.specs())
        if (s.replicated() && s.offset >= unit.begin && s.offset < unit.end) {
          std::copy(q, q + s.numel, l.g.data<float>() + (s.offset - unit.begin));
          q += s.numel;
        }
    }
  }
  Tensor out = Tensor::empty({n_[size_t(u)]}, DType::f32, pool_, MemCategory::grads);
  // The Work keeps the unit buffer alive until the reduce-scatter completes.
  pending_.push_back({dp_.reduce_scatter(comm::BufferRef(l.g), comm::BufferRef(out)), u, out});
  l.g = Tensor();
  // MPI progresses only inside MPI calls: poke the reductions in flight between layers, and
  // retire the finished ones so their unit buffers are freed during the backward. At most
  // kMaxInFlight stay pending (bounding gradient memory to the shard plus a few units); each
  // unit's piece has its own accumulator, so retiring out of order changes no sum.
  std::erase_if(pending_, [&](Pending& p) {
    if (!p.work.test()) return false;
    accumulate(p);
    return true;
  });
  while (int(pending_.size()) > kMaxInFlight) {
    pending_.front().work.wait();
    accumulate(pending_.front());
    pending_.erase(pending_.begin());
  }
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

double ZeroStore::grad_sum_squares() const {
  double ss = 0;
  if (!tp_.valid()) {
    ss = kernels::sum_squares(gshard_.data<float>(), shard_);
  } else {
    // Shards are disjoint across tp; replicated tensors count on tp rank 0 only.
    for (size_t u = 0; u < units_.size(); ++u)
      for (const auto& s : layout_.specs()) {
        const int64_t lo = std::max(s.offset, pieces_[u].begin);
        const int64_t hi = std::min(s.offset + s.numel, pieces_[u].end);
        if (lo < hi && (!s.replicated() || tp_.rank() == 0))
          ss += kernels::sum_squares(gshard_.data<float>() + packed_off_[u] + (lo - pieces_[u].begin),
                                     hi - lo);
      }
  }
  dp_.all_reduce(comm::BufferRef(&ss, 1, DType::f64)).wait();
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
  for (size_t u = 0; u < units_.size(); ++u)
    std::memcpy(packed.data<float>() + packed_off_[u], w + pieces_[u].begin, size_t(piece_len(u)) * 4);
  opt.step_compact(packed.data<float>(), gshard_.data<float>(), grad_scale);
  for (size_t u = 0; u < units_.size(); ++u) {
    Tensor buf = Tensor::empty({n_[u] * dp_.size()}, DType::f32, pool_, MemCategory::workspace);
    gather_unit(u, packed.data<float>(), buf.data<float>());
    std::memcpy(w + units_[u].begin, buf.data<float>(),
                size_t(units_[u].end - units_[u].begin) * 4);
  }
  if (bf_) convert_f32_to_bf16(w, wfull_lp_.data<bf16>(), size_t(layout_.total()));
}

void ZeroStore::init(uint64_t seed) {
  if (stage_ == 2) {
    model::init_params(layout_, cfg_, wfull_.data<float>(), seed);
    if (bf_) convert_f32_to_bf16(wfull_.data<float>(), wfull_lp_.data<bf16>(), size_t(layout_.total()));
    return;
  }
  for (size_t u = 0; u < units_.size(); ++u)
    model::init_params_range(layout_, cfg_, wshard_.data<float>() + packed_off_[u],
                             pieces_[u].begin, pieces_[u].end, seed);
}

void ZeroStore::load(const checkpoint::CheckpointReader& r) {
  if (stage_ == 2) {
    r.load_weights(layout_, wfull_.data<float>());
    if (bf_) convert_f32_to_bf16(wfull_.data<float>(), wfull_lp_.data<bf16>(), size_t(layout_.total()));
    return;
  }
  // Each rank reads only its pieces.
  for (size_t u = 0; u < units_.size(); ++u)
    if (piece_len(u) > 0)
      r.load_weights_packed(layout_, wshard_.data<float>() + packed_off_[u], pieces_[u].begin,
                            pieces_[u].end);
}

std::vector<float> ZeroStore::gather_packed(const float* packed) const {
  std::vector<float> full(size_t(layout_.total()));
  for (size_t u = 0; u < units_.size(); ++u) {
    std::vector<float> buf(static_cast<size_t>(n_[u] * dp_.size()));
    gather_unit(u, packed, buf.data());
    std::copy(buf.begin(), buf.begin() + (units_[u].end - units_[u].begin),
              full.begin() + units_[u].begin);
  }
  return full;
}

std::vector<float> ZeroStore::full_weights() const {
  if (stage_ == 2) return std::vector<float>(wfull_.data<float>(), wfull_.data<float>() + layout_.total());
  return gather_packed(wshard_.data<float>());
}

}  // namespace loom::train
