// comm/detail.h: internal state behind ProcessGroup and Work (not a public header).
//
// A GroupState is shared by every copy of a ProcessGroup handle. Works in flight are kept in
// `pending` (issue order) so that waiting on any of them progresses all of them: ranks may wait
// in different orders without deadlocking, and buffers stay alive until MPI is done with them.
// pending -> WorkState -> GroupState is a reference cycle on purpose; it is broken when the work
// completes (a Work that never completes leaks, which only happens on a broken group).
#pragma once

#include <mpi.h>

#include <array>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "comm/process_group.h"
#include "core/memory_pool.h"
#include "core/tensor.h"

namespace loom::comm::detail {

struct WorkState;

// A liveness reply in flight (diagnose.cpp): its buffer must outlive the send.
struct DiagSend {
  std::array<int64_t, 5> buf{};  // nonce, coll_seq, p2p_seq, pending op (-1: none), its seq
  MPI_Request req = MPI_REQUEST_NULL;
};

struct GroupState {
  MPI_Comm coll = MPI_COMM_NULL;  // collectives and loom's ring traffic
  MPI_Comm p2p = MPI_COMM_NULL;   // user send/recv (separate so tags can never collide)
  MPI_Comm diag = MPI_COMM_NULL;  // timeout diagnosis: liveness probes and replies
  int rank = 0;
  int size = 1;
  std::string name;
  int world_rank = 0;
  int world_size = 1;
  std::vector<int> world_ranks;                         // (size) world rank per member
  std::vector<int> member_nodes;                        // (size) node index per member
  std::shared_ptr<const std::vector<int>> world_nodes;  // (world_size) node per world rank
  int host_ranks = 1;  // world ranks on this rank's physical host (MPI shared-memory island)
  GroupOptions opts;
  double timeout_s = 300;
  int tag_ub = 32767;
  int64_t coll_seq = 0;  // collectives issued; identical on all members
  int64_t p2p_seq = 0;   // point-to-point calls issued by this rank
  CommCounters counters;
  MemoryPool pool;  // comm workspace: bf16 staging, ring receive buffers
  std::vector<std::shared_ptr<WorkState>> pending;
  int64_t diag_nonce = 0;                         // probes this rank sent
  std::vector<std::unique_ptr<DiagSend>> diag_sends;  // replies and probes still in flight
  // Bumped whenever a pending work completes or a ring step finishes: waits back off (sleep)
  // only while it stands still.
  int64_t progress = 0;

  GroupState() = default;
  GroupState(const GroupState&) = delete;
  GroupState& operator=(const GroupState&) = delete;
  ~GroupState();

  std::string prefix() const;
  // Advances every pending work once, in issue order, and drops the completed ones. A work whose
  // MPI call fails is completed with its error recorded (its own wait() rethrows it).
  void progress_pending();
  Tensor workspace(int64_t bytes);  // u8 tensor from `pool`, category comm
  // Answers other members' liveness probes on `diag` (never blocks). progress_pending calls it,
  // so every rank waiting on this group answers.
  void answer_probes();
  // After `w` timed out: probes the members `w` waits on (its peer, or every other member of a
  // collective) and waits up to grace_s for their replies while progressing this group. Returns
  // a sentence naming each member that holds `w` up (did not answer: frozen, dead or busy
  // elsewhere; or alive without having issued this call), or "" if `w` completed meanwhile.
  std::string diagnose(const WorkState& w, double grace_s);
};

struct WorkState {
  std::shared_ptr<GroupState> group;
  CommOp op = CommOp::barrier;
  int64_t count = 0;
  DType dtype = DType::f32;
  int64_t seq = 0;
  bool p2p = false;
  int peer = -1;
  Algorithm algorithm = Algorithm::mpi;
  bool done = false;
  std::string error;                          // non-empty: failed with this message
  std::vector<Tensor> keep;                   // caller tensors and staging, alive until done
  std::vector<std::function<void()>> on_complete;  // run once, in order, when step() finishes

  virtual ~WorkState() = default;
  // Advances without blocking; returns true when the communication has finished.
  virtual bool step() = 0;
  // step() plus completion hooks; records errors instead of throwing. Returns done.
  bool advance();
  // "all_reduce of 1024 x F32 (seq 7, algorithm ring)", or `label` where it is set (a group's
  // construction: ProcessGroup::world / split).
  std::string describe() const;
  std::string label;
};

// Plain MPI non-blocking requests.
struct RequestWork : WorkState {
  std::vector<MPI_Request> reqs;
  int64_t expect_recv_count = -1;  // irecv: elements the message must hold
  MPI_Datatype recv_type = MPI_BYTE;
  bool step() override;
};

// Ring reduce-scatter and/or all-gather over `offsets` (w+1 chunk boundaries in elements).
//   rs_in  (N):    reduce-scatter source, read only (null: no reduce-scatter phase)
//   rs_out (len r): receives op over ranks of chunk r (may alias rs_in + offsets[r])
//   ag_buf (N):    all-gather buffer whose chunk r is filled (by rs_out or the caller) before the
//                  all-gather phase runs (null: no all-gather phase)
struct RingPlan {
  const void* rs_in = nullptr;
  void* rs_out = nullptr;
  void* ag_buf = nullptr;
  std::vector<int64_t> offsets;
  DType dtype = DType::f32;
  ReduceOp op = ReduceOp::sum;
};
std::shared_ptr<WorkState> make_ring_work(const std::shared_ptr<GroupState>& g,
                                          const RingPlan& plan);

// Balanced split of n elements into w chunks: w+1 offsets, chunk j has n/w (+1 for j < n%w).
std::vector<int64_t> balanced_offsets(int64_t n, int w);

}  // namespace loom::comm::detail
