// tests/dist/comm/kill_helper.cpp: rank 2 (or the last rank) SIGKILLs itself in the middle of an
// all_reduce; the others keep waiting on it. Run by kill_rank_test.sh, which checks that the job
// ends non-zero with a message naming the dead rank. If Open MPI did not tear the job down, the
// survivors' waits would time out (LOOM_COMM_TIMEOUT) and this program aborts the job with the
// TimeoutError text -- the application's choice; the library itself never aborts.
#include <mpi.h>
#include <signal.h>
#include <unistd.h>

#include <cstdio>
#include <vector>

#include "comm/process_group.h"

int main(int argc, char** argv) {
  loom::comm::MpiRuntime mpi(&argc, &argv);
  int victim = mpi.world_size() > 2 ? 2 : mpi.world_size() - 1;
  try {
    loom::comm::ProcessGroup world = loom::comm::ProcessGroup::world();
    world.set_algorithm(loom::comm::Algorithm::ring);
    std::vector<float> x(1 << 18, 1.0f);  // (N) 1 MiB
    for (int iter = 0; iter < 1000; ++iter) {
      loom::comm::Work w = world.all_reduce(loom::comm::BufferRef(x.data(), int64_t(x.size()), loom::DType::f32));
      if (iter == 5 && world.rank() == victim) {
        std::fprintf(stderr, "[rank %d] kill_helper: raising SIGKILL mid all_reduce (seq %lld)\n",
                     world.rank(), (long long)world.sequence());
        std::fflush(stderr);
        raise(SIGKILL);
      }
      w.wait();
      x.assign(x.size(), 1.0f);
    }
    std::fprintf(stderr, "[rank %d] kill_helper: finished without noticing the dead rank\n",
                 world.rank());
  } catch (const loom::Error& e) {
    std::fprintf(stderr, "%s\n", e.what());
    std::fflush(stderr);
    MPI_Abort(MPI_COMM_WORLD, 3);
  }
  return 0;
}
