// tests/unit/parallel/test_schedule.cpp: pipeline schedules checked by the pure simulator.
#include <gtest/gtest.h>

#include <map>
#include <tuple>

#include "core/error.h"
#include "parallel/schedule.h"

namespace loom::parallel {
namespace {

struct Config {
  ScheduleKind kind;
  int pp, M, V;
};

std::vector<Config> sweep() {
  std::vector<Config> out;
  for (int pp : {1, 2, 3, 4, 8})
    for (int M : {1, 2, 3, 4, 5, 8, 13, 16}) {
      out.push_back({ScheduleKind::gpipe, pp, M, 1});
      out.push_back({ScheduleKind::one_f_one_b, pp, M, 1});
      if (pp >= 2 && M % pp == 0)
        for (int V : {1, 2, 3, 4}) out.push_back({ScheduleKind::interleaved, pp, M, V});
    }
  return out;
}

std::string name(const Config& c) {
  return fmt::format("{} pp={} M={} V={}", schedule_name(c.kind), c.pp, c.M, c.V);
}

TEST(Schedule, EveryConfigurationSimulatesWithoutDeadlock) {
  for (const Config& c : sweep()) {
    PipelineSchedule s = make_schedule(c.kind, c.pp, c.M, c.V);
    for (auto [tf, tb] : {std::pair{1.0, 1.0}, std::pair{1.0, 2.0}}) {
      SimulationResult r = simulate(s, {tf, tb});
      ASSERT_TRUE(r.completed) << name(c) << ": " << r.error;
    }
  }
}

TEST(Schedule, ForwardPrecedesBackwardAndSendsMatchRecvs) {
  for (const Config& c : sweep()) {
    PipelineSchedule s = make_schedule(c.kind, c.pp, c.M, c.V);
    // (src, dst, kind, mb, producer virtual stage) multiset of sends vs receives.
    std::map<std::tuple<int, int, int, int, int>, int> balance;
    for (int st = 0; st < c.pp; ++st) {
      std::map<std::pair<int, int>, size_t> fwd_at;
      const auto& list = s.stages[size_t(st)];
      for (size_t i = 0; i < list.size(); ++i) {
        const Action& a = list[i];
        int g = s.virtual_stage(st, a.chunk);
        switch (a.kind) {
          case ActionKind::forward: fwd_at[{a.micro_batch, a.chunk}] = i; break;
          case ActionKind::backward:
            ASSERT_TRUE(fwd_at.count({a.micro_batch, a.chunk}))
                << name(c) << " stage " << st << " " << to_string(a) << " before its forward";
            break;
          case ActionKind::send_activation: balance[{st, a.peer, 0, a.micro_batch, g}] += 1; break;
          case ActionKind::send_grad: balance[{st, a.peer, 1, a.micro_batch, g}] += 1; break;
          case ActionKind::recv_activation: balance[{a.peer, st, 0, a.micro_batch, g - 1}] -= 1; break;
          case ActionKind::recv_grad: balance[{a.peer, st, 1, a.micro_batch, g + 1}] -= 1; break;
        }
      }
    }
    for (const auto& [k, v] : balance) ASSERT_EQ(v, 0) << name(c) << ": unmatched send/recv";
    // Message count: every boundary between virtual stages carries M activations and M grads.
    int64_t sends = 0;
    for (const auto& list : s.stages)
      for (const Action& a : list)
        sends += a.kind == ActionKind::send_activation || a.kind == ActionKind::send_grad;
    EXPECT_EQ(sends, int64_t(2) * c.M * (c.V * c.pp - 1)) << name(c);
  }
}

TEST(Schedule, OneFOneBInFlightActivationsBounded) {
  for (int pp : {2, 3, 4, 8})
    for (int M : {1, 3, 4, 8, 16}) {
      SimulationResult r = simulate(make_schedule(ScheduleKind::one_f_one_b, pp, M));
      ASSERT_TRUE(r.completed) << r.error;
      for (int s = 0; s < pp; ++s) {
        EXPECT_LE(r.peak_in_flight[size_t(s)], pp - s) << "pp=" << pp << " M=" << M << " s=" << s;
        EXPECT_EQ(r.peak_in_flight[size_t(s)], std::min(pp - s, M));
      }
      // GPipe, by contrast, holds all M.
      SimulationResult g = simulate(make_schedule(ScheduleKind::gpipe, pp, M));
      EXPECT_EQ(g.peak_in_flight[0], M);
    }
}

TEST(Schedule, BubbleFractionMatchesClosedForms) {
  // Unit-time model, no communication cost: the bubble is exactly (pp-1)/(M+pp-1) for gpipe and
  // 1f1b, and (pp-1)/(V*M+pp-1) for interleaved (chunks cost 1/V of a stage). Only rounding of
  // sums of small dyadic-ish numbers differs, hence 1e-12.
  for (int pp : {2, 3, 4, 8})
    for (int M : {1, 2, 4, 8, 16}) {
      double expect = double(pp - 1) / (M + pp - 1);
      for (ScheduleKind k : {ScheduleKind::gpipe, ScheduleKind::one_f_one_b})
        for (auto [tf, tb] : {std::pair{1.0, 1.0}, std::pair{1.0, 2.0}}) {
          SimulationResult r = simulate(make_schedule(k, pp, M), {tf, tb});
          ASSERT_TRUE(r.completed) << r.error;
          EXPECT_NEAR(r.bubble_fraction, expect, 1e-12)
              << schedule_name(k) << " pp=" << pp << " M=" << M << " tb=" << tb;
          EXPECT_NEAR(r.makespan, (M + pp - 1) * (tf + tb), 1e-9);
        }
      if (M % pp != 0) continue;
      for (int V : {1, 2, 4}) {
        SimulationResult r = simulate(make_schedule(ScheduleKind::interleaved, pp, M, V));
        ASSERT_TRUE(r.completed) << r.error;
        EXPECT_NEAR(r.bubble_fraction, double(pp - 1) / (V * M + pp - 1), 1e-12)
            << "interleaved pp=" << pp << " M=" << M << " V=" << V;
      }
    }
}

TEST(Schedule, HandWrittenOneFOneBTwoStages) {
  // pp=2, M=3: stage 0 warms up with one forward.
  PipelineSchedule s = make_schedule(ScheduleKind::one_f_one_b, 2, 3);
  std::vector<std::string> st0, st1;
  for (const Action& a : s.stages[0]) st0.push_back(to_string(a));
  for (const Action& a : s.stages[1]) st1.push_back(to_string(a));
  EXPECT_EQ(st0, (std::vector<std::string>{
                     "F(mb=0,c=0)", "SendAct(mb=0,c=0->1)", "F(mb=1,c=0)", "SendAct(mb=1,c=0->1)",
                     "RecvGrad(mb=0,c=0<-1)", "B(mb=0,c=0)", "F(mb=2,c=0)", "SendAct(mb=2,c=0->1)",
                     "RecvGrad(mb=1,c=0<-1)", "B(mb=1,c=0)", "RecvGrad(mb=2,c=0<-1)", "B(mb=2,c=0)"}));
  EXPECT_EQ(st1, (std::vector<std::string>{
                     "RecvAct(mb=0,c=0<-0)", "F(mb=0,c=0)", "B(mb=0,c=0)", "SendGrad(mb=0,c=0->0)",
                     "RecvAct(mb=1,c=0<-0)", "F(mb=1,c=0)", "B(mb=1,c=0)", "SendGrad(mb=1,c=0->0)",
                     "RecvAct(mb=2,c=0<-0)", "F(mb=2,c=0)", "B(mb=2,c=0)", "SendGrad(mb=2,c=0->0)"}));
}

TEST(Schedule, InterleavedNeedsMicroBatchesDivisibleByPp) {
  try {
    make_schedule(ScheduleKind::interleaved, 4, 6, 2);
    FAIL() << "expected loom::Error";
  } catch (const Error& e) {
    std::string m = e.what();
    EXPECT_NE(m.find("M=6 pp=4; use M=4 or 8"), std::string::npos) << m;
  }
  EXPECT_THROW(make_schedule(ScheduleKind::interleaved, 1, 4, 2), Error);
  EXPECT_THROW(make_schedule(ScheduleKind::one_f_one_b, 4, 8, 2), Error);
  EXPECT_THROW(make_schedule(ScheduleKind::gpipe, 0, 8), Error);
  EXPECT_THROW(make_schedule(ScheduleKind::gpipe, 2, 0), Error);
  EXPECT_EQ(schedule_from_name("1f1b"), ScheduleKind::one_f_one_b);
  EXPECT_THROW(schedule_from_name("zb"), Error);
}

TEST(Schedule, SimulatorCatchesBrokenSchedules) {
  // Swapping stage 1's two receives makes it expect mb=1 while mb=0 heads the stream.
  PipelineSchedule s = make_schedule(ScheduleKind::gpipe, 2, 2);
  auto& l1 = s.stages[1];
  std::swap(l1[0], l1[2]);  // RecvAct(mb=0) <-> RecvAct(mb=1)
  SimulationResult r = simulate(s);
  EXPECT_FALSE(r.completed);
  EXPECT_NE(r.error.find("out of order"), std::string::npos) << r.error;
  // A cycle: both stages receive before sending.
  PipelineSchedule d = make_schedule(ScheduleKind::one_f_one_b, 2, 2);
  d.stages[0].insert(d.stages[0].begin(), Action{ActionKind::recv_grad, 0, 0, 1});
  r = simulate(d);
  EXPECT_FALSE(r.completed);
  EXPECT_NE(r.error.find("deadlock"), std::string::npos) << r.error;
  // Dropping a backward leaves work undone.
  PipelineSchedule m = make_schedule(ScheduleKind::gpipe, 1, 2);
  m.stages[0].pop_back();
  r = simulate(m);
  EXPECT_FALSE(r.completed);
}

}  // namespace
}  // namespace loom::parallel
