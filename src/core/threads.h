// core/threads.h: OpenMP thread setup.
//
// loom uses OpenMP for its own loops and oneDNN uses the same OpenMP runtime. Ranks x threads
// must not exceed the cores, or they thrash: the default is LOOM_THREADS, else OMP_NUM_THREADS,
// else the cores this process may run on divided by the local ranks.
#pragma once

namespace loom {

// Cores this process may run on (sched_getaffinity), at least 1.
int available_cores();
// The thread count loom would use for `local_ranks` processes sharing this machine.
int default_num_threads(int local_ranks = 1);
// Sets the OpenMP thread count (>= 1) for this process.
void set_num_threads(int n);
int num_threads();

}  // namespace loom
