// comm/ring.cpp: ring reduce-scatter and all-gather over non-blocking send/recv.
//
// Glossary: w ranks, r this rank, chunk j = elements [offsets[j], offsets[j+1]), s step.
//
// Reduce-scatter, step s = 0..w-2: send the partial sum of chunk (r-s-1) to r+1, receive the
// partial of chunk (r-s-2) from r-1 and add this rank's own contribution to it. After w-1 steps
// rank r holds chunk r summed over all ranks, in the fixed order x[r+1] + x[r+2] + ... + x[r]
// (mod w), so the result does not depend on timing. Bandwidth: each rank sends (N - len(r)).
// All-gather, step s = 0..w-2: send chunk (r-s) to r+1, receive chunk (r-s-1) from r-1 straight
// into place. Every rank ends with the very same bits (each chunk was rounded once, by its owner).
//
// Partial sums travel in two ping-pong workspace buffers (2 * max chunk): the one received at step
// s is sent at step s+1 while the next arrives in the other, so the caller's input is never
// modified unless rs_out aliases it.
#include <algorithm>
#include <climits>
#include <cstring>

#include "comm/detail.h"
#include "core/error.h"

namespace loom::comm::detail {

std::vector<int64_t> balanced_offsets(int64_t n, int w) {
  std::vector<int64_t> off(size_t(w) + 1, 0);
  int64_t base = n / w, rem = n % w;
  for (int j = 0; j < w; ++j) off[size_t(j) + 1] = off[size_t(j)] + base + (j < rem ? 1 : 0);
  return off;
}

namespace {

class RingWork final : public WorkState {
 public:
  RingWork(const std::shared_ptr<GroupState>& g, const RingPlan& plan) : plan_(plan) {
    w_ = g->size;
    r_ = g->rank;
    next_ = (r_ + 1) % w_;
    prev_ = (r_ + w_ - 1) % w_;
    esize_ = int64_t(dtype_size(plan.dtype));
    mpi_type_ = mpi_transport_type(plan.dtype);
    LOOM_ASSERT(plan.offsets.size() == size_t(w_) + 1, "ring offsets {} for w={}",
                plan.offsets.size(), w_);
    int64_t max_chunk = 0;
    for (int j = 0; j < w_; ++j) max_chunk = std::max(max_chunk, len(j));
    LOOM_CHECK(max_chunk <= INT_MAX,
               "ring chunk of {} elements exceeds MPI's int count limit {}; split the buffer",
               max_chunk, INT_MAX);
    if (plan.rs_in) {
      if (w_ > 1) {
        Tensor ws = g->workspace(2 * max_chunk * esize_);  // (2, max_chunk) elements
        keep.push_back(ws);
        tmp_[0] = static_cast<char*>(ws.raw());
        tmp_[1] = tmp_[0] + max_chunk * esize_;
      } else if (plan.rs_out != plan.rs_in) {
        std::memcpy(plan.rs_out, plan.rs_in, size_t(len(0) * esize_));
      }
    }
    phase_ = plan.rs_in && w_ > 1 ? Phase::reduce_scatter
             : plan.ag_buf && w_ > 1 ? Phase::all_gather
                                     : Phase::done;
  }

  bool step() override {
    while (true) {
      if (active_) {
        int flag = 0;
        mpi_check(MPI_Testall(2, reqs_, &flag, MPI_STATUSES_IGNORE), "MPI_Testall (ring)");
        if (!flag) return false;
        active_ = false;
        ++group->progress;
        finish_step();
      }
      if (phase_ == Phase::done) return true;
      start_step();
    }
  }

 private:
  enum class Phase { reduce_scatter, all_gather, done };

  int64_t len(int j) const { return plan_.offsets[size_t(j) + 1] - plan_.offsets[size_t(j)]; }
  int mod(int j) const { return ((j % w_) + w_) % w_; }
  const char* in_chunk(int j) const {
    return static_cast<const char*>(plan_.rs_in) + plan_.offsets[size_t(j)] * esize_;
  }
  char* ag_chunk(int j) const {
    return static_cast<char*>(plan_.ag_buf) + plan_.offsets[size_t(j)] * esize_;
  }

  void start_step() {
    MPI_Comm comm = group->coll;
    int tag = int(seq % group->tag_ub);
    const void* send_ptr;
    void* recv_ptr;
    int64_t send_n, recv_n;
    if (phase_ == Phase::reduce_scatter) {
      int c_send = mod(r_ - step_ - 1), c_recv = mod(r_ - step_ - 2);
      // Step 0 sends this rank's own data; later steps forward the partial received last step.
      send_ptr = step_ == 0 ? static_cast<const void*>(in_chunk(c_send)) : tmp_[(step_ + 1) % 2];
      recv_ptr = tmp_[step_ % 2];
      send_n = len(c_send);
      recv_n = len(c_recv);
    } else {
      int c_send = mod(r_ - step_), c_recv = mod(r_ - step_ - 1);
      send_ptr = ag_chunk(c_send);
      recv_ptr = ag_chunk(c_recv);
      send_n = len(c_send);
      recv_n = len(c_recv);
    }
    mpi_check(MPI_Irecv(recv_ptr, int(recv_n), mpi_type_, prev_, tag, comm, &reqs_[1]),
              "MPI_Irecv (ring)");
    mpi_check(MPI_Isend(send_ptr, int(send_n), mpi_type_, next_, tag, comm, &reqs_[0]),
              "MPI_Isend (ring)");
    active_ = true;
  }

  void finish_step() {
    if (phase_ == Phase::reduce_scatter) {
      int c_recv = mod(r_ - step_ - 2);
      char* partial = tmp_[step_ % 2];
      // partial (ranks c_recv+1 .. r-1) + own contribution; the last step lands in rs_out.
      void* dst = step_ == w_ - 2 ? plan_.rs_out : partial;
      reduce_into(dst, partial, in_chunk(c_recv), len(c_recv), plan_.dtype, plan_.op);
      if (++step_ == w_ - 1) {
        step_ = 0;
        phase_ = plan_.ag_buf ? Phase::all_gather : Phase::done;
      }
    } else {
      if (++step_ == w_ - 1) phase_ = Phase::done;
    }
  }

  RingPlan plan_;
  int w_ = 1, r_ = 0, next_ = 0, prev_ = 0;
  int64_t esize_ = 4;
  MPI_Datatype mpi_type_ = MPI_BYTE;
  char* tmp_[2] = {nullptr, nullptr};
  Phase phase_ = Phase::done;
  int step_ = 0;
  bool active_ = false;
  MPI_Request reqs_[2] = {MPI_REQUEST_NULL, MPI_REQUEST_NULL};
};

}  // namespace

std::shared_ptr<WorkState> make_ring_work(const std::shared_ptr<GroupState>& g,
                                          const RingPlan& plan) {
  return std::make_shared<RingWork>(g, plan);
}

}  // namespace loom::comm::detail
