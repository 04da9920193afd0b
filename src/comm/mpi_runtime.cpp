#include "comm/mpi_runtime.h"

#include <unistd.h>

#include <cstdio>
#include <cstdlib>

#include "core/error.h"

namespace loom::comm {

void mpi_check(int rc, const char* what) {
  if (rc == MPI_SUCCESS) [[likely]]
    return;
  char msg[MPI_MAX_ERROR_STRING] = {0};
  int len = 0;
  MPI_Error_string(rc, msg, &len);
  int world_rank = -1;
  int initialised = 0;
  MPI_Initialized(&initialised);
  if (initialised) MPI_Comm_rank(MPI_COMM_WORLD, &world_rank);
  LOOM_FAIL("[rank {}] {} failed: {} (MPI error code {})", world_rank, what,
            std::string(msg, size_t(len)), rc);
}

MpiRuntime::MpiRuntime(int* argc, char*** argv, ThreadLevel level) {
  int initialised = 0;
  LOOM_MPI(MPI_Initialized(&initialised));
  int wanted = level == ThreadLevel::funneled ? MPI_THREAD_FUNNELED : MPI_THREAD_SERIALIZED;
  if (!initialised) {
    int provided = 0;
    LOOM_MPI(MPI_Init_thread(argc, argv, wanted, &provided));
    owns_ = true;
    LOOM_CHECK(provided >= wanted,
               "MPI provides thread level {} but loom needs {} (FUNNELED=1, SERIALIZED=2); use an "
               "MPI built with thread support",
               provided, wanted);
  }
  // Errors on the world communicator come back as codes (mpi_check turns them into loom::Error)
  // instead of the default abort-the-job handler.
  LOOM_MPI(MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN));
  LOOM_MPI(MPI_Comm_rank(MPI_COMM_WORLD, &world_rank_));
  LOOM_MPI(MPI_Comm_size(MPI_COMM_WORLD, &world_size_));
}

MpiRuntime::~MpiRuntime() {
  if (!owns_) return;
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (!finalized) MPI_Finalize();
}

void abort_world(const std::string& message) {
  int rank = -1, size = 0, initialised = 0, finalized = 0;
  MPI_Initialized(&initialised);
  MPI_Finalized(&finalized);
  if (initialised && !finalized) {
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
  }
  std::fprintf(stderr, "error: [rank %d/%d] %s\nloom: rank %d failed; aborting the other ranks\n",
               rank, size, message.c_str(), rank);
  std::fflush(stderr);
  // Under mpirun our stderr is a pipe to the launcher, which forwards it asynchronously: give it
  // a moment before MPI_Abort tears the job down, or the one line that names the failure can be
  // lost (seen in the frozen-rank CLI test on a loaded machine).
  if (initialised && !finalized) {
    ::usleep(300 * 1000);
    MPI_Abort(MPI_COMM_WORLD, 1);
  }
  std::_Exit(1);
}

MPI_Datatype mpi_transport_type(DType t) {
  switch (t) {
    case DType::f32: return MPI_FLOAT;
    case DType::bf16: return MPI_UINT16_T;
    case DType::f16: return MPI_UINT16_T;
    case DType::i32: return MPI_INT32_T;
    case DType::i64: return MPI_INT64_T;
    case DType::u8: return MPI_UINT8_T;
    case DType::i8: return MPI_INT8_T;
    case DType::f64: return MPI_DOUBLE;
  }
  LOOM_ASSERT(false, "unknown dtype {}", int(t));
  return MPI_BYTE;
}

}  // namespace loom::comm
