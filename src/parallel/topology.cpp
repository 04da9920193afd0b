// parallel/topology.cpp: rank <-> coordinates on (dp, tp, pp, cp, ep), and groups over axes.
//
// Glossary: w world size, stride[a] = product of the sizes of the axes before a in the order
// string (first axis stride 1), so rank = sum_a coord[a] * stride[a].
#include "parallel/topology.h"

#include <algorithm>

#include "core/error.h"
#include "core/log.h"
#include <fmt/format.h>

namespace loom::parallel {

namespace {
constexpr std::array<Axis, kNumAxes> kAllAxes = {Axis::dp, Axis::tp, Axis::pp, Axis::cp, Axis::ep};

std::string join(const std::vector<int>& v) {
  std::string s;
  for (size_t i = 0; i < v.size(); ++i) s += fmt::format("{}{}", i ? ", " : "", v[i]);
  return s;
}
}  // namespace

std::string_view axis_name(Axis a) {
  switch (a) {
    case Axis::dp: return "dp";
    case Axis::tp: return "tp";
    case Axis::pp: return "pp";
    case Axis::cp: return "cp";
    case Axis::ep: return "ep";
  }
  return "?";
}

Axis axis_from_name(std::string_view name) {
  for (Axis a : kAllAxes)
    if (axis_name(a) == name) return a;
  LOOM_FAIL("unknown parallel axis '{}'; axes are dp, tp, pp, cp, ep", name);
}

int ParallelSizes::operator[](Axis a) const {
  switch (a) {
    case Axis::dp: return dp;
    case Axis::tp: return tp;
    case Axis::pp: return pp;
    case Axis::cp: return cp;
    case Axis::ep: return ep;
  }
  return 1;
}

std::vector<int> divisors(int n) {
  std::vector<int> d;
  for (int i = 1; i <= n; ++i)
    if (n % i == 0) d.push_back(i);
  return d;
}

Topology::Topology(int world_size, const ParallelSizes& sizes, std::string_view order)
    : world_size_(world_size), sizes_(sizes) {
  LOOM_CHECK(world_size >= 1, "world size {} must be >= 1", world_size);
  int64_t product = 1;
  for (Axis a : kAllAxes) {
    int s = sizes[a];
    LOOM_CHECK(s >= 1, "{}={} must be >= 1", axis_name(a), s);
    LOOM_CHECK(world_size % s == 0, "{}={} does not divide world {}; valid {} for world {}: {}",
               axis_name(a), s, world_size, axis_name(a), world_size, join(divisors(world_size)));
    product *= s;
  }
  LOOM_CHECK(product == world_size,
             "dp*tp*pp*cp*ep = {}*{}*{}*{}*{} = {} but the world has {} ranks; with tp={} pp={} "
             "cp={} ep={} choose dp={}{}",
             sizes.dp, sizes.tp, sizes.pp, sizes.cp, sizes.ep, product, world_size, sizes.tp,
             sizes.pp, sizes.cp, sizes.ep, world_size * int64_t(sizes.dp) / product,
             (world_size * int64_t(sizes.dp)) % product == 0
                 ? ""
                 : " (not an integer: change the other sizes so their product divides the world)");

  // Parse the order string: distinct axis names separated by '-'.
  std::array<bool, kNumAxes> seen{};
  size_t n = 0;
  size_t pos = 0;
  while (pos <= order.size() && !order.empty()) {
    size_t dash = order.find('-', pos);
    std::string_view tok = order.substr(pos, dash == std::string_view::npos ? std::string_view::npos : dash - pos);
    Axis a;
    try {
      a = axis_from_name(tok);
    } catch (const Error&) {
      LOOM_FAIL("order '{}': '{}' is not an axis; write distinct axes from dp, tp, pp, cp, ep "
                "joined by '-', fastest-varying first (e.g. tp-cp-ep-dp-pp)",
                order, tok);
    }
    LOOM_CHECK(!seen[size_t(a)], "order '{}' names axis {} twice", order, axis_name(a));
    seen[size_t(a)] = true;
    order_[n++] = a;
    if (dash == std::string_view::npos) break;
    pos = dash + 1;
  }
  for (Axis a : kAllAxes) {
    if (seen[size_t(a)]) continue;
    LOOM_CHECK(sizes[a] == 1, "order '{}' omits axis {} but {}={}; add it to the order string",
               order, axis_name(a), axis_name(a), sizes[a]);
    order_[n++] = a;
  }
  int stride = 1;
  for (Axis a : order_) {
    stride_[size_t(a)] = stride;
    stride *= sizes[a];
  }
}

std::string Topology::order() const {
  std::string s;
  for (size_t i = 0; i < kNumAxes; ++i) s += fmt::format("{}{}", i ? "-" : "", axis_name(order_[i]));
  return s;
}

int Topology::coord(int rank, Axis a) const {
  LOOM_CHECK(rank >= 0 && rank < world_size_, "rank {} outside world 0..{}", rank, world_size_ - 1);
  return (rank / stride_[size_t(a)]) % sizes_[a];
}

std::array<int, kNumAxes> Topology::coords(int rank) const {
  std::array<int, kNumAxes> c{};
  for (Axis a : kAllAxes) c[size_t(a)] = coord(rank, a);
  return c;
}

int Topology::rank_of(const std::array<int, kNumAxes>& c) const {
  int r = 0;
  for (Axis a : kAllAxes) {
    LOOM_CHECK(c[size_t(a)] >= 0 && c[size_t(a)] < sizes_[a], "{} coordinate {} outside 0..{}",
               axis_name(a), c[size_t(a)], sizes_[a] - 1);
    r += c[size_t(a)] * stride_[size_t(a)];
  }
  return r;
}

std::vector<int> Topology::group_ranks(int rank, const std::vector<Axis>& axes) const {
  std::array<int, kNumAxes> base = coords(rank);
  std::array<bool, kNumAxes> varies{};
  for (Axis a : axes) varies[size_t(a)] = true;
  for (Axis a : kAllAxes)
    if (varies[size_t(a)]) base[size_t(a)] = 0;
  // Odometer over the varying axes, fastest (order-string) axis first: ranks come out ascending.
  std::vector<int> out;
  std::array<int, kNumAxes> c = base;
  while (true) {
    out.push_back(rank_of(c));
    size_t i = 0;
    for (; i < kNumAxes; ++i) {
      Axis a = order_[i];
      if (!varies[size_t(a)]) continue;
      if (++c[size_t(a)] < sizes_[a]) break;
      c[size_t(a)] = 0;
    }
    if (i == kNumAxes) break;
  }
  LOOM_ASSERT(std::is_sorted(out.begin(), out.end()), "group ranks not ascending");
  return out;
}

std::vector<std::vector<int>> Topology::all_groups(const std::vector<Axis>& axes) const {
  std::vector<std::vector<int>> groups;
  std::vector<bool> covered(size_t(world_size_), false);
  for (int r = 0; r < world_size_; ++r) {
    if (covered[size_t(r)]) continue;
    groups.push_back(group_ranks(r, axes));
    for (int m : groups.back()) covered[size_t(m)] = true;
  }
  return groups;
}

std::string Topology::describe() const {
  return fmt::format("world {} = dp{} x tp{} x pp{} x cp{} x ep{}, order {}", world_size_,
                     sizes_.dp, sizes_.tp, sizes_.pp, sizes_.cp, sizes_.ep, order());
}

AxisPlacement axis_placement(const Topology& topo, Axis axis, const std::vector<int>& node_of) {
  LOOM_CHECK(int64_t(node_of.size()) == topo.world_size(),
             "node list has {} entries but the topology '{}' has {} ranks", node_of.size(),
             topo.describe(), topo.world_size());
  AxisPlacement p;
  p.axis = axis;
  for (const std::vector<int>& g : topo.all_groups({axis})) {
    std::vector<int> nodes;
    for (int r : g) nodes.push_back(node_of[size_t(r)]);
    std::sort(nodes.begin(), nodes.end());
    const int n = int(std::unique(nodes.begin(), nodes.end()) - nodes.begin());
    ++p.groups;
    if (n > 1) ++p.spanning;
    p.max_nodes = std::max(p.max_nodes, n);
  }
  return p;
}

namespace {

// Ranks on each node, as "4" when equal, else "3-4".
std::string ranks_per_node_text(const std::vector<int>& node_of, int* num_nodes) {
  std::vector<int> count;
  for (int n : node_of) {
    if (n >= int(count.size())) count.resize(size_t(n) + 1, 0);
    ++count[size_t(n)];
  }
  count.erase(std::remove(count.begin(), count.end(), 0), count.end());
  *num_nodes = int(count.size());
  const auto [lo, hi] = std::minmax_element(count.begin(), count.end());
  return *lo == *hi ? fmt::format("{}", *lo) : fmt::format("{}-{}", *lo, *hi);
}

}  // namespace

std::string describe_placement(const Topology& topo, const std::vector<int>& node_of) {
  int nodes = 0;
  const std::string per_node = ranks_per_node_text(node_of, &nodes);
  std::string out = fmt::format("{} node(s) x {} rank(s)", nodes, per_node);
  for (Axis a : {Axis::tp, Axis::cp, Axis::ep, Axis::dp, Axis::pp}) {
    if (topo.size(a) == 1) continue;
    const AxisPlacement p = axis_placement(topo, a, node_of);
    if (p.spanning == 0)
      out += fmt::format("; {} within a node", axis_name(a));
    else
      out += fmt::format("; {} across up to {} nodes", axis_name(a), p.max_nodes);
  }
  return out;
}

std::vector<std::string> placement_warnings(const Topology& topo, const std::vector<int>& node_of) {
  std::vector<std::string> out;
  int nodes = 0;
  const std::string per_node = ranks_per_node_text(node_of, &nodes);
  for (Axis a : {Axis::tp, Axis::cp}) {
    const AxisPlacement p = axis_placement(topo, a, node_of);
    if (p.spanning == 0) continue;
    out.push_back(fmt::format(
        "{} = {}: {} of {} {} groups span nodes (up to {} nodes each; {} rank(s) per node), so "
        "the collectives every layer runs cross the links between nodes; use a {} that divides "
        "the ranks per node, with {} first in the rank order (it varies fastest)",
        axis_name(a), topo.size(a), p.spanning, p.groups, axis_name(a), p.max_nodes, per_node,
        axis_name(a), axis_name(a)));
  }
  return out;
}

void log_placement(const Topology& topo, const comm::ProcessGroup& world) {
  LOOM_LOG_INFO("placement: {}", describe_placement(topo, world.member_nodes()));
  for (const std::string& w : placement_warnings(topo, world.member_nodes())) LOOM_LOG_WARN("{}", w);
}

ProcessGroups ProcessGroups::build(const Topology& topo, const comm::ProcessGroup& world) {
  LOOM_CHECK(world.size() == topo.world_size(),
             "{} topology '{}' is for {} ranks but the world group has {}", world.prefix(),
             topo.describe(), topo.world_size(), world.size());
  ProcessGroups g;
  g.world = world;
  // Every rank runs the same splits in the same order (MPI_Comm_split is collective).
  g.dp = world.split(topo.all_groups({Axis::dp}), "dp");
  g.tp = world.split(topo.all_groups({Axis::tp}), "tp");
  g.pp = world.split(topo.all_groups({Axis::pp}), "pp");
  g.cp = world.split(topo.all_groups({Axis::cp}), "cp");
  g.ep = world.split(topo.all_groups({Axis::ep}), "ep");
  g.dp_cp = world.split(topo.all_groups({Axis::dp, Axis::cp}), "dp_cp");
  return g;
}

const comm::ProcessGroup& ProcessGroups::get(Axis a) const {
  switch (a) {
    case Axis::dp: return dp;
    case Axis::tp: return tp;
    case Axis::pp: return pp;
    case Axis::cp: return cp;
    case Axis::ep: return ep;
  }
  return world;
}

}  // namespace loom::parallel
