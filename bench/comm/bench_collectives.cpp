// bench/comm/bench_collectives.cpp: all_reduce / reduce_scatter / all_gather, ring vs Open MPI,
// 1 KiB .. 64 MiB of f32, plus a point-to-point bandwidth line for reference.
//
// Usage: scripts/mpirun-local N bench_comm_collectives [--max-bytes B] [--min-bytes B]
//        [--ops all_reduce,reduce_scatter,all_gather,p2p] [--dtype f32|bf16]
// Output (rank 0, JSON lines):
//   {"op","algorithm","ranks","dtype","bytes","iters","time_us","algbw_GBps","busbw_GBps"}
//   {"op","bytes","ranks","ring_over_mpi"}   busbw ratio at each size
// bytes is the nccl-tests size: the all_reduce buffer, the reduce_scatter input (w*n), the
// all_gather output (w*n). algbw = bytes / time; busbw = algbw * 2(w-1)/w for all_reduce and
// algbw * (w-1)/w for reduce_scatter and all_gather. time = slowest rank's mean over `iters`
// calls, best of 3 repetitions (shared machines are noisy).
#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "comm/process_group.h"

namespace {

using loom::DType;
using namespace loom::comm;

struct Args {
  int64_t min_bytes = 1 << 10;
  int64_t max_bytes = int64_t(64) << 20;
  std::vector<std::string> ops = {"all_reduce", "reduce_scatter", "all_gather", "p2p"};
  DType dtype = DType::f32;
};

Args parse(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    std::string k = argv[i];
    auto next = [&]() -> std::string {
      LOOM_CHECK(i + 1 < argc, "{} needs a value", k);
      return argv[++i];
    };
    if (k == "--max-bytes") a.max_bytes = std::stoll(next());
    else if (k == "--min-bytes") a.min_bytes = std::stoll(next());
    else if (k == "--dtype") a.dtype = next() == "bf16" ? DType::bf16 : DType::f32;
    else if (k == "--ops") {
      a.ops.clear();
      std::string v = next();
      size_t p = 0;
      while (p <= v.size()) {
        size_t c = v.find(',', p);
        a.ops.push_back(v.substr(p, c == std::string::npos ? std::string::npos : c - p));
        if (c == std::string::npos) break;
        p = c + 1;
      }
    } else LOOM_FAIL("unknown option {}; see the usage at the top of bench_collectives.cpp", k);
  }
  return a;
}

double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

}  // namespace

int main(int argc, char** argv) {
  MpiRuntime mpi(&argc, &argv);
  Args args = parse(argc, argv);
  ProcessGroup g = ProcessGroup::world();
  const int w = g.size(), r = g.rank();
  const int64_t es = int64_t(loom::dtype_size(args.dtype));
  const char* dt = args.dtype == DType::f32 ? "f32" : "bf16";
  std::map<std::pair<std::string, int64_t>, std::map<std::string, double>> busbw;

  auto slowest = [&](double t) {
    MPI_Allreduce(MPI_IN_PLACE, &t, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
    return t;
  };

  for (const std::string& op : args.ops) {
    for (int64_t bytes = args.min_bytes; bytes <= args.max_bytes; bytes *= 4) {
      int64_t n_total = bytes / es;
      n_total = std::max<int64_t>(w, n_total / w * w);  // multiple of w for rs/ag blocks
      int64_t n_block = n_total / w;
      // Enough calls for ~0.1 s of traffic at 2 GB/s, at least 5.
      int iters = int(std::clamp<int64_t>((int64_t(200) << 20) / std::max<int64_t>(bytes, 1) / w, 5, 200));
      std::vector<char> a(size_t(n_total * es), 0), b(size_t(n_total * es), 0);
      if (op == "p2p") {
        if (w < 2 || r > 1) {
          slowest(0);
          continue;
        }
        // Rank 0 -> rank 1, one direction, blocking pairs.
        auto f = [&] {
          if (r == 0) g.send(BufferRef(a.data(), n_total, args.dtype), 1);
          else g.recv(BufferRef(b.data(), n_total, args.dtype), 0);
        };
        f();
        double best = 1e30;
        for (int rep = 0; rep < 3; ++rep) {
          double t0 = now();
          for (int i = 0; i < iters; ++i) f();
          best = std::min(best, (now() - t0) / iters);
        }
        double t = slowest(best);
        if (r == 0)
          std::printf("{\"op\": \"p2p\", \"algorithm\": \"mpi\", \"ranks\": 2, \"dtype\": \"%s\", "
                      "\"bytes\": %lld, \"iters\": %d, \"time_us\": %.2f, \"algbw_GBps\": %.3f, "
                      "\"busbw_GBps\": %.3f}\n",
                      dt, (long long)(n_total * es), iters, t * 1e6, double(n_total * es) / t / 1e9,
                      double(n_total * es) / t / 1e9);
        std::fflush(stdout);
        continue;
      }
      for (Algorithm algo : {Algorithm::mpi, Algorithm::ring, Algorithm::auto_select}) {
        g.set_algorithm(algo);
        std::function<void()> f;
        double factor = 1;
        if (op == "all_reduce") {
          f = [&] { g.all_reduce(BufferRef(a.data(), n_total, args.dtype)).wait(); };
          factor = 2.0 * (w - 1) / w;
        } else if (op == "reduce_scatter") {
          f = [&] {
            g.reduce_scatter(BufferRef(a.data(), n_total, args.dtype), BufferRef(b.data(), n_block, args.dtype)).wait();
          };
          factor = double(w - 1) / w;
        } else if (op == "all_gather") {
          f = [&] {
            g.all_gather(BufferRef(a.data(), n_block, args.dtype), BufferRef(b.data(), n_total, args.dtype)).wait();
          };
          factor = double(w - 1) / w;
        } else {
          LOOM_FAIL("unknown op '{}'; choose all_reduce, reduce_scatter, all_gather, p2p", op);
        }
        f();
        double best = 1e30;
        for (int rep = 0; rep < 3; ++rep) {
          g.barrier().wait();
          double t0 = now();
          for (int i = 0; i < iters; ++i) f();
          best = std::min(best, slowest((now() - t0) / iters));
        }
        double sz = double(n_total * es);
        double alg = sz / best / 1e9, bus = alg * factor;
        busbw[{op, n_total * es}][std::string(algorithm_name(algo))] = bus;
        if (r == 0)
          std::printf("{\"op\": \"%s\", \"algorithm\": \"%s\", \"ranks\": %d, \"dtype\": \"%s\", "
                      "\"bytes\": %lld, \"iters\": %d, \"time_us\": %.2f, \"algbw_GBps\": %.3f, "
                      "\"busbw_GBps\": %.3f}\n",
                      op.c_str(), std::string(algorithm_name(algo)).c_str(), w, dt,
                      (long long)(n_total * es), iters, best * 1e6, alg, bus);
        std::fflush(stdout);
      }
    }
  }
  if (r == 0)
    for (const auto& [k, m] : busbw)
      std::printf("{\"op\": \"%s\", \"bytes\": %lld, \"ranks\": %d, \"ring_over_mpi\": %.2f}\n",
                  k.first.c_str(), (long long)k.second, w, m.at("ring") / m.at("mpi"));
  return 0;
}
