// Tests for attention/cp_layout.h: positions, scatter/gather and next-token targets of the cp
// layouts, and the errors for sequences a layout cannot split. No MPI: every "rank" is a loop
// index.
//
// Glossary: T global length, G cp size, r cp rank, Tl = T/G, B batch.
#include <gtest/gtest.h>

#include <algorithm>
#include <numeric>
#include <string>
#include <vector>

#include "attention/cp_layout.h"
#include "core/error.h"

namespace loom::attention {
namespace {

TEST(CpLayout, ZigzagHoldsChunksRAnd2GMinus1MinusR) {
  // T = 8, G = 2: chunks of 2; rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2.
  EXPECT_EQ(cp_position_ids(CpLayout::zigzag, 8, 2, 0), (std::vector<int64_t>{0, 1, 6, 7}));
  EXPECT_EQ(cp_position_ids(CpLayout::zigzag, 8, 2, 1), (std::vector<int64_t>{2, 3, 4, 5}));
  // G = 3, T = 12: chunks of 2, rank r holds r and 5 - r.
  EXPECT_EQ(cp_position_ids(CpLayout::zigzag, 12, 3, 2), (std::vector<int64_t>{4, 5, 6, 7}));
  EXPECT_EQ(cp_position_ids(CpLayout::striped, 8, 2, 1), (std::vector<int64_t>{1, 3, 5, 7}));
  EXPECT_EQ(cp_position_ids(CpLayout::contiguous, 8, 2, 1), (std::vector<int64_t>{4, 5, 6, 7}));
  EXPECT_EQ(cp_global_position(CpLayout::zigzag, 8, 2, 0, 2), 6);
}

TEST(CpLayout, EveryPositionOnExactlyOneRankAndCausalWorkBalanced) {
  for (CpLayout l : {CpLayout::contiguous, CpLayout::zigzag, CpLayout::striped})
    for (int G : {1, 2, 3, 4, 8}) {
      const int64_t T = 2 * G * 7;
      std::vector<int> seen(size_t(T), 0);
      std::vector<int64_t> work(static_cast<size_t>(G), 0);  // causal work: sum over local rows of (pos + 1)
      for (int r = 0; r < G; ++r)
        for (int64_t p : cp_position_ids(l, T, G, r)) {
          seen[size_t(p)] += 1;
          work[size_t(r)] += p + 1;
        }
      EXPECT_TRUE(std::all_of(seen.begin(), seen.end(), [](int c) { return c == 1; }));
      const auto [lo, hi] = std::minmax_element(work.begin(), work.end());
      if (l == CpLayout::zigzag) {
        EXPECT_EQ(*lo, *hi) << "zigzag is exactly balanced, G=" << G;
      }
      if (l == CpLayout::striped) {  // rank r is r rows ahead of rank 0 on each of its T/G rows
        EXPECT_EQ(*hi - *lo, int64_t(G - 1) * (T / G));
      }
    }
}

TEST(CpLayout, ScatterThenGatherRebuildsTheSequence) {
  const int64_t B = 2, T = 24, inner = 3;
  std::vector<float> full(size_t(B * T * inner));
  std::iota(full.begin(), full.end(), 0.0f);
  for (CpLayout l : {CpLayout::contiguous, CpLayout::zigzag, CpLayout::striped})
    for (int G : {1, 2, 3, 4}) {
      std::vector<float> back(full.size(), -1.0f);
      for (int r = 0; r < G; ++r) {
        std::vector<float> loc(full.size() / size_t(G));  // (B, T/G, inner)
        cp_scatter_rows(loc.data(), full.data(), B, inner, sizeof(float), l, T, G, r);
        // Local row i of batch b is the full row at its global position.
        const std::vector<int64_t> pos = cp_position_ids(l, T, G, r);
        for (int64_t b = 0; b < B; ++b)
          for (size_t i = 0; i < pos.size(); ++i)
            EXPECT_EQ(loc[size_t(b) * pos.size() * inner + i * inner],
                      full[size_t((b * T + pos[i]) * inner)]);
        cp_gather_rows(back.data(), loc.data(), B, inner, sizeof(float), l, T, G, r);
      }
      EXPECT_EQ(back, full) << cp_layout_name(l) << " G=" << G;
    }
}

TEST(CpLayout, NextTokenTargetsCrossChunkAndRankBoundaries) {
  // tokens[t] = 100 + t: the target of position p is 100 + p + 1 on every rank, including the
  // last row of a chunk whose next token lives on another rank.
  const int64_t B = 2, T = 16;
  std::vector<int32_t> tokens(size_t(B * (T + 1)));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t <= T; ++t) tokens[size_t(b * (T + 1) + t)] = int32_t(1000 * b + 100 + t);
  for (CpLayout l : {CpLayout::contiguous, CpLayout::zigzag, CpLayout::striped})
    for (int G : {2, 4}) {
      std::vector<int32_t> all_targets;
      for (int r = 0; r < G; ++r) {
        std::vector<int32_t> in(size_t(B * T / G)), tg(in.size());
        cp_next_token_split(in.data(), tg.data(), tokens.data(), B, l, T, G, r);
        const std::vector<int64_t> pos = cp_position_ids(l, T, G, r);
        for (int64_t b = 0; b < B; ++b)
          for (size_t i = 0; i < pos.size(); ++i) {
            EXPECT_EQ(in[size_t(b) * pos.size() + i], 1000 * b + 100 + pos[i]);
            EXPECT_EQ(tg[size_t(b) * pos.size() + i], 1000 * b + 101 + pos[i]);
          }
        all_targets.insert(all_targets.end(), tg.begin(), tg.end());
      }
      // Every target of the sequence appears exactly once over the ranks.
      std::sort(all_targets.begin(), all_targets.end());
      EXPECT_EQ(std::adjacent_find(all_targets.begin(), all_targets.end()), all_targets.end());
      EXPECT_EQ(all_targets.size(), size_t(B * T));
    }
  // Zigzag G = 2, T = 16, rank 0 holds chunks 0 (positions 0..3) and 3 (12..15): the target of
  // position 3 is token 4, which rank 1 holds.
  std::vector<int32_t> tg(size_t(B * T / 2));
  cp_next_token_split(nullptr, tg.data(), tokens.data(), B, CpLayout::zigzag, T, 2, 0);
  EXPECT_EQ(tg[3], 104);
  EXPECT_EQ(tg[4], 113);
}

TEST(CpLayout, BadSplitsNameValuesAndFixes) {
  try {
    check_cp_layout(CpLayout::zigzag, 100, 3);
    ADD_FAILURE() << "accepted";
  } catch (const Error& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("cp=3"), std::string::npos) << m;
    EXPECT_NE(m.find("T=100"), std::string::npos) << m;
    EXPECT_NE(m.find("divisible by 6"), std::string::npos) << m;
    EXPECT_NE(m.find("T=96"), std::string::npos) << m;
  }
  try {
    check_cp_layout(CpLayout::striped, 10, 4);
    ADD_FAILURE() << "accepted";
  } catch (const Error& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("cp=4 must divide the sequence length T=10"), std::string::npos) << m;
  }
  EXPECT_NO_THROW(check_cp_layout(CpLayout::striped, 12, 4));
  EXPECT_THROW(check_cp_layout(CpLayout::zigzag, 12, 0), Error);
  EXPECT_THROW(cp_global_position(CpLayout::zigzag, 8, 2, 0, 4), Error);
  EXPECT_THROW(cp_layout_from_name("zig-zag"), Error);
  EXPECT_EQ(cp_layout_from_name("striped"), CpLayout::striped);
}

}  // namespace
}  // namespace loom::attention
