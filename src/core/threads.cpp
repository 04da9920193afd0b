#include "core/threads.h"

#include <omp.h>
#include <sched.h>

#include <cstdlib>

#include "core/error.h"

namespace loom {

int available_cores() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    int n = CPU_COUNT(&set);
    if (n > 0) return n;
  }
  return 1;
}

namespace {
int env_int(const char* name) {
  const char* v = std::getenv(name);
  if (!v || !*v) return 0;
  char* end = nullptr;
  long n = std::strtol(v, &end, 10);
  LOOM_CHECK(end && *end == '\0' && n > 0 && n < 4096,
             "environment variable {}='{}' must be a positive integer thread count", name, v);
  return int(n);
}
}  // namespace

int default_num_threads(int local_ranks) {
  if (int n = env_int("LOOM_THREADS")) return n;
  if (int n = env_int("OMP_NUM_THREADS")) return n;
  int n = available_cores() / (local_ranks > 0 ? local_ranks : 1);
  return n > 0 ? n : 1;
}

void set_num_threads(int n) {
  LOOM_CHECK(n >= 1, "thread count must be at least 1, got {}", n);
  omp_set_num_threads(n);
}

int num_threads() { return omp_get_max_threads(); }

void release_thread_pool() {
  // OpenMP 5.0; libgomp frees the calling thread's pool (a no-op inside a parallel region,
  // where it returns non-zero, and harmless to call twice).
  (void)omp_pause_resource_all(omp_pause_soft);
}

}  // namespace loom
