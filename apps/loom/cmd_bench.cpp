// `loom bench train-step --model M.toml --batch B --seq T --dtype f32|bf16 [--steps N]`:
// times full training steps (forward, backward, grad norm, AdamW) of the training executor
// (train::Executor, one rank, one micro-batch of B) on random tokens and prints JSON.
//
// `loom bench context-parallel --seq T --cp G --heads H --kv-heads K --head-dim D
//  --scheme burst|ring|allgather|ulysses [--dtype f32|bf16] [--no-overlap] ...` (under
// `mpirun -np G`): times cp attention forward and backward (attention/context_parallel.h) on
// random inputs and prints one JSON line from rank 0: median times (the slowest rank's),
// exposed communication wait, bytes sent per rank in forward and backward (group counters) beside
// the closed forms, and peak attention memory per rank (inputs, outputs, gradients and the
// call's workspace).
#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <nlohmann/json.hpp>
#include <vector>

#include "attention/context_parallel.h"
#include "cli.h"
#include "comm/mpi_runtime.h"
#include "comm/process_group.h"
#include "core/error.h"
#include "core/rng.h"
#include "core/threads.h"
#include "kernels/cpu/matmul.h"
#include "train/executor.h"

namespace {

void add_bench_context_parallel(CLI::App& root, loom::cli::Context& ctx);

void add_bench(CLI::App& root, loom::cli::Context& ctx) {
  struct Opts {
    std::string model, dtype = "f32", recompute = "none";
    int64_t batch = 4, seq = 256, steps = 5, warmup = 2;
  };
  auto o = std::make_shared<Opts>();
  CLI::App* bench = loom::cli::subcommand_path(root, "bench", "benchmarks (JSON output)");
  CLI::App* sub = bench->add_subcommand("train-step", "time training steps of a model");
  sub->add_option("--model", o->model, "model config (TOML)")->required();
  sub->add_option("--batch", o->batch, "batch size B");
  sub->add_option("--seq", o->seq, "sequence length T");
  sub->add_option("--dtype", o->dtype, "f32 or bf16")->check(CLI::IsMember({"f32", "bf16"}));
  sub->add_option("--recompute", o->recompute, "none, selective or full")
      ->check(CLI::IsMember({"none", "selective", "full"}));
  sub->add_option("--steps", o->steps, "timed steps");
  sub->add_option("--warmup", o->warmup, "untimed steps first");
  sub->callback([o, &ctx] {
    using namespace loom;
    model::ModelConfig cfg = model::load_model_config(o->model);
    const bool bf = o->dtype == "bf16";
    MemoryPool pool;
    train::ExecutorConfig ec;
    ec.plan.micro_batch_size = o->batch;
    ec.plan.recompute = parallel::parse_recompute(o->recompute, cfg.n_layers);
    ec.precision = bf ? model::Precision::bf16 : model::Precision::f32;
    train::Executor exec(cfg, ec, pool);
    exec.init_weights(1);
    const int64_t B = o->batch, T = o->seq;
    std::vector<int32_t> tokens(size_t(B * (T + 1)));
    for (size_t i = 0; i < tokens.size(); ++i)
      tokens[i] = int32_t(rng_u64(7, 1, i) % uint64_t(cfg.vocab));
    std::vector<double> times;
    double loss = 0;
    for (int64_t s = 0; s < o->warmup + o->steps; ++s) {
      auto t0 = std::chrono::steady_clock::now();
      train::StepResult r = exec.train_step(tokens.data(), B, T);
      double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      if (s >= o->warmup) times.push_back(dt);
      loss = r.loss;
    }
    std::sort(times.begin(), times.end());
    double med = times[times.size() / 2];
    double tps = double(B * T) / med;
    double gflops = cfg.train_flops_per_token(T) * double(B * T) / med / 1e9;
    double peak = kernels::measure_matmul_peak_gflops(bf);
    nlohmann::json j = {{"impl", "loom"},
                        {"model", cfg.name},
                        {"dtype", o->dtype},
                        {"batch", B},
                        {"seq", T},
                        {"threads", num_threads()},
                        {"recompute", o->recompute},
                        {"steps", o->steps},
                        {"step_ms_median", med * 1e3},
                        {"step_ms_min", times.front() * 1e3},
                        {"tokens_per_s", tps},
                        {"gflops", gflops},
                        {"matmul_peak_gflops", peak},
                        {"peak_fraction", gflops / peak},
                        {"flops_per_token", cfg.train_flops_per_token(T)},
                        {"loss", loss},
                        {"peak_activation_bytes", pool.peak(MemCategory::activations)}};
    std::printf("%s\n", j.dump().c_str());
    ctx.exit_code = 0;
  });
  add_bench_context_parallel(root, ctx);
}

void add_bench_context_parallel(CLI::App& root, loom::cli::Context& ctx) {
  struct Opts {
    std::string scheme = "burst", dtype = "f32", layout = "zigzag", backward = "auto";
    int64_t seq = 4096, cp = 1, heads = 12, kv_heads = 12, head_dim = 64, batch = 1;
    int64_t iters = 3, warmup = 1;
    int ranks_per_node = 0;
    bool no_overlap = false, no_causal = false;
  };
  auto o = std::make_shared<Opts>();
  CLI::App* bench = loom::cli::subcommand_path(root, "bench", "benchmarks (JSON output)");
  CLI::App* sub = bench->add_subcommand(
      "context-parallel", "time cp attention forward/backward over mpirun ranks (one JSON line)");
  sub->add_option("--seq", o->seq, "global sequence length T");
  sub->add_option("--cp", o->cp, "cp group size G (must equal the mpirun rank count)");
  sub->add_option("--heads", o->heads, "query heads NH");
  sub->add_option("--kv-heads", o->kv_heads, "kv heads NKV (divides NH)");
  sub->add_option("--head-dim", o->head_dim, "head dim HD");
  sub->add_option("--batch", o->batch, "batch B");
  sub->add_option("--scheme", o->scheme, "burst, ring, allgather or ulysses")
      ->check(CLI::IsMember({"burst", "ring", "allgather", "ulysses"}));
  sub->add_option("--backward", o->backward, "auto, burst or ring (scheme burst only)")
      ->check(CLI::IsMember({"auto", "burst", "ring"}));
  sub->add_option("--layout", o->layout, "zigzag, striped or contiguous")
      ->check(CLI::IsMember({"zigzag", "striped", "contiguous"}));
  sub->add_option("--dtype", o->dtype, "f32 or bf16 (q, k, v, dout)")
      ->check(CLI::IsMember({"f32", "bf16"}));
  sub->add_option("--ranks-per-node", o->ranks_per_node,
                  "emulated ranks per node for the double ring (0: from MPI)");
  sub->add_option("--iters", o->iters, "timed iterations (median reported)");
  sub->add_option("--warmup", o->warmup, "untimed iterations first");
  sub->add_flag("--no-overlap", o->no_overlap, "wait for each transfer before computing");
  sub->add_flag("--no-causal", o->no_causal, "full (non-causal) attention");
  sub->callback([o, &ctx] {
    using namespace loom;
    using namespace loom::attention;
    using Clock = std::chrono::steady_clock;
    LOOM_CHECK(o->cp == 1 || loom::cli::launched_by_mpi(),
               "--cp {} needs {} MPI ranks: run under `mpirun -np {} loom bench context-parallel ...`",
               o->cp, o->cp, o->cp);
    comm::MpiRuntime mpi(nullptr, nullptr);
    comm::GroupOptions go;
    go.ranks_per_node = o->ranks_per_node;
    comm::ProcessGroup world = comm::ProcessGroup::world(go);
    LOOM_CHECK(world.size() == o->cp, "--cp {} must equal the number of MPI ranks {}; run "
               "`mpirun -np {}` or pass --cp {}", o->cp, world.size(), o->cp, world.size());
    const DType dt = o->dtype == "bf16" ? DType::bf16 : DType::f32;
    const int G = world.size(), r = world.rank();
    const int64_t B = o->batch, T = o->seq, NH = o->heads, NKV = o->kv_heads, HD = o->head_dim;
    check_cp_layout(cp_layout_from_name(o->layout), T, G);  // names T, cp and Ts that work
    const int64_t Tl = T / G;
    CpStats stats;
    CpContext cx;
    cx.group = world;
    cx.scheme = cp_scheme_from_name(o->scheme);
    cx.backward = cp_backward_from_name(o->backward);
    cx.layout = cp_layout_from_name(o->layout);
    cx.overlap = !o->no_overlap;
    cx.ranks_per_node = 0;  // from the group (GroupOptions::ranks_per_node above)
    cx.stats = &stats;
    AttentionShape s{B, Tl, Tl, NH, NKV, HD, NH * HD, NKV * HD, NKV * HD, NH * HD,
                     !o->no_causal, 0, 0, float(1.0 / std::sqrt(double(HD)))};
    check_cp_attention(s, dt, cx);
    // Local inputs (random, distinct per rank) and outputs.
    const size_t nq = size_t(B * Tl * NH * HD), nk = size_t(B * Tl * NKV * HD);
    std::vector<float> q(nq), k(nk), v(nk), dout(nq), out(nq), lse(size_t(B * NH * Tl));
    std::vector<float> dq(nq), dk(nk), dv(nk);
    rng_fill_normal(q.data(), int64_t(nq), 0.0f, 1.0f, 11, uint64_t(r), 0);
    rng_fill_normal(k.data(), int64_t(nk), 0.0f, 1.0f, 12, uint64_t(r), 0);
    rng_fill_normal(v.data(), int64_t(nk), 0.0f, 1.0f, 13, uint64_t(r), 0);
    rng_fill_normal(dout.data(), int64_t(nq), 0.0f, 1.0f, 14, uint64_t(r), 0);
    std::vector<bf16> qb, kb, vb, dob;
    const void *qp = q.data(), *kp = k.data(), *vp = v.data(), *dop = dout.data();
    if (dt == DType::bf16) {
      qb.resize(nq), kb.resize(nk), vb.resize(nk), dob.resize(nq);
      convert_f32_to_bf16(q.data(), qb.data(), nq);
      convert_f32_to_bf16(k.data(), kb.data(), nk);
      convert_f32_to_bf16(v.data(), vb.data(), nk);
      convert_f32_to_bf16(dout.data(), dob.data(), nq);
      qp = qb.data(), kp = kb.data(), vp = vb.data(), dop = dob.data();
    }
    std::vector<double> tf, tb;
    double wf = 0, wb = 0;
    int64_t bytes_f = 0, bytes_b = 0;
    for (int64_t it = 0; it < o->warmup + o->iters; ++it) {
      stats = CpStats{};
      world.barrier().wait();
      auto t0 = Clock::now();
      cp_attention_forward(out.data(), lse.data(), qp, kp, vp, dt, s, cx);
      auto t1 = Clock::now();
      world.barrier().wait();
      auto t2 = Clock::now();
      cp_attention_backward(dq.data(), dk.data(), dv.data(), dop, qp, kp, vp, out.data(), lse.data(),
                            dt, s, cx);
      auto t3 = Clock::now();
      // The slowest rank's times: the step waits for it.
      double t[4] = {std::chrono::duration<double>(t1 - t0).count(),
                     std::chrono::duration<double>(t3 - t2).count(), stats.forward_wait_s,
                     stats.backward_wait_s};
      world.all_reduce(comm::BufferRef(t, 4, DType::f64), comm::ReduceOp::max).wait();
      if (it < o->warmup) continue;
      tf.push_back(t[0]), tb.push_back(t[1]);
      wf += t[2] / double(o->iters), wb += t[3] / double(o->iters);
      bytes_f = stats.forward_bytes_sent, bytes_b = stats.backward_bytes_sent;
    }
    std::sort(tf.begin(), tf.end());
    std::sort(tb.begin(), tb.end());
    const double fwd = tf[tf.size() / 2], bwd = tb[tb.size() / 2];
    // Attention FLOPs per rank: forward 4*B*T^2*NH*HD/G (half when causal), backward 2.5x.
    const double fflops = 4.0 * double(B) * double(T) * double(T) * double(NH) * double(HD) /
                          double(G) * (o->no_causal ? 1.0 : 0.5);
    const int64_t io_bytes = int64_t(sizeof(float)) * int64_t(4 * nq + 3 * nk + lse.size()) +
                             int64_t(dtype_size(dt)) * int64_t(2 * nq + 2 * nk);
    rusage ru{};
    getrusage(RUSAGE_SELF, &ru);
    CpBackward ran = stats.last_backward;
    nlohmann::json j = {
        {"bench", "context-parallel"},
        {"scheme", o->scheme},
        {"backward", cx.scheme == CpScheme::ulysses ? "ulysses" : std::string(cp_backward_name(ran))},
        {"layout", o->layout},
        {"dtype", o->dtype},
        {"overlap", !o->no_overlap},
        {"causal", !o->no_causal},
        {"seq", T},
        {"cp", G},
        {"nodes", world.num_nodes()},
        {"batch", B},
        {"heads", NH},
        {"kv_heads", NKV},
        {"head_dim", HD},
        {"threads_per_rank", std::getenv("OMP_NUM_THREADS") ? std::atoi(std::getenv("OMP_NUM_THREADS")) : 0},
        {"fwd_ms", fwd * 1e3},
        {"bwd_ms", bwd * 1e3},
        {"fwd_wait_ms", wf * 1e3},
        {"bwd_wait_ms", wb * 1e3},
        {"fwd_gflops_per_rank", fflops / fwd / 1e9},
        {"bwd_gflops_per_rank", 2.5 * fflops / bwd / 1e9},
        {"fwd_bytes_per_rank", bytes_f},
        {"bwd_bytes_per_rank", bytes_b},
        {"fwd_bytes_closed_form", cx.scheme == CpScheme::ulysses
                                      ? cp_ulysses_bytes(false, B, T, G, NH, NKV, HD, dt)
                                      : cp_forward_bytes(B, T, G, NKV, HD, dt)},
        {"bwd_bytes_closed_form", cx.scheme == CpScheme::ulysses
                                      ? cp_ulysses_bytes(true, B, T, G, NH, NKV, HD, dt)
                                      : cp_backward_bytes(ran, B, T, G, NH, NKV, HD, dt)},
        {"peak_attention_bytes_per_rank", io_bytes + stats.peak_workspace_bytes},
        {"attention_io_bytes_per_rank", io_bytes},
        {"attention_workspace_bytes_per_rank", stats.peak_workspace_bytes},
        {"max_rss_bytes", int64_t(ru.ru_maxrss) * 1024}};
    if (r == 0) std::printf("%s\n", j.dump().c_str());
    ctx.exit_code = 0;
  });
}

}  // namespace

LOOM_REGISTER_COMMAND(bench, add_bench);
