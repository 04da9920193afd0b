// comm/mpi_runtime.h: MPI initialisation and the error-checking wrapper every MPI call goes
// through.
//
// Glossary: w world/group size, r rank in a group, "world rank" rank in MPI_COMM_WORLD.
//
// MpiRuntime is the one RAII owner of MPI in a process: it calls MPI_Init_thread if MPI is not
// initialised yet and MPI_Finalize on destruction (only if it was the one that initialised).
// Every ProcessGroup must be destroyed before it. loom's comm layer calls MPI from one thread at
// a time, so FUNNELED (the default) or SERIALIZED is enough.
#pragma once

#include <mpi.h>

#include <string>

#include "core/dtype.h"

namespace loom::comm {

enum class ThreadLevel { funneled, serialized };

class MpiRuntime {
 public:
  // Initialises MPI once per process (argc/argv may be null). Throws loom::Error if the MPI
  // library cannot provide `level`.
  MpiRuntime(int* argc, char*** argv, ThreadLevel level = ThreadLevel::funneled);
  ~MpiRuntime();
  MpiRuntime(const MpiRuntime&) = delete;
  MpiRuntime& operator=(const MpiRuntime&) = delete;

  bool owns_mpi() const { return owns_; }
  int world_rank() const { return world_rank_; }
  int world_size() const { return world_size_; }

 private:
  bool owns_ = false;
  int world_rank_ = 0;
  int world_size_ = 1;
};

// Same as constructing an MpiRuntime; reads well at the top of main():
//   auto mpi = loom::comm::init_mpi(&argc, &argv);
inline MpiRuntime init_mpi(int* argc, char*** argv, ThreadLevel level = ThreadLevel::funneled) {
  return MpiRuntime(argc, argv, level);
}

// Throws loom::Error "<what> failed: <MPI error string> (code c)" when rc != MPI_SUCCESS.
// Communicators made by loom use MPI_ERRORS_RETURN so failures arrive here instead of aborting.
void mpi_check(int rc, const char* what);
#define LOOM_MPI(call) ::loom::comm::mpi_check((call), #call)

// For a rank that cannot go on (an exception reached the top of a multi-rank command): prints
// "error: [rank r/w] <message>" to stderr and calls MPI_Abort on the world, so the launcher ends
// every other rank now instead of leaving them blocked in a collective until its timeout (and
// the launcher's report names this rank). Returning normally would run MPI_Finalize, which
// waits for ranks that are themselves waiting for this one.
[[noreturn]] void abort_world(const std::string& message);

// The MPI datatype that carries `t` bit-exactly (bf16 travels as MPI_UINT16_T; reductions on bf16
// are done in f32, see process_group.h).
MPI_Datatype mpi_transport_type(DType t);

}  // namespace loom::comm
