// Tests for attention/paged_attention.h against the float64 reference (kernels/ref/attention_ref.h)
// on the same keys gathered into a contiguous buffer.
//
// Glossary: NH query heads, NKV kv heads, HD head dim, BT tokens per block, n keys.
//
// Tolerance: each output sums at most n <= 131 softmax-weighted f32 terms of O(1) size, relative
// error ~sqrt(n) * 6e-8; NMSE 1e-10 is loose for any correct f32 order and orders of magnitude
// below an indexing bug (a wrong block or slot gives NMSE ~ 1e-2 .. 1).
#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <vector>

#include "attention/paged_attention.h"
#include "core/dtype.h"
#include "core/error.h"
#include "core/rng.h"
#include "kernels/ref/attention_ref.h"

namespace loom::attention {
namespace {

struct Pool {
  int64_t NKV, HD, BT, P;
  std::vector<float> data;  // (P, 2, NKV, BT, HD): K then V per block, each head-major
  int64_t stride() const { return 2 * BT * NKV * HD; }
  const float* k() const { return data.data(); }
  const float* v() const { return data.data() + BT * NKV * HD; }
};

Pool make_pool(int64_t NKV, int64_t HD, int64_t BT, int64_t P, uint64_t seed) {
  Pool p{NKV, HD, BT, P, {}};
  p.data.resize(size_t(P * p.stride()));
  rng_fill_uniform(p.data.data(), int64_t(p.data.size()), -1.f, 1.f, seed, 1, 0);
  return p;
}

// The pool in a bf16 cache's storage: every head's HD elements through kv_row_store (rounded,
// and paired where the head dim is a multiple of 32), as infer::KvCache writes them.
std::vector<bf16> to_bf16_cache(const Pool& p) {
  std::vector<bf16> b16(p.data.size());
  for (size_t r = 0; r < p.data.size(); r += size_t(p.HD))
    kv_row_store(p.data.data() + r, b16.data() + r, 1, p.HD, p.HD, DType::bf16);
  return b16;
}

// Element e = kh * HD + d of key j's K or V row in the pool (k() / v() base) under `table`.
int64_t at(const Pool& p, const std::vector<int32_t>& table, int64_t j, int64_t e) {
  return table[size_t(j / p.BT)] * p.stride() + (e / p.HD) * p.BT * p.HD + (j % p.BT) * p.HD +
         e % p.HD;
}

double nmse(const std::vector<float>& got, const std::vector<double>& want) {
  double num = 0, den = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    EXPECT_TRUE(std::isfinite(got[i])) << i;
    num += (got[i] - want[i]) * (got[i] - want[i]);
    den += want[i] * want[i];
  }
  return num / std::max(den, 1e-300);
}

struct Case {
  int64_t NH, NKV, HD, n_keys;
};

class PagedVsReference : public ::testing::TestWithParam<Case> {};

TEST_P(PagedVsReference, MatchesFloat64OnShuffledBlocks) {
  const Case c = GetParam();
  const int64_t BT = 16, blocks = (c.n_keys + BT - 1) / BT, P = blocks + 5;
  Pool pool = make_pool(c.NKV, c.HD, BT, P, 7 + uint64_t(c.n_keys));
  // A shuffled block table: logical block i in physical block table[i].
  std::vector<int32_t> table(static_cast<size_t>(P));
  std::iota(table.begin(), table.end(), 0);
  for (int64_t i = P - 1; i > 0; --i)
    std::swap(table[size_t(i)], table[size_t(rng_u64(3, 2, uint64_t(i)) % uint64_t(i + 1))]);
  table.resize(size_t(blocks));
  const int64_t C = c.NH * c.HD, KV = c.NKV * c.HD;
  std::vector<float> q(static_cast<size_t>(C)), out(static_cast<size_t>(C));
  rng_fill_uniform(q.data(), C, -1.f, 1.f, 11, 4, 0);
  PagedQuery pq{table.data(), int64_t(table.size()), c.n_keys};
  PagedShape s;
  s.NH = c.NH;
  s.NKV = c.NKV;
  s.HD = c.HD;
  s.block_tokens = BT;
  s.block_stride = pool.stride();
  s.scale = 1.f / std::sqrt(float(c.HD));
  paged_attention_forward(out.data(), q.data(), &pq, 1, pool.k(), pool.v(), s);

  // Gather the keys the table names into (n, NKV, HD) and run the reference.
  std::vector<double> k(size_t(c.n_keys * KV)), v(size_t(c.n_keys * KV)), qd(q.begin(), q.end());
  for (int64_t j = 0; j < c.n_keys; ++j)
    for (int64_t e = 0; e < KV; ++e) {
      const int64_t base = at(pool, table, j, e);
      k[size_t(j * KV + e)] = pool.k()[base];
      v[size_t(j * KV + e)] = pool.v()[base];
    }
  std::vector<double> want(static_cast<size_t>(C));
  kernels::ref::AttentionRefShape rs{1,    1,     c.n_keys, c.NH, c.NKV,
                                     c.HD, false, 0,        0,    1.0 / std::sqrt(double(c.HD))};
  kernels::ref::attention_forward_ref(want.data(), nullptr, qd.data(), k.data(), v.data(), rs);
  EXPECT_LT(nmse(out, want), 1e-10);
}

INSTANTIATE_TEST_SUITE_P(Shapes, PagedVsReference,
                         ::testing::Values(Case{4, 4, 16, 1}, Case{4, 2, 16, 5}, Case{4, 1, 8, 16},
                                           Case{2, 2, 13, 17}, Case{6, 3, 7, 33},
                                           Case{4, 2, 64, 127}, Case{1, 1, 5, 131},
                                           Case{4, 4, 32, 47}, Case{2, 1, 128, 70},
                                           Case{12, 12, 64, 200},
                                           // paired bf16 heads off the vector path
                                           Case{2, 1, 96, 40}));

// A bf16 cache: the kernel widens each element exactly and accumulates in f32, so it gives
// bitwise what the f32 kernel gives on the same K/V rounded to bf16. Against the float64
// reference on the unrounded K/V its error is at most 2x a plain bf16 implementation's (the
// float64 reference on the rounded K/V; conventions rule 11), plus the f32 rounding allowance of
// the test above.
TEST_P(PagedVsReference, Bf16CacheEqualsF32KernelOnRoundedKv) {
  const Case c = GetParam();
  const int64_t BT = 16, blocks = (c.n_keys + BT - 1) / BT, P = blocks + 3;
  Pool pool = make_pool(c.NKV, c.HD, BT, P, 19 + uint64_t(c.n_keys));
  Pool rounded = pool;
  round_f32_to_bf16(rounded.data.data(), rounded.data.data(), rounded.data.size());
  const std::vector<bf16> b16 = to_bf16_cache(pool);
  std::vector<int32_t> table(static_cast<size_t>(blocks));
  for (int64_t i = 0; i < blocks; ++i) table[size_t(i)] = int32_t((i * 5 + 2) % P);  // scattered
  const int64_t n = 3, C = c.NH * c.HD, KV = c.NKV * c.HD;
  std::vector<float> q(size_t(n * C)), o16(size_t(n * C)), o32(size_t(n * C));
  rng_fill_uniform(q.data(), n * C, -1.f, 1.f, 13, 4, 0);
  std::vector<PagedQuery> qs = {{table.data(), blocks, c.n_keys},
                                {table.data(), blocks, (c.n_keys + 1) / 2},
                                {table.data(), blocks, 1}};
  PagedShape s;
  s.NH = c.NH;
  s.NKV = c.NKV;
  s.HD = c.HD;
  s.block_tokens = BT;
  s.block_stride = pool.stride();
  s.scale = 1.f / std::sqrt(float(c.HD));
  paged_attention_forward(o32.data(), q.data(), qs.data(), n, rounded.k(), rounded.v(), s);
  s.kv_dtype = DType::bf16;
  paged_attention_forward(o16.data(), q.data(), qs.data(), n, b16.data(),
                          b16.data() + BT * KV, s);
  EXPECT_EQ(0, std::memcmp(o16.data(), o32.data(), o16.size() * 4));

  // Query 0 against float64: exact K/V (want) and rounded K/V (the plain bf16 implementation).
  std::vector<double> k(size_t(c.n_keys * KV)), v(size_t(c.n_keys * KV)), kr(k.size()),
      vr(v.size()), qd(q.begin(), q.begin() + C);
  for (int64_t j = 0; j < c.n_keys; ++j)
    for (int64_t e = 0; e < KV; ++e) {
      const int64_t base = at(pool, table, j, e);
      k[size_t(j * KV + e)] = pool.k()[base];
      v[size_t(j * KV + e)] = pool.v()[base];
      kr[size_t(j * KV + e)] = rounded.k()[base];
      vr[size_t(j * KV + e)] = rounded.v()[base];
    }
  std::vector<double> want(static_cast<size_t>(C)), plain(static_cast<size_t>(C));
  kernels::ref::AttentionRefShape rs{1,    1,     c.n_keys, c.NH, c.NKV,
                                     c.HD, false, 0,        0,    1.0 / std::sqrt(double(c.HD))};
  kernels::ref::attention_forward_ref(want.data(), nullptr, qd.data(), k.data(), v.data(), rs);
  kernels::ref::attention_forward_ref(plain.data(), nullptr, qd.data(), kr.data(), vr.data(), rs);
  const std::vector<float> got(o16.begin(), o16.begin() + C);
  std::vector<float> plain_f(plain.begin(), plain.end());
  const double err = nmse(got, want), err_plain = nmse(plain_f, want);
  EXPECT_GT(err_plain, 0.0);  // the rounding is real
  EXPECT_LE(err, 4 * err_plain + 1e-10) << "NMSE (2x in RMS = 4x in NMSE)";
}

// A query's row is the same bits alone and in a batch, at 1, 2 and 3 threads: the kernel gives a
// task a group of heads whose size follows the number of queries and of threads (heads_vec's G:
// here from 1 up to NH), for several head layouts, GQA groups that a task's heads cut included.
class PagedBatchInvariance : public ::testing::TestWithParam<Case> {};

TEST_P(PagedBatchInvariance, RowIsBitwiseIndependentOfTheBatch) {
  const Case c = GetParam();
  const int64_t NH = c.NH, NKV = c.NKV, HD = c.HD, BT = 16, P = 12, C = NH * HD;
  Pool pool = make_pool(NKV, HD, BT, P, 5);
  std::vector<int32_t> t0 = {3, 7, 1}, t1 = {0, 2}, t2 = {11, 4, 5, 6};
  std::vector<PagedQuery> qs = {{t0.data(), 3, 40}, {t1.data(), 2, 17}, {t2.data(), 4, 64},
                                {t0.data(), 3, 1},  {t2.data(), 4, 50}, {t1.data(), 2, 32},
                                {t0.data(), 3, 33}};
  const int64_t n = int64_t(qs.size());
  std::vector<float> q(size_t(n * C)), out(size_t(n * C)), one(static_cast<size_t>(C));
  rng_fill_uniform(q.data(), n * C, -2.f, 2.f, 9, 4, 0);
  const std::vector<bf16> b16 = to_bf16_cache(pool);
  const int saved = omp_get_max_threads();
  for (DType dt : {DType::f32, DType::bf16}) {
    PagedShape s{NH, NKV, HD, BT, pool.stride(), 0, 0, 0.25f};
    s.kv_dtype = dt;
    const void* kb = dt == DType::f32 ? static_cast<const void*>(pool.k())
                                      : static_cast<const void*>(b16.data());
    const void* vb = dt == DType::f32 ? static_cast<const void*>(pool.v())
                                      : static_cast<const void*>(b16.data() + BT * NKV * HD);
    omp_set_num_threads(1);
    paged_attention_forward(out.data(), q.data(), qs.data(), n, kb, vb, s);
    for (int threads : {1, 2, 3}) {
      omp_set_num_threads(threads);
      std::vector<float> again(out.size());
      paged_attention_forward(again.data(), q.data(), qs.data(), n, kb, vb, s);
      EXPECT_EQ(0, std::memcmp(again.data(), out.data(), out.size() * 4))
          << dtype_name(dt) << " batch at " << threads << " threads";
      for (int64_t i = 0; i < n; ++i) {
        paged_attention_forward(one.data(), q.data() + i * C, &qs[size_t(i)], 1, kb, vb, s);
        EXPECT_EQ(0, std::memcmp(one.data(), out.data() + i * C, size_t(C) * 4))
            << dtype_name(dt) << " row " << i << " alone at " << threads << " threads";
      }
    }
  }
  omp_set_num_threads(saved);
}

INSTANTIATE_TEST_SUITE_P(Heads, PagedBatchInvariance,
                         ::testing::Values(Case{4, 2, 16, 0}, Case{12, 12, 64, 0},
                                           Case{8, 2, 32, 0}, Case{6, 3, 16, 0},
                                           Case{6, 3, 13, 0}));

// kv_row_store / kv_row_load: a bf16 row comes back as the f32 row rounded to bf16 (every head
// dim, paired or not), and a paired row has model elements 32g + l and 32g + 16 + l side by side.
TEST(PagedAttention, KvRowStoreAndLoadRoundTrip) {
  for (int64_t HD : {5, 16, 32, 64, 96, 128}) {
    const int64_t NKV = 3, KV = NKV * HD;
    std::vector<float> row(static_cast<size_t>(KV)), back(row.size()), rounded(row.size());
    rng_fill_uniform(row.data(), KV, -3.f, 3.f, 21, uint64_t(HD), 0);
    row[1] = NAN;  // a NaN stays NaN, as f32_to_bf16 keeps it
    row[2] = INFINITY;
    row[3] = 3.3895314e38f;  // rounds up to infinity in bf16
    round_f32_to_bf16(row.data(), rounded.data(), row.size());
    const int64_t stride = HD + 7;  // heads HD + 7 elements apart, as a block's are BT * HD apart
    std::vector<bf16> stored(size_t(NKV * stride), f32_to_bf16(-5.f));
    kv_row_store(row.data(), stored.data(), NKV, HD, stride, DType::bf16);
    kv_row_load(stored.data(), back.data(), NKV, HD, stride, DType::bf16);
    EXPECT_EQ(0, std::memcmp(back.data(), rounded.data(), back.size() * 4)) << "HD " << HD;
    EXPECT_EQ(bf16_to_f32(stored[size_t(HD)]), -5.f) << "the gap between heads is untouched";
    EXPECT_EQ(kv_bf16_paired(HD), HD % 32 == 0);
    if (kv_bf16_paired(HD)) {
      // head 1, group 1 (HD >= 64) or 0: element 32g + 16 + 3 sits at position 32g + 7
      const int64_t g = HD >= 64 ? 1 : 0, e = HD + 32 * g + 16 + 3, pos = stride + 32 * g + 7;
      EXPECT_EQ(bf16_to_f32(stored[size_t(pos)]), rounded[size_t(e)]) << "HD " << HD;
    } else {
      EXPECT_EQ(bf16_to_f32(stored[size_t(stride + HD - 1)]), rounded[size_t(2 * HD - 1)]);
    }
    std::vector<float> f32(size_t(NKV * stride));
    kv_row_store(row.data(), f32.data(), NKV, HD, stride, DType::f32);
    kv_row_load(f32.data(), back.data(), NKV, HD, stride, DType::f32);
    EXPECT_EQ(0, std::memcmp(back.data(), row.data(), row.size() * 4));
  }
  float x = 1.f, y = 0.f;
  EXPECT_THROW(kv_row_store(&x, &y, 1, 1, 1, DType::f16), Error);
  EXPECT_THROW(kv_row_store(&x, &y, 1, 2, 1, DType::f32), Error);  // head_stride < HD
}

TEST(PagedAttention, BadShapesThrowBeforeWriting) {
  Pool pool = make_pool(2, 8, 16, 2, 1);
  std::vector<int32_t> t = {0};
  std::vector<float> q(32, 1.f), out(32, 7.f);
  PagedShape s{4, 2, 8, 16, pool.stride(), 0, 0, 0.5f};
  PagedQuery too_many{t.data(), 1, 17};  // 17 keys but one block of 16
  EXPECT_THROW(paged_attention_forward(out.data(), q.data(), &too_many, 1, pool.k(), pool.v(), s),
               Error);
  PagedQuery none{t.data(), 1, 0};
  EXPECT_THROW(paged_attention_forward(out.data(), q.data(), &none, 1, pool.k(), pool.v(), s),
               Error);
  PagedShape bad = s;
  bad.NKV = 3;  // does not divide NH = 4
  PagedQuery ok{t.data(), 1, 3};
  EXPECT_THROW(paged_attention_forward(out.data(), q.data(), &ok, 1, pool.k(), pool.v(), bad),
               Error);
  EXPECT_EQ(out[0], 7.f);
}

}  // namespace
}  // namespace loom::attention
