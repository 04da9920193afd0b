// checkpoint/pieces.h: internal to checkpoint/ (not a public header): the geometry of pieces
// (which flat elements of a logical tensor a PieceSpec holds, and where two pieces overlap),
// their validation, and small file helpers shared by the sharded writer and reader.
//
// A tensor is seen as rows x cols: rows = dimension 0, cols = the product of the others (a 0-D
// tensor is 1 x 1). Row slices (shard_dim 0) and whole tensors are contiguous in the flattened
// tensor; column slices (shard_dim 1, 2-D only) are one segment per row.
#pragma once

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <functional>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "checkpoint/sharded.h"
#include "core/error.h"

namespace loom::checkpoint::detail {

inline constexpr const char* kFormat = "loom-sharded-1";
// Shards carry a SHA-256 per block of this many bytes (in shard-*.blocks.json), so that a reader
// verifies what it reads without hashing whole shards it needs only a part of.
inline constexpr uint64_t kBlockBytes = uint64_t(1) << 20;

// The dtypes a checkpoint tensor may be stored in (sharded.h).
inline bool is_stored_dtype(DType t) {
  return t == DType::f32 || t == DType::bf16 || t == DType::f16 || t == DType::i8;
}

inline std::string blocks_name(const std::string& shard) {
  const std::string ext = ".safetensors";
  std::string base = shard.size() > ext.size() && shard.ends_with(ext)
                         ? shard.substr(0, shard.size() - ext.size())
                         : shard;
  return base + ".blocks.json";
}

inline void pread_exact(int fd, void* dst, size_t n, uint64_t offset, const std::string& path) {
  char* p = static_cast<char*>(dst);
  while (n > 0) {
    ssize_t r = ::pread(fd, p, n, off_t(offset));
    if (r < 0 && errno == EINTR) continue;
    LOOM_CHECK(r > 0, "reading '{}' at byte {} failed: {}", path, offset,
               r == 0 ? "unexpected end of file (truncated?)" : std::strerror(errno));
    p += r;
    n -= size_t(r);
    offset += uint64_t(r);
  }
}

inline std::string shape_text(const std::vector<int64_t>& s) {
  std::string t = "[";
  for (size_t i = 0; i < s.size(); ++i) t += (i ? ", " : "") + std::to_string(s[i]);
  return t + "]";
}

inline int64_t numel_of(const std::vector<int64_t>& s) {
  int64_t n = 1;
  for (int64_t d : s) n *= d;
  return n;
}

// A tensor seen as rows x cols: rows = dimension 0, cols = the product of the others (a 0-D
// tensor is 1 x 1). Row slices (shard_dim 0) are contiguous in the flattened tensor; column
// slices (shard_dim 1, 2-D only) are one segment per row.
struct Grid {
  int64_t rows = 1, cols = 1;
  explicit Grid(const std::vector<int64_t>& shape) {
    if (!shape.empty()) {
      rows = shape[0];
      cols = rows == 0 ? 0 : numel_of(shape) / rows;
    }
  }
};

// Flat offset of the slice's local element 0 when the slice is contiguous (shard_dim -1 or 0).
inline int64_t contiguous_base(const PieceSpec& p, const Grid& g) {
  return p.shard_dim == 0 ? p.shard_start * g.cols : 0;
}

// Rows [first, last) that elements [lo, hi) of the slice touch.
inline std::pair<int64_t, int64_t> rows_touched(const PieceSpec& p, const Grid& g) {
  if (p.shard_dim == 1) return {p.lo / p.shard_len, (p.hi - 1) / p.shard_len + 1};
  const int64_t b = contiguous_base(p, g);
  return {(b + p.lo) / g.cols, (b + p.hi - 1) / g.cols + 1};
}

// The columns [c0, c1) of row r that elements [lo, hi) of the slice hold, and the local index
// of (r, c0). False if none.
inline bool row_segment(const PieceSpec& p, const Grid& g, int64_t r, int64_t& c0, int64_t& c1,
                 int64_t& local0) {
  if (p.shard_dim == 1) {
    const int64_t w = p.shard_len;
    const int64_t a = std::max(r * w, p.lo), b = std::min(r * w + w, p.hi);
    if (a >= b) return false;
    c0 = p.shard_start + (a - r * w);
    c1 = c0 + (b - a);
    local0 = a;
    return true;
  }
  const int64_t base = contiguous_base(p, g);
  const int64_t a = std::max(r * g.cols, base + p.lo), b = std::min(r * g.cols + g.cols, base + p.hi);
  if (a >= b) return false;
  c0 = a - r * g.cols;
  c1 = b - r * g.cols;
  local0 = a - base;
  return true;
}

// Calls f(a_local, b_local, len) for every run of elements that both a's elements [lo, hi) and
// b's hold: a_local, b_local are indices into the two slices. Both describe the same tensor.
template <class F>
void for_each_overlap(const PieceSpec& a, const PieceSpec& b, const Grid& g, F&& f) {
  if (a.lo >= a.hi || b.lo >= b.hi) return;
  if (a.shard_dim != 1 && b.shard_dim != 1) {  // both contiguous: one interval each
    const int64_t ab = contiguous_base(a, g), bb = contiguous_base(b, g);
    const int64_t x = std::max(ab + a.lo, bb + b.lo), y = std::min(ab + a.hi, bb + b.hi);
    if (x < y) f(x - ab, x - bb, y - x);
    return;
  }
  auto [ar0, ar1] = rows_touched(a, g);
  auto [br0, br1] = rows_touched(b, g);
  for (int64_t r = std::max(ar0, br0); r < std::min(ar1, br1); ++r) {
    int64_t ac0, ac1, al, bc0, bc1, bl;
    if (!row_segment(a, g, r, ac0, ac1, al) || !row_segment(b, g, r, bc0, bc1, bl)) continue;
    const int64_t c0 = std::max(ac0, bc0), c1 = std::min(ac1, bc1);
    if (c0 < c1) f(al + (c0 - ac0), bl + (c0 - bc0), c1 - c0);
  }
}

// Throws naming the tensor if the spec is not a slice of its tensor.
inline void check_piece(const std::string& where, const std::string& kind, const PieceSpec& p) {
  const std::string what = fmt::format("{}: {} tensor '{}' (shape {})", where, kind, p.name,
                                        shape_text(p.global_shape));
  LOOM_CHECK(!p.name.empty(), "{}: a piece has an empty tensor name", where);
  int64_t n_total = 1;
  for (int64_t d : p.global_shape) {
    LOOM_CHECK(d >= 0 && d <= (int64_t(1) << 40), "{} has dimension {} outside [0, 2^40]", what,
               d);
    LOOM_CHECK(d == 0 || n_total <= (int64_t(1) << 50) / d,
               "{} has more than 2^50 elements", what);
    n_total *= d;
  }
  LOOM_CHECK(p.shard_dim >= -1 && p.shard_dim <= 1,
             "{}: shard_dim = {} must be -1 (whole), 0 (rows) or 1 (columns)", what, p.shard_dim);
  if (p.shard_dim == 0)
    LOOM_CHECK(!p.global_shape.empty() && p.shard_start >= 0 && p.shard_len >= 0 &&
                   p.shard_start + p.shard_len <= p.global_shape[0],
               "{}: rows [{}, {}) are not inside its {} rows", what, p.shard_start,
               p.shard_start + p.shard_len, p.global_shape.empty() ? 0 : p.global_shape[0]);
  if (p.shard_dim == 1)
    LOOM_CHECK(p.global_shape.size() == 2 && p.shard_start >= 0 && p.shard_len >= 0 &&
                   p.shard_start + p.shard_len <= p.global_shape[1],
               "{}: columns [{}, {}) are not a column slice of a 2-D tensor", what,
               p.shard_start, p.shard_start + p.shard_len);
  const int64_t n = slice_numel(p);
  LOOM_CHECK(p.lo >= 0 && p.lo <= p.hi && p.hi <= n,
             "{}: element range [{}, {}) is not inside its slice of {} elements", what, p.lo,
             p.hi, n);
}

// Every element of a tensor of `numel` elements in exactly one of the pieces: throws naming the
// tensor, the elements (flat indices) and the owners ("rank 3", ...) otherwise.
inline void check_coverage(const std::string& kind, const std::string& name,
                    const std::vector<int64_t>& shape, const std::vector<PieceSpec>& pieces,
                    const std::function<std::string(size_t)>& owner, const std::string& fix) {
  const Grid g(shape);
  struct Interval {
    int64_t a, b;
    size_t owner;
  };
  std::vector<Interval> iv;
  for (size_t i = 0; i < pieces.size(); ++i) {
    const PieceSpec& p = pieces[i];
    if (p.lo >= p.hi) continue;
    if (p.shard_dim != 1) {
      const int64_t b = contiguous_base(p, g);
      iv.push_back({b + p.lo, b + p.hi, i});
      continue;
    }
    auto [r0, r1] = rows_touched(p, g);
    for (int64_t r = r0; r < r1; ++r) {
      int64_t c0, c1, l;
      if (row_segment(p, g, r, c0, c1, l)) iv.push_back({r * g.cols + c0, r * g.cols + c1, i});
    }
  }
  std::sort(iv.begin(), iv.end(), [](const Interval& x, const Interval& y) { return x.a < y.a; });
  const int64_t n = numel_of(shape);
  int64_t cursor = 0;
  size_t last = 0;
  for (const Interval& v : iv) {
    LOOM_CHECK(v.a >= cursor,
               "{} tensor '{}' (shape {}): elements [{}, {}) of the flattened tensor are saved "
               "twice, by {} and by {}; {}", kind, name, shape_text(shape), v.a,
               std::min(v.b, cursor), owner(last), owner(v.owner), fix);
    LOOM_CHECK(v.a == cursor,
               "{} tensor '{}' (shape {}): elements [{}, {}) of the flattened tensor are saved "
               "by no piece (a gap); {}", kind, name, shape_text(shape), cursor, v.a, fix);
    cursor = v.b;
    last = v.owner;
  }
  LOOM_CHECK(cursor == n,
             "{} tensor '{}' (shape {}): elements [{}, {}) of the flattened tensor are saved by "
             "no piece (a gap); {}", kind, name, shape_text(shape), cursor, n, fix);
}

inline std::string read_text(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  LOOM_CHECK(f.good(), "cannot open '{}'", path);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

}  // namespace loom::checkpoint::detail
