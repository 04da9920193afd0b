// tests/dist/pipeline/test_pipeline.cpp: pipeline-parallel training (train::Executor)
// under mpirun, pp = world size. Every schedule and split trains the tiny model 10 steps and
// must match the single-rank Gpt + AdamW run on rank 0 (losses and every parameter, by name),
// repeat bit for bit, and move exactly the closed-form bytes between stages.
//
// Glossary: pp pipeline ranks, VS chunks per rank, M micro-batches, B, T, N = B*T, C d_model.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <map>
#include <string>

#include "comm/process_group.h"
#include "core/error.h"
#include "dist/pipeline/pipeline_helpers.h"
#include "parallel/topology.h"
#include "train/executor.h"

namespace loom::train {
namespace {

using parallel::ScheduleKind;
using pipeline_test::run_serial;
using pipeline_test::step_tokens;
using pipeline_test::tiny_config;

constexpr int kSteps = 10;
constexpr int64_t kM = 4, kB = 2, kT = 16;
constexpr uint64_t kSeed = 1234;

comm::ProcessGroup world_group() {
  comm::GroupOptions o;
  o.timeout_s = 60;  // a hang fails within a minute, naming the op
  return comm::ProcessGroup::world(o);
}

// The config with the plan's sizes set to those of the groups (null: size 1).
ExecutorConfig sized(ExecutorConfig pc, const comm::ProcessGroup* dp, const comm::ProcessGroup* tp,
                     const comm::ProcessGroup* pp) {
  pc.plan.dp = dp ? dp->size() : 1;
  pc.plan.tp = tp ? tp->size() : 1;
  pc.plan.pp = pp ? pp->size() : 1;
  return pc;
}

struct PipelineRun {
  std::vector<double> losses;      // (steps) as reported on this rank
  std::vector<double> grad_norms;  // (steps) before clipping
  std::vector<float> weights;      // (total) gathered from all stages, every rank
  std::vector<float> tied_copy;    // (V*C) the head stage's copy of embed.token.weight
  comm::CommCounters pp_counters;  // of the last step
  int64_t weight_bytes = 0, grad_bytes = 0, optimizer_bytes = 0;  // this rank's pool
  int64_t peak_activation_bytes = 0;                              // this rank, over the steps
};

// Full training state in the global layout (a checkpoint's content).
struct TrainState {
  std::vector<float> weights, m, v;
  int64_t step = 0;
};

// Every rank writes the tensors it owns into a zeroed global buffer; a sum over ranks adds
// exact zeros elsewhere, so every rank ends with the whole buffer ("gather by name").
void gather_global(std::vector<float>& buf) {
  world_group().all_reduce(comm::BufferRef(buf.data(), int64_t(buf.size()), DType::f32)).wait();
}

// Trains steps [first_step, first_step + n_steps) with pp = world size, from seed kSeed or from
// `from`; gathers the final weights (and, if `to`, the whole state).
PipelineRun run_pipeline(const model::ModelConfig& cfg, const ExecutorConfig& pc,
                         int first_step = 0, int n_steps = kSteps, const TrainState* from = nullptr,
                         TrainState* to = nullptr) {
  comm::ProcessGroup world = world_group();
  std::vector<int> all(size_t(world.size()));
  for (int i = 0; i < world.size(); ++i) all[size_t(i)] = i;
  // Its own handle, so the counters see only the pipeline's traffic.
  comm::ProcessGroup pp = world.split({all}, "pp");
  MemoryPool pool;
  Executor ex(cfg, sized(pc, nullptr, nullptr, &pp), pool, nullptr, nullptr, &pp);
  if (from) {
    ex.import_weights(from->weights.data());
    ex.import_optimizer(from->m.data(), from->v.data(), from->step);
  } else {
    ex.init_weights(kSeed);
  }
  PipelineRun r;
  r.weight_bytes = pool.current(MemCategory::weights);
  r.grad_bytes = pool.current(MemCategory::grads);
  r.optimizer_bytes = pool.current(MemCategory::optimizer);
  pool.reset_peaks();
  for (int s = first_step; s < first_step + n_steps; ++s) {
    std::vector<int32_t> tokens = step_tokens(s, kM, kB, kT, cfg.vocab);
    pp.reset_counters();
    StepResult st = ex.train_step(tokens.data(), kB, kT);
    r.pp_counters = pp.counters();
    EXPECT_EQ(st.step, s + 1);
    EXPECT_EQ(st.tokens, kM * kB * kT);
    r.losses.push_back(st.loss);
    r.grad_norms.push_back(st.grad_norm);
  }
  r.peak_activation_bytes = pool.peak(MemCategory::activations);
  model::ParamLayout layout(cfg);
  r.weights.assign(size_t(layout.total()), 0.f);
  ex.export_weights(r.weights.data());
  gather_global(r.weights);
  if (to) {
    to->weights = r.weights;
    to->m.assign(size_t(layout.total()), 0.f);
    to->v.assign(size_t(layout.total()), 0.f);
    ex.export_optimizer(to->m.data(), to->v.data());
    gather_global(to->m);
    gather_global(to->v);
    to->step = ex.step_count();
  }
  const int64_t VC = cfg.vocab * cfg.d_model;
  r.tied_copy.assign(size_t(VC), 0.f);
  for (int c = 0; c < ex.num_chunks(); ++c) {
    model::GptStage& st = ex.chunk(c);
    if (st.span().has_head)
      std::memcpy(r.tied_copy.data(), st.weights() + st.token_embedding(), size_t(VC) * 4);
  }
  world.all_reduce(comm::BufferRef(r.tied_copy.data(), VC, DType::f32)).wait();
  return r;
}

// The serial run on rank 0, broadcast to every rank.
pipeline_test::SerialRun serial_on_rank0(const model::ModelConfig& cfg) {
  comm::ProcessGroup world = world_group();
  pipeline_test::SerialRun s;
  if (world.rank() == 0)
    s = run_serial(cfg, kSteps, kM, kB, kT, kSeed, pipeline_test::test_adamw());
  s.losses.resize(kSteps);
  s.grad_norms.resize(kSteps);
  s.weights.resize(size_t(model::ParamLayout(cfg).total()));
  world.broadcast(comm::BufferRef(s.losses.data(), kSteps, DType::f64), 0).wait();
  world.broadcast(comm::BufferRef(s.grad_norms.data(), kSteps, DType::f64), 0).wait();
  world.broadcast(comm::BufferRef(&s.eval_loss, 1, DType::f64), 0).wait();
  world.broadcast(comm::BufferRef(s.weights.data(), int64_t(s.weights.size()), DType::f32), 0)
      .wait();
  return s;
}

ExecutorConfig pipeline_config(ScheduleKind kind, int vs, std::vector<int64_t> layers = {}) {
  ExecutorConfig pc;
  pc.plan.schedule = kind;
  pc.plan.micro_batches = kM;
  pc.plan.virtual_stages = vs;
  pc.plan.stage_layers = std::move(layers);
  pc.optim = pipeline_test::test_adamw();
  return pc;
}


// `serial_order`: the run adds every gradient in the serial trainer's order (one stage running
// F0 B0 F1 B1 ...: 1F1B on one rank), so everything must be bit-identical.
void expect_matches_serial(const model::ModelConfig& cfg, const PipelineRun& got,
                           const pipeline_test::SerialRun& ref, bool serial_order) {
  // Tolerance: only summation orders differ (the tied embedding's gradient, the grad norm's
  // partial sums): a few f32 ulp per step, which then propagate through later steps' forward
  // passes. 1e-5 relative leaves a wide margin yet catches any wrong micro-batch, layer or
  // scale (those change losses in the 3rd digit).
  for (int s = 0; s < kSteps; ++s)
    EXPECT_NEAR(got.losses[size_t(s)], ref.losses[size_t(s)],
                1e-5 * std::fabs(ref.losses[size_t(s)]))
        << "step " << s + 1;
  // Step 1 runs the serial model's exact kernels in the serial order.
  EXPECT_EQ(got.losses[0], ref.losses[0]);
  if (serial_order) {
    EXPECT_EQ(got.losses, ref.losses);
    EXPECT_EQ(std::memcmp(got.weights.data(), ref.weights.data(), got.weights.size() * 4), 0);
  }
  // The global norm (tied embedding counted once) is the serial one; clip = 0.5 is active on
  // some step, so a wrong norm would change the weights too.
  double max_norm = 0;
  for (int s = 0; s < kSteps; ++s) {
    EXPECT_NEAR(got.grad_norms[size_t(s)], ref.grad_norms[size_t(s)],
                1e-5 * ref.grad_norms[size_t(s)])
        << "step " << s + 1;
    max_norm = std::max(max_norm, ref.grad_norms[size_t(s)]);
  }
  EXPECT_GT(max_norm, double(pipeline_test::test_adamw().clip)) << "clipping never active";
  model::ParamLayout layout(cfg);
  for (const model::ParamSpec& p : layout.specs()) {
    double diff = 0, norm = 0, max_abs = 0;
    for (int64_t i = 0; i < p.numel; ++i) {
      double a = got.weights[size_t(p.offset + i)], b = ref.weights[size_t(p.offset + i)];
      diff += (a - b) * (a - b);
      norm += b * b;
      max_abs = std::max(max_abs, std::fabs(a - b));
    }
    if (p.name.find("attn.k.bias") != std::string::npos) {
      // A key bias adds q.b_k to every score of a query row, which softmax ignores: its
      // gradient is exactly 0, and the model keeps it so (block.cpp), so it never moves.
      EXPECT_EQ(max_abs, 0.0) << p.name;
    } else {
      // Relative L2 per tensor (observed <= 5e-7). Element-wise relative error is not
      // meaningful: Adam normalises each element's step, so an element whose gradient is near
      // zero moves by ~lr in a direction set by rounding.
      EXPECT_LE(std::sqrt(diff), 1e-5 * std::sqrt(norm)) << p.name;
    }
  }
  // The two copies of the tied embedding saw the same summed gradient: bit-identical.
  EXPECT_EQ(std::memcmp(got.tied_copy.data(), got.weights.data() + layout.token_embedding(),
                        got.tied_copy.size() * 4),
            0);
}

// p2p bytes of the last step: per boundary 2 * M * N * C * 4 (activation + gradient).
void expect_closed_form_bytes(const model::ModelConfig& cfg, const PipelineRun& r, int vs) {
  comm::ProcessGroup world = world_group();
  const int pp = world.size(), rank = world.rank(), n_virtual = pp * vs;
  const int64_t msg = kB * kT * cfg.d_model * 4;
  int64_t sends = 0;
  for (int c = 0; c < vs; ++c) {
    int g = c * pp + rank;
    sends += (g + 1 < n_virtual ? kM : 0) + (g > 0 ? kM : 0);
  }
  EXPECT_EQ(r.pp_counters[comm::CommOp::send].calls, sends);
  EXPECT_EQ(r.pp_counters[comm::CommOp::send].bytes, sends * msg);
  // Every stage receives what its neighbours send it: the same count (a recv counts 0 bytes).
  EXPECT_EQ(r.pp_counters[comm::CommOp::recv].calls, sends);
  int64_t total = r.pp_counters[comm::CommOp::send].bytes;
  world.all_reduce(comm::BufferRef(&total, 1, DType::i64)).wait();
  EXPECT_EQ(total, int64_t(n_virtual - 1) * 2 * kM * msg);
}

// Each rank allocates only its own parameters: over the ranks, the model once plus the head's
// copy of the tied embedding (f32 mode: no bf16 copy).
void expect_owned_memory(const model::ModelConfig& cfg, const PipelineRun& r) {
  comm::ProcessGroup world = world_group();
  int64_t bytes[3] = {r.weight_bytes, r.grad_bytes, r.optimizer_bytes};
  world.all_reduce(comm::BufferRef(bytes, 3, DType::i64)).wait();
  const int64_t expected =
      (cfg.num_params() + (world.size() > 1 ? cfg.vocab * cfg.d_model : 0)) * 4;
  EXPECT_EQ(bytes[0], expected);
  EXPECT_EQ(bytes[1], expected);
  EXPECT_EQ(bytes[2], 2 * expected);  // AdamW m and v
}

void check_layout(int64_t n_layers, ScheduleKind kind, int vs, std::vector<int64_t> layers = {}) {
  model::ModelConfig cfg = tiny_config(n_layers);
  pipeline_test::SerialRun ref = serial_on_rank0(cfg);
  PipelineRun got = run_pipeline(cfg, pipeline_config(kind, vs, layers));
  expect_matches_serial(cfg, got, ref,
                        world_group().size() == 1 && kind == ScheduleKind::one_f_one_b);
  expect_closed_form_bytes(cfg, got, vs);
  expect_owned_memory(cfg, got);
}

// Per tensor of the logical layout: relative L2 within 3e-5 of the serial weights. The key
// bias's gradient is identically 0 (softmax ignores it) and the model keeps it so: it must
// not move at all.
// Why 3e-5 (it was 1e-5, which held on the Zen 4 host): on the 2-core Xeon with AMX (session
// 22), dp 1 x tp 8 gives 1.09e-5 to 1.17e-5 on the query layer's norm2.bias (32 elements) and
// ffn.up.bias (64), every schedule, the code of b636ac8 alike; the other tensors stay under 6e-6.
// Their elements are 1e-4..1e-2 after the AdamW steps (lr 3e-3) and differ from the serial run
// by up to 2e-7: a bias gradient is a sum over all tokens whose terms nearly cancel, so the tp 8
// split (each rank's partial products summed in another order, then all-reduced) changes it by
// f32 rounding of the terms (~6e-8 times their magnitudes, not the sum's), and AdamW divides
// each element's step by its own gradient scale, so a small gradient's rounding shows in the
// step at full size. A wrong shard or a missing reduction moves a tensor by 1e-2 or more.
void expect_tensors_match(const model::ParamLayout& layout, const std::vector<float>& got,
                          const std::vector<float>& ref, const std::string& what) {
  for (const model::ParamSpec& p : layout.specs()) {
    double diff = 0, norm = 0;
    for (int64_t i = 0; i < p.numel; ++i) {
      double a = got[size_t(p.offset + i)], b = ref[size_t(p.offset + i)];
      diff += (a - b) * (a - b);
      norm += b * b;
    }
    if (p.name.find("attn.k.bias") != std::string::npos)
      EXPECT_EQ(diff, 0.0) << what << " " << p.name << " moved";
    else
      EXPECT_LE(std::sqrt(diff), 3e-5 * std::sqrt(norm)) << what << " " << p.name;
  }
}

// dp x pp: world = 2 x (w/2), dp ranks of a stage adjacent. dp rank d runs micro-batches
// [d*M/2, (d+1)*M/2) of every step through its own pipeline; the chunks' gradients are summed
// over dp. Must equal the serial run on all M micro-batches.
TEST(Pipeline, DataParallelTimesPipelineMatchesSerial) {
  comm::ProcessGroup world = world_group();
  const int w = world.size();
  if (w % 2 != 0) {
    std::printf("SKIP dp x pp needs an even number of ranks (have %d)\n", w);
    GTEST_SKIP();
  }
  parallel::ParallelSizes sizes;
  sizes.dp = 2;
  sizes.pp = w / 2;
  parallel::ProcessGroups g =
      parallel::ProcessGroups::build(parallel::Topology(w, sizes, "tp-dp-pp"), world);
  model::ModelConfig cfg = tiny_config(4);
  pipeline_test::SerialRun ref = serial_on_rank0(cfg);
  model::ParamLayout layout(cfg);
  for (ScheduleKind kind : {ScheduleKind::gpipe, ScheduleKind::one_f_one_b}) {
    ExecutorConfig pc = pipeline_config(kind, 1);
    pc.plan.micro_batches = kM / 2;
    MemoryPool pool;
    Executor ex(cfg, sized(pc, &g.dp, nullptr, &g.pp), pool, &g.dp, nullptr, &g.pp);
    ex.init_weights(kSeed);
    std::vector<double> losses;
    for (int s = 0; s < kSteps; ++s) {
      std::vector<int32_t> tokens = step_tokens(s, kM, kB, kT, cfg.vocab);
      g.dp.reset_counters();
      StepResult st =
          ex.train_step(tokens.data() + g.dp.rank() * (kM / 2) * kB * (kT + 1), kB, kT);
      EXPECT_EQ(st.tokens, kM * kB * kT);
      EXPECT_NEAR(st.grad_norm, ref.grad_norms[size_t(s)], 1e-5 * ref.grad_norms[size_t(s)]);
      losses.push_back(st.loss);
    }
    // dp traffic per step: each chunk's gradient all-reduced once, in buckets of adjacent
    // units started as they become final (at least one per chunk, at most one per unit), and
    // one all-reduce of the loss.
    int64_t grads = 0, units = 0;
    for (int c = 0; c < ex.num_chunks(); ++c) {
      grads += ex.chunk(c).total();
      units += int64_t(ex.chunk(c).units().size());
    }
    EXPECT_GE(g.dp.counters()[comm::CommOp::all_reduce].calls, ex.num_chunks() + 1);
    EXPECT_LE(g.dp.counters()[comm::CommOp::all_reduce].calls, units + 1);
    // Ring all-reduce on 2 ranks sends n elements per n-element buffer.
    EXPECT_EQ(g.dp.counters()[comm::CommOp::all_reduce].bytes, 4 * grads + 8 * 2);
    for (int s = 0; s < kSteps; ++s)
      EXPECT_NEAR(losses[size_t(s)], ref.losses[size_t(s)], 1e-5 * ref.losses[size_t(s)])
          << "step " << s + 1;
    std::vector<float> weights(size_t(layout.total()), 0.f);
    ex.export_weights(weights.data());
    g.pp.all_reduce(comm::BufferRef(weights.data(), layout.total(), DType::f32)).wait();
    expect_tensors_match(layout, weights, ref.weights, "dp x pp");
    // The dp replicas hold bit-identical weights.
    std::vector<float> other = weights;
    g.dp.broadcast(comm::BufferRef(other.data(), layout.total(), DType::f32), 0).wait();
    EXPECT_EQ(weights, other);
  }
}

// Every (dp, tp, pp) layout of this world (dp or tp > 1), every ZeRO stage (1-3 where
// dp > 1) and schedule (GPipe, 1F1B, and interleaved where the 4 blocks split into 2 chunks
// per pp rank and pp divides the micro-batches of a dp rank): equals the serial run. Every
// layout's plan comes from ONE set of settings (parallel::make_plan: global batch kM x kB = 8
// sequences, kM micro-batches per dp rank) with only the layout sizes changed and, where the
// 8 / dp sequences of a dp rank do not split into kM micro-batches, fewer micro-batches (the
// only setting the issue lets a layout change). dp rank r trains on sequences [r*8/dp,
// (r+1)*8/dp) of each step's global batch, as train::Trainer does.
// The model: 8 query heads so that tp up to 8 splits them, vocab 104 = 8 x 13, and grouped-query
// attention (4 kv heads) wherever tp divides them; tp = 8 needs as many kv heads (so MHA).
model::ModelConfig three_dim_config(int tp) {
  model::ModelConfig cfg = tiny_config(4);
  cfg.vocab = 104;
  cfg.n_heads = 8;
  cfg.n_kv_heads = tp > 4 ? 8 : 4;
  cfg.validate();
  return cfg;
}

TEST(Pipeline, ThreeDimLayoutsMatchSerial) {
  comm::ProcessGroup world = world_group();
  const int w = world.size();
  if (w == 1) GTEST_SKIP() << "no dp or tp layout on 1 rank";
  std::map<int64_t, pipeline_test::SerialRun> refs;  // by kv heads
  int tested = 0;
  const int64_t G = kM * kB;  // the global batch
  for (int tp : {1, 2, 4, 8}) {
    const model::ModelConfig cfg = three_dim_config(tp);
    if (!refs.count(cfg.n_kv_heads)) refs[cfg.n_kv_heads] = serial_on_rank0(cfg);
    const pipeline_test::SerialRun& ref = refs[cfg.n_kv_heads];
    const model::ParamLayout full(cfg);
    const parallel::ModelShape shape{cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.d_ff, cfg.vocab};
    for (int pp : {1, 2, 4}) {
      if (w % (tp * pp) != 0) continue;
      const int dp = w / (tp * pp);
      if (dp == 1 && tp == 1) continue;
      const int64_t seqs = G / dp;  // sequences per dp rank
      for (int zero : {0, 1, 2, 3})
      for (ScheduleKind kind :
           {ScheduleKind::one_f_one_b, ScheduleKind::gpipe, ScheduleKind::interleaved}) {
      if (zero >= 1 && dp == 1) continue;
      const int vs = kind == ScheduleKind::interleaved ? 2 : 1;
      parallel::PlanSettings settings;
      settings.dp = dp;
      settings.tp = tp;
      settings.pp = pp;
      settings.zero = zero;
      settings.schedule = std::string(parallel::schedule_name(kind));
      settings.virtual_stages = vs;
      settings.micro_batches = kM;
      while (seqs % *settings.micro_batches != 0) *settings.micro_batches /= 2;
      const int64_t m_local = *settings.micro_batches;
      if (vs > 1 && (pp < 2 || cfg.n_layers % (pp * vs) != 0 || m_local % pp != 0)) continue;
      ExecutorConfig pc;
      pc.plan = parallel::make_plan(settings, shape, G, w);
      pc.optim = pipeline_test::test_adamw();
      const int64_t b_local = pc.plan.micro_batch_size;
      ASSERT_EQ(m_local * b_local * dp, G);
      ++tested;
      const std::string what = "dp " + std::to_string(dp) + " x tp " + std::to_string(tp) +
                               " x pp " + std::to_string(pp) + " zero " + std::to_string(zero) +
                               " " + std::string(parallel::schedule_name(kind));
      parallel::ParallelSizes sizes;
      sizes.dp = dp;
      sizes.tp = tp;
      sizes.pp = pp;
      parallel::ProcessGroups g =
          parallel::ProcessGroups::build(parallel::Topology(w, sizes, "tp-dp-pp"), world);
      MemoryPool pool;
      Executor ex(cfg, pc, pool, &g.dp, &g.tp, &g.pp);
      ex.init_weights(kSeed);
      for (int s = 0; s < kSteps; ++s) {
        std::vector<int32_t> tokens = step_tokens(s, kM, kB, kT, cfg.vocab);
        StepResult st =
            ex.train_step(tokens.data() + g.dp.rank() * seqs * (kT + 1), b_local, kT);
        EXPECT_NEAR(st.loss, ref.losses[size_t(s)], 1e-5 * ref.losses[size_t(s)])
            << what << " step " << s + 1;
        EXPECT_NEAR(st.grad_norm, ref.grad_norms[size_t(s)], 1e-5 * ref.grad_norms[size_t(s)])
            << what << " step " << s + 1;
      }
      // Forward-only evaluation of windows no step used, at the final weights: every dp
      // replica evaluates all of them with the micro-batch size B of the serial run.
      {
        std::vector<int32_t> ev = pipeline_test::eval_tokens(kB, kT, cfg.vocab);
        const double got = ex.eval_loss(ev.data(), pipeline_test::kEvalBatches, kB, kT);
        EXPECT_NEAR(got, ref.eval_loss, 1e-5 * ref.eval_loss) << what << " eval";
      }
      // This tp rank's tensors from every stage, then the tp shards into the logical tensors.
      const model::ParamLayout mine(cfg, tp > 1 ? model::TpShard{g.tp.rank(), tp} : model::TpShard{});
      std::vector<float> local(size_t(mine.total()), 0.f);
      ex.export_weights(local.data());
      g.pp.all_reduce(comm::BufferRef(local.data(), mine.total(), DType::f32)).wait();
      std::vector<float> weights =
          tp > 1 ? model::gather_tp_buffer(cfg, mine, local.data(), g.tp) : local;
      expect_tensors_match(full, weights, ref.weights, what);
      // ZeRO-1 keeps 1/dp of the optimizer state (equal shares of every chunk, rounded up);
      // ZeRO-2/3 1/dp of every unit (rounded up) of the optimizer state and the gradient
      // accumulator, ZeRO-3 also of the weights (between steps nothing else stays).
      int64_t held = 0, owned = 0;
      for (int c = 0; c < ex.num_chunks(); ++c) {
        held += ex.chunk(c).total();
        if (zero == 1) owned += (ex.chunk(c).total() + dp - 1) / dp;
        if (zero >= 2)
          for (const model::UnitRange& u : ex.chunk(c).units()) owned += (u.end - u.begin + dp - 1) / dp;
      }
      if (zero >= 1) {
        EXPECT_LE(pool.current(MemCategory::optimizer), 8 * owned) << what;
        // Measured, within 20% of 1/dp of the unsharded 8 bytes per held element.
        EXPECT_LT(pool.current(MemCategory::optimizer), 8 * held * 6 / (5 * dp)) << what;
      }
      if (zero >= 2) {
        EXPECT_LE(pool.current(MemCategory::grads), 4 * owned) << what;
      }
      if (zero == 3) {
        EXPECT_LE(pool.current(MemCategory::weights), 4 * owned) << what;
      } else {
        EXPECT_EQ(pool.current(MemCategory::weights), 4 * held) << what;
      }
      }  // zero, schedule
    }
  }
  EXPECT_GT(tested, 0);
  if (world.rank() == 0) std::printf("%d layouts x ZeRO stages x schedules\n", tested);
}

TEST(Pipeline, GPipeMatchesSerial) { check_layout(4, ScheduleKind::gpipe, 1); }
TEST(Pipeline, OneFOneBMatchesSerial) { check_layout(4, ScheduleKind::one_f_one_b, 1); }

// Two chunks per rank: 2*pp layer groups, so pp=2 uses the 4-layer model and pp=4 an 8-layer
// one (the 4-layer model has too few layers for 8 groups).
TEST(Pipeline, InterleavedMatchesSerial) {
  const int pp = world_group().size();
  if (pp < 2) GTEST_SKIP() << "interleaving needs pp >= 2 (world size " << pp << ")";
  check_layout(std::max<int64_t>(4, 2 * pp), ScheduleKind::interleaved, 2);
}

// Uneven split: one block on every stage but the last, which gets three.
TEST(Pipeline, UnevenStagesMatchSerial) {
  const int pp = world_group().size();
  std::vector<int64_t> layers(size_t(pp), 1);
  layers.back() = 3;
  check_layout(pp + 2, ScheduleKind::one_f_one_b, 1, layers);
}

TEST(Pipeline, TwoRunsAreBitIdentical) {
  const int pp = world_group().size();
  model::ModelConfig cfg = tiny_config(std::max<int64_t>(4, 2 * pp));
  for (ScheduleKind kind : {ScheduleKind::one_f_one_b, ScheduleKind::interleaved}) {
    if (kind == ScheduleKind::interleaved && pp < 2) continue;  // needs pp >= 2
    int vs = kind == ScheduleKind::interleaved ? 2 : 1;
    PipelineRun a = run_pipeline(cfg, pipeline_config(kind, vs));
    PipelineRun b = run_pipeline(cfg, pipeline_config(kind, vs));
    EXPECT_EQ(std::memcmp(a.losses.data(), b.losses.data(), a.losses.size() * 8), 0)
        << parallel::schedule_name(kind);
    EXPECT_EQ(std::memcmp(a.weights.data(), b.weights.data(), a.weights.size() * 4), 0)
        << parallel::schedule_name(kind);
  }
}

// 1F1B bounds the micro-batches in flight on stage s by pp - s; GPipe keeps all M. So the first
// stage's activation peak is lower under 1F1B whenever pp < M (equal when pp = M).
TEST(Pipeline, OneFOneBHoldsFewerActivationsThanGPipe) {
  model::ModelConfig cfg = tiny_config(4);
  const int pp = world_group().size();
  PipelineRun gpipe = run_pipeline(cfg, pipeline_config(ScheduleKind::gpipe, 1));
  PipelineRun ofob = run_pipeline(cfg, pipeline_config(ScheduleKind::one_f_one_b, 1));
  if (world_group().rank() == 0) {
    // Messages leave from comm buffers whose lifetime the schedule fixes (train/executor.cpp),
    // so the activation peaks do not depend on when transfers complete: strictly lower under
    // 1F1B while pp < M, equal at pp = M.
    if (pp < kM) {
      EXPECT_LT(ofob.peak_activation_bytes, gpipe.peak_activation_bytes);
    } else {
      EXPECT_EQ(ofob.peak_activation_bytes, gpipe.peak_activation_bytes);
    }
    std::printf(
        "{\"pp\": %d, \"M\": %lld, \"rank0_peak_activation_bytes\": {\"gpipe\": %lld, "
        "\"1f1b\": %lld}}\n",
        pp, (long long)kM, (long long)gpipe.peak_activation_bytes,
        (long long)ofob.peak_activation_bytes);
  }
}

// Save after 2 steps, resume for the rest: the same layout continues bit for bit; another layout
// (uneven GPipe) continues within the parity tolerance of expect_matches_serial.
TEST(Pipeline, ResumeFromGatheredStateAtAnyLayout) {
  const int pp = world_group().size();
  model::ModelConfig cfg = tiny_config(2 * pp);
  ExecutorConfig even = pipeline_config(ScheduleKind::one_f_one_b, 1);
  PipelineRun straight = run_pipeline(cfg, even);
  TrainState saved;
  run_pipeline(cfg, even, 0, 2, nullptr, &saved);
  EXPECT_EQ(saved.step, 2);
  PipelineRun resumed = run_pipeline(cfg, even, 2, kSteps - 2, &saved);
  ASSERT_EQ(resumed.losses.size(), size_t(kSteps - 2));
  for (int s = 0; s < kSteps - 2; ++s) EXPECT_EQ(resumed.losses[size_t(s)], straight.losses[size_t(s + 2)]);
  EXPECT_EQ(
      std::memcmp(resumed.weights.data(), straight.weights.data(), straight.weights.size() * 4), 0);

  std::vector<int64_t> layers(size_t(pp), 1);
  layers.back() = pp + 1;
  PipelineRun other =
      run_pipeline(cfg, pipeline_config(ScheduleKind::gpipe, 1, layers), 2, kSteps - 2, &saved);
  for (int s = 0; s < kSteps - 2; ++s)  // same tolerance and reason as expect_matches_serial
    EXPECT_NEAR(other.losses[size_t(s)], straight.losses[size_t(s + 2)],
                1e-5 * straight.losses[size_t(s + 2)]);
}

// Bad splits fail on every rank at construction, before any communication, naming the fix.
TEST(Pipeline, BadConfigsAreErrors) {
  model::ModelConfig cfg = tiny_config(4);
  comm::ProcessGroup world = world_group();
  MemoryPool pool;
  auto message = [&](const ExecutorConfig& pc) {
    try {
      Executor ex(cfg, sized(pc, nullptr, nullptr, &world), pool, nullptr, nullptr, &world);
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  std::string m = message(pipeline_config(ScheduleKind::one_f_one_b, 1, {1, 1, 1, 1, 1}));
  EXPECT_NE(m.find("give exactly"), std::string::npos) << m;
  m = message(pipeline_config(ScheduleKind::gpipe, 2));  // VS > 1 outside interleaved
  EXPECT_NE(m, "no error");
  ExecutorConfig odd = pipeline_config(ScheduleKind::interleaved, 2);
  odd.plan.micro_batches = 3;  // interleaved needs M % pp == 0
  m = message(odd);
  EXPECT_NE(m, "no error");
}

}  // namespace
}  // namespace loom::train
