// tests/dist/comm/test_collectives.cpp: rank-valued closed forms for every collective, on the
// world and on sub-groups (two halves, rows and columns of a 2-D grid), for each dtype and for
// both algorithms (mpi, ring); counters; determinism; timeouts.
//
// Values are small integers, exact in every dtype (bf16 holds integers up to 256 exactly, u8 up
// to 255), so every closed form is checked with ==, except the random-data comparisons of ring
// against MPI, whose tolerance is derived below.
#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <cstring>
#include <numeric>
#include <thread>
#include <vector>

#include "comm/process_group.h"
#include "core/memory_pool.h"
#include "core/tensor.h"

namespace loom::comm {
namespace {

MemoryPool& pool() {
  static MemoryPool p;  // test-only: one pool for test buffers
  return p;
}

// Tests fail in seconds rather than the 300 s default if something hangs.
constexpr double kTestTimeout = 30.0;

ProcessGroup world() {
  static ProcessGroup w = [] {
    GroupOptions o;
    o.timeout_s = kTestTimeout;
    return ProcessGroup::world(o);
  }();
  return w;
}

Tensor make(int64_t n, DType t) { return Tensor::zeros({n}, t, pool(), MemCategory::comm); }

void set(const Tensor& x, int64_t i, double v) {
  switch (x.dtype()) {
    case DType::f32: x.data<float>()[i] = float(v); break;
    case DType::bf16: x.data<bf16>()[i] = f32_to_bf16(float(v)); break;
    case DType::i32: x.data<int32_t>()[i] = int32_t(v); break;
    case DType::i64: x.data<int64_t>()[i] = int64_t(v); break;
    case DType::u8: x.data<uint8_t>()[i] = uint8_t(v); break;
    case DType::i8: x.data<int8_t>()[i] = int8_t(v); break;
    case DType::f64: x.data<double>()[i] = v; break;
    case DType::f16: x.data<uint16_t>()[i] = f32_to_f16(float(v)); break;
  }
}

double get(const Tensor& x, int64_t i) {
  switch (x.dtype()) {
    case DType::f32: return x.data<float>()[i];
    case DType::bf16: return bf16_to_f32(x.data<bf16>()[i]);
    case DType::i32: return x.data<int32_t>()[i];
    case DType::i64: return double(x.data<int64_t>()[i]);
    case DType::u8: return x.data<uint8_t>()[i];
    case DType::i8: return x.data<int8_t>()[i];
    case DType::f64: return x.data<double>()[i];
    case DType::f16: return f16_to_f32(x.data<uint16_t>()[i]);
  }
  return 0;
}

const DType kDTypes[] = {DType::f32, DType::bf16, DType::i32, DType::i64, DType::u8};
const Algorithm kAlgos[] = {Algorithm::mpi, Algorithm::ring};

// Group handle with a given algorithm (a copy of the handle shares state, so restore after).
struct AlgoScope {
  ProcessGroup g;
  Algorithm saved;
  AlgoScope(const ProcessGroup& grp, Algorithm a) : g(grp), saved(grp.algorithm()) {
    g.set_algorithm(a);
  }
  ~AlgoScope() { g.set_algorithm(saved); }
};

std::string ctx(const ProcessGroup& g, DType t, Algorithm a, int64_t n) {
  return fmt::format("{} dtype={} algo={} n={}", g.prefix(), dtype_name(t), algorithm_name(a), n);
}

// Every collective's closed form on group g. n is the per-rank block / buffer length.
void check_group(const ProcessGroup& g, DType t, Algorithm a, int64_t n) {
  AlgoScope scope(g, a);
  const int w = g.size(), r = g.rank();
  SCOPED_TRACE(ctx(g, t, a, n));

  // all_reduce sum: element i holds r + i%3 -> w(w-1)/2 + w*(i%3).
  {
    Tensor x = make(n, t);
    for (int64_t i = 0; i < n; ++i) set(x, i, r + i % 3);
    g.all_reduce(x).wait();
    for (int64_t i = 0; i < n; ++i) ASSERT_EQ(get(x, i), w * (w - 1) / 2 + w * (i % 3)) << i;
  }
  // all_reduce max: element i holds (r + i) % w -> w-1 everywhere (some rank holds w-1).
  {
    Tensor x = make(n, t);
    for (int64_t i = 0; i < n; ++i) set(x, i, (r + i) % w);
    g.all_reduce(x, ReduceOp::max).wait();
    for (int64_t i = 0; i < n; ++i) ASSERT_EQ(get(x, i), w - 1) << i;
  }
  // all_gather: slot j holds j*10 + i%10.
  {
    Tensor in = make(n, t), out = make(w * n, t);
    for (int64_t i = 0; i < n; ++i) set(in, i, r * 10 + i % 10);
    g.all_gather(in, out).wait();
    for (int j = 0; j < w; ++j)
      for (int64_t i = 0; i < n; ++i) ASSERT_EQ(get(out, j * n + i), j * 10 + i % 10) << j << "," << i;
    // In place: the input is this rank's slot of the output.
    Tensor out2 = make(w * n, t);
    for (int64_t i = 0; i < n; ++i) set(out2, r * n + i, r * 10 + i % 10);
    g.all_gather(out2.view(r * n, {n}), out2).wait();
    for (int j = 0; j < w; ++j)
      for (int64_t i = 0; i < n; ++i) ASSERT_EQ(get(out2, j * n + i), j * 10 + i % 10);
  }
  // reduce_scatter: input block j element i holds r + j + i%4 -> w(w-1)/2 + w*(me + i%4).
  {
    Tensor in = make(w * n, t), out = make(n, t);
    for (int j = 0; j < w; ++j)
      for (int64_t i = 0; i < n; ++i) set(in, j * n + i, r + j + i % 4);
    g.reduce_scatter(in, out).wait();
    for (int64_t i = 0; i < n; ++i) ASSERT_EQ(get(out, i), w * (w - 1) / 2 + w * (r + i % 4)) << i;
    // The input is left untouched.
    for (int j = 0; j < w; ++j) ASSERT_EQ(get(in, j * n + n - 1), r + j + (n - 1) % 4);
  }
  // all_to_all: input block j holds r*10 + j -> output block j holds j*10 + r.
  {
    Tensor in = make(w * n, t), out = make(w * n, t);
    for (int j = 0; j < w; ++j)
      for (int64_t i = 0; i < n; ++i) set(in, j * n + i, r * 10 + j);
    g.all_to_all(in, out).wait();
    for (int j = 0; j < w; ++j)
      for (int64_t i = 0; i < n; ++i) ASSERT_EQ(get(out, j * n + i), j * 10 + r);
  }
  // all_to_all_v: rank r sends r+j+1 elements of value r*10+j to rank j.
  {
    std::vector<int64_t> sc(static_cast<size_t>(w)), rc(static_cast<size_t>(w));
    for (int j = 0; j < w; ++j) sc[size_t(j)] = rc[size_t(j)] = r + j + 1;
    int64_t ns = std::accumulate(sc.begin(), sc.end(), int64_t(0));
    Tensor in = make(ns, t), out = make(ns, t);
    int64_t k = 0;
    for (int j = 0; j < w; ++j)
      for (int64_t i = 0; i < sc[size_t(j)]; ++i) set(in, k++, r * 10 + j);
    g.all_to_all_v(in, sc, out, rc).wait();
    k = 0;
    for (int j = 0; j < w; ++j)
      for (int64_t i = 0; i < rc[size_t(j)]; ++i) ASSERT_EQ(get(out, k++), j * 10 + r);
  }
  // broadcast from every root.
  for (int root = 0; root < w; ++root) {
    Tensor x = make(n, t);
    for (int64_t i = 0; i < n; ++i) set(x, i, r == root ? root * 10 + i % 5 : 99);
    g.broadcast(x, root).wait();
    for (int64_t i = 0; i < n; ++i) ASSERT_EQ(get(x, i), root * 10 + i % 5) << "root " << root;
  }
  // send/recv ring: non-blocking receive from r-1, blocking send to r+1.
  if (w > 1) {
    Tensor in = make(n, t), out = make(n, t);
    for (int64_t i = 0; i < n; ++i) set(in, i, r * 10 + i % 7);
    Work rw = g.irecv(out, (r + w - 1) % w, /*tag=*/5);
    g.send(in, (r + 1) % w, 5);
    rw.wait();
    int prev = (r + w - 1) % w;
    for (int64_t i = 0; i < n; ++i) ASSERT_EQ(get(out, i), prev * 10 + i % 7);
  }
  g.barrier().wait();
}

// Sub-groups of the world: {halves, rows, columns} of this rank, each a valid group.
struct SubGroups {
  ProcessGroup half, row, col;
  int rows = 1, cols = 1;
};

SubGroups make_subgroups() {
  ProcessGroup wg = world();
  int w = wg.size();
  SubGroups s;
  std::vector<std::vector<int>> halves(2);
  for (int i = 0; i < w; ++i) halves[i < (w + 1) / 2 ? 0 : 1].push_back(i);
  if (halves[1].empty()) halves.pop_back();
  s.half = wg.split(halves, "half");
  // Grid rows x cols, row-major: rows = smallest divisor > 1 of w (w=8: 2x4, w=3: 3x1).
  s.rows = w;
  for (int d = 2; d <= w; ++d)
    if (w % d == 0) {
      s.rows = d;
      break;
    }
  s.cols = w / s.rows;
  std::vector<std::vector<int>> rows(size_t(s.rows)), cols(size_t(s.cols));
  for (int i = 0; i < w; ++i) {
    rows[size_t(i / s.cols)].push_back(i);
    cols[size_t(i % s.cols)].push_back(i);
  }
  s.row = wg.split(rows, "row");
  s.col = wg.split(cols, "col");
  return s;
}

TEST(Collectives, ClosedFormsWorld) {
  for (DType t : kDTypes)
    for (Algorithm a : kAlgos)
      for (int64_t n : {int64_t(1), int64_t(13), int64_t(300)}) check_group(world(), t, a, n);
}

TEST(Collectives, ClosedFormsSubGroups) {
  SubGroups s = make_subgroups();
  int w = world().size(), wr = world().rank();
  // Membership is what the partition says.
  ASSERT_TRUE(s.half.valid() && s.row.valid() && s.col.valid());
  EXPECT_EQ(s.row.world_ranks()[size_t(s.row.rank())], wr);
  EXPECT_EQ(s.row.size(), s.cols);
  EXPECT_EQ(s.col.size(), s.rows);
  EXPECT_EQ(s.row.rank(), wr % s.cols);
  EXPECT_EQ(s.col.rank(), wr / s.cols);
  EXPECT_EQ(s.half.size(), wr < (w + 1) / 2 ? (w + 1) / 2 : w / 2);
  EXPECT_EQ(s.row.name(), "row");
  for (DType t : {DType::f32, DType::bf16, DType::i64})
    for (Algorithm a : kAlgos)
      for (const ProcessGroup* g : {&s.half, &s.row, &s.col}) check_group(*g, t, a, 7);
}

TEST(Collectives, UnevenAndEmptyRingChunks) {
  // N smaller than, equal to, and not a multiple of w: some ring chunks are empty or uneven.
  ProcessGroup g = world();
  AlgoScope scope(g, Algorithm::ring);
  int w = g.size(), r = g.rank();
  for (int64_t n : {int64_t(0), int64_t(1), int64_t(w - 1), int64_t(w + 1), int64_t(5 * w + 3)}) {
    Tensor x = make(n, DType::f32);
    for (int64_t i = 0; i < n; ++i) set(x, i, r * 2 + i);
    g.all_reduce(x).wait();
    for (int64_t i = 0; i < n; ++i) ASSERT_EQ(get(x, i), w * (w - 1) + w * i) << "n=" << n;
  }
}

TEST(Collectives, AllGatherInPlaceUnevenPieces) {
  // Rank j's piece [off[j], off[j+1]) of one buffer reaches every rank; pieces of different
  // lengths, an empty piece (rank 1) and untouched elements before the first and after the last
  // piece, under both algorithms and on sub-groups.
  SubGroups s = make_subgroups();
  ProcessGroup wg = world();
  for (Algorithm a : kAlgos)
    for (const ProcessGroup* gp : {&wg, &s.half, &s.row}) {
      const ProcessGroup& g = *gp;
      AlgoScope scope(g, a);
      const int w = g.size(), r = g.rank();
      std::vector<int64_t> off(size_t(w) + 1);
      off[0] = 2;  // elements 0, 1 belong to no piece
      for (int j = 0; j < w; ++j) off[size_t(j) + 1] = off[size_t(j)] + (j == 1 ? 0 : j + 3);
      const int64_t n = off.back() + 3;  // and 3 after the last
      Tensor x = make(n, DType::f32);
      for (int64_t i = 0; i < n; ++i) set(x, i, -1 - r);  // this rank's marker everywhere
      for (int64_t i = off[size_t(r)]; i < off[size_t(r) + 1]; ++i) set(x, i, r * 100 + i);
      g.reset_counters();
      g.all_gather_in_place(x, off).wait();
      for (int j = 0; j < w; ++j)
        for (int64_t i = off[size_t(j)]; i < off[size_t(j) + 1]; ++i)
          ASSERT_EQ(get(x, i), j * 100 + i) << "piece of rank " << j << " element " << i;
      for (int64_t i : {int64_t(0), int64_t(1), n - 3, n - 2, n - 1})
        ASSERT_EQ(get(x, i), -1 - r) << "element " << i << " is in no piece";
      const int64_t own = off[size_t(r) + 1] - off[size_t(r)];
      EXPECT_EQ(g.counters()[CommOp::all_gather].bytes, (w - 1) * own * 4);
    }
  ProcessGroup g = world();
  Tensor x = make(10, DType::f32);
  std::vector<int64_t> few(size_t(g.size()), 0), back(size_t(g.size()) + 1, 0), past = back;
  back[1] = 5;  // rank 1's piece would be [5, 0)
  past.back() = 11;
  for (auto* bad : {&few, &past}) {
    try {
      g.all_gather_in_place(x, *bad);
      FAIL();
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("all_gather_in_place"), std::string::npos) << e.what();
    }
  }
  if (g.size() >= 2) {
    EXPECT_THROW(g.all_gather_in_place(x, back), Error);
  }
}

TEST(Collectives, CountersMatchClosedForms) {
  ProcessGroup g = world();
  const int w = g.size(), r = g.rank();
  const int64_t n = 12;  // per-rank block
  for (Algorithm a : kAlgos) {
    AlgoScope scope(g, a);
    g.reset_counters();
    int64_t seq0 = g.sequence();
    Tensor x = make(w * n, DType::f32), y = make(n, DType::f32), z = make(w * n, DType::f32);
    Tensor b16 = make(w * n, DType::bf16);
    g.all_reduce(x).wait();                 // N = w*n divisible by w: 2(w-1)n elements
    g.all_reduce(b16).wait();               // bf16 counts 2 bytes per element
    g.reduce_scatter(x, y).wait();          // (w-1) n
    g.all_gather(y, z).wait();              // (w-1) n
    g.all_to_all(x, z).wait();              // (w-1) n
    g.broadcast(y, 0).wait();               // root: (w-1) n
    g.barrier().wait();
    const CommCounters& c = g.counters();
    EXPECT_EQ(c[CommOp::all_reduce].calls, 2);
    EXPECT_EQ(c[CommOp::all_reduce].bytes, 2 * (w - 1) * n * (4 + 2));
    EXPECT_EQ(c[CommOp::reduce_scatter].bytes, (w - 1) * n * 4);
    EXPECT_EQ(c[CommOp::all_gather].bytes, (w - 1) * n * 4);
    EXPECT_EQ(c[CommOp::all_to_all].bytes, (w - 1) * n * 4);
    EXPECT_EQ(c[CommOp::broadcast].bytes, r == 0 ? (w - 1) * n * 4 : 0);
    EXPECT_EQ(c[CommOp::barrier].calls, 1);
    EXPECT_EQ(c[CommOp::barrier].bytes, 0);
    EXPECT_EQ(c.total_calls(), 7);
    EXPECT_EQ(g.sequence() - seq0, 7);
    // Send/recv: a ring of one message each.
    g.reset_counters();
    Tensor out = make(n, DType::f32);
    Work rw = g.irecv(out, (r + w - 1) % w);
    g.send(y, (r + 1) % w);
    rw.wait();
    EXPECT_EQ(g.counters()[CommOp::send].calls, 1);
    EXPECT_EQ(g.counters()[CommOp::send].bytes, n * 4);
    EXPECT_EQ(g.counters()[CommOp::recv].calls, 1);
    EXPECT_EQ(g.counters()[CommOp::recv].bytes, 0);
    EXPECT_NE(g.counters().to_json().find("\"send\": {\"calls\": 1"), std::string::npos);
  }
}

// Deterministic pseudo-random values in [-1, 1) per (rank, i) without any shared state.
float noise(int rank, int64_t i) {
  uint64_t z = uint64_t(rank) * 0x9E3779B97F4A7C15ull + uint64_t(i) * 0xBF58476D1CE4E5B9ull + 1;
  z = (z ^ (z >> 31)) * 0x94D049BB133111EBull;
  z ^= z >> 29;
  return float(double(z >> 40) / double(1ull << 24) * 2.0 - 1.0);
}

TEST(Collectives, RingBitIdenticalAcrossRanksAndCloseToMpi) {
  ProcessGroup g = world();
  const int w = g.size(), r = g.rank();
  const int64_t n = 1001;
  Tensor ring = make(n, DType::f32), ring2 = make(n, DType::f32), ref = make(n, DType::f32);
  for (int64_t i = 0; i < n; ++i)
    ring.data<float>()[i] = ring2.data<float>()[i] = ref.data<float>()[i] = noise(r, i);
  {
    AlgoScope s(g, Algorithm::ring);
    g.all_reduce(ring).wait();
    g.all_reduce(ring2).wait();
  }
  {
    AlgoScope s(g, Algorithm::mpi);
    g.all_reduce(ref).wait();
  }
  // Same run twice: same bits.
  EXPECT_EQ(std::memcmp(ring.raw(), ring2.raw(), size_t(n) * 4), 0);
  // Every rank holds the same bits: gather everyone's result and compare with rank 0's.
  Tensor all = make(w * n, DType::f32);
  g.all_gather(ring, all).wait();
  for (int j = 1; j < w; ++j)
    EXPECT_EQ(std::memcmp(all.data<float>(), all.data<float>() + j * n, size_t(n) * 4), 0) << j;
  // Ring and MPI sum in different orders. Each of the w-1 additions rounds once, with error at
  // most 2^-24 of the running partial, so |ring - mpi| <= 2 (w-1) 2^-24 sum_r |x_r|.
  for (int64_t i = 0; i < n; ++i) {
    double abs_sum = 0;
    for (int j = 0; j < w; ++j) abs_sum += std::fabs(noise(j, i));
    double tol = 2.0 * (w - 1) * std::ldexp(abs_sum, -24);
    ASSERT_NEAR(ring.data<float>()[i], ref.data<float>()[i], tol) << i;
  }
  // bf16: ring and mpi both reduce in f32 and round once; results differ by at most one bf16 ulp
  // (f32 sums differ by the bound above, which can straddle one rounding boundary).
  Tensor b_ring = make(n, DType::bf16), b_ref = make(n, DType::bf16);
  for (int64_t i = 0; i < n; ++i)
    b_ring.data<bf16>()[i] = b_ref.data<bf16>()[i] = f32_to_bf16(noise(r, i));
  {
    AlgoScope s(g, Algorithm::ring);
    g.all_reduce(b_ring).wait();
  }
  {
    AlgoScope s(g, Algorithm::mpi);
    g.all_reduce(b_ref).wait();
  }
  for (int64_t i = 0; i < n; ++i) {
    int d = int(b_ring.data<bf16>()[i].bits) - int(b_ref.data<bf16>()[i].bits);
    ASSERT_LE(std::abs(d), 1) << i;
  }
  // Integers: exactly equal, including wrap-around in u8.
  for (DType t : {DType::i32, DType::i64, DType::u8}) {
    Tensor a = make(n, t), b = make(n, t);
    for (int64_t i = 0; i < n; ++i) {
      double v = std::floor(noise(r, i) * 100) + 100;  // 0..199; u8 sums wrap
      set(a, i, v);
      set(b, i, v);
    }
    {
      AlgoScope s(g, Algorithm::ring);
      g.all_reduce(a).wait();
      g.reduce_scatter(a.view(0, {(n / w) * w}), make(n / w, t)).wait();
    }
    {
      AlgoScope s(g, Algorithm::mpi);
      g.all_reduce(b).wait();
    }
    for (int64_t i = 0; i < n; ++i) ASSERT_EQ(get(a, i), get(b, i)) << dtype_name(t) << " i=" << i;
  }
}

TEST(Collectives, EightBitSumsWrapUnderEveryAlgorithm) {
  // Each rank adds 200: the sum is 200 w mod 256 (Open MPI 4.1's own op would saturate at 255,
  // so the library routes 8-bit sums to the ring; this pins the contract).
  ProcessGroup g = world();
  int w = g.size();
  for (Algorithm a : {Algorithm::mpi, Algorithm::ring, Algorithm::auto_select}) {
    AlgoScope s(g, a);
    Tensor x = make(5, DType::u8);
    for (int64_t i = 0; i < 5; ++i) set(x, i, 200);
    g.all_reduce(x).wait();
    for (int64_t i = 0; i < 5; ++i) ASSERT_EQ(get(x, i), (200 * w) % 256) << algorithm_name(a);
  }
}

TEST(Collectives, NodeLocalityOverride) {
  GroupOptions o;
  o.timeout_s = kTestTimeout;
  o.ranks_per_node = 2;
  ProcessGroup g = ProcessGroup::world(o);
  int w = g.size(), r = g.rank();
  EXPECT_EQ(g.node(), r / 2);
  EXPECT_EQ(g.local_rank(), r % 2);
  EXPECT_EQ(g.num_nodes(), (w + 1) / 2);
  EXPECT_EQ(g.local_size(), (r / 2) * 2 + 1 < w ? 2 : 1);
  // The emulated nodes do not change how many ranks share this machine's cores.
  EXPECT_EQ(g.host_ranks(), w);
  EXPECT_EQ(g.split({g.world_ranks()}, "copy").host_ranks(), w);
  // Detected: one machine, one node.
  EXPECT_EQ(world().num_nodes(), 1);
  EXPECT_EQ(world().local_size(), w);
  EXPECT_EQ(world().host_ranks(), w);
  // A sub-group keeps the world's node map.
  std::vector<std::vector<int>> odd_even(2);
  for (int i = 0; i < w; ++i) odd_even[size_t(i % 2)].push_back(i);
  ProcessGroup sub = g.split(odd_even, "parity");
  for (int j = 0; j < sub.size(); ++j) EXPECT_EQ(sub.member_nodes()[size_t(j)], sub.world_ranks()[size_t(j)] / 2);
}

TEST(Collectives, SplitValidationAndNonMembers) {
  ProcessGroup g = world();
  int w = g.size();
  try {
    g.split({{0, 1}, {1}}, "bad");
    FAIL() << "expected loom::Error for a duplicated rank";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("rank 1 is listed in set 0 and set 1"), std::string::npos)
        << e.what();
  }
  try {
    g.split({{0, w}}, "bad");
    FAIL() << "expected loom::Error for an out-of-range rank";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(fmt::format("lists rank {}", w)), std::string::npos);
  }
  // Only rank 0 is a member; everyone else gets a null group whose use is a clear error.
  ProcessGroup only0 = g.split({{0}}, "solo");
  EXPECT_EQ(only0.valid(), g.rank() == 0);
  if (!only0.valid()) {
    EXPECT_THROW(only0.barrier(), Error);
  }
}

TEST(Collectives, BadArgumentsAreClearErrors) {
  ProcessGroup g = world();
  int w = g.size();
  Tensor a = make(w * 3 + 1, DType::f32), b = make(3, DType::f32);
  try {
    g.reduce_scatter(a, b);
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("must be group size"), std::string::npos) << e.what();
  }
  EXPECT_THROW(g.broadcast(b, w), Error);
  EXPECT_THROW(g.isend(b, -1), Error);
  EXPECT_THROW(g.all_reduce(BufferRef(nullptr, 4, DType::f32)), Error);
}

// One rank skips a collective: the others time out within the limit with a message naming
// group, op and sequence number; then the late rank arrives and waiting again completes.
TEST(Collectives, TimeoutNamesGroupOpAndSeqThenRecovers) {
  ProcessGroup wg = world();
  int w = wg.size();
  std::vector<std::vector<int>> all(1);
  for (int i = 0; i < w; ++i) all[0].push_back(i);
  for (Algorithm a : kAlgos) {
    ProcessGroup g = wg.split(all, "timeout-test");
    g.set_algorithm(a);
    const double timeout = 1.0;
    g.set_timeout(timeout);
    g.barrier().wait();
    const int late = w - 1;
    const int64_t n = 64 * 1024;  // 256 KiB: several ring steps per message
    Tensor x = make(n, DType::f32);
    for (int64_t i = 0; i < n; ++i) x.data<float>()[i] = float(g.rank());
    if (g.rank() == late) {
      // Arrive after everyone else has timed out.
      std::this_thread::sleep_for(std::chrono::duration<double>(timeout * 2.5));
      g.all_reduce(x).wait(kTestTimeout);
    } else {
      Work work = g.all_reduce(x);
      auto t0 = std::chrono::steady_clock::now();
      try {
        work.wait();
        FAIL() << "expected TimeoutError";
      } catch (const TimeoutError& e) {
        double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        std::string m = e.what();
        EXPECT_GE(waited, timeout * 0.99);
        EXPECT_LT(waited, timeout + 1.0);  // the poll loop sleeps at most 50 us at a time
        EXPECT_NE(m.find(fmt::format("[rank {}/{} group=timeout-test]", wg.rank(), w)), std::string::npos) << m;
        EXPECT_NE(m.find("all_reduce of 65536 x F32"), std::string::npos) << m;
        EXPECT_NE(m.find("seq 2"), std::string::npos) << m;  // barrier was seq 1
        EXPECT_NE(m.find("timed out"), std::string::npos) << m;
        // The frozen member is named by the ranks waiting on it (it sleeps without polling).
        EXPECT_NE(m.find(fmt::format("waiting on world rank {} (group rank {}), which did not "
                                     "answer a liveness probe", late, late)),
                  std::string::npos) << m;
        // Live members that did join are not blamed.
        const int other = g.rank() == 0 ? 1 : 0;
        if (other != late) {
          EXPECT_EQ(m.find(fmt::format("world rank {} (group rank {}), which", other, other)),
                    std::string::npos) << m;
        }
      }
      EXPECT_FALSE(work.completed());
      work.wait(kTestTimeout);  // the late rank arrives: the same Work completes
    }
    for (int64_t i = 0; i < n; i += 997) ASSERT_EQ(x.data<float>()[i], float(w * (w - 1) / 2));
    g.barrier().wait(kTestTimeout);
  }
}

// A receive whose sender is alive but busy in another call names the sender and what it is
// doing; the late send then completes the same Work.
TEST(Collectives, PointToPointTimeoutNamesThePeer) {
  ProcessGroup wg = world();
  if (wg.size() < 2) GTEST_SKIP() << "needs 2 ranks";
  std::vector<std::vector<int>> all(1);
  for (int i = 0; i < wg.size(); ++i) all[0].push_back(i);
  ProcessGroup g = wg.split(all, "p2p-timeout");
  g.set_timeout(1.0);
  std::vector<float> buf(16, float(g.rank()));
  if (g.rank() == 1) {
    // Alive and polling this group (a barrier rank 0 joins only later), but not sending yet.
    // It polls (and so answers rank 0's probe, sent after 1 s) until its own 2.5 s run out.
    Work b = g.barrier();
    try {
      b.wait(2.5);
    } catch (const TimeoutError&) {
    }
    g.send(BufferRef(buf.data(), 16, DType::f32), 0);
    b.wait(kTestTimeout);
  } else if (g.rank() == 0) {
    Work r = g.irecv(BufferRef(buf.data(), 16, DType::f32), 1);
    try {
      r.wait();
      FAIL() << "expected TimeoutError";
    } catch (const TimeoutError& e) {
      const std::string m = e.what();
      EXPECT_NE(m.find("waiting on world rank 1 (group rank 1), which is alive (waiting in "
                       "barrier seq 1"), std::string::npos) << m;
    }
    r.wait(kTestTimeout);
    EXPECT_EQ(buf[0], 1.0f);
    g.barrier().wait(kTestTimeout);
  } else {
    g.barrier().wait(kTestTimeout);
  }
  g.barrier().wait(kTestTimeout);
}

TEST(Collectives, TimeoutFromEnvironment) {
  setenv("LOOM_COMM_TIMEOUT", "7.5", 1);
  EXPECT_EQ(resolve_timeout(GroupOptions{}), 7.5);
  GroupOptions o;
  o.timeout_s = 2;
  EXPECT_EQ(resolve_timeout(o), 2);  // explicit beats the environment
  setenv("LOOM_COMM_TIMEOUT", "soon", 1);
  EXPECT_THROW(resolve_timeout(GroupOptions{}), Error);
  unsetenv("LOOM_COMM_TIMEOUT");
  EXPECT_EQ(resolve_timeout(GroupOptions{}), 300);
}

TEST(Collectives, WaitInAnyOrderDoesNotDeadlock) {
  // Rank 0 waits on the second collective first; the poll loop progresses both.
  ProcessGroup g = world();
  AlgoScope s(g, Algorithm::ring);
  int w = g.size();
  Tensor a = make(4096, DType::f32), b = make(4096, DType::f32);
  for (int64_t i = 0; i < 4096; ++i) a.data<float>()[i] = b.data<float>()[i] = 1.0f;
  Work wa = g.all_reduce(a), wb = g.all_reduce(b);
  if (g.rank() == 0) {
    wb.wait();
    wa.wait();
  } else {
    wa.wait();
    wb.wait();
  }
  EXPECT_EQ(a.data<float>()[4095], float(w));
  EXPECT_EQ(b.data<float>()[0], float(w));
}

}  // namespace
}  // namespace loom::comm
