// comm/diagnose.cpp: naming the member a timed-out wait is stuck on (detail.h: answer_probes,
// diagnose).
//
// MPI cannot say which member of a collective has not arrived. After a timeout the waiter asks:
// it sends a liveness probe (a nonce) to each member it waits on over the group's `diag`
// communicator, and every rank that is waiting on this group (any Work::wait or test polls
// progress_pending, which answers probes) replies with how many collectives and point-to-point
// calls it has issued and what it is waiting in. A member that does not reply within the grace
// period is frozen, dead, or computing outside communication; one that replies without having
// issued the call is alive but somewhere else. Replies to an earlier probe (a member that
// answered late) carry an old nonce and are dropped.
#include <chrono>
#include <thread>

#include "comm/detail.h"
#include "core/error.h"

namespace loom::comm::detail {

namespace {

constexpr int kProbeTag = 1;
constexpr int kReplyTag = 2;

void prune_sends(std::vector<std::unique_ptr<DiagSend>>& sends) {
  std::erase_if(sends, [](const std::unique_ptr<DiagSend>& d) {
    int flag = 0;
    if (d->req == MPI_REQUEST_NULL) return true;
    if (MPI_Test(&d->req, &flag, MPI_STATUS_IGNORE) != MPI_SUCCESS) return true;
    return flag != 0;
  });
}

}  // namespace

void GroupState::answer_probes() {
  if (diag == MPI_COMM_NULL) return;
  prune_sends(diag_sends);
  for (;;) {
    int flag = 0;
    MPI_Status st;
    if (MPI_Iprobe(MPI_ANY_SOURCE, kProbeTag, diag, &flag, &st) != MPI_SUCCESS || !flag) return;
    int64_t nonce = 0;
    if (MPI_Recv(&nonce, 1, MPI_INT64_T, st.MPI_SOURCE, kProbeTag, diag, MPI_STATUS_IGNORE) !=
        MPI_SUCCESS)
      return;
    auto d = std::make_unique<DiagSend>();
    d->buf = {nonce, coll_seq, p2p_seq, -1, 0};
    for (const auto& w : pending)
      if (!w->done) {
        d->buf[3] = int64_t(w->op);
        d->buf[4] = w->seq;
        break;
      }
    if (MPI_Isend(d->buf.data(), 5, MPI_INT64_T, st.MPI_SOURCE, kReplyTag, diag, &d->req) ==
        MPI_SUCCESS)
      diag_sends.push_back(std::move(d));
  }
}

std::string GroupState::diagnose(const WorkState& w, double grace_s) {
  if (diag == MPI_COMM_NULL || size <= 1) return "no other member to wait on";
  std::vector<int> targets;
  if (w.p2p) {
    if (w.peer >= 0 && w.peer < size) targets.push_back(w.peer);
  } else {
    for (int r = 0; r < size; ++r)
      if (r != rank) targets.push_back(r);
  }
  const int64_t nonce = ++diag_nonce;
  for (int t : targets) {
    auto d = std::make_unique<DiagSend>();
    d->buf[0] = nonce;
    if (MPI_Isend(d->buf.data(), 1, MPI_INT64_T, t, kProbeTag, diag, &d->req) == MPI_SUCCESS)
      diag_sends.push_back(std::move(d));
  }
  std::vector<std::array<int64_t, 5>> reply(static_cast<size_t>(size));
  std::vector<bool> answered(static_cast<size_t>(size), false);
  size_t got = 0;
  const auto deadline =
      std::chrono::steady_clock::now() + std::chrono::duration<double>(grace_s);
  while (got < targets.size() && std::chrono::steady_clock::now() < deadline) {
    progress_pending();  // also answers the probes other waiters send us
    if (w.done) return "";
    int flag = 0;
    MPI_Status st;
    while (MPI_Iprobe(MPI_ANY_SOURCE, kReplyTag, diag, &flag, &st) == MPI_SUCCESS && flag) {
      std::array<int64_t, 5> b{};
      if (MPI_Recv(b.data(), 5, MPI_INT64_T, st.MPI_SOURCE, kReplyTag, diag, MPI_STATUS_IGNORE) !=
          MPI_SUCCESS)
        break;
      const int src = st.MPI_SOURCE;
      if (b[0] != nonce || src < 0 || src >= size || answered[size_t(src)]) continue;
      answered[size_t(src)] = true;
      reply[size_t(src)] = b;
      ++got;
    }
    std::this_thread::sleep_for(std::chrono::microseconds(500));
  }
  auto who = [&](int r) {
    return fmt::format("world rank {} (group rank {})", world_ranks[size_t(r)], r);
  };
  auto waiting_in = [&](const std::array<int64_t, 5>& b) {
    if (b[3] < 0) return std::string("not waiting on this group");
    return fmt::format("waiting in {} seq {}", comm_op_name(CommOp(b[3])), b[4]);
  };
  std::string out;
  auto add = [&](const std::string& s) { out += (out.empty() ? "" : "; ") + s; };
  for (int t : targets) {
    if (!answered[size_t(t)]) {
      add(fmt::format("waiting on {}, which did not answer a liveness probe within {:.1f} s: it "
                      "is frozen, dead, or busy outside communication on this group",
                      who(t), grace_s));
      continue;
    }
    const auto& b = reply[size_t(t)];
    if (w.p2p)
      add(fmt::format("waiting on {}, which is alive ({}; {} point-to-point calls issued) but has "
                      "not sent the matching message",
                      who(t), waiting_in(b), b[2]));
    else if (b[1] < w.seq)
      add(fmt::format("waiting on {}, which is alive but has not issued this call (it has "
                      "issued {} collectives; {})",
                      who(t), b[1], waiting_in(b)));
  }
  if (out.empty())
    out = "every member answered and has issued this call, yet it did not complete: a member "
          "joined it with a different operation or count";
  return out;
}

}  // namespace loom::comm::detail
