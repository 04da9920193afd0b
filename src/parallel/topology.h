// parallel/topology.h: the rank layout of a dp x tp x pp x cp x ep grid, and its process groups.
//
// Glossary: w world size; axes dp (data), tp (tensor), pp (pipeline), cp (context), ep (expert);
// order string e.g. "tp-cp-ep-dp-pp": the FIRST axis varies fastest (Megatron's RankGenerator
// convention), so with order tp-dp-pp, tp=2, dp=2, pp=2: rank = tp + 2*dp + 4*pp.
//
// Topology is a pure function of (w, sizes, order): no MPI. Each rank has a coordinate on every
// axis; the group of a set of axes is the ranks that agree with it on every OTHER axis (the dp
// group: ranks that differ only in dp; the dp-cp group: ranks that differ only in dp and cp).
// Group member lists are ascending world ranks, which is also the group rank order.
//
// ep is a separate axis here: the five sizes multiply to w. Ranks that differ in ep hold
// different experts and see different tokens, so dense-parameter gradients reduce over
// dp-cp-ep (use group_ranks with those axes); dp-cp alone is what the dense model uses when
// ep = 1.
//
// ProcessGroups turns a Topology into ProcessGroup handles (collective over the world). It is a
// plain value passed to whoever needs groups; nothing is global.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "comm/process_group.h"

namespace loom::parallel {

enum class Axis : uint8_t { dp, tp, pp, cp, ep };
constexpr size_t kNumAxes = 5;
std::string_view axis_name(Axis a);  // "dp", "tp", ...
// Parses "dp" | "tp" | "pp" | "cp" | "ep"; throws loom::Error listing them otherwise.
Axis axis_from_name(std::string_view name);

struct ParallelSizes {
  int dp = 1, tp = 1, pp = 1, cp = 1, ep = 1;
  int operator[](Axis a) const;
};

// Divisors of n in ascending order (for error messages and planners).
std::vector<int> divisors(int n);

class Topology {
 public:
  // Validates and builds the layout. Throws loom::Error when a size is < 1, a size does not
  // divide w ("tp=3 does not divide world 8; valid tp for world 8: 1, 2, 4, 8"), the product of
  // the sizes is not w, or `order` is not a '-'-separated list of distinct axis names. Axes
  // missing from `order` must have size 1 (they are appended, slowest).
  Topology(int world_size, const ParallelSizes& sizes, std::string_view order = "tp-cp-ep-dp-pp");

  int world_size() const { return world_size_; }
  const ParallelSizes& sizes() const { return sizes_; }
  int size(Axis a) const { return sizes_[a]; }
  std::string order() const;  // normalised, all five axes, e.g. "tp-cp-ep-dp-pp"

  // Coordinate of `rank` on axis a (0 <= coord < size(a)).
  int coord(int rank, Axis a) const;
  std::array<int, kNumAxes> coords(int rank) const;  // indexed by Axis
  // The rank with these coordinates (indexed by Axis).
  int rank_of(const std::array<int, kNumAxes>& coords) const;

  // Ranks (ascending) that share every coordinate of `rank` except those on `axes`.
  std::vector<int> group_ranks(int rank, const std::vector<Axis>& axes) const;
  // All groups over `axes`, a partition of the world, ordered by their lowest rank.
  std::vector<std::vector<int>> all_groups(const std::vector<Axis>& axes) const;

  // Convenience: the group over one axis, and the gradient-reduction group dp-cp.
  std::vector<int> group_ranks(int rank, Axis a) const { return group_ranks(rank, std::vector<Axis>{a}); }
  std::vector<int> dp_cp_ranks(int rank) const { return group_ranks(rank, {Axis::dp, Axis::cp}); }

  // "world 8 = dp2 x tp2 x pp2 x cp1 x ep1, order tp-dp-pp-cp-ep"
  std::string describe() const;

 private:
  int world_size_;
  ParallelSizes sizes_;
  std::array<Axis, kNumAxes> order_{};     // fastest first
  std::array<int, kNumAxes> stride_{};     // indexed by Axis
};

// How the groups of one axis lie on nodes, given the node of every world rank (node_of[r]).
struct AxisPlacement {
  Axis axis = Axis::dp;
  int groups = 0;     // groups over this axis (they partition the world)
  int spanning = 0;   // of which span more than one node
  int max_nodes = 1;  // the most nodes one group spans
};
// Pure (no MPI). Throws loom::Error when node_of does not have one entry per world rank.
AxisPlacement axis_placement(const Topology& topo, Axis axis, const std::vector<int>& node_of);
// One line for the run log, e.g. "2 nodes x 4 ranks; tp within a node; dp across 2 nodes; pp
// within a node" (axes of size 1 left out).
std::string describe_placement(const Topology& topo, const std::vector<int>& node_of);
// What a user should change: tp and cp groups that span nodes (their collectives run in every
// layer, so they belong on the fast links inside a node), each with a fix.
std::vector<std::string> placement_warnings(const Topology& topo, const std::vector<int>& node_of);
// Logs describe_placement (info) and placement_warnings (warn) for `world`'s nodes.
void log_placement(const Topology& topo, const comm::ProcessGroup& world);

// One ProcessGroup per axis (and dp_cp) for this rank, built from a Topology by splitting
// `world` (collective over world; every rank must call it with the same topology). Group names
// are the axis names ("dp", "tp", "pp", "cp", "ep", "dp_cp").
struct ProcessGroups {
  comm::ProcessGroup world, dp, tp, pp, cp, ep, dp_cp;

  static ProcessGroups build(const Topology& topo, const comm::ProcessGroup& world);
  const comm::ProcessGroup& get(Axis a) const;
};

}  // namespace loom::parallel
