// parallel/schedule.h: pipeline schedules as pure functions, and a pure simulator for them.
//
// Glossary: pp pipeline stages (= pp-group ranks), M micro-batches per step, V model chunks per
// stage ("virtual stages"; V = 1 except for interleaved), mb micro-batch index, chunk a stage's
// model chunk 0..V-1. Virtual stage g = chunk * pp + stage: the model's layers are split into
// V*pp pieces, and stage s holds pieces s, s+pp, s+2pp, ... (Megatron's interleaving).
//
// make_schedule() returns, for every stage, the ordered list of actions its executor runs:
//   Forward(mb, chunk), Backward(mb, chunk),
//   RecvActivation / SendActivation (before / after a forward that is not the first / last
//   virtual stage), RecvGrad / SendGrad (before / after a backward that is not the last / first).
// Executor contract (what makes the lists deadlock-free): sends are non-blocking (isend, waited
// on at the end of the step or later) and a Recv completes before the next compute action runs.
// Messages between a pair of stages of one kind (activation or grad) arrive in the order sent
// (MPI's non-overtaking rule with a fixed tag per kind), and the lists are built so that every
// receive expects exactly the head of that stream. simulate() checks all of this.
//
// Schedules: gpipe (all forwards, then all backwards), 1f1b (PipeDream-flush: pp-s-1 warm-up
// forwards, then one forward / one backward; at most pp - s activations in flight on stage s),
// interleaved (Megatron's interleaved 1F1B over V chunks; needs M % pp == 0 and pp >= 2).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace loom::parallel {

enum class ScheduleKind : uint8_t { gpipe, one_f_one_b, interleaved };
std::string_view schedule_name(ScheduleKind k);  // "gpipe", "1f1b", "interleaved"
// Parses the names above; throws loom::Error listing them otherwise.
ScheduleKind schedule_from_name(std::string_view name);

enum class ActionKind : uint8_t {
  forward,
  backward,
  send_activation,
  recv_activation,
  send_grad,
  recv_grad
};

struct Action {
  ActionKind kind = ActionKind::forward;
  int micro_batch = 0;
  int chunk = 0;  // this stage's chunk that computes / produced / will consume the tensor
  int peer = -1;  // pp-group rank on the other side of a send/recv; -1 for compute
  bool operator==(const Action&) const = default;
};
// "F(mb=3,c=0)", "B(mb=3,c=1)", "SendAct(mb=3,c=0->2)", "RecvGrad(mb=1,c=0<-1)"
std::string to_string(const Action& a);

struct PipelineSchedule {
  ScheduleKind kind = ScheduleKind::one_f_one_b;
  int pp = 1;
  int micro_batches = 1;
  int virtual_stages = 1;
  std::vector<std::vector<Action>> stages;  // (pp) action lists

  int virtual_stage(int stage, int chunk) const { return chunk * pp + stage; }
};

// Throws loom::Error for pp < 1, M < 1, V < 1, V != 1 outside interleaved, and for interleaved
// with pp < 2 or M % pp != 0 (naming the valid micro-batch counts near M).
PipelineSchedule make_schedule(ScheduleKind kind, int pp, int micro_batches, int virtual_stages = 1);
// One stage's list, make_schedule(...).stages[stage] without building the others (the memory
// model replays one rank).
std::vector<Action> make_stage_actions(ScheduleKind kind, int pp, int micro_batches,
                                       int virtual_stages, int stage);

// Unit-time model: a full stage's forward takes forward_time and its backward backward_time;
// one chunk of V takes 1/V of that. Sends cost nothing and arrive at once.
struct SimulationOptions {
  double forward_time = 1.0;
  double backward_time = 1.0;
};

struct SimulationResult {
  bool completed = false;
  std::string error;                // deadlock or protocol violation, naming stage and action
  double makespan = 0;              // time the last stage finishes
  std::vector<double> busy;         // (pp) compute time per stage
  double bubble_fraction = 0;       // 1 - mean(busy) / makespan
  std::vector<int> peak_in_flight;  // (pp) most forwards awaiting their backward, per stage
};

// Runs every stage's list with non-blocking sends and blocking receives. Checks: each receive
// matches the head of its stream (kind, micro-batch, virtual stage), a forward has its input
// activation (unless first virtual stage), a backward follows its forward and has its output
// gradient (unless last virtual stage), sends follow the compute that produced them, every
// (mb, virtual stage) runs forward and backward exactly once, and no message is left unreceived.
SimulationResult simulate(const PipelineSchedule& s, const SimulationOptions& opts = {});

}  // namespace loom::parallel
