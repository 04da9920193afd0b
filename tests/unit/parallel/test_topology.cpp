// tests/unit/parallel/test_topology.cpp: Topology against hand-written group lists.
#include <gtest/gtest.h>

#include <algorithm>
#include <set>

#include "core/error.h"
#include "parallel/plan.h"
#include "parallel/topology.h"

namespace loom::parallel {
namespace {

using Groups = std::vector<std::vector<int>>;

TEST(Topology, World8Tp2Dp2Pp2OrderTpDpPp) {
  // order tp-dp-pp: rank = tp + 2*dp + 4*pp.
  Topology t(8, {.dp = 2, .tp = 2, .pp = 2}, "tp-dp-pp");
  EXPECT_EQ(t.all_groups({Axis::tp}), (Groups{{0, 1}, {2, 3}, {4, 5}, {6, 7}}));
  EXPECT_EQ(t.all_groups({Axis::dp}), (Groups{{0, 2}, {1, 3}, {4, 6}, {5, 7}}));
  EXPECT_EQ(t.all_groups({Axis::pp}), (Groups{{0, 4}, {1, 5}, {2, 6}, {3, 7}}));
  EXPECT_EQ(t.all_groups({Axis::cp}), (Groups{{0}, {1}, {2}, {3}, {4}, {5}, {6}, {7}}));
  EXPECT_EQ(t.all_groups({Axis::dp, Axis::tp}), (Groups{{0, 1, 2, 3}, {4, 5, 6, 7}}));
  EXPECT_EQ(t.group_ranks(5, Axis::dp), (std::vector<int>{5, 7}));
  EXPECT_EQ(t.group_ranks(6, Axis::pp), (std::vector<int>{2, 6}));
  // rank 6 = tp 0, dp 1, pp 1
  EXPECT_EQ(t.coord(6, Axis::tp), 0);
  EXPECT_EQ(t.coord(6, Axis::dp), 1);
  EXPECT_EQ(t.coord(6, Axis::pp), 1);
  EXPECT_EQ(t.coord(6, Axis::cp), 0);
  EXPECT_EQ(t.order(), "tp-dp-pp-cp-ep");
}

TEST(Topology, MegatronDefaultOrderWithContextParallel) {
  // world 16, tp2 cp2 dp2 pp2, order tp-cp-ep-dp-pp: rank = tp + 2 cp + 4 dp + 8 pp.
  Topology t(16, {.dp = 2, .tp = 2, .pp = 2, .cp = 2});
  EXPECT_EQ(t.group_ranks(0, Axis::cp), (std::vector<int>{0, 2}));
  EXPECT_EQ(t.group_ranks(0, Axis::dp), (std::vector<int>{0, 4}));
  EXPECT_EQ(t.group_ranks(0, Axis::pp), (std::vector<int>{0, 8}));
  EXPECT_EQ(t.dp_cp_ranks(0), (std::vector<int>{0, 2, 4, 6}));
  EXPECT_EQ(t.dp_cp_ranks(9), (std::vector<int>{9, 11, 13, 15}));
  EXPECT_EQ(t.all_groups({Axis::dp, Axis::cp}),
            (Groups{{0, 2, 4, 6}, {1, 3, 5, 7}, {8, 10, 12, 14}, {9, 11, 13, 15}}));
}

TEST(Topology, CoordinatesRoundTripAndGroupsPartition) {
  for (const char* order : {"tp-cp-ep-dp-pp", "dp-pp-tp-ep-cp", "pp-ep-cp-tp-dp"}) {
    Topology t(24, {.dp = 2, .tp = 3, .pp = 2, .cp = 1, .ep = 2}, order);
    std::set<int> seen;
    for (int r = 0; r < 24; ++r) {
      EXPECT_EQ(t.rank_of(t.coords(r)), r);
      seen.insert(r);
      for (Axis a : {Axis::dp, Axis::tp, Axis::pp, Axis::cp, Axis::ep}) {
        auto g = t.group_ranks(r, a);
        EXPECT_EQ(int(g.size()), t.size(a));
        EXPECT_TRUE(std::find(g.begin(), g.end(), r) != g.end());
        // Members differ from r only on axis a, and their a-coordinates are 0..size-1 in order.
        for (size_t i = 0; i < g.size(); ++i) {
          EXPECT_EQ(t.coord(g[i], a), int(i));
          for (Axis b : {Axis::dp, Axis::tp, Axis::pp, Axis::cp, Axis::ep})
            if (b != a) {
              EXPECT_EQ(t.coord(g[i], b), t.coord(r, b));
            }
        }
      }
    }
    // all_groups is a partition of the world.
    auto groups = t.all_groups({Axis::tp, Axis::ep});
    std::vector<int> all;
    for (auto& g : groups) all.insert(all.end(), g.begin(), g.end());
    std::sort(all.begin(), all.end());
    for (int r = 0; r < 24; ++r) EXPECT_EQ(all[size_t(r)], r);
    EXPECT_EQ(groups.size(), 24u / 6u);
  }
}

std::string error_of(auto&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST(Topology, ValidationErrorsListValidValues) {
  std::string m = error_of([] { Topology(8, {.tp = 3}); });
  EXPECT_NE(m.find("tp=3 does not divide world 8; valid tp for world 8: 1, 2, 4, 8"), std::string::npos) << m;
  m = error_of([] { Topology(16, {.dp = 2, .tp = 2, .pp = 2}); });
  EXPECT_NE(m.find("= 8 but the world has 16 ranks"), std::string::npos) << m;
  EXPECT_NE(m.find("choose dp=4"), std::string::npos) << m;
  m = error_of([] { Topology(8, {.dp = 2, .tp = 2, .pp = 2}, "tp-dp-xx"); });
  EXPECT_NE(m.find("'xx' is not an axis"), std::string::npos) << m;
  m = error_of([] { Topology(8, {.dp = 2, .tp = 2, .pp = 2}, "tp-dp-tp"); });
  EXPECT_NE(m.find("names axis tp twice"), std::string::npos) << m;
  m = error_of([] { Topology(8, {.dp = 2, .tp = 2, .pp = 2}, "tp-dp"); });
  EXPECT_NE(m.find("omits axis pp but pp=2"), std::string::npos) << m;
  m = error_of([] { Topology(8, {.dp = 0, .tp = 8}); });
  EXPECT_NE(m.find("dp=0 must be >= 1"), std::string::npos) << m;
  EXPECT_THROW(Topology(4, {.dp = 4}).coord(4, Axis::dp), Error);
}

TEST(Topology, SingleRank) {
  Topology t(1, {});
  EXPECT_EQ(t.group_ranks(0, Axis::tp), (std::vector<int>{0}));
  EXPECT_EQ(t.describe(), "world 1 = dp1 x tp1 x pp1 x cp1 x ep1, order tp-cp-ep-dp-pp");
}

// Node placement: 8 ranks, order tp-dp-pp, tp2 x dp2 x pp2 (rank = tp + 2 dp + 4 pp).
TEST(Topology, PlacementOnNodes) {
  Topology t(8, [] {
    ParallelSizes s;
    s.tp = 2;
    s.dp = 2;
    s.pp = 2;
    return s;
  }(), "tp-dp-pp");
  // 4 ranks per node: tp pairs {0,1}.. and dp pairs {0,2}.. inside a node, pp pairs {0,4}
  // across the two nodes.
  const std::vector<int> four = {0, 0, 0, 0, 1, 1, 1, 1};
  AxisPlacement tp = axis_placement(t, Axis::tp, four);
  EXPECT_EQ(tp.groups, 4);
  EXPECT_EQ(tp.spanning, 0);
  EXPECT_EQ(tp.max_nodes, 1);
  AxisPlacement pp = axis_placement(t, Axis::pp, four);
  EXPECT_EQ(pp.groups, 4);
  EXPECT_EQ(pp.spanning, 4);
  EXPECT_EQ(pp.max_nodes, 2);
  EXPECT_EQ(describe_placement(t, four), "2 node(s) x 4 rank(s); tp within a node; dp within a node; pp across up to 2 nodes");
  EXPECT_TRUE(placement_warnings(t, four).empty());
  // One rank per node: every group spans nodes, and tp gets a warning with its fix.
  const std::vector<int> one = {0, 1, 2, 3, 4, 5, 6, 7};
  EXPECT_EQ(axis_placement(t, Axis::tp, one).spanning, 4);
  std::vector<std::string> w = placement_warnings(t, one);
  ASSERT_EQ(w.size(), 1u);
  EXPECT_NE(w[0].find("tp = 2: 4 of 4 tp groups span nodes (up to 2 nodes each; 1 rank(s) per node)"),
            std::string::npos)
      << w[0];
  EXPECT_NE(w[0].find("use a tp that divides the ranks per node"), std::string::npos) << w[0];
  // Uneven nodes (3 + 3 + 2): the tp pair {2,3} straddles nodes 0 and 1.
  const std::vector<int> uneven = {0, 0, 0, 1, 1, 1, 2, 2};
  EXPECT_EQ(axis_placement(t, Axis::tp, uneven).spanning, 1);
  EXPECT_EQ(describe_placement(t, uneven).rfind("3 node(s) x 2-3 rank(s); tp across up to 2 nodes", 0), 0u)
      << describe_placement(t, uneven);
  EXPECT_THROW(axis_placement(t, Axis::tp, {0, 0}), Error);
}

}  // namespace
}  // namespace loom::parallel

namespace loom::parallel {
namespace {

// parallel::cp_ranks_per_node turns "K consecutive world ranks per node" into the cp groups'
// "L consecutive group ranks per node": checked against every cp group's real members.
TEST(Topology, CpRanksPerNodeMatchesTheGroupsMembers) {
  int checked = 0, nonzero = 0;
  for (int tp : {1, 2, 4})
    for (int cp : {2, 4, 8})
      for (int dp : {1, 2})
        for (int K : {1, 2, 3, 4, 6, 8, 16, 32}) {
          const int w = tp * cp * dp;
          if (w > 64) continue;
          ParallelPlan p;
          p.tp = tp, p.cp = cp, p.dp = dp, p.ranks_per_node = K;
          const int L = cp_ranks_per_node(p);
          const Topology t(w, {.dp = dp, .tp = tp, .cp = cp}, "tp-cp-dp-pp");
          for (const std::vector<int>& g : t.all_groups({Axis::cp})) {
            ASSERT_EQ(int(g.size()), cp);
            if (L == 0) continue;
            ASSERT_EQ(cp % L, 0) << "tp " << tp << " cp " << cp << " K " << K;
            // Members [i*L, (i+1)*L) share a node, and consecutive blocks do not.
            for (int j = 0; j < cp; ++j) {
              EXPECT_EQ(g[size_t(j)] / K, g[size_t(j / L * L)] / K)
                  << "tp " << tp << " cp " << cp << " K " << K << " L " << L;
              if (j % L == 0 && j > 0) {
                EXPECT_NE(g[size_t(j)] / K, g[size_t(j - 1)] / K)
                    << "tp " << tp << " cp " << cp << " K " << K << " L " << L;
              }
            }
          }
          ++checked;
          nonzero += L > 0;
        }
  EXPECT_GT(nonzero, 20);
  EXPECT_GT(checked, 100);
  ParallelPlan none;
  none.cp = 4;
  EXPECT_EQ(cp_ranks_per_node(none), 0);  // no K: the group's own nodes
  ParallelPlan cp2;  // the case that failed before: cp 2 on 4 ranks per node is one node
  cp2.cp = 2, cp2.dp = 2, cp2.ranks_per_node = 4;
  EXPECT_EQ(cp_ranks_per_node(cp2), 2);
}

}  // namespace
}  // namespace loom::parallel
