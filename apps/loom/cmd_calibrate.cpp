// `loom calibrate [--out configs/clusters/local.toml] [--quick]`: measures this machine and writes
// a cluster file (planner/cluster.h) for `loom plan` and `loom train --auto`:
// - the matmul efficiency table: kernels::matmul_f32 (and matmul_bf16 where bf16 runs natively)
//   over square products of 32..1024 and the engine's row-heavy shapes, as a fraction of the best
//   rate measured (the host's peak with every core);
// - vector-op bandwidth: a triad a = b + s*c over arrays far larger than the caches;
// - the cores of the host (ranks share them: core/threads.h);
// - under mpirun with N >= 2 ranks: every collective (all-reduce, all-gather, reduce-scatter)
//   and point-to-point send at group sizes 2..N with a small and a large message, fitted to the
//   alpha-beta form of cluster.h: alpha and beta from the all-gather, per-collective factors
//   from the others. Without MPI the links keep the figures of a single shared-memory host
//   measured on an earlier run, or (none known) a 1-rank file whose links are never used.
// Records the CPU model and the date. Progress goes to stderr; about a minute on 2 cores.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include <unistd.h>

#include <fmt/format.h>

#include "cli.h"
#include "comm/mpi_runtime.h"
#include "comm/process_group.h"
#include "core/error.h"
#include "core/threads.h"
#include "kernels/cpu/matmul.h"
#include "model/stage.h"
#include "planner/cluster.h"

namespace {

using Clock = std::chrono::steady_clock;
using loom::planner::Cluster;
using loom::planner::Collective;

double seconds_since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

// Rate (FLOP/s) of an (m x k) @ (k x n) product on this thread count.
double matmul_rate(int64_t m, int64_t n, int64_t k, bool bf16_native, double budget_s,
                   double* best_out = nullptr, double* median_call_s = nullptr) {
  std::vector<float> A(size_t(m * k), 0.5f), B(size_t(k * n), 0.25f), C(size_t(m * n));
  std::vector<loom::bf16> Ab, Bb;
  if (bf16_native) {
    Ab.assign(A.size(), loom::bf16{});
    Bb.assign(B.size(), loom::bf16{});
  }
  auto once = [&] {
    if (bf16_native)
      loom::kernels::matmul_bf16(Ab.data(), Bb.data(), C.data(), m, n, k, false, false, false);
    else
      loom::kernels::matmul_f32(A.data(), B.data(), C.data(), m, n, k, false, false, false);
  };
  once();  // creates the primitive
  // The median call within the budget: what a rank gets on this machine as it is loaded now
  // (on a shared machine the fastest call is what the kernel could do alone; both printed).
  std::vector<double> t;
  const auto t0 = Clock::now();
  do {
    const auto t1 = Clock::now();
    once();
    t.push_back(seconds_since(t1));
  } while (seconds_since(t0) < budget_s || t.size() < 3);
  std::sort(t.begin(), t.end());
  const double flops = 2.0 * double(m) * double(n) * double(k);
  if (best_out) *best_out = flops / t.front();
  if (median_call_s) *median_call_s = t[t.size() / 2];
  return flops / t[t.size() / 2];
}

// Throughput (FLOP/s) of back-to-back 256^3 products over `budget_s` of wall time: unlike a
// single call's time, this sees the time slices other processes take.
double matmul_throughput(double budget_s) {
  const int64_t n = 256;
  std::vector<float> A(size_t(n * n), 0.5f), B(size_t(n * n), 0.25f), C(size_t(n * n));
  loom::kernels::matmul_f32(A.data(), B.data(), C.data(), n, n, n, false, false, false);
  const auto t0 = Clock::now();
  int64_t reps = 0;
  do {
    loom::kernels::matmul_f32(A.data(), B.data(), C.data(), n, n, n, false, false, false);
    ++reps;
  } while (seconds_since(t0) < budget_s);
  return 2.0 * double(n * n * n) * double(reps) / seconds_since(t0);
}

// Triad bandwidth in bytes/s (3 arrays of 4-byte floats per element): the median pass.
double triad_bandwidth(double min_s) {
  const int64_t n = int64_t(1) << 23;  // 32 MiB per array: beyond any last-level cache here
  std::vector<float> a(static_cast<size_t>(n)), b(static_cast<size_t>(n), 1.0f), c(static_cast<size_t>(n), 2.0f);
  std::vector<double> t;
  const auto t0 = Clock::now();
  do {
    const auto t1 = Clock::now();
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; ++i) a[size_t(i)] = b[size_t(i)] + 0.5f * c[size_t(i)];
    t.push_back(seconds_since(t1));
  } while (seconds_since(t0) < min_s || t.size() < 3);
  std::sort(t.begin(), t.end());
  return 3.0 * 4.0 * double(n) / t[t.size() / 2];
}

// Median seconds of `reps` calls of op on group g (every member calls).
template <class F>
double median_time(const loom::comm::ProcessGroup& g, int reps, F op) {
  std::vector<double> t;
  op();  // warm-up
  for (int i = 0; i < reps; ++i) {
    g.barrier().wait();
    const auto t0 = Clock::now();
    op();
    t.push_back(seconds_since(t0));
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

// A barrier that sleeps while it waits, so that ranks not being measured leave the cores to the
// ones that are (MPI's own waits poll and would take a core each).
void sleepy_barrier(const loom::comm::ProcessGroup& g) {
  const loom::comm::Work w = g.barrier();
  while (!w.test()) usleep(2000);
  w.wait();
}

std::string today() {
  const std::time_t now = std::time(nullptr);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%d %H:%M UTC", std::gmtime(&now));
  return buf;
}

}  // namespace

void loom::cli::calibrate_to_file(const std::string& out, bool quick,
                                  const loom::comm::ProcessGroup& world) {
  const auto start = Clock::now();
  const int W = world.valid() ? world.size() : 1;
  const bool root = !world.valid() || world.rank() == 0;
  auto progress = [&](const std::string& s) {
    if (root) std::fprintf(stderr, "[calibrate %5.1f s] %s\n", seconds_since(start), s.c_str());
  };
  Cluster c;
  c.name = "this machine (loom calibrate)";
  c.nodes = 1;
  c.cpu_model = loom::planner::this_cpu_model();
  c.calibrated = today();
  c.host_cores = loom::available_cores();
  // Ranks on this host share its cores; allow as many ranks as a plan may ask for.
  c.devices_per_node = 64;
  c.bf16_emulated = loom::model::bf16_emulated();
  const double min_s = quick ? 0.05 : 0.25;  // seconds per measurement
  double alone_256 = 0;                       // root: one-thread 256^3 rate alone

  if (root) {
    // Compute: one thread, as each rank runs when ranks fill the cores (core/threads.h), scaled
    // to the host by its cores (the cost model divides the host among the ranks again).
    loom::set_num_threads(1);
    const bool native = loom::kernels::bf16_matmul_path() == loom::kernels::Bf16MatmulPath::native;
    struct Shape { int64_t m, n, k; };
    std::vector<Shape> shapes;
    for (int64_t s : {16, 32, 64, 128, 256, 512, 1024}) shapes.push_back({s, s, s});
    // Row-heavy products as the blocks run them (rows N = b*T, widths of a small model).
    for (int64_t w : {64, 256}) shapes.push_back({2048, w, w});
    std::vector<std::pair<double, double>> f32_pts, bf16_pts;  // (flops, rate)
    for (const Shape& s : shapes) {
      const double fl = 2.0 * double(s.m * s.n * s.k);
      double best = 0;
      const double r = matmul_rate(s.m, s.n, s.k, false, min_s, &best);
      f32_pts.emplace_back(fl, r);
      progress(fmt::format("matmul f32 {}x{}x{}: {:.2f} GFLOP/s (median call; fastest {:.2f})",
                           s.m, s.n, s.k, r / 1e9, best / 1e9));
      if (native) {
        const double rb = matmul_rate(s.m, s.n, s.k, true, min_s);
        bf16_pts.emplace_back(fl, rb);
        progress(fmt::format("matmul bf16 {}x{}x{}: {:.2f} GFLOP/s", s.m, s.n, s.k, rb / 1e9));
      }
    }
    // Emulated bf16 runs the f32 kernel on rounded values (model/stage.h): the same table.
    if (!native) bf16_pts = f32_pts;
    auto table = [](std::vector<std::pair<double, double>> pts, double& peak) {
      std::sort(pts.begin(), pts.end());
      peak = 0;
      for (auto [f, r] : pts) peak = std::max(peak, r);
      loom::planner::EfficiencyTable t;
      for (auto [f, r] : pts) {
        const double g = f / 1e9;
        if (!t.points.empty() && g <= t.points.back().first) {  // same size twice: keep the best
          t.points.back().second = std::max(t.points.back().second, r / peak);
          continue;
        }
        t.points.emplace_back(g, std::min(1.0, r / peak));
      }
      return t;
    };
    // The concurrency table's unit: one thread alone on 256^3 products, the best of three
    // windows like every concurrency entry below, measured after the sweep has warmed the core
    // (a single first window read ~1.6x low here and made every rank look 1.6x faster than it
    // is: the cost model then predicted half the measured step times on a quiet host).
    for (int w = 0; w < 3; ++w) alone_256 = std::max(alone_256, matmul_throughput(min_s));
    c.eff_f32 = table(f32_pts, c.peak_flops_f32);
    c.eff_bf16 = table(bf16_pts, c.peak_flops_bf16);
    c.peak_flops_f32 *= c.host_cores;
    c.peak_flops_bf16 *= c.host_cores;
    // Kernel-call overhead: the median time of an 8x8x8 product (1 kFLOP: all dispatch).
    double call_s = 0;
    (void)matmul_rate(8, 8, 8, false, min_s / 4, nullptr, &call_s);
    c.op_overhead_s = call_s;
    progress(fmt::format("kernel call overhead: {:.2f} us", call_s * 1e6));
    c.memory_bandwidth_Bps = triad_bandwidth(min_s / 3) * c.host_cores;  // one thread x cores
    progress(fmt::format("vector triad: {:.2f} GB/s", c.memory_bandwidth_Bps / 1e9));
    c.memory_bytes = int64_t(sysconf(_SC_PHYS_PAGES)) * int64_t(sysconf(_SC_PAGE_SIZE));
  }
  if (world.valid()) sleepy_barrier(world);  // the others slept through the compute timings

  // Concurrency: p ranks (each with the engine's max(1, cores/p) threads) computing 256^3
  // products at once; each one's throughput in cores' worth of the one-thread throughput alone.
  // This sees oversubscription and whatever else loads the host now.
  for (int p = 1; p <= W; ++p) {
    std::vector<double> rates(static_cast<size_t>(W), 0.0);
    const int me = world.valid() ? world.rank() : 0;
    if (me < p) {
      loom::set_num_threads(std::max(1, c.host_cores / p));
      // The best of three windows: a burst of outside load in one window is not the host's state.
      for (int w = 0; w < 3; ++w)
        rates[size_t(me)] = std::max(rates[size_t(me)], matmul_throughput(min_s));
    }
    if (world.valid()) {
      // Ranks not computing wait asleep (MPI's own wait polls and would take a core).
      const loom::comm::Work w =
          world.all_reduce(loom::comm::BufferRef(rates.data(), W, loom::DType::f64));
      while (!w.test()) usleep(2000);
      w.wait();
    }
    if (root) {
      double sum = 0;
      for (int i = 0; i < p; ++i) sum += rates[size_t(i)];
      c.concurrency.emplace_back(p, sum / p / alone_256);
      progress(fmt::format("{} rank(s) computing at once: {:.2f} cores' worth each", p,
                           c.concurrency.back().second));
    }
  }

  // Links: one shared-memory level; inter is the same (one node).
  loom::planner::LinkLevel link;
  link.latency_s = 5e-6;
  link.bandwidth_Bps = 1e9;
  link.efficiency = 1;
  if (W >= 2) {
    loom::set_num_threads(std::max(1, c.host_cores / W));
    const int reps = quick ? 5 : 11;
    const int64_t small = 16, large = int64_t(1) << 20;  // floats: 64 B and 4 MiB buffers
    struct Fit { double lat_sum = 0, bw_sum = 0; int n = 0; };
    // [collective][size]: median seconds per group size.
    std::vector<std::array<std::array<double, 2>, 4>> t(size_t(W + 1));
    for (int p = 2; p <= W; ++p) {
      std::vector<int> members(static_cast<size_t>(p));
      for (int i = 0; i < p; ++i) members[size_t(i)] = i;
      std::vector<std::vector<int>> parts = {members};
      const loom::comm::ProcessGroup g = world.split(parts, fmt::format("calib{}", p));
      if (g.valid()) {
        for (int si = 0; si < 2; ++si) {
          const int64_t n = si ? large : small;  // the full buffer, elements
          std::vector<float> full(size_t(n * p), 1.0f), part(size_t(n), 1.0f);
          using loom::DType;
          t[size_t(p)][0][size_t(si)] = median_time(g, reps, [&] {
            g.all_reduce(loom::comm::BufferRef(full.data(), n, DType::f32)).wait();
          });
          std::vector<float> blk(size_t(n / p + 1), 1.0f), whole(size_t((n / p + 1) * p));
          const int64_t b = std::max<int64_t>(1, n / p);
          t[size_t(p)][1][size_t(si)] = median_time(g, reps, [&] {
            g.all_gather(loom::comm::BufferRef(blk.data(), b, DType::f32),
                         loom::comm::BufferRef(whole.data(), b * p, DType::f32)).wait();
          });
          t[size_t(p)][2][size_t(si)] = median_time(g, reps, [&] {
            g.reduce_scatter(loom::comm::BufferRef(whole.data(), b * p, DType::f32),
                             loom::comm::BufferRef(blk.data(), b, DType::f32)).wait();
          });
          // Send: rank 0 -> 1, one way (the others only take part in the barrier).
          t[size_t(p)][3][size_t(si)] = median_time(g, reps, [&] {
            if (g.rank() == 0) g.send(loom::comm::BufferRef(full.data(), n, DType::f32), 1, 7);
            if (g.rank() == 1) g.recv(loom::comm::BufferRef(full.data(), n, DType::f32), 0, 7);
          });
        }
        if (g.rank() == 0)
          progress(fmt::format("collectives at {} ranks: all_reduce {:.1f} us / {:.2f} ms (64 B / "
                               "4 MiB), all_gather {:.1f} us / {:.2f} ms, send {:.1f} us / {:.2f} ms",
                               p, t[size_t(p)][0][0] * 1e6, t[size_t(p)][0][1] * 1e3,
                               t[size_t(p)][1][0] * 1e6, t[size_t(p)][1][1] * 1e3,
                               t[size_t(p)][3][0] * 1e6, t[size_t(p)][3][1] * 1e3));
      }
      sleepy_barrier(world);
    }
    if (root) {
      // Alpha, beta from the all-gather (factors [1, 1] by definition), averaged over p:
      // t_small = (p-1) alpha, t_large - t_small = (p-1)/p * bytes / beta.
      const double bytes = double(large) * 4;
      double a = 0, inv_b = 0;
      for (int p = 2; p <= W; ++p) {
        a += t[size_t(p)][1][0] / (p - 1);
        inv_b += std::max(1e-12, t[size_t(p)][1][1] - t[size_t(p)][1][0]) / ((p - 1.0) / p * bytes);
      }
      a /= (W - 1);
      inv_b /= (W - 1);
      link.latency_s = a;
      link.bandwidth_Bps = 1.0 / inv_b;
      for (int ci : {0, 2, 3}) {
        double fl = 0, fb = 0;
        for (int p = 2; p <= W; ++p) {
          const double steps = ci == 3 ? 1.0 : p - 1.0, share = ci == 3 ? 1.0 : (p - 1.0) / p;
          fl += t[size_t(p)][size_t(ci)][0] / (steps * a);
          fb += std::max(1e-12, t[size_t(p)][size_t(ci)][1] - t[size_t(p)][size_t(ci)][0]) /
                (share * bytes * inv_b);
        }
        link.factors[size_t(ci)] = {fl / (W - 1), fb / (W - 1)};
      }
      link.factors[1] = {1, 1};
    }
  } else {
    progress("not under mpirun: link figures are placeholders (alpha 5 us, beta 1 GB/s); run "
             "`mpirun -np 4 loom calibrate` to measure the collectives");
  }
  if (root) {
    c.intra = link;
    c.inter = link;
    std::string text = fmt::format(
        "# Written by `loom calibrate` on {} ({} cores, {} MPI ranks measured). Every figure is a\n"
        "# measurement of this host: peaks are the best one-thread matmul rate x cores; efficiency\n"
        "# is each size's rate over that peak; memory_bandwidth_GBps a triad; links an\n"
        "# alpha-beta fit of the collectives at 2..{} ranks (all_gather defines alpha and beta).\n"
        "# Ranks share the host's cores ([host] cores): the cost model divides these figures\n"
        "# among the ranks. Re-run after changing the machine: loom calibrate --out {}\n",
        c.calibrated, c.host_cores, W, W, out);
    text += c.to_toml();
    std::ofstream f(out);
    LOOM_CHECK(f.good(), "cannot write '{}': check the directory exists and is writable", out);
    f << text;
    progress(fmt::format("wrote {}", out));
  }
}

namespace {

void run_calibrate(const std::string& out, bool quick, loom::cli::Context& ctx) {
  std::unique_ptr<loom::comm::MpiRuntime> mpi;
  loom::comm::ProcessGroup world;
  if (loom::cli::launched_by_mpi()) {
    mpi = std::make_unique<loom::comm::MpiRuntime>(nullptr, nullptr);
    world = loom::comm::ProcessGroup::world();
  }
  loom::cli::calibrate_to_file(out, quick, world);
  ctx.exit_code = 0;
}

void add_calibrate(CLI::App& root, loom::cli::Context& ctx) {
  auto out = std::make_shared<std::string>("configs/clusters/local.toml");
  auto quick = std::make_shared<bool>(false);
  CLI::App* sub = root.add_subcommand(
      "calibrate", "measure this machine (matmul, bandwidth, MPI collectives) into a cluster file");
  sub->add_option("--out", *out, "cluster file to write (default configs/clusters/local.toml)");
  sub->add_flag("--quick", *quick, "shorter timing windows (tests)");
  sub->callback([out, quick, &ctx] { run_calibrate(*out, *quick, ctx); });
}

}  // namespace

LOOM_REGISTER_COMMAND(calibrate, add_calibrate);
