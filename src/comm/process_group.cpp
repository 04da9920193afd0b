// comm/process_group.cpp: ProcessGroup over MPI communicators; Work = polled non-blocking MPI.
//
// Glossary: w group size, r group rank, N elements, n per-rank block, seq collective sequence.
//
// Why polling: a blocking MPI call cannot time out, and a rank that never arrives would hang the
// job forever. Every operation is started non-blocking and Work::wait polls it (MPI_Test drives
// Open MPI's progress engine) against a deadline. Ranks share few cores, so the poll loop spins
// briefly for latency, then yields, then sleeps.
#include "comm/process_group.h"

#include <sched.h>
#include <time.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <numeric>
#include <thread>

#include "comm/detail.h"
#include "core/error.h"

namespace loom::comm {

using detail::GroupState;
using detail::RequestWork;
using detail::WorkState;

// ---------------------------------------------------------------------------------------------
// Names, counters, options

std::string_view algorithm_name(Algorithm a) {
  switch (a) {
    case Algorithm::mpi: return "mpi";
    case Algorithm::ring: return "ring";
    case Algorithm::auto_select: return "auto";
  }
  return "?";
}

Algorithm algorithm_from_name(std::string_view name) {
  for (Algorithm a : {Algorithm::mpi, Algorithm::ring, Algorithm::auto_select})
    if (algorithm_name(a) == name) return a;
  LOOM_FAIL("unknown collective algorithm '{}'; choose mpi, ring or auto", name);
}

std::string_view comm_op_name(CommOp op) {
  switch (op) {
    case CommOp::all_reduce: return "all_reduce";
    case CommOp::reduce_scatter: return "reduce_scatter";
    case CommOp::all_gather: return "all_gather";
    case CommOp::all_to_all: return "all_to_all";
    case CommOp::all_to_all_v: return "all_to_all_v";
    case CommOp::broadcast: return "broadcast";
    case CommOp::send: return "send";
    case CommOp::recv: return "recv";
    case CommOp::barrier: return "barrier";
  }
  return "?";
}

int64_t CommCounters::total_calls() const {
  int64_t t = 0;
  for (const auto& c : by_op) t += c.calls;
  return t;
}

int64_t CommCounters::total_bytes() const {
  int64_t t = 0;
  for (const auto& c : by_op) t += c.bytes;
  return t;
}

std::string CommCounters::to_json() const {
  std::string out = "{";
  for (size_t i = 0; i < kNumCommOps; ++i)
    out += fmt::format("{}\"{}\": {{\"calls\": {}, \"bytes\": {}}}", i ? ", " : "",
                       comm_op_name(CommOp(i)), by_op[i].calls, by_op[i].bytes);
  return out + "}";
}

double resolve_timeout(const GroupOptions& opts) {
  if (opts.timeout_s > 0) return opts.timeout_s;
  const char* v = std::getenv("LOOM_COMM_TIMEOUT");
  if (!v || !*v) return 300.0;
  char* end = nullptr;
  double t = std::strtod(v, &end);
  LOOM_CHECK(end && *end == '\0' && t > 0,
             "LOOM_COMM_TIMEOUT='{}' must be a positive number of seconds (e.g. 300)", v);
  return t;
}

Algorithm choose_algorithm(CommOp op, int64_t bytes, int w) {
  // From bench/comm on the 2-core development machine (f32, best of 3; re-measured quiet in
  // session 4 with single-copy transfers and the progress-aware wait; busbw GB/s MPI -> ring):
  // - 2 ranks: the ring's all_reduce wins from 4 KiB (1.2-3.6x from 1 MiB: 64 MiB 1.13 -> 3.01)
  //   but for one dip at 256 KiB; its reduce_scatter wins at every size (64 MiB 0.91 -> 1.85):
  //   Open MPI 4.1 reduces through temporaries.
  // - 4 and 8 ranks oversubscribe the 2 cores; each of the ring's 2(w-1) steps may wait for a
  //   descheduled neighbour. The ring's all_reduce wins from 1 MiB at 4 ranks (64 MiB 0.98 ->
  //   1.46) and from 4 MiB at 8 (0.46 -> 0.69), its reduce_scatter from 1-16 MiB; below that
  //   MPI's wins by up to 3x. 4 MiB is the shared crossover.
  // - all_gather: MPI's is as fast or faster at 2 and 8 ranks and at 64 MiB on 4 (1.51 vs 1.05;
  //   the ring wins 1-16 MiB on 4 ranks by 10-20%), so MPI's (fewer steps) is kept.
  const int64_t kib = 1024, mib = 1024 * kib;
  switch (op) {
    case CommOp::all_reduce:
    case CommOp::reduce_scatter:
      return bytes >= (w <= 2 ? 4 * kib : 4 * mib) ? Algorithm::ring : Algorithm::mpi;
    default: return Algorithm::mpi;
  }
}

// ---------------------------------------------------------------------------------------------
// The watchdog

namespace {

// Longest wait for liveness replies after a timeout (half the timeout when that is shorter).
constexpr double kDiagnoseGraceMax = 2.0;  // seconds
double diagnose_grace(double timeout_s) { return std::min(kDiagnoseGraceMax, 0.5 * timeout_s); }

// The last line of "nothing hangs": Work::wait checks its deadline between polls, but a poll is
// an MPI call, and a peer stopped or killed in the middle of a shared-memory transfer can leave
// Open MPI spinning inside it (its FIFO reader waits for a write the stopped writer never
// finishes), so the deadline check is never reached. A watchdog thread, started with the first
// armed call, checks every half second whether the armed call has outlived its timeout, the
// liveness probe's grace and kWatchdogMargin; if so it names the call and ends this rank (_Exit),
// and mpirun ends the job. Every MPI call of a group runs armed (WatchdogScope): a wait, the
// polls of Work::test and of launching a collective (progress_pending), and posting the
// collective itself, since any of them can be the call that never returns (session 13: a frozen
// peer once left its neighbour 140 s in an unarmed poll, which only the test's own timeout
// ended). Arming is a mutex and a shared_ptr copy (no wake-up per call). One communicating
// thread per process, as loom's ranks have.
constexpr double kWatchdogMargin = 5.0;  // seconds past timeout + grace

class Watchdog {
 public:
  static Watchdog& get() {
    static Watchdog* w = new Watchdog();  // never destroyed: its detached thread may outlive exit
    return *w;
  }
  void arm(const std::shared_ptr<WorkState>& w, double timeout_s, double grace_s) {
    const std::lock_guard<std::mutex> lk(m_);
    work_ = w;
    timeout_s_ = timeout_s;
    start_ = std::chrono::steady_clock::now();
    // Capped at 1e9 s (31 years): a larger LOOM_COMM_TIMEOUT would overflow the clock's ticks.
    const double after_s = std::min(timeout_s + grace_s + kWatchdogMargin, 1e9);
    fire_at_ = start_ + std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                            std::chrono::duration<double>(after_s));
  }
  void disarm() {
    const std::lock_guard<std::mutex> lk(m_);
    work_.reset();
  }

 private:
  Watchdog() { std::thread([this] { run(); }).detach(); }
  void run() {
    for (;;) {
      std::this_thread::sleep_for(std::chrono::milliseconds(500));
      std::shared_ptr<WorkState> w;
      double timeout_s = 0, elapsed = 0;
      {
        const std::lock_guard<std::mutex> lk(m_);
        const auto now = std::chrono::steady_clock::now();
        if (!work_ || now < fire_at_) continue;
        w = work_;
        timeout_s = timeout_s_;
        elapsed = std::chrono::duration<double>(now - start_).count();
      }
      std::fprintf(stderr,
                   "error: %s %s is still inside an MPI call %.1f s after it started, past its "
                   "%.1f s timeout and the liveness probe: a peer stopped or killed in the middle "
                   "of a shared-memory transfer can leave MPI spinning in a call that never "
                   "returns. Ending this rank so that the job ends (raise LOOM_COMM_TIMEOUT if the "
                   "wait is legitimate).\n",
                   w->group->prefix().c_str(), w->describe().c_str(), elapsed, timeout_s);
      std::fflush(stderr);
      std::_Exit(1);
    }
  }
  std::mutex m_;
  std::shared_ptr<WorkState> work_;  // the armed call's work (null: disarmed)
  double timeout_s_ = 0;
  std::chrono::steady_clock::time_point start_, fire_at_;
};

// Arms the watchdog for the scope's lifetime unless an enclosing scope already has (a wait's
// polls run inside the wait's arming, which keeps the wait's start and deadline).
class WatchdogScope {
 public:
  WatchdogScope(const std::shared_ptr<WorkState>& w, double timeout_s) {
    // A group of one makes no MPI call to watch (and a serial run starts no watchdog thread).
    if (depth_ > 0 || !w || w->group->size <= 1) return;
    Watchdog::get().arm(w, timeout_s, diagnose_grace(timeout_s));
    armed_ = true;
    ++depth_;
  }
  ~WatchdogScope() {
    if (!armed_) return;
    --depth_;
    Watchdog::get().disarm();
  }
  WatchdogScope(const WatchdogScope&) = delete;
  WatchdogScope& operator=(const WatchdogScope&) = delete;

 private:
  static thread_local int depth_;
  bool armed_ = false;
};
thread_local int WatchdogScope::depth_ = 0;

// Fault injection for the watchdog's tests (tests/cli/test_cli.sh): LOOM_TEST_STUCK_IN_MPI=RANK
// (or "all") makes that world rank's waits block as a poll stuck inside MPI would;
// "poll:RANK" (or "poll:all") makes its polls outside a wait block instead (launching a
// collective, Work::test), which a wait's deadline cannot see; "setup:RANK" (or "setup:all")
// makes its construction of the world group block (SetupWork below).
enum class StuckAt { wait, poll, setup };
bool stuck_in_mpi_injected(const detail::GroupState& g, StuckAt at) {
  static const std::pair<StuckAt, int> where = [] {
    const char* v = std::getenv("LOOM_TEST_STUCK_IN_MPI");
    if (!v || !*v) return std::pair{StuckAt::wait, -1};
    StuckAt a = StuckAt::wait;
    if (std::strncmp(v, "poll:", 5) == 0) {
      a = StuckAt::poll;
      v += 5;
    } else if (std::strncmp(v, "setup:", 6) == 0) {
      a = StuckAt::setup;
      v += 6;
    }
    if (std::strcmp(v, "all") == 0) return std::pair{a, INT_MAX};
    char* end = nullptr;
    const long r = std::strtol(v, &end, 10);
    LOOM_CHECK(end && *end == '\0' && r >= 0 && r < INT_MAX,
               "LOOM_TEST_STUCK_IN_MPI='{}' must be a world rank (0, 1, ...) or 'all', optionally "
               "after 'poll:' or 'setup:' (fault injection for tests: that rank's waits, its polls "
               "outside a wait, or its making of the world group never return)",
               std::getenv("LOOM_TEST_STUCK_IN_MPI"));
    return std::pair{a, int(r)};
  }();
  return where.first == at &&
         (where.second == INT_MAX || (where.second >= 0 && g.world_rank == where.second));
}
thread_local bool t_in_wait = false;  // inside Work::wait (its polls are not "outside a wait")

}  // namespace

// ---------------------------------------------------------------------------------------------
// GroupState / WorkState

namespace detail {

GroupState::~GroupState() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (finalized) return;  // MPI already gone: nothing can be freed any more
  for (auto& d : diag_sends)
    if (d->req != MPI_REQUEST_NULL) MPI_Request_free(&d->req);
  if (coll != MPI_COMM_NULL) MPI_Comm_free(&coll);
  if (p2p != MPI_COMM_NULL) MPI_Comm_free(&p2p);
  if (diag != MPI_COMM_NULL) MPI_Comm_free(&diag);
}

std::string GroupState::prefix() const {
  return fmt::format("[rank {}/{} group={}]", world_rank, world_size, name);
}

Tensor GroupState::workspace(int64_t bytes) {
  return Tensor::empty({bytes}, DType::u8, pool, MemCategory::comm);
}

void GroupState::progress_pending() {
  // Armed with the oldest pending work (the one a stuck poll most likely waits on); inside a
  // wait, the wait's arming stands.
  const WatchdogScope armed(pending.empty() ? nullptr : pending.front(), timeout_s);
  if (!t_in_wait && !pending.empty() && stuck_in_mpi_injected(*this, StuckAt::poll))
    for (;;) std::this_thread::sleep_for(std::chrono::seconds(1));
  answer_probes();
  // Index loop: advance() runs completion hooks only, never issues new work, so `pending` is
  // not modified under us.
  for (auto& w : pending) w->advance();
  std::erase_if(pending, [](const std::shared_ptr<WorkState>& w) { return w->done; });
}

bool WorkState::advance() {
  if (done) return true;
  try {
    if (!step()) return false;
    for (auto& f : on_complete) f();
  } catch (const std::exception& e) {
    error = e.what();
  }
  on_complete.clear();
  keep.clear();
  done = true;
  ++group->progress;
  return true;
}

std::string WorkState::describe() const {
  if (!label.empty()) return label;
  std::string peer_s = p2p ? fmt::format(" with group rank {}", peer) : "";
  return fmt::format("{} of {} x {}{} ({}seq {}, algorithm {})", comm_op_name(op), count,
                     dtype_name(dtype), peer_s, p2p ? "p2p " : "", seq, algorithm_name(algorithm));
}

bool RequestWork::step() {
  if (reqs.empty()) return true;
  int flag = 0;
  std::vector<MPI_Status> st(reqs.size());
  int rc = MPI_Testall(int(reqs.size()), reqs.data(), &flag, st.data());
  mpi_check(rc, "MPI_Testall");
  if (!flag) return false;
  if (expect_recv_count >= 0) {
    int got = 0;
    mpi_check(MPI_Get_count(&st[0], recv_type, &got), "MPI_Get_count");
    LOOM_CHECK(got == expect_recv_count,
               "{} received {} elements from group rank {} but the buffer holds {}; sender and "
               "receiver must agree on the message size",
               group->prefix(), got, peer, expect_recv_count);
  }
  return true;
}

}  // namespace detail

// ---------------------------------------------------------------------------------------------
// Work

namespace {

// Poll back-off, reset whenever the group makes progress (a work completes, a ring step
// finishes): ~100 immediate re-polls (microseconds; best latency when every rank has a core),
// then sched_yield (ranks oversubscribing cores let the peer run) until nothing has progressed
// for yield_window(), then 50 us sleeps so an idle waiter costs next to nothing while a slow peer
// computes. The window must cover a whole large message: without single-copy transfers (CMA),
// MPI moves one 32 KiB fragment per poll of both ranks, and sleeping between polls cut a 64 MiB
// send from 5.7 to 0.7 GB/s (bench/comm, session 4).
constexpr double kYieldWindow = 0.2;  // seconds
// With single-copy transfers named (scripts/mpirun-local sets Open MPI's
// btl_vader_single_copy_mechanism to cma where the kernel allows it) a large message moves in one
// copy inside one poll, so nothing needs the long window, and there it costs the computing
// ranks: a waiter yielding in a loop keeps taking half of a shared core's time (sched_yield
// under CFS hardly gives it up). Measured on 2 cores (session 11, codegeex-small, 8 x 128
// tokens): tp 2 x pp 2 on 4 ranks 167 -> 115 ms a step with a 1 ms window; dp 4, dp 8 and 2-rank
// tp 2 unchanged. Unset (plain mpirun, whatever the transport picks) keeps the long window.
constexpr double kYieldWindowSingleCopy = 0.001;  // seconds

double yield_window() {
  static const double w = [] {
    const char* m = std::getenv("OMPI_MCA_btl_vader_single_copy_mechanism");
    return m && *m && std::strcmp(m, "none") != 0 ? kYieldWindowSingleCopy : kYieldWindow;
  }();
  return w;
}
void backoff(int64_t polls, double idle_s) {
  if (polls < 100) return;
  if (idle_s < yield_window()) {
    sched_yield();
    return;
  }
  timespec ts{0, 50'000};
  nanosleep(&ts, nullptr);
}

}  // namespace

bool Work::completed() const { return !state_ || state_->done; }

bool Work::test() const {
  if (!state_ || state_->done) return true;
  state_->group->progress_pending();
  if (state_->done && !state_->error.empty()) throw Error(state_->error);
  return state_->done;
}

void Work::wait() const {
  if (!state_) return;
  wait(state_->group->timeout_s);
}

void Work::wait(double timeout_s) const {
  if (!state_) return;
  WorkState& w = *state_;
  GroupState& g = *w.group;
  const double grace = diagnose_grace(timeout_s);
  const WatchdogScope armed(state_, timeout_s);
  if (stuck_in_mpi_injected(g, StuckAt::wait))
    for (;;) std::this_thread::sleep_for(std::chrono::seconds(1));
  struct InWait {
    InWait() { t_in_wait = true; }
    ~InWait() { t_in_wait = false; }
  } in_wait;
  auto start = std::chrono::steady_clock::now();
  auto deadline = start + std::chrono::duration<double>(timeout_s);
  auto idle_since = start;
  int64_t seen = g.progress;
  for (int64_t polls = 0;; ++polls) {
    if (!w.done) g.progress_pending();
    if (w.done) {
      if (!w.error.empty()) throw Error(fmt::format("{} {} failed: {}", g.prefix(), w.describe(), w.error));
      return;
    }
    const auto now = std::chrono::steady_clock::now();
    if (g.progress != seen) {
      seen = g.progress;
      idle_since = now;
    }
    if (now >= deadline) {
      // Name the member this wait is stuck on: a short liveness probe tells a frozen or dead
      // peer (no answer) from a live one that never issued this call.
      const std::string why = g.diagnose(w, grace);
      if (w.done) continue;  // completed during the probe: report as usual
      std::string members;
      for (size_t i = 0; i < g.world_ranks.size(); ++i)
        members += fmt::format("{}{}", i ? "," : "", g.world_ranks[i]);
      throw TimeoutError(fmt::format(
          "{} {} timed out after {:.1f} s (group rank {}/{}, world ranks [{}]): {}. If the wait "
          "is legitimate raise LOOM_COMM_TIMEOUT or GroupOptions::timeout_s.",
          g.prefix(), w.describe(), timeout_s, g.rank, g.size, members, why));
    }
    backoff(polls, std::chrono::duration<double>(now - idle_since).count());
  }
}

// ---------------------------------------------------------------------------------------------
// ProcessGroup: construction

namespace {

int mpi_count(int64_t n, const GroupState& g, CommOp op) {
  LOOM_CHECK(n >= 0 && n <= INT_MAX,
             "{} {} of {} elements exceeds MPI's int count limit {}; split the buffer", g.prefix(),
             comm_op_name(op), n, INT_MAX);
  return int(n);
}

void set_comm_basics(GroupState& s) {
  LOOM_MPI(MPI_Comm_set_errhandler(s.coll, MPI_ERRORS_RETURN));
  LOOM_MPI(MPI_Comm_set_errhandler(s.p2p, MPI_ERRORS_RETURN));
  LOOM_MPI(MPI_Comm_set_errhandler(s.diag, MPI_ERRORS_RETURN));
  LOOM_MPI(MPI_Comm_rank(s.coll, &s.rank));
  LOOM_MPI(MPI_Comm_size(s.coll, &s.size));
  void* attr = nullptr;
  int flag = 0;
  LOOM_MPI(MPI_Comm_get_attr(s.coll, MPI_TAG_UB, &attr, &flag));
  if (flag && attr) s.tag_ub = *static_cast<int*>(attr);
}

// Making a group runs blocking MPI collectives (MPI_Comm_dup, MPI_Comm_split, the host
// detection's all-reduce and all-gather), which a peer frozen or killed meanwhile leaves
// unfinished for good; so they run armed like every other call (the watchdog names the group
// being made and ends the rank). Session 25: a checkpoint save makes a world group, and a rank
// frozen just before it left its neighbour inside MPI_Comm_dup until the test's 150 s limit.
struct SetupWork : WorkState {
  bool step() override { return true; }
};
std::shared_ptr<WorkState> setup_work(const std::shared_ptr<GroupState>& g, std::string label) {
  auto w = std::make_shared<SetupWork>();
  w->group = g;
  w->label = std::move(label);
  return w;
}

// Host index of every world rank, from MPI's shared-memory islands (hosts numbered in order of
// their lowest world rank).
std::vector<int> detect_world_hosts(int world_rank, int world_size) {
  std::vector<int> hosts(size_t(world_size), 0);
  MPI_Comm local = MPI_COMM_NULL;
  LOOM_MPI(MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, world_rank, MPI_INFO_NULL,
                               &local));
  int leader = world_rank;  // lowest world rank on this host names the host
  LOOM_MPI(MPI_Allreduce(MPI_IN_PLACE, &leader, 1, MPI_INT, MPI_MIN, local));
  LOOM_MPI(MPI_Comm_free(&local));
  std::vector<int> leaders(size_t(world_size), 0);
  LOOM_MPI(MPI_Allgather(&leader, 1, MPI_INT, leaders.data(), 1, MPI_INT, MPI_COMM_WORLD));
  std::vector<int> distinct = leaders;
  std::sort(distinct.begin(), distinct.end());
  distinct.erase(std::unique(distinct.begin(), distinct.end()), distinct.end());
  for (int i = 0; i < world_size; ++i)
    hosts[size_t(i)] = int(std::lower_bound(distinct.begin(), distinct.end(), leaders[size_t(i)]) -
                           distinct.begin());
  return hosts;
}

}  // namespace

ProcessGroup ProcessGroup::world(const GroupOptions& opts) {
  int initialised = 0;
  LOOM_MPI(MPI_Initialized(&initialised));
  LOOM_CHECK(initialised, "ProcessGroup::world() needs MPI: create a loom::comm::MpiRuntime "
                          "(init_mpi) at the top of main() first");
  LOOM_CHECK(opts.ranks_per_node >= 0, "ranks_per_node={} must be >= 0 (0 = detect)",
             opts.ranks_per_node);
  auto s = std::make_shared<GroupState>();
  s->name = "world";
  s->opts = opts;
  s->timeout_s = resolve_timeout(opts);
  // Rank and size first (local calls), so that the armed setup below can name this rank.
  LOOM_MPI(MPI_Comm_rank(MPI_COMM_WORLD, &s->world_rank));
  LOOM_MPI(MPI_Comm_size(MPI_COMM_WORLD, &s->world_size));
  s->size = s->world_size;
  const WatchdogScope armed(
      setup_work(s, "making the world group (MPI_Comm_dup, host detection)"), s->timeout_s);
  if (stuck_in_mpi_injected(*s, StuckAt::setup))
    for (;;) std::this_thread::sleep_for(std::chrono::seconds(1));
  LOOM_MPI(MPI_Comm_dup(MPI_COMM_WORLD, &s->coll));
  LOOM_MPI(MPI_Comm_dup(MPI_COMM_WORLD, &s->p2p));
  LOOM_MPI(MPI_Comm_dup(MPI_COMM_WORLD, &s->diag));
  set_comm_basics(*s);
  s->world_rank = s->rank;
  s->world_size = s->size;
  s->world_ranks.resize(size_t(s->size));
  std::iota(s->world_ranks.begin(), s->world_ranks.end(), 0);
  // Nodes are the hosts unless ranks_per_node emulates others; the hosts still set how many
  // ranks share this machine's cores.
  std::vector<int> hosts = detect_world_hosts(s->world_rank, s->world_size);
  s->host_ranks = int(std::count(hosts.begin(), hosts.end(), hosts[size_t(s->world_rank)]));
  if (opts.ranks_per_node > 0)
    for (int i = 0; i < s->world_size; ++i) hosts[size_t(i)] = i / opts.ranks_per_node;
  s->world_nodes = std::make_shared<const std::vector<int>>(std::move(hosts));
  s->member_nodes = *s->world_nodes;
  return ProcessGroup(std::move(s));
}

ProcessGroup ProcessGroup::split(const std::vector<std::vector<int>>& partition,
                                 const std::string& name) const {
  GroupState& g = st();
  std::vector<int> owner(size_t(g.size), -1);
  int color = MPI_UNDEFINED, key = 0;
  for (size_t set = 0; set < partition.size(); ++set) {
    for (size_t i = 0; i < partition[set].size(); ++i) {
      int r = partition[set][i];
      LOOM_CHECK(r >= 0 && r < g.size,
                 "{} split '{}': set {} lists rank {} but group '{}' has ranks 0..{}", g.prefix(),
                 name, set, r, g.name, g.size - 1);
      LOOM_CHECK(owner[size_t(r)] < 0, "{} split '{}': rank {} is listed in set {} and set {}",
                 g.prefix(), name, r, owner[size_t(r)], set);
      owner[size_t(r)] = int(set);
      if (r == g.rank) {
        color = int(set);
        key = int(i);
      }
    }
  }
  MPI_Comm sub = MPI_COMM_NULL;
  const WatchdogScope armed(
      setup_work(state_, fmt::format("making group '{}' (MPI_Comm_split, MPI_Comm_dup)", name)),
      g.timeout_s);
  LOOM_MPI(MPI_Comm_split(g.coll, color, key, &sub));
  if (color == MPI_UNDEFINED) return ProcessGroup();
  auto s = std::make_shared<GroupState>();
  s->coll = sub;
  LOOM_MPI(MPI_Comm_dup(sub, &s->p2p));
  LOOM_MPI(MPI_Comm_dup(sub, &s->diag));
  s->name = name;
  s->opts = g.opts;
  s->timeout_s = g.timeout_s;
  set_comm_basics(*s);
  s->world_rank = g.world_rank;
  s->world_size = g.world_size;
  s->world_nodes = g.world_nodes;
  s->host_ranks = g.host_ranks;
  for (int r : partition[size_t(color)]) {
    int wr = g.world_ranks[size_t(r)];
    s->world_ranks.push_back(wr);
    s->member_nodes.push_back((*g.world_nodes)[size_t(wr)]);
  }
  LOOM_ASSERT(int(s->world_ranks.size()) == s->size, "split size {} vs MPI size {}",
              s->world_ranks.size(), s->size);
  return ProcessGroup(std::move(s));
}

// ---------------------------------------------------------------------------------------------
// ProcessGroup: accessors

GroupState& ProcessGroup::st() const {
  LOOM_CHECK(state_ != nullptr,
             "operation on a null ProcessGroup (this rank is not a member of the group it was "
             "given; check the split that produced it)");
  return *state_;
}

int ProcessGroup::rank() const { return st().rank; }
int ProcessGroup::size() const { return st().size; }
const std::string& ProcessGroup::name() const { return st().name; }
const std::vector<int>& ProcessGroup::world_ranks() const { return st().world_ranks; }
int ProcessGroup::world_rank() const { return st().world_rank; }
int ProcessGroup::world_size() const { return st().world_size; }
const std::vector<int>& ProcessGroup::member_nodes() const { return st().member_nodes; }
int ProcessGroup::node() const { return st().member_nodes[size_t(st().rank)]; }
int ProcessGroup::num_nodes() const {
  std::vector<int> n = st().member_nodes;
  std::sort(n.begin(), n.end());
  return int(std::unique(n.begin(), n.end()) - n.begin());
}
int ProcessGroup::local_rank() const {
  const GroupState& g = st();
  int me = g.member_nodes[size_t(g.rank)];
  return int(std::count(g.member_nodes.begin(), g.member_nodes.begin() + g.rank, me));
}
int ProcessGroup::local_size() const {
  const GroupState& g = st();
  return int(std::count(g.member_nodes.begin(), g.member_nodes.end(), g.member_nodes[size_t(g.rank)]));
}
int ProcessGroup::host_ranks() const { return st().host_ranks; }
double ProcessGroup::timeout_s() const { return st().timeout_s; }
void ProcessGroup::set_timeout(double seconds) const {
  LOOM_CHECK(seconds > 0, "{} timeout {} s must be > 0", st().prefix(), seconds);
  st().timeout_s = seconds;
}
Algorithm ProcessGroup::algorithm() const { return st().opts.algorithm; }
void ProcessGroup::set_algorithm(Algorithm a) const { st().opts.algorithm = a; }
int64_t ProcessGroup::sequence() const { return st().coll_seq; }
const CommCounters& ProcessGroup::counters() const { return st().counters; }
void ProcessGroup::reset_counters() const { st().counters = CommCounters{}; }
std::string ProcessGroup::prefix() const { return st().prefix(); }

// ---------------------------------------------------------------------------------------------
// ProcessGroup: operations

namespace {

MPI_Op mpi_op(ReduceOp op) { return op == ReduceOp::sum ? MPI_SUM : MPI_MAX; }

// Starts bookkeeping shared by every collective: sequence number, counters, algorithm.
template <typename W>
std::shared_ptr<W> new_work(const std::shared_ptr<GroupState>& g, CommOp op, const BufferRef& b,
                            int64_t bytes_sent) {
  auto w = std::make_shared<W>();
  w->group = g;
  w->op = op;
  w->count = b.count;
  w->dtype = b.dtype;
  w->seq = ++g->coll_seq;
  g->counters[op].calls += 1;
  g->counters[op].bytes += bytes_sent;
  return w;
}

Work launch(const std::shared_ptr<GroupState>& g, std::shared_ptr<WorkState> w) {
  g->pending.push_back(w);
  g->progress_pending();  // start right away (ring: post the first step)
  return Work(std::move(w));
}

void check_buffer(const GroupState& g, CommOp op, const BufferRef& b, const char* what) {
  LOOM_CHECK(b.count >= 0, "{} {}: {} has negative count {}", g.prefix(), comm_op_name(op), what,
             b.count);
  LOOM_CHECK(b.count == 0 || b.data != nullptr, "{} {}: {} of {} elements has a null pointer",
             g.prefix(), comm_op_name(op), what, b.count);
}

Algorithm pick(const GroupState& g, CommOp op, int64_t bytes) {
  Algorithm a = g.opts.algorithm;
  return a == Algorithm::auto_select ? choose_algorithm(op, bytes, g.size) : a;
}

// Open MPI 4.1's AVX reduction component sums MPI_UINT8_T/MPI_INT8_T with saturating adds
// (measured: 167 + 167 gives 255, not 78), while loom's contract is wrap-around. 8-bit sums
// therefore always take the ring, whose kernel wraps.
Algorithm pick_reduction(const GroupState& g, CommOp op, int64_t bytes, DType t, ReduceOp rop) {
  if (rop == ReduceOp::sum && (t == DType::u8 || t == DType::i8)) return Algorithm::ring;
  return pick(g, op, bytes);
}

// Moves bookkeeping from a prepared RequestWork to a ring work and launches it.
Work launch_ring(const std::shared_ptr<GroupState>& g, const std::shared_ptr<RequestWork>& w,
                 const detail::RingPlan& plan) {
  auto ring = detail::make_ring_work(g, plan);
  ring->group = w->group;
  ring->op = w->op;
  ring->count = w->count;
  ring->dtype = w->dtype;
  ring->seq = w->seq;
  ring->algorithm = w->algorithm;
  ring->keep.insert(ring->keep.end(), w->keep.begin(), w->keep.end());
  ring->on_complete = std::move(w->on_complete);
  return launch(g, ring);
}

// A completed work carrying a sequence number (w == 1 or empty buffers).
Work finished(std::shared_ptr<WorkState> w) {
  w->done = true;
  w->keep.clear();
  return Work(std::move(w));
}

}  // namespace

Work ProcessGroup::all_reduce(BufferRef buf, ReduceOp op) const {
  GroupState& g = st();
  check_buffer(g, CommOp::all_reduce, buf, "buffer");
  auto off = detail::balanced_offsets(buf.count, g.size);
  int64_t es = int64_t(dtype_size(buf.dtype));
  int64_t sent = g.size > 1 ? (2 * buf.count - (off[size_t(g.rank) + 1] - off[size_t(g.rank)]) -
                               (off[size_t((g.rank + 1) % g.size) + 1] - off[size_t((g.rank + 1) % g.size)])) * es
                            : 0;
  auto w = new_work<RequestWork>(state_, CommOp::all_reduce, buf, sent);
  const WatchdogScope posting(w, state_->timeout_s);  // the MPI call below runs armed
  if (g.size == 1 || buf.count == 0) return finished(w);
  if (buf.keep_alive.defined()) w->keep.push_back(buf.keep_alive);

  // bf16: reduce an f32 copy and round once at the end.
  void* data = buf.data;
  DType dt = buf.dtype;
  if (dt == DType::bf16) {
    Tensor stage = g.workspace(buf.count * 4);  // (N) f32
    convert_bf16_to_f32(static_cast<const bf16*>(buf.data), static_cast<float*>(stage.raw()),
                        size_t(buf.count));
    data = stage.raw();
    dt = DType::f32;
    void* out = buf.data;
    int64_t n = buf.count;
    w->on_complete.push_back([stage, out, n] {
      convert_f32_to_bf16(static_cast<const float*>(stage.raw()), static_cast<bf16*>(out), size_t(n));
    });
    w->keep.push_back(stage);
  }
  w->algorithm = pick_reduction(g, CommOp::all_reduce, int64_t(buf.nbytes()), buf.dtype, op);
  if (w->algorithm == Algorithm::ring) {
    detail::RingPlan plan;
    plan.rs_in = data;
    plan.rs_out = static_cast<char*>(data) + off[size_t(g.rank)] * int64_t(dtype_size(dt));
    plan.ag_buf = data;
    plan.offsets = off;
    plan.dtype = dt;
    plan.op = op;
    return launch_ring(state_, w, plan);
  }
  w->reqs.resize(1);
  LOOM_MPI(MPI_Iallreduce(MPI_IN_PLACE, data, mpi_count(buf.count, g, CommOp::all_reduce),
                          mpi_transport_type(dt), mpi_op(op), g.coll, &w->reqs[0]));
  return launch(state_, w);
}


Work ProcessGroup::reduce_scatter(BufferRef input, BufferRef output, ReduceOp op) const {
  GroupState& g = st();
  check_buffer(g, CommOp::reduce_scatter, input, "input");
  check_buffer(g, CommOp::reduce_scatter, output, "output");
  LOOM_CHECK(input.dtype == output.dtype, "{} reduce_scatter: input {} and output {} dtypes differ",
             g.prefix(), dtype_name(input.dtype), dtype_name(output.dtype));
  LOOM_CHECK(input.count == int64_t(g.size) * output.count,
             "{} reduce_scatter: input has {} elements but must be group size {} x output {} = {}",
             g.prefix(), input.count, g.size, output.count, int64_t(g.size) * output.count);
  int64_t n = output.count;
  int64_t es = int64_t(dtype_size(input.dtype));
  auto w = new_work<RequestWork>(state_, CommOp::reduce_scatter, input, (g.size - 1) * n * es);
  const WatchdogScope posting(w, state_->timeout_s);  // the MPI call below runs armed
  if (input.keep_alive.defined()) w->keep.push_back(input.keep_alive);
  if (output.keep_alive.defined()) w->keep.push_back(output.keep_alive);
  if (n == 0) return finished(w);

  const void* in = input.data;
  void* out = output.data;
  DType dt = input.dtype;
  if (dt == DType::bf16) {
    Tensor stage_in = g.workspace(input.count * 4);  // (w*n) f32
    Tensor stage_out = g.workspace(n * 4);           // (n) f32
    convert_bf16_to_f32(static_cast<const bf16*>(input.data), static_cast<float*>(stage_in.raw()),
                        size_t(input.count));
    in = stage_in.raw();
    out = stage_out.raw();
    dt = DType::f32;
    void* user_out = output.data;
    w->on_complete.push_back([stage_out, user_out, n] {
      convert_f32_to_bf16(static_cast<const float*>(stage_out.raw()), static_cast<bf16*>(user_out),
                          size_t(n));
    });
    w->keep.push_back(stage_in);
    w->keep.push_back(stage_out);
  }
  w->algorithm = g.size == 1 ? Algorithm::ring
                              : pick_reduction(g, CommOp::reduce_scatter, int64_t(input.nbytes()),
                                               input.dtype, op);
  if (w->algorithm == Algorithm::ring) {
    detail::RingPlan plan;
    plan.rs_in = in;
    plan.rs_out = out;
    plan.offsets.resize(size_t(g.size) + 1);
    for (int j = 0; j <= g.size; ++j) plan.offsets[size_t(j)] = j * n;
    plan.dtype = dt;
    plan.op = op;
    return launch_ring(state_, w, plan);
  }
  w->reqs.resize(1);
  LOOM_MPI(MPI_Ireduce_scatter_block(in, out, mpi_count(n, g, CommOp::reduce_scatter),
                                     mpi_transport_type(dt), mpi_op(op), g.coll, &w->reqs[0]));
  return launch(state_, w);
}

Work ProcessGroup::all_gather(BufferRef input, BufferRef output) const {
  GroupState& g = st();
  check_buffer(g, CommOp::all_gather, input, "input");
  check_buffer(g, CommOp::all_gather, output, "output");
  LOOM_CHECK(input.dtype == output.dtype, "{} all_gather: input {} and output {} dtypes differ",
             g.prefix(), dtype_name(input.dtype), dtype_name(output.dtype));
  LOOM_CHECK(output.count == int64_t(g.size) * input.count,
             "{} all_gather: output has {} elements but must be group size {} x input {} = {}",
             g.prefix(), output.count, g.size, input.count, int64_t(g.size) * input.count);
  int64_t n = input.count;
  int64_t es = int64_t(dtype_size(input.dtype));
  auto w = new_work<RequestWork>(state_, CommOp::all_gather, input, (g.size - 1) * n * es);
  const WatchdogScope posting(w, state_->timeout_s);  // the MPI call below runs armed
  if (input.keep_alive.defined()) w->keep.push_back(input.keep_alive);
  if (output.keep_alive.defined()) w->keep.push_back(output.keep_alive);
  if (n == 0) return finished(w);
  char* own_slot = static_cast<char*>(output.data) + g.rank * n * es;
  bool in_place = input.data == own_slot;
  w->algorithm = pick(g, CommOp::all_gather, int64_t(output.nbytes()));
  if (w->algorithm == Algorithm::ring || g.size == 1) {
    w->algorithm = Algorithm::ring;
    if (!in_place) std::memmove(own_slot, input.data, size_t(n * es));
    detail::RingPlan plan;
    plan.ag_buf = output.data;
    plan.offsets.resize(size_t(g.size) + 1);
    for (int j = 0; j <= g.size; ++j) plan.offsets[size_t(j)] = j * n;
    plan.dtype = input.dtype;
    return launch_ring(state_, w, plan);
  }
  MPI_Datatype t = mpi_transport_type(input.dtype);
  int c = mpi_count(n, g, CommOp::all_gather);
  w->reqs.resize(1);
  LOOM_MPI(MPI_Iallgather(in_place ? MPI_IN_PLACE : input.data, c, t, output.data, c, t, g.coll,
                          &w->reqs[0]));
  return launch(state_, w);
}

Work ProcessGroup::all_gather_in_place(BufferRef buf, const std::vector<int64_t>& offsets) const {
  GroupState& g = st();
  check_buffer(g, CommOp::all_gather, buf, "buffer");
  LOOM_CHECK(offsets.size() == size_t(g.size) + 1,
             "{} all_gather_in_place: {} offsets given, need group size + 1 = {}", g.prefix(),
             offsets.size(), g.size + 1);
  for (int j = 0; j < g.size; ++j)
    LOOM_CHECK(offsets[size_t(j)] >= 0 && offsets[size_t(j)] <= offsets[size_t(j) + 1],
               "{} all_gather_in_place: offsets must be non-decreasing from 0; rank {}'s piece "
               "is [{}, {})",
               g.prefix(), j, offsets[size_t(j)], offsets[size_t(j) + 1]);
  LOOM_CHECK(offsets.back() <= buf.count,
             "{} all_gather_in_place: the pieces end at element {} but the buffer has {}",
             g.prefix(), offsets.back(), buf.count);
  const int64_t es = int64_t(dtype_size(buf.dtype));
  const int64_t own = offsets[size_t(g.rank) + 1] - offsets[size_t(g.rank)];
  const int64_t total = offsets.back() - offsets.front();
  Algorithm algo = pick(g, CommOp::all_gather, total * es);
  // MPI_Iallgatherv's displacements are ints; the ring's offsets are not (its pieces must be).
  if (offsets.back() > INT_MAX) algo = Algorithm::ring;
  std::vector<int> counts, displs;
  if (algo != Algorithm::ring && g.size > 1 && total > 0) {
    counts.resize(size_t(g.size));
    displs.resize(size_t(g.size));
    for (int j = 0; j < g.size; ++j) {
      counts[size_t(j)] =
          mpi_count(offsets[size_t(j) + 1] - offsets[size_t(j)], g, CommOp::all_gather);
      displs[size_t(j)] = mpi_count(offsets[size_t(j)], g, CommOp::all_gather);
    }
  }
  auto w = new_work<RequestWork>(state_, CommOp::all_gather, buf, (g.size - 1) * own * es);
  const WatchdogScope posting(w, state_->timeout_s);  // the MPI call below runs armed
  if (buf.keep_alive.defined()) w->keep.push_back(buf.keep_alive);
  if (g.size == 1 || total == 0) return finished(w);
  w->algorithm = algo;
  if (w->algorithm == Algorithm::ring) {
    detail::RingPlan plan;
    plan.ag_buf = buf.data;
    plan.offsets = offsets;
    plan.dtype = buf.dtype;
    return launch_ring(state_, w, plan);
  }
  // MPI reads the count/displacement arrays until completion: they live in the hook.
  auto arrays = std::make_shared<std::array<std::vector<int>, 2>>(
      std::array<std::vector<int>, 2>{std::move(counts), std::move(displs)});
  w->on_complete.push_back([arrays] {});
  w->reqs.resize(1);
  LOOM_MPI(MPI_Iallgatherv(MPI_IN_PLACE, 0, MPI_DATATYPE_NULL, buf.data, (*arrays)[0].data(),
                           (*arrays)[1].data(), mpi_transport_type(buf.dtype), g.coll,
                           &w->reqs[0]));
  return launch(state_, w);
}

Work ProcessGroup::all_to_all(BufferRef input, BufferRef output) const {
  GroupState& g = st();
  check_buffer(g, CommOp::all_to_all, input, "input");
  check_buffer(g, CommOp::all_to_all, output, "output");
  LOOM_CHECK(input.dtype == output.dtype && input.count == output.count &&
                 input.count % g.size == 0,
             "{} all_to_all: input ({} x {}) and output ({} x {}) must have the same dtype and "
             "the same count, a multiple of group size {}",
             g.prefix(), input.count, dtype_name(input.dtype), output.count,
             dtype_name(output.dtype), g.size);
  int64_t n = input.count / g.size;
  int64_t es = int64_t(dtype_size(input.dtype));
  auto w = new_work<RequestWork>(state_, CommOp::all_to_all, input, (g.size - 1) * n * es);
  const WatchdogScope posting(w, state_->timeout_s);  // the MPI call below runs armed
  if (input.keep_alive.defined()) w->keep.push_back(input.keep_alive);
  if (output.keep_alive.defined()) w->keep.push_back(output.keep_alive);
  if (n == 0) return finished(w);
  MPI_Datatype t = mpi_transport_type(input.dtype);
  int c = mpi_count(n, g, CommOp::all_to_all);
  w->reqs.resize(1);
  LOOM_MPI(MPI_Ialltoall(input.data, c, t, output.data, c, t, g.coll, &w->reqs[0]));
  return launch(state_, w);
}

Work ProcessGroup::all_to_all_v(BufferRef input, const std::vector<int64_t>& send_counts,
                                BufferRef output, const std::vector<int64_t>& recv_counts) const {
  GroupState& g = st();
  check_buffer(g, CommOp::all_to_all_v, input, "input");
  check_buffer(g, CommOp::all_to_all_v, output, "output");
  LOOM_CHECK(input.dtype == output.dtype, "{} all_to_all_v: input {} and output {} dtypes differ",
             g.prefix(), dtype_name(input.dtype), dtype_name(output.dtype));
  LOOM_CHECK(send_counts.size() == size_t(g.size) && recv_counts.size() == size_t(g.size),
             "{} all_to_all_v: send_counts ({}) and recv_counts ({}) need one entry per rank ({})",
             g.prefix(), send_counts.size(), recv_counts.size(), g.size);
  std::vector<int> sc(size_t(g.size)), rc(size_t(g.size)), sd(size_t(g.size)), rd(size_t(g.size));
  int64_t s_total = 0, r_total = 0, sent = 0;
  for (int j = 0; j < g.size; ++j) {
    LOOM_CHECK(send_counts[size_t(j)] >= 0 && recv_counts[size_t(j)] >= 0,
               "{} all_to_all_v: negative count for rank {}", g.prefix(), j);
    sd[size_t(j)] = mpi_count(s_total, g, CommOp::all_to_all_v);
    rd[size_t(j)] = mpi_count(r_total, g, CommOp::all_to_all_v);
    sc[size_t(j)] = mpi_count(send_counts[size_t(j)], g, CommOp::all_to_all_v);
    rc[size_t(j)] = mpi_count(recv_counts[size_t(j)], g, CommOp::all_to_all_v);
    s_total += send_counts[size_t(j)];
    r_total += recv_counts[size_t(j)];
    if (j != g.rank) sent += send_counts[size_t(j)];
  }
  LOOM_CHECK(s_total == input.count && r_total == output.count,
             "{} all_to_all_v: send_counts sum to {} but input has {}; recv_counts sum to {} but "
             "output has {}",
             g.prefix(), s_total, input.count, r_total, output.count);
  auto w = new_work<RequestWork>(state_, CommOp::all_to_all_v, input,
                                 sent * int64_t(dtype_size(input.dtype)));
  const WatchdogScope posting(w, state_->timeout_s);  // the MPI call below runs armed
  if (input.keep_alive.defined()) w->keep.push_back(input.keep_alive);
  if (output.keep_alive.defined()) w->keep.push_back(output.keep_alive);
  MPI_Datatype t = mpi_transport_type(input.dtype);
  // MPI reads the count/displacement arrays until completion: they live in the hook.
  auto arrays = std::make_shared<std::array<std::vector<int>, 4>>(
      std::array<std::vector<int>, 4>{std::move(sc), std::move(sd), std::move(rc), std::move(rd)});
  w->on_complete.push_back([arrays] {});
  w->reqs.resize(1);
  LOOM_MPI(MPI_Ialltoallv(input.data, (*arrays)[0].data(), (*arrays)[1].data(), t, output.data,
                          (*arrays)[2].data(), (*arrays)[3].data(), t, g.coll, &w->reqs[0]));
  return launch(state_, w);
}

Work ProcessGroup::broadcast(BufferRef buf, int root) const {
  GroupState& g = st();
  check_buffer(g, CommOp::broadcast, buf, "buffer");
  LOOM_CHECK(root >= 0 && root < g.size, "{} broadcast root {} is not a rank of group '{}' (0..{})",
             g.prefix(), root, g.name, g.size - 1);
  int64_t sent = g.rank == root ? (g.size - 1) * int64_t(buf.nbytes()) : 0;
  auto w = new_work<RequestWork>(state_, CommOp::broadcast, buf, sent);
  const WatchdogScope posting(w, state_->timeout_s);  // the MPI call below runs armed
  if (g.size == 1 || buf.count == 0) return finished(w);
  if (buf.keep_alive.defined()) w->keep.push_back(buf.keep_alive);
  w->reqs.resize(1);
  LOOM_MPI(MPI_Ibcast(buf.data, mpi_count(buf.count, g, CommOp::broadcast),
                      mpi_transport_type(buf.dtype), root, g.coll, &w->reqs[0]));
  return launch(state_, w);
}

Work ProcessGroup::barrier() const {
  GroupState& g = st();
  auto w = new_work<RequestWork>(state_, CommOp::barrier, BufferRef(nullptr, 0, DType::u8), 0);
  const WatchdogScope posting(w, state_->timeout_s);  // the MPI call below runs armed
  if (g.size == 1) return finished(w);
  w->reqs.resize(1);
  LOOM_MPI(MPI_Ibarrier(g.coll, &w->reqs[0]));
  return launch(state_, w);
}

namespace {
std::shared_ptr<RequestWork> new_p2p_work(const std::shared_ptr<GroupState>& g, CommOp op,
                                          const BufferRef& b, int peer, int tag) {
  GroupState& s = *g;
  check_buffer(s, op, b, "buffer");
  LOOM_CHECK(peer >= 0 && peer < s.size, "{} {}: peer {} is not a rank of group '{}' (0..{})",
             s.prefix(), comm_op_name(op), peer, s.name, s.size - 1);
  LOOM_CHECK(tag >= 0 && tag <= s.tag_ub, "{} {}: tag {} must be in 0..{}", s.prefix(),
             comm_op_name(op), tag, s.tag_ub);
  auto w = std::make_shared<RequestWork>();
  w->group = g;
  w->op = op;
  w->count = b.count;
  w->dtype = b.dtype;
  w->p2p = true;
  w->peer = peer;
  w->seq = ++s.p2p_seq;  // per rank: the peers' own sequences need not match
  s.counters[op].calls += 1;
  if (op == CommOp::send) s.counters[op].bytes += int64_t(b.nbytes());
  if (b.keep_alive.defined()) w->keep.push_back(b.keep_alive);
  w->reqs.resize(1);
  return w;
}
}  // namespace

Work ProcessGroup::isend(BufferRef buf, int dst, int tag) const {
  auto w = new_p2p_work(state_, CommOp::send, buf, dst, tag);
  const WatchdogScope posting(w, state_->timeout_s);  // the MPI call below runs armed
  LOOM_MPI(MPI_Isend(buf.data, mpi_count(buf.count, *state_, CommOp::send),
                     mpi_transport_type(buf.dtype), dst, tag, state_->p2p, &w->reqs[0]));
  return launch(state_, w);
}

Work ProcessGroup::irecv(BufferRef buf, int src, int tag) const {
  auto w = new_p2p_work(state_, CommOp::recv, buf, src, tag);
  const WatchdogScope posting(w, state_->timeout_s);  // the MPI call below runs armed
  w->expect_recv_count = buf.count;
  w->recv_type = mpi_transport_type(buf.dtype);
  LOOM_MPI(MPI_Irecv(buf.data, mpi_count(buf.count, *state_, CommOp::recv), w->recv_type, src, tag,
                     state_->p2p, &w->reqs[0]));
  return launch(state_, w);
}

void ProcessGroup::send(BufferRef buf, int dst, int tag) const { isend(std::move(buf), dst, tag).wait(); }
void ProcessGroup::recv(BufferRef buf, int src, int tag) const { irecv(std::move(buf), src, tag).wait(); }

}  // namespace loom::comm
