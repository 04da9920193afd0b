// parallel/schedule.cpp: GPipe, 1F1B and interleaved 1F1B action lists, and their simulator.
//
// Glossary: pp stages, M micro-batches, V chunks per stage, T = M*V chunk-micro-batches a stage
// runs forward (and backward), g = chunk*pp + stage the virtual stage, k the k-th forward (or
// backward) a stage runs.
//
// The compute order is decided first; communication is then inserted mechanically (receive just
// before the compute that needs it, send just after the compute that produced it). Because the
// compute orders are the published ones, the inter-stage dependencies are acyclic, which the
// simulator confirms for every configuration the tests sweep.
#include "parallel/schedule.h"

#include <algorithm>
#include <deque>
#include <map>
#include <set>
#include <tuple>

#include "core/error.h"

namespace loom::parallel {

std::string_view schedule_name(ScheduleKind k) {
  switch (k) {
    case ScheduleKind::gpipe: return "gpipe";
    case ScheduleKind::one_f_one_b: return "1f1b";
    case ScheduleKind::interleaved: return "interleaved";
  }
  return "?";
}

ScheduleKind schedule_from_name(std::string_view name) {
  for (ScheduleKind k : {ScheduleKind::gpipe, ScheduleKind::one_f_one_b, ScheduleKind::interleaved})
    if (schedule_name(k) == name) return k;
  LOOM_FAIL("unknown pipeline schedule '{}'; choose gpipe, 1f1b or interleaved", name);
}

std::string to_string(const Action& a) {
  switch (a.kind) {
    case ActionKind::forward: return fmt::format("F(mb={},c={})", a.micro_batch, a.chunk);
    case ActionKind::backward: return fmt::format("B(mb={},c={})", a.micro_batch, a.chunk);
    case ActionKind::send_activation:
      return fmt::format("SendAct(mb={},c={}->{})", a.micro_batch, a.chunk, a.peer);
    case ActionKind::recv_activation:
      return fmt::format("RecvAct(mb={},c={}<-{})", a.micro_batch, a.chunk, a.peer);
    case ActionKind::send_grad:
      return fmt::format("SendGrad(mb={},c={}->{})", a.micro_batch, a.chunk, a.peer);
    case ActionKind::recv_grad:
      return fmt::format("RecvGrad(mb={},c={}<-{})", a.micro_batch, a.chunk, a.peer);
  }
  return "?";
}

namespace {

struct Compute {
  bool forward;
  int mb;
  int chunk;
};

// Compute order of one stage.
std::vector<Compute> compute_order(ScheduleKind kind, int pp, int M, int V, int s) {
  std::vector<Compute> out;
  switch (kind) {
    case ScheduleKind::gpipe:
      for (int m = 0; m < M; ++m) out.push_back({true, m, 0});
      for (int m = 0; m < M; ++m) out.push_back({false, m, 0});
      break;
    case ScheduleKind::one_f_one_b: {
      int warmup = std::min(pp - s - 1, M);
      for (int m = 0; m < warmup; ++m) out.push_back({true, m, 0});
      for (int i = 0; i < M - warmup; ++i) {
        out.push_back({true, warmup + i, 0});
        out.push_back({false, i, 0});
      }
      for (int i = M - warmup; i < M; ++i) out.push_back({false, i, 0});
      break;
    }
    case ScheduleKind::interleaved: {
      // Megatron-LM's interleaved schedule: forwards walk pp micro-batches through chunk 0, then
      // the same pp through chunk 1, ...; backwards walk the chunks in reverse. Warm-up covers
      // the pipeline depth of all chunks: 2(pp-s-1) + (V-1)pp.
      const int T = M * V;
      auto mb_of = [&](int k) { return (k / (pp * V)) * pp + k % pp; };
      auto fwd_chunk = [&](int k) { return (k / pp) % V; };
      auto bwd_chunk = [&](int k) { return V - 1 - (k / pp) % V; };
      int warmup = std::min(2 * (pp - s - 1) + (V - 1) * pp, T);
      for (int k = 0; k < warmup; ++k) out.push_back({true, mb_of(k), fwd_chunk(k)});
      for (int i = 0; i < T - warmup; ++i) {
        out.push_back({true, mb_of(warmup + i), fwd_chunk(warmup + i)});
        out.push_back({false, mb_of(i), bwd_chunk(i)});
      }
      for (int i = T - warmup; i < T; ++i) out.push_back({false, mb_of(i), bwd_chunk(i)});
      break;
    }
  }
  return out;
}

std::string near_multiples(int M, int pp) {
  int lo = std::max(pp, M / pp * pp), hi = (M / pp + 1) * pp;
  return lo == hi || lo < pp ? fmt::format("{}", hi) : fmt::format("{} or {}", lo, hi);
}

}  // namespace

namespace {

void check_schedule_args(ScheduleKind kind, int pp, int micro_batches, int virtual_stages) {
  LOOM_CHECK(pp >= 1, "pipeline stages pp={} must be >= 1", pp);
  LOOM_CHECK(micro_batches >= 1, "micro-batches M={} must be >= 1", micro_batches);
  LOOM_CHECK(virtual_stages >= 1, "virtual stages V={} must be >= 1", virtual_stages);
  if (kind != ScheduleKind::interleaved) {
    LOOM_CHECK(virtual_stages == 1,
               "schedule {} runs one chunk per stage but V={}; use V=1 or the interleaved schedule",
               schedule_name(kind), virtual_stages);
  } else {
    LOOM_CHECK(pp >= 2, "the interleaved schedule needs pp >= 2 (got pp={}); use 1f1b", pp);
    LOOM_CHECK(micro_batches % pp == 0,
               "the interleaved schedule needs micro-batches M divisible by pp: M={} pp={}; use "
               "M={}",
               micro_batches, pp, near_multiples(micro_batches, pp));
  }
}

void append_stage_actions(ScheduleKind kind, int pp, int micro_batches, int virtual_stages, int s,
                          std::vector<Action>& list) {
  const int last_g = virtual_stages * pp - 1;
  const int prev = (s + pp - 1) % pp, next = (s + 1) % pp;
  for (const Compute& c : compute_order(kind, pp, micro_batches, virtual_stages, s)) {
    const int g = c.chunk * pp + s;  // PipelineSchedule::virtual_stage
    if (c.forward) {
      if (g > 0) list.push_back({ActionKind::recv_activation, c.mb, c.chunk, prev});
      list.push_back({ActionKind::forward, c.mb, c.chunk, -1});
      if (g < last_g) list.push_back({ActionKind::send_activation, c.mb, c.chunk, next});
    } else {
      if (g < last_g) list.push_back({ActionKind::recv_grad, c.mb, c.chunk, next});
      list.push_back({ActionKind::backward, c.mb, c.chunk, -1});
      if (g > 0) list.push_back({ActionKind::send_grad, c.mb, c.chunk, prev});
    }
  }
}

}  // namespace

PipelineSchedule make_schedule(ScheduleKind kind, int pp, int micro_batches, int virtual_stages) {
  check_schedule_args(kind, pp, micro_batches, virtual_stages);
  PipelineSchedule sch;
  sch.kind = kind;
  sch.pp = pp;
  sch.micro_batches = micro_batches;
  sch.virtual_stages = virtual_stages;
  sch.stages.resize(size_t(pp));
  for (int s = 0; s < pp; ++s)
    append_stage_actions(kind, pp, micro_batches, virtual_stages, s, sch.stages[size_t(s)]);
  return sch;
}

std::vector<Action> make_stage_actions(ScheduleKind kind, int pp, int micro_batches,
                                       int virtual_stages, int stage) {
  check_schedule_args(kind, pp, micro_batches, virtual_stages);
  LOOM_CHECK(stage >= 0 && stage < pp, "stage {} is outside the pipeline's {} stages", stage, pp);
  std::vector<Action> list;
  append_stage_actions(kind, pp, micro_batches, virtual_stages, stage, list);
  return list;
}

// ---------------------------------------------------------------------------------------------
// Simulator

SimulationResult simulate(const PipelineSchedule& sch, const SimulationOptions& opts) {
  const int pp = sch.pp, V = sch.virtual_stages, M = sch.micro_batches;
  const int last_g = V * pp - 1;
  SimulationResult res;
  res.busy.assign(size_t(pp), 0.0);
  res.peak_in_flight.assign(size_t(pp), 0);
  LOOM_CHECK(int(sch.stages.size()) == pp, "schedule has {} stage lists for pp={}",
             sch.stages.size(), pp);

  struct Msg {
    int mb;
    int from_g;  // producer's virtual stage
    double time;
  };
  // (src stage, dst stage, 0 activation / 1 grad) -> FIFO stream
  std::map<std::tuple<int, int, int>, std::deque<Msg>> streams;
  struct StageState {
    size_t pc = 0;
    double clock = 0;
    std::set<std::pair<int, int>> act_in, grad_in;         // received, not yet consumed (mb, chunk)
    std::set<std::pair<int, int>> fwd_done, bwd_done;      // (mb, chunk)
    std::set<std::pair<int, int>> act_sent, grad_sent;
    int in_flight = 0;
  };
  std::vector<StageState> st(static_cast<size_t>(pp));
  const double tf = opts.forward_time / V, tb = opts.backward_time / V;

  auto fail = [&](int s, const Action& a, const std::string& why) {
    res.error = fmt::format("stage {} action #{} {}: {}", s, st[size_t(s)].pc, to_string(a), why);
    return res;
  };

  bool progress = true;
  while (progress) {
    progress = false;
    for (int s = 0; s < pp; ++s) {
      StageState& S = st[size_t(s)];
      const auto& list = sch.stages[size_t(s)];
      while (S.pc < list.size()) {
        const Action& a = list[S.pc];
        if (a.chunk < 0 || a.chunk >= V || a.micro_batch < 0 || a.micro_batch >= M)
          return fail(s, a, "micro-batch or chunk out of range");
        const int g = sch.virtual_stage(s, a.chunk);
        const std::pair<int, int> key{a.micro_batch, a.chunk};
        bool blocked = false;
        switch (a.kind) {
          case ActionKind::forward:
            if (g > 0 && !S.act_in.erase(key)) return fail(s, a, "input activation not received");
            if (!S.fwd_done.insert(key).second) return fail(s, a, "forward runs twice");
            S.clock += tf;
            res.busy[size_t(s)] += tf;
            S.in_flight += 1;
            res.peak_in_flight[size_t(s)] = std::max(res.peak_in_flight[size_t(s)], S.in_flight);
            break;
          case ActionKind::backward:
            if (!S.fwd_done.count(key)) return fail(s, a, "backward before its forward");
            if (g < last_g && !S.grad_in.erase(key)) return fail(s, a, "output gradient not received");
            if (!S.bwd_done.insert(key).second) return fail(s, a, "backward runs twice");
            S.clock += tb;
            res.busy[size_t(s)] += tb;
            S.in_flight -= 1;
            break;
          case ActionKind::send_activation:
          case ActionKind::send_grad: {
            bool act = a.kind == ActionKind::send_activation;
            int to_g = act ? g + 1 : g - 1;
            if (to_g < 0 || to_g > last_g) return fail(s, a, "no virtual stage to send to");
            if (a.peer != to_g % pp)
              return fail(s, a, fmt::format("peer should be stage {}", to_g % pp));
            if (act ? !S.fwd_done.count(key) : !S.bwd_done.count(key))
              return fail(s, a, "sends a tensor its compute has not produced");
            if (!(act ? S.act_sent : S.grad_sent).insert(key).second) return fail(s, a, "sent twice");
            streams[{s, a.peer, act ? 0 : 1}].push_back({a.micro_batch, g, S.clock});
            break;
          }
          case ActionKind::recv_activation:
          case ActionKind::recv_grad: {
            bool act = a.kind == ActionKind::recv_activation;
            int from_g = act ? g - 1 : g + 1;
            if (from_g < 0 || from_g > last_g) return fail(s, a, "no virtual stage to receive from");
            if (a.peer != from_g % pp)
              return fail(s, a, fmt::format("peer should be stage {}", from_g % pp));
            auto& q = streams[{a.peer, s, act ? 0 : 1}];
            if (q.empty()) {
              blocked = true;
              break;
            }
            const Msg m = q.front();
            if (m.mb != a.micro_batch || m.from_g != from_g)
              return fail(s, a,
                          fmt::format("head of the stream is mb={} from virtual stage {}, not mb={} "
                                      "from {} (sends and receives are out of order)",
                                      m.mb, m.from_g, a.micro_batch, from_g));
            q.pop_front();
            S.clock = std::max(S.clock, m.time);
            (act ? S.act_in : S.grad_in).insert(key);
            break;
          }
        }
        if (blocked) break;
        ++S.pc;
        progress = true;
      }
    }
  }

  std::string stuck;
  for (int s = 0; s < pp; ++s) {
    const auto& list = sch.stages[size_t(s)];
    if (st[size_t(s)].pc < list.size())
      stuck += fmt::format("{}stage {} waits at #{} {}", stuck.empty() ? "" : "; ", s,
                           st[size_t(s)].pc, to_string(list[st[size_t(s)].pc]));
  }
  if (!stuck.empty()) {
    res.error = "deadlock: " + stuck;
    return res;
  }
  for (const auto& [k, q] : streams)
    if (!q.empty()) {
      res.error = fmt::format("{} message(s) from stage {} to stage {} never received", q.size(),
                              std::get<0>(k), std::get<1>(k));
      return res;
    }
  for (int s = 0; s < pp; ++s)
    if (int(st[size_t(s)].fwd_done.size()) != M * V || int(st[size_t(s)].bwd_done.size()) != M * V) {
      res.error = fmt::format("stage {} ran {} forwards and {} backwards, expected {} each", s,
                              st[size_t(s)].fwd_done.size(), st[size_t(s)].bwd_done.size(), M * V);
      return res;
    }
  double busy_sum = 0;
  for (int s = 0; s < pp; ++s) {
    res.makespan = std::max(res.makespan, st[size_t(s)].clock);
    busy_sum += res.busy[size_t(s)];
  }
  res.bubble_fraction = res.makespan > 0 ? 1.0 - busy_sum / pp / res.makespan : 0.0;
  res.completed = true;
  return res;
}

}  // namespace loom::parallel
