// model/geometry.cpp: see geometry.h.
//
// Glossary: L blocks, C d_model, V vocab, tp tensor-parallel size.
#include "model/geometry.h"

#include <algorithm>
#include <cstring>
#include <string>

#include "core/error.h"

namespace loom::model {

UnitRange zero1_share(int64_t n, int D, int r) {
  const int64_t share = (n + D - 1) / D, lo = std::min(n, share * r);
  return {lo, std::min(n, lo + share)};
}

int64_t zero_piece_stride(const UnitRange& unit, int D) {
  return (unit.end - unit.begin + D - 1) / D;
}

UnitRange zero_piece(const UnitRange& unit, int D, int r) {
  const int64_t n = zero_piece_stride(unit, D);
  const int64_t lo = std::min(unit.end, unit.begin + r * n);
  return {lo, std::min(unit.end, lo + n)};
}

StageSpan whole_model_span(const ModelConfig& cfg) {
  return StageSpan{0, cfg.n_layers, true, true};
}

std::vector<StageSpan> split_stages(const ModelConfig& cfg, int64_t n_stages,
                                    const std::vector<int64_t>& stage_layers) {
  const int64_t L = cfg.n_layers;
  LOOM_CHECK(n_stages >= 1 && n_stages <= L,
             "{} pipeline (virtual) stages for n_layers = {}: every stage needs at least one "
             "block, so use 1 to {} stages",
             n_stages, L, L);
  std::vector<int64_t> counts = stage_layers;
  if (counts.empty()) {
    if (L % n_stages != 0) {
      std::string valid;
      for (int64_t d = 1; d <= L; ++d)
        if (L % d == 0) valid += (valid.empty() ? "" : ", ") + std::to_string(d);
      LOOM_FAIL(
          "n_layers = {} does not split evenly into {} stages; use a stage count in {{{}}} "
          "or give stage_layers (e.g. {} entries summing to {})",
          L, n_stages, valid, n_stages, L);
    }
    counts.assign(size_t(n_stages), L / n_stages);
  }
  LOOM_CHECK(int64_t(counts.size()) == n_stages,
             "stage_layers has {} entries but there are {} (virtual) stages (pp * virtual "
             "stages); give exactly {} entries",
             counts.size(), n_stages, n_stages);
  int64_t sum = 0;
  for (size_t i = 0; i < counts.size(); ++i) {
    LOOM_CHECK(counts[i] >= 1, "stage_layers[{}] = {}: every stage needs at least one block", i,
               counts[i]);
    sum += counts[i];
  }
  LOOM_CHECK(sum == L, "stage_layers sum to {} but the model has n_layers = {}", sum, L);
  std::vector<StageSpan> spans;
  int64_t first = 0;
  for (size_t i = 0; i < counts.size(); ++i) {
    StageSpan s;
    s.first_layer = first;
    s.last_layer = first + counts[i];
    s.has_embedding = i == 0;
    s.has_head = i + 1 == counts.size();
    spans.push_back(s);
    first = s.last_layer;
  }
  return spans;
}

StageGeometry::StageGeometry(const ModelConfig& cfg, const StageSpan& span, TpShard tp,
                             EpShard ep)
    : StageGeometry(cfg, span, std::make_shared<const ParamLayout>(cfg, tp), ep) {}

StageGeometry::StageGeometry(const ModelConfig& cfg, const StageSpan& span,
                             std::shared_ptr<const ParamLayout> layout, EpShard ep)
    : cfg_(cfg), span_(span), global_(std::move(layout)), ep_(ep) {
  LOOM_CHECK(global_ != nullptr, "StageGeometry: no parameter layout given");
  const int64_t L = cfg_.n_layers;
  LOOM_CHECK(0 <= span.first_layer && span.first_layer <= span.last_layer && span.last_layer <= L,
             "stage span blocks [{}, {}) is outside the model's blocks [0, {})", span.first_layer,
             span.last_layer, L);
  LOOM_CHECK(!span.has_embedding || span.first_layer == 0,
             "the embedding stage must start at block 0, not {}", span.first_layer);
  LOOM_CHECK(!span.has_head || span.last_layer == L,
             "the head stage must end at block L = {}, not {}", L, span.last_layer);

  // Global ranges held, ascending. The layout orders embed.token, embed.position, blocks,
  // final norm, query layer, so each piece is one contiguous global range.
  std::vector<std::pair<int64_t, int64_t>> ranges;
  const int64_t tok_end = global_->token_embedding() + global_->specs()[0].numel;  // (V/tp, C)
  const int64_t blocks_begin = L > 0 ? global_->block(0).norm1_w : global_->final_norm_w();
  if (span.has_embedding)
    ranges.push_back({global_->token_embedding(), blocks_begin});  // token + position
  else if (span.has_head)
    ranges.push_back({global_->token_embedding(), tok_end});  // the tied head's copy
  if (span.first_layer < span.last_layer)
    ranges.push_back(
        {global_->block(span.first_layer).norm1_w, block_end(global_->block(span.last_layer - 1), cfg_)});
  if (span.has_head) ranges.push_back({global_->final_norm_w(), global_->total()});
  // Expert parallel: each sparse block's experts outside [e0, e0 + El) are holes in its range.
  const int64_t E = cfg_.moe.enabled() ? cfg_.moe.experts : 0;
  LOOM_CHECK(ep.size >= 1 && ep.rank >= 0 && ep.rank < ep.size,
             "ep rank {} of {} is not a valid expert-parallel coordinate", ep.rank, ep.size);
  int64_t e0 = 0, El = E;
  if (ep.size > 1) {
    LOOM_CHECK(E > 0 && E % ep.size == 0,
               "ep = {} must divide the {} experts of each sparse block of model '{}' (each ep "
               "rank holds experts / ep of them)",
               ep.size, E, cfg_.name);
    El = E / ep.size;
    e0 = El * ep.rank;
    for (int64_t l = span.first_layer; l < span.last_layer; ++l) {
      const BlockOffsets& o = global_->block(l);
      if (!o.sparse()) continue;
      const int64_t stride = o.moe_stride;
      const std::pair<int64_t, int64_t> holes[2] = {
          {o.moe_experts, o.moe_experts + e0 * stride},
          {o.moe_experts + (e0 + El) * stride, o.moe_experts + E * stride}};
      for (auto [hb, he] : holes) {
        if (hb >= he) continue;
        std::vector<std::pair<int64_t, int64_t>> cut;
        for (auto [b, e] : ranges) {
          if (he <= b || hb >= e) {
            cut.push_back({b, e});
            continue;
          }
          if (b < hb) cut.push_back({b, hb});
          if (he < e) cut.push_back({he, e});
        }
        ranges = std::move(cut);
      }
    }
  }
  for (auto [b, e] : ranges) {
    segments_.push_back({b, e, total_});
    total_ += e - b;
  }
  for (const ParamSpec& s : global_->specs()) {
    for (const Segment& g : segments_) {
      if (s.offset < g.global_begin || s.offset >= g.global_end) continue;
      StageParam p;
      p.global = s;
      p.local_offset = g.local_begin + (s.offset - g.global_begin);
      p.tied_copy = s.offset == global_->token_embedding() && !span.has_embedding;
      for (int64_t l = span.first_layer; l < span.last_layer && E > 0; ++l) {
        const BlockOffsets& o = global_->block(l);
        if (o.sparse() && s.offset >= o.moe_experts &&
            s.offset < o.moe_experts + E * o.moe_stride)
          p.expert = true;
      }
      params_.push_back(std::move(p));
    }
  }

  if (span.has_embedding || span.has_head) tok_ = local(global_->token_embedding());
  if (span.has_embedding) pos_ = local(global_->position_embedding());
  for (int64_t l = span.first_layer; l < span.last_layer; ++l) {
    BlockOffsets o = global_->block(l);
    if (o.sparse()) {
      o.moe_experts += e0 * o.moe_stride;  // the first expert held
      o.moe_expert0 = e0;
      o.moe_n_experts = El;
    }
    blocks_.push_back(map_offsets(o, [this](int64_t x) { return local(x); }));
    const BlockOffsets& b = blocks_.back();
    if (b.sparse())
      expert_ranges_.push_back({b.moe_experts, b.moe_experts + El * b.moe_stride});
  }
  if (span.has_head) {
    fnw_ = local(global_->final_norm_w());
    fnb_ = local(global_->final_norm_b());
    if (cfg_.query_layer) {
      qpos_ = local(global_->query_position());
      qblock_ = map_offsets(global_->query_block(), [this](int64_t x) { return local(x); });
    }
  }

  auto add_unit = [&](int64_t b, int64_t e) {
    units_.push_back({b, e});
    return int(units_.size()) - 1;
  };
  if (tok_ >= 0) u_tok_ = add_unit(tok_, tok_ + global_->specs()[0].numel);
  if (pos_ >= 0) u_pos_ = add_unit(pos_, pos_ + global_->find("embed.position.weight").numel);
  u_block0_ = int(units_.size());
  for (const BlockOffsets& o : blocks_) add_unit(o.norm1_w, block_end(o, cfg_));
  if (span.has_head) u_head_ = add_unit(fnw_, total_);
  for (size_t i = 0; i < units_.size(); ++i)
    LOOM_ASSERT(units_[i].begin == (i ? units_[i - 1].end : 0) && units_[i].end > units_[i].begin,
                "stage units do not tile its buffer");
  LOOM_ASSERT(units_.empty() ? total_ == 0 : units_.back().end == total_,
              "stage units do not tile its buffer");
}

std::vector<ParamSpec> StageGeometry::local_specs() const {
  std::vector<ParamSpec> out;
  for (const StageParam& p : params_) {
    out.push_back(p.global);
    out.back().offset = p.local_offset;
  }
  return out;
}

std::vector<std::pair<int64_t, int64_t>> StageGeometry::held_ranges() const {
  std::vector<std::pair<int64_t, int64_t>> r;
  for (const Segment& g : segments_) r.push_back({g.global_begin, g.global_end});
  return r;
}

int64_t StageGeometry::local(int64_t global_offset) const {
  for (const Segment& g : segments_)
    if (global_offset >= g.global_begin && global_offset < g.global_end)
      return g.local_begin + (global_offset - g.global_begin);
  LOOM_ASSERT(false, "global offset {} is not held by stage blocks [{}, {})", global_offset,
              span_.first_layer, span_.last_layer);
  return -1;
}

const StageParam& StageGeometry::find(const std::string& name) const {
  for (const StageParam& p : params_)
    if (p.global.name == name) return p;
  LOOM_FAIL("stage with blocks [{}, {}){}{} holds no parameter named '{}'", span_.first_layer,
            span_.last_layer, span_.has_embedding ? " + embedding" : "",
            span_.has_head ? " + head" : "", name);
}

void StageGeometry::init_range(float* dst, int64_t begin, int64_t end, uint64_t seed) const {
  for (const Segment& g : segments_) {
    const int64_t len = g.global_end - g.global_begin;
    const int64_t lo = std::max(begin, g.local_begin), hi = std::min(end, g.local_begin + len);
    if (lo < hi)
      init_params_range(*global_, cfg_, dst + (lo - begin), g.global_begin + (lo - g.local_begin),
                        g.global_begin + (hi - g.local_begin), seed);
  }
}

void StageGeometry::to_local(const float* global_buffer, float* local_buffer) const {
  for (const Segment& g : segments_)
    std::memcpy(local_buffer + g.local_begin, global_buffer + g.global_begin,
                size_t(g.global_end - g.global_begin) * sizeof(float));
}

void StageGeometry::to_global(const float* local_buffer, float* global_buffer,
                              bool include_tied_copy) const {
  for (const StageParam& p : params_) {
    if (p.tied_copy && !include_tied_copy) continue;
    std::memcpy(global_buffer + p.global.offset, local_buffer + p.local_offset,
                size_t(p.global.numel) * sizeof(float));
  }
}

std::vector<UnitRange> zero1_dense_ranges(const StageGeometry& geo, int D, int r) {
  const UnitRange share = zero1_share(geo.total(), D, r);
  std::vector<UnitRange> out;
  int64_t x = share.begin;
  for (const UnitRange& e : geo.expert_ranges()) {
    if (geo.ep().size <= 1) break;
    if (e.end <= x || e.begin >= share.end) continue;
    if (e.begin > x) out.push_back({x, e.begin});
    x = std::min(share.end, e.end);
  }
  if (x < share.end) out.push_back({x, share.end});
  return out;
}

EcssSplit ecss_split(const StageGeometry& geo, const std::vector<UnitRange>& owned) {
  EcssSplit out;
  // Every held expert's tensors, ascending: expert e of block i at moe_expert_offset(o, e).
  std::vector<EcssSplit::Piece> experts;
  for (size_t i = 0; i < geo.blocks().size(); ++i) {
    const BlockOffsets& o = geo.blocks()[i];
    if (!o.sparse()) continue;
    for (int64_t e = o.moe_expert0; e < o.moe_expert0 + o.moe_n_experts; ++e) {
      const int64_t b = moe_expert_offset(o, e);
      experts.push_back({geo.span().first_layer + int64_t(i), e, b, b + o.moe_stride});
    }
  }
  for (const UnitRange& r : owned) {
    int64_t x = r.begin;
    for (const EcssSplit::Piece& p : experts) {
      if (p.end <= x || p.begin >= r.end) continue;
      if (p.begin > x) out.dense.push_back({x, p.begin});
      const int64_t lo = std::max(x, p.begin), hi = std::min(r.end, p.end);
      out.experts.push_back({p.layer, p.expert, lo, hi});
      x = hi;
    }
    if (x < r.end) out.dense.push_back({x, r.end});
  }
  return out;
}

std::vector<UnitRange> ecss_master_holes(const StageGeometry& geo) {
  std::vector<UnitRange> out;
  for (const StageParam& p : geo.params())
    if (p.expert && p.global.shape.size() == 2)
      out.push_back({p.local_offset, p.local_offset + p.global.numel});
  std::sort(out.begin(), out.end(),
            [](const UnitRange& a, const UnitRange& b) { return a.begin < b.begin; });
  return out;
}

std::vector<UnitRange> zero1_expert_pieces(const StageGeometry& geo, int S, int q) {
  std::vector<UnitRange> shares;
  if (geo.ep().size > 1) {
    for (const UnitRange& e : geo.expert_ranges()) {
      const UnitRange s = zero1_share(e.end - e.begin, S, q);
      if (s.end > s.begin) shares.push_back({e.begin + s.begin, e.begin + s.end});
    }
  } else {
    shares.push_back(zero1_share(geo.total(), S, q));
  }
  std::vector<UnitRange> out;
  for (const EcssSplit::Piece& p : ecss_split(geo, shares).experts)
    if (p.end > p.begin) out.push_back({p.begin, p.end});
  return out;
}

HoleyLayout::HoleyLayout(int64_t total, std::vector<UnitRange> holes)
    : total_(total), holes_(std::move(holes)) {
  int64_t x = 0;
  for (const UnitRange& h : holes_) {
    LOOM_ASSERT(h.begin >= x && h.end >= h.begin && h.end <= total_,
                "hole [{}, {}) out of order or outside [0, {})", h.begin, h.end, total_);
    if (h.begin > x) kept_.push_back({x, h.begin, size_});
    size_ += h.begin - x;
    x = h.end;
  }
  if (x < total_) kept_.push_back({x, total_, size_});
  size_ += total_ - x;
}

int64_t HoleyLayout::at(int64_t x) const {
  auto it = std::upper_bound(kept_.begin(), kept_.end(), x,
                             [](int64_t v, const Kept& k) { return v < k.begin; });
  LOOM_ASSERT(it != kept_.begin() && x < std::prev(it)->end,
              "element {} lies in a hole of the buffer (ECSS keeps it in the host store)", x);
  return std::prev(it)->packed + (x - std::prev(it)->begin);
}

bool HoleyLayout::in_hole(int64_t x) const {
  auto it = std::upper_bound(kept_.begin(), kept_.end(), x,
                             [](int64_t v, const Kept& k) { return v < k.begin; });
  return it == kept_.begin() || x >= std::prev(it)->end;
}

std::vector<UnitRange> zero1_ranges(const StageGeometry& geo, int D, int r, int De, int re) {
  if (geo.ep().size <= 1) return {zero1_share(geo.total(), D, r)};
  std::vector<UnitRange> out = zero1_dense_ranges(geo, D, r);
  for (const UnitRange& e : geo.expert_ranges()) {
    const UnitRange s = zero1_share(e.end - e.begin, De, re);
    if (s.end > s.begin) out.push_back({e.begin + s.begin, e.begin + s.end});
  }
  std::sort(out.begin(), out.end(),
            [](const UnitRange& a, const UnitRange& b) { return a.begin < b.begin; });
  // Merge touching ranges (a dense share may end where this rank's expert share begins).
  std::vector<UnitRange> merged;
  for (const UnitRange& u : out) {
    if (!merged.empty() && merged.back().end == u.begin)
      merged.back().end = u.end;
    else
      merged.push_back(u);
  }
  return merged;
}

}  // namespace loom::model
