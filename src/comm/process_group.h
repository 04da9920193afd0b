// comm/process_group.h: ProcessGroup and Work, loom's collectives over Open MPI.
//
// Glossary: w group size, r this rank's index in the group, N element count of a buffer,
// n per-rank block (N = w*n for reduce_scatter / all_gather / all_to_all), seq the group's call
// sequence number (every collective and point-to-point call takes the next one).
//
// Contract
// - A ProcessGroup is a handle: copies share one MPI communicator, one sequence counter and one
//   set of counters. Pass groups as values; there is no global group registry. Every method that
//   starts communication must be called by all members in the same order (like MPI).
// - Every call returns a Work (or, for send/recv, waits on one). The call only starts the
//   operation; buffers must stay valid and untouched until the Work completes. Tensors passed in
//   are kept alive by the Work itself. Work::wait() polls non-blocking MPI with a deadline and
//   throws loom::TimeoutError when it passes, naming "[rank r/w group=<name>]", op, element
//   count, dtype and seq. A timed-out Work is still pending: waiting again may complete it (a late
//   rank arrived) or time out again. After a timeout the caller should treat the group as broken
//   unless it can prove every rank resynchronised.
// - MPI failures throw loom::Error with the MPI call and its error string.
// - Reductions (sum, max) on f32, bf16, i32, i64, u8, i8 (and f64, for tests). bf16 is reduced in f32 arithmetic and
//   rounded to bf16 once at the end. Integer sums wrap (8-bit sums always run on the ring:
//   Open MPI 4.1's AVX op saturates them).
// - Determinism: the same inputs, group and algorithm give bit-identical results on every rank
//   and every run. The ring algorithms sum each chunk in a fixed rank order and then all-gather
//   the single rounded result, so all ranks hold identical bits.
// - Algorithms: `mpi` (Open MPI's own collectives, the tested reference), `ring` (loom's ring
//   reduce-scatter / all-gather over non-blocking send/recv with vectorised local reductions) or
//   `auto` (per op and size, from bench/comm measurements; see choose_algorithm()).
// - Counters: per op, calls and bytes this rank sends in the bandwidth-optimal (ring) schedule,
//   counted in the caller's dtype and independent of the algorithm actually used, so metrics are
//   comparable across algorithms:
//     all_reduce      (N - len(r)) + (N - len(r+1)) elements, len(j) = balanced chunk j of N
//                     over w  (= 2N(w-1)/w when w divides N)
//     reduce_scatter  (w-1)*n      all_gather  (w-1)*n      all_to_all  (w-1)*n
//     all_to_all_v    sum of send_counts except the block to itself
//     all_gather_in_place  (w-1)*len(r), len(r) this rank's piece (counted as all_gather)
//     broadcast       (w-1)*N on the root, 0 elsewhere     send  N     recv, barrier  0
//   times dtype_size. Only calls made through this API are counted.
// - Timeout: GroupOptions::timeout_s if > 0, else env LOOM_COMM_TIMEOUT (seconds), else 300.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "comm/mpi_runtime.h"
#include "comm/reduce.h"
#include "core/dtype.h"
#include "core/tensor.h"

namespace loom::comm {

enum class Algorithm : uint8_t { mpi, ring, auto_select };
std::string_view algorithm_name(Algorithm a);  // "mpi", "ring", "auto"
// Parses "mpi" | "ring" | "auto"; throws loom::Error listing them otherwise.
Algorithm algorithm_from_name(std::string_view name);

enum class CommOp : uint8_t {
  all_reduce,
  reduce_scatter,
  all_gather,
  all_to_all,
  all_to_all_v,
  broadcast,
  send,
  recv,
  barrier
};
constexpr size_t kNumCommOps = 9;
std::string_view comm_op_name(CommOp op);

struct OpCounter {
  int64_t calls = 0;
  int64_t bytes = 0;  // bytes this rank sends (see the contract above)
};

struct CommCounters {
  std::array<OpCounter, kNumCommOps> by_op{};
  const OpCounter& operator[](CommOp op) const { return by_op[size_t(op)]; }
  OpCounter& operator[](CommOp op) { return by_op[size_t(op)]; }
  int64_t total_calls() const;
  int64_t total_bytes() const;
  // {"all_reduce": {"calls": 3, "bytes": 1024}, ...} with every op listed.
  std::string to_json() const;
};

struct GroupOptions {
  double timeout_s = 0;  // <= 0: env LOOM_COMM_TIMEOUT, else 300 s
  Algorithm algorithm = Algorithm::auto_select;
  // > 0: pretend every `ranks_per_node` consecutive world ranks share a node (emulates several
  // nodes on one machine). 0: nodes from MPI_Comm_split_type(MPI_COMM_TYPE_SHARED).
  int ranks_per_node = 0;
};

// The timeout in seconds a group with `opts` uses (resolves env LOOM_COMM_TIMEOUT; throws
// loom::Error naming the variable when it is not a positive number).
double resolve_timeout(const GroupOptions& opts);

// The algorithm `auto` picks for `op` moving `bytes` (the caller's whole buffer) on a group of
// size w. Collectives without a ring implementation always use mpi.
Algorithm choose_algorithm(CommOp op, int64_t bytes, int w);

// A contiguous buffer: raw (pointer, count, dtype) or a whole Tensor (which the Work then keeps
// alive until it completes).
struct BufferRef {
  void* data = nullptr;
  int64_t count = 0;
  DType dtype = DType::f32;
  Tensor keep_alive;

  BufferRef(void* ptr, int64_t n, DType t) : data(ptr), count(n), dtype(t) {}
  BufferRef(const Tensor& t)  // NOLINT: implicit on purpose, tensors are the common case
      : data(t.defined() ? t.raw() : nullptr), count(t.numel()), dtype(t.dtype()), keep_alive(t) {}
  size_t nbytes() const { return size_t(count) * dtype_size(dtype); }
};

namespace detail {
struct GroupState;
struct WorkState;
}  // namespace detail

class Work {
 public:
  Work() = default;  // an already-completed no-op
  explicit Work(std::shared_ptr<detail::WorkState> s) : state_(std::move(s)) {}

  // Waits with the group's timeout / with `timeout_s` seconds. Throws loom::TimeoutError (the
  // Work stays pending) or loom::Error (MPI failure). Returns at once if already complete.
  void wait() const;
  void wait(double timeout_s) const;
  // Makes progress without blocking; true once complete.
  bool test() const;
  bool completed() const;

 private:
  std::shared_ptr<detail::WorkState> state_;
};

class ProcessGroup {
 public:
  ProcessGroup() = default;  // a null group: valid() is false, every operation throws

  // All of MPI_COMM_WORLD (duplicated, so loom's traffic never matches anyone else's). Collective
  // over the world. MPI must be initialised (MpiRuntime).
  static ProcessGroup world(const GroupOptions& opts = {});

  // Collective over this group: `partition` lists disjoint sets of this group's ranks (the same
  // list on every member); each member gets the sub-group holding it, ranked in the order listed,
  // named `name`. Members in no set get a null group. Throws loom::Error naming the bad entry if
  // a rank is out of range or listed twice. Options (timeout, algorithm) are inherited.
  ProcessGroup split(const std::vector<std::vector<int>>& partition, const std::string& name) const;

  bool valid() const { return state_ != nullptr; }
  int rank() const;
  int size() const;
  const std::string& name() const;
  const std::vector<int>& world_ranks() const;  // world rank of each member, by group rank
  int world_rank() const;
  int world_size() const;

  // Node locality (see GroupOptions::ranks_per_node): node index of each member (nodes numbered
  // in order of their lowest world rank), this rank's node, and its index/count on that node
  // within this group.
  const std::vector<int>& member_nodes() const;
  int node() const;
  int num_nodes() const;
  int local_rank() const;
  int local_size() const;
  // World ranks on this rank's physical host (from MPI's shared-memory split, whatever
  // ranks_per_node emulates): the ranks that share this machine's cores.
  int host_ranks() const;

  double timeout_s() const;
  void set_timeout(double seconds) const;  // shared by all copies of this handle
  Algorithm algorithm() const;
  void set_algorithm(Algorithm a) const;
  int64_t sequence() const;  // calls made so far on this group

  // In place: buf <- op over ranks of buf.
  Work all_reduce(BufferRef buf, ReduceOp op = ReduceOp::sum) const;
  // input (w*n) -> output (n): output = op over ranks of input block r. Same dtype.
  Work reduce_scatter(BufferRef input, BufferRef output, ReduceOp op = ReduceOp::sum) const;
  // input (n) -> output (w*n): output block j = input of rank j. input may be output block r.
  Work all_gather(BufferRef input, BufferRef output) const;
  // In place, pieces of any length: buf elements [offsets[j], offsets[j+1]) of rank j reach
  // every rank (offsets: size+1 non-decreasing values within buf; ZeRO-1's updated shares). One
  // collective where a broadcast per rank would move each piece through a tree.
  Work all_gather_in_place(BufferRef buf, const std::vector<int64_t>& offsets) const;
  // input (w*n) -> output (w*n): output block j = input block r of rank j.
  Work all_to_all(BufferRef input, BufferRef output) const;
  // input holds send_counts[j] elements for rank j, packed in rank order; output receives
  // recv_counts[j] from rank j, packed. Counts must agree pairwise across ranks (MPI's rule).
  Work all_to_all_v(BufferRef input, const std::vector<int64_t>& send_counts, BufferRef output,
                    const std::vector<int64_t>& recv_counts) const;
  // buf on every rank <- buf on `root`.
  Work broadcast(BufferRef buf, int root) const;
  Work barrier() const;
  // Point to point with a group rank; tag >= 0. Messages between a pair with the same tag arrive
  // in order. isend/irecv return at once; send/recv wait (with the group timeout).
  Work isend(BufferRef buf, int dst, int tag = 0) const;
  Work irecv(BufferRef buf, int src, int tag = 0) const;
  void send(BufferRef buf, int dst, int tag = 0) const;
  void recv(BufferRef buf, int src, int tag = 0) const;

  const CommCounters& counters() const;
  void reset_counters() const;

  // "[rank r/w group=<name>]" with world rank and size, for messages.
  std::string prefix() const;

 private:
  explicit ProcessGroup(std::shared_ptr<detail::GroupState> s) : state_(std::move(s)) {}
  detail::GroupState& st() const;
  std::shared_ptr<detail::GroupState> state_;
};

}  // namespace loom::comm
