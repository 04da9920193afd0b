// tests/dist/comm/dist_main.cpp: gtest main for tests run under mpirun.
//
// Every rank runs every test. Rank 0 prints gtest's normal output; other ranks print only their
// failures, prefixed with "[rank r]". A rank with a failure aborts the job (MPI_Abort) instead
// of entering MPI_Finalize, which could wait forever on collectives its peers never finished.
#include <gtest/gtest.h>
#include <mpi.h>

#include <cstdio>

#include "comm/mpi_runtime.h"

namespace {

class RankFailurePrinter : public ::testing::EmptyTestEventListener {
 public:
  explicit RankFailurePrinter(int rank) : rank_(rank) {}
  void OnTestPartResult(const ::testing::TestPartResult& r) override {
    if (r.failed())
      std::fprintf(stderr, "[rank %d] %s:%d: Failure\n%s\n", rank_,
                   r.file_name() ? r.file_name() : "?", r.line_number(), r.summary());
  }
  void OnTestEnd(const ::testing::TestInfo& info) override {
    if (info.result()->Failed())
      std::fprintf(stderr, "[rank %d] FAILED %s.%s\n", rank_, info.test_suite_name(), info.name());
  }

 private:
  int rank_;
};

}  // namespace

int main(int argc, char** argv) {
#ifdef LOOM_DIST_MPI_SERIALIZED
  // Tests that make their collectives from a thread other than main (the infer engine's step
  // thread) need SERIALIZED.
  loom::comm::MpiRuntime mpi(&argc, &argv, loom::comm::ThreadLevel::serialized);
#else
  loom::comm::MpiRuntime mpi(&argc, &argv);
#endif
  ::testing::InitGoogleTest(&argc, argv);
  auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
  if (mpi.world_rank() != 0) {
    delete listeners.Release(listeners.default_result_printer());
    listeners.Append(new RankFailurePrinter(mpi.world_rank()));
  }
  int rc = RUN_ALL_TESTS();
  std::fflush(stdout);
  std::fflush(stderr);
  if (rc != 0) MPI_Abort(MPI_COMM_WORLD, 1);
  return 0;
}
