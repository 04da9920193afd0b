// attention/cp_layout.cpp: the three cp layouts as segment lists; everything else (positions,
// scatter, gather, targets) is written once over segments.
#include "attention/cp_layout.h"

#include <cstring>

#include "core/error.h"

namespace loom::attention {

std::string_view cp_layout_name(CpLayout l) {
  switch (l) {
    case CpLayout::contiguous: return "contiguous";
    case CpLayout::zigzag: return "zigzag";
    case CpLayout::striped: return "striped";
  }
  return "?";
}

CpLayout cp_layout_from_name(std::string_view name) {
  if (name == "contiguous") return CpLayout::contiguous;
  if (name == "zigzag") return CpLayout::zigzag;
  if (name == "striped") return CpLayout::striped;
  LOOM_CHECK(false, "unknown cp layout '{}'; choose contiguous, zigzag or striped", name);
  return CpLayout::zigzag;
}

void check_cp_layout(CpLayout l, int64_t T, int G) {
  LOOM_CHECK(G >= 1, "cp={} must be >= 1", G);
  LOOM_CHECK(T >= 1, "sequence length T={} must be >= 1", T);
  const int64_t div = l == CpLayout::zigzag ? 2 * int64_t(G) : int64_t(G);
  if (T % div == 0) return;
  const int64_t lo = T / div * div, hi = lo + div;
  if (l == CpLayout::zigzag)
    LOOM_CHECK(false,
               "cp={} with the zigzag layout cuts the sequence into 2*cp={} chunks, so T={} must be "
               "divisible by {}; use T={} or T={} (or a cp that divides T/2)",
               G, div, T, div, lo > 0 ? lo : hi, hi);
  LOOM_CHECK(false, "cp={} must divide the sequence length T={} ({} layout); use T={} or T={}", G,
             T, cp_layout_name(l), lo > 0 ? lo : hi, hi);
}

std::vector<CpSegment> cp_segments(CpLayout l, int64_t T, int G, int r) {
  check_cp_layout(l, T, G);
  LOOM_CHECK(r >= 0 && r < G, "cp rank {} out of range 0..{}", r, G - 1);
  const int64_t Tl = T / G;
  switch (l) {
    case CpLayout::contiguous: return {{0, Tl, r * Tl, 1}};
    case CpLayout::striped: return {{0, Tl, r, G}};
    case CpLayout::zigzag: {
      const int64_t c = T / (2 * int64_t(G));
      return {{0, c, r * c, 1}, {c, c, (2 * int64_t(G) - 1 - r) * c, 1}};
    }
  }
  LOOM_ASSERT(false, "bad CpLayout");
  return {};
}

int64_t cp_global_position(CpLayout l, int64_t T, int G, int r, int64_t i) {
  for (const CpSegment& s : cp_segments(l, T, G, r))
    if (i >= s.local_start && i < s.local_start + s.len)
      return s.pos_start + (i - s.local_start) * s.pos_stride;
  LOOM_CHECK(false, "local row {} out of range 0..{} (T={}, cp={})", i, T / G - 1, T, G);
  return -1;
}

std::vector<int64_t> cp_position_ids(CpLayout l, int64_t T, int G, int r) {
  std::vector<int64_t> pos(size_t(T / G));  // (Tl)
  for (const CpSegment& s : cp_segments(l, T, G, r))
    for (int64_t i = 0; i < s.len; ++i) pos[size_t(s.local_start + i)] = s.pos_start + i * s.pos_stride;
  return pos;
}

namespace {
// Copies rows between full (outer, T, inner) and local (outer, Tl, inner) in either direction.
void copy_rows(void* full, const void* full_src, void* local, const void* local_src,
               int64_t outer, int64_t inner, size_t es, CpLayout l, int64_t T, int G, int r) {
  LOOM_CHECK(outer >= 1 && inner >= 1, "cp rows: outer={} and inner={} must be >= 1", outer, inner);
  const int64_t Tl = T / G;
  const size_t row = size_t(inner) * es;
  const std::vector<int64_t> pos = cp_position_ids(l, T, G, r);
  for (int64_t o = 0; o < outer; ++o)
    for (int64_t i = 0; i < Tl; ++i) {
      const size_t fo = (size_t(o * T + pos[size_t(i)])) * row, lo = size_t(o * Tl + i) * row;
      if (full_src)
        std::memcpy(static_cast<char*>(local) + lo, static_cast<const char*>(full_src) + fo, row);
      else
        std::memcpy(static_cast<char*>(full) + fo, static_cast<const char*>(local_src) + lo, row);
    }
}
}  // namespace

void cp_scatter_rows(void* local, const void* full, int64_t outer, int64_t inner,
                     size_t elem_size, CpLayout l, int64_t T, int G, int r) {
  copy_rows(nullptr, full, local, nullptr, outer, inner, elem_size, l, T, G, r);
}

void cp_gather_rows(void* full, const void* local, int64_t outer, int64_t inner,
                    size_t elem_size, CpLayout l, int64_t T, int G, int r) {
  copy_rows(full, nullptr, nullptr, local, outer, inner, elem_size, l, T, G, r);
}

void cp_next_token_split(int32_t* inputs, int32_t* targets, const int32_t* tokens, int64_t B,
                         CpLayout l, int64_t T, int G, int r) {
  const std::vector<int64_t> pos = cp_position_ids(l, T, G, r);
  const int64_t Tl = T / G;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < Tl; ++i) {
      const int32_t* seq = tokens + b * (T + 1);  // (T+1)
      if (inputs) inputs[b * Tl + i] = seq[pos[size_t(i)]];
      if (targets) targets[b * Tl + i] = seq[pos[size_t(i)] + 1];
    }
}

}  // namespace loom::attention
