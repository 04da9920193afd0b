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

// Gives back the calling thread's OpenMP worker threads (they are started again if it opens a
// parallel region later). Call it on a thread that is done with OpenMP before another thread
// takes over the compute (e.g. main after loading, before the serving engine's step thread
// starts). Why: GCC's libgomp counts every pool's workers, and once they exceed the cores it
// spins only ~1000 times at a barrier before sleeping in the kernel, so the step thread's team
// would sleep and wake at every parallel region (measured: 20000 small regions 0.38 s
// against 1.2 s, and 2 against 40,000 voluntary context switches). The call is OpenMP 5.0's
// omp_pause_resource_all(omp_pause_soft); what it frees is the runtime's choice: libgomp (GCC,
// loom's build) frees only the calling thread's pool, LLVM's libomp pauses the whole runtime.
void release_thread_pool();

}  // namespace loom
