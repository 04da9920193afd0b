// tests/unit/checkpoint/ck_helpers.h: logical test tensors, layouts that cut them into pieces,
// and a naive reference for what a slice holds (shared by the unit and the dist tests).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <string>
#include <unistd.h>
#include <vector>

#include "checkpoint/sharded.h"

namespace loom::checkpoint::test {

namespace fs = std::filesystem;

inline fs::path temp_dir(const std::string& name) {
  fs::path p = fs::temp_directory_path() /
               ("loom_ck_" + name + "_" + std::to_string(::getpid()));
  fs::remove_all(p);
  fs::create_directories(p);
  return p;
}

struct TestTensor {
  std::string name;
  std::vector<int64_t> shape;
};

// Odd shapes on purpose (conventions: 5, 7, 13): a matrix, a tall matrix, a vector, a 3-D
// tensor (row-sliced along dimension 0) and a scalar-like (1).
inline std::vector<TestTensor> test_tensors() {
  return {{"wte", {13, 6}}, {"h.0.attn.w", {6, 10}}, {"h.0.attn.b", {7}},
          {"h.0.ffn.w", {5, 8}}, {"cube", {4, 3, 5}}, {"scale", {1}}};
}

inline int64_t numel(const std::vector<int64_t>& s) {
  int64_t n = 1;
  for (int64_t d : s) n *= d;
  return n;
}

// The logical values: distinct bit patterns per (version, kind, tensor, element).
inline std::vector<float> logical_values(int version, const std::string& kind,
                                         const TestTensor& t) {
  std::vector<float> v(size_t(numel(t.shape)));
  uint32_t h = 2166136261u ^ uint32_t(version * 7919);
  for (char c : kind + "/" + t.name) h = (h ^ uint8_t(c)) * 16777619u;
  for (size_t i = 0; i < v.size(); ++i)
    v[i] = float(int32_t((h + uint32_t(i) * 2654435761u) >> 8)) * 1e-6f;
  return v;
}

// Naive reference: elements [lo, hi) of the local slice p, by explicit row/column arithmetic.
inline std::vector<float> reference_slice(const PieceSpec& p, const std::vector<float>& g) {
  const int64_t rows = p.global_shape.empty() ? 1 : p.global_shape[0];
  const int64_t cols = rows == 0 ? 0 : numel(p.global_shape) / rows;
  std::vector<float> out;
  for (int64_t i = p.lo; i < p.hi; ++i) {
    int64_t flat = i;
    if (p.shard_dim == 0) flat = p.shard_start * cols + i;
    if (p.shard_dim == 1) flat = (i / p.shard_len) * cols + p.shard_start + i % p.shard_len;
    out.push_back(g[size_t(flat)]);
  }
  return out;
}

// Balanced split of n into k parts: part j is [start(j), start(j+1)).
inline int64_t part_start(int64_t n, int64_t k, int64_t j) { return n * j / k; }

// Layouts: "whole"; "rows:T:Z" (T row slices, each cut into Z element ranges, i.e. tp=T with
// ZeRO over Z); "cols:T:Z" (column slices of 2-D tensors, rows for others); "flat:Z" (the whole
// tensor cut into Z uneven element ranges).
inline std::vector<PieceSpec> layout_pieces(const std::string& layout, const TestTensor& t) {
  std::vector<PieceSpec> out;
  PieceSpec base;
  base.name = t.name;
  base.global_shape = t.shape;
  auto cut = [&](PieceSpec s, int64_t z) {
    const int64_t n = slice_numel(s);
    for (int64_t j = 0; j < z; ++j) {
      s.lo = part_start(n, z, j);
      s.hi = part_start(n, z, j + 1);
      out.push_back(s);
    }
  };
  if (layout == "whole") {
    base.hi = numel(t.shape);
    out.push_back(base);
  } else if (layout.rfind("flat:", 0) == 0) {
    const int64_t z = std::stoll(layout.substr(5)), n = numel(t.shape);
    // Uneven on purpose: boundaries at j^2 / z^2 of n.
    for (int64_t j = 0; j < z; ++j) {
      PieceSpec s = base;
      s.lo = n * j * j / (z * z);
      s.hi = n * (j + 1) * (j + 1) / (z * z);
      out.push_back(s);
    }
  } else {
    const bool cols = layout.rfind("cols:", 0) == 0;
    const auto c1 = layout.find(':', 5);
    const int64_t tp = std::stoll(layout.substr(5, c1 - 5)), z = std::stoll(layout.substr(c1 + 1));
    const int dim = cols && t.shape.size() == 2 ? 1 : 0;
    const int64_t extent = t.shape[size_t(dim)];
    for (int64_t r = 0; r < tp; ++r) {
      PieceSpec s = base;
      s.shard_dim = dim;
      s.shard_start = part_start(extent, tp, r);
      s.shard_len = part_start(extent, tp, r + 1) - s.shard_start;
      cut(s, z);
    }
  }
  return out;
}

inline bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

}  // namespace loom::checkpoint::test
