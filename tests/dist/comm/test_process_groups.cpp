// tests/dist/comm/test_process_groups.cpp: ProcessGroups built from a Topology have exactly the
// Topology's membership, and collectives on them reduce over exactly those ranks.
#include <gtest/gtest.h>

#include <numeric>

#include "parallel/topology.h"

namespace loom::parallel {
namespace {

Topology topology_for(int w) {
  switch (w) {
    case 8: return Topology(8, {.dp = 2, .tp = 2, .pp = 2}, "tp-dp-pp");
    case 4: return Topology(4, {.dp = 2, .tp = 2}, "tp-cp-ep-dp-pp");
    case 2: return Topology(2, {.cp = 2});
    default: return Topology(w, {.dp = w});
  }
}

TEST(ProcessGroups, MembershipMatchesTopology) {
  comm::GroupOptions o;
  o.timeout_s = 30;
  comm::ProcessGroup world = comm::ProcessGroup::world(o);
  Topology topo = topology_for(world.size());
  ProcessGroups groups = ProcessGroups::build(topo, world);
  int r = world.rank();
  for (Axis a : {Axis::dp, Axis::tp, Axis::pp, Axis::cp, Axis::ep}) {
    const comm::ProcessGroup& g = groups.get(a);
    SCOPED_TRACE(topo.describe() + " axis " + std::string(axis_name(a)));
    EXPECT_EQ(g.world_ranks(), topo.group_ranks(r, a));
    EXPECT_EQ(g.rank(), topo.coord(r, a));
    EXPECT_EQ(g.name(), axis_name(a));
    // all_reduce of the world rank sums exactly the listed members.
    std::vector<int64_t> members(g.world_ranks().begin(), g.world_ranks().end());
    int64_t v = r;
    g.all_reduce(comm::BufferRef(&v, 1, DType::i64)).wait();
    EXPECT_EQ(v, std::accumulate(members.begin(), members.end(), int64_t(0)));
  }
  EXPECT_EQ(groups.dp_cp.world_ranks(), topo.dp_cp_ranks(r));
  EXPECT_EQ(groups.world.size(), world.size());
}

}  // namespace
}  // namespace loom::parallel
