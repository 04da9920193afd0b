// The read-bandwidth probe (kernels/cpu/bandwidth.h): a finite positive rate, arguments checked,
// and its buffer on transparent huge pages, as the weights it is the yardstick for.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <fstream>
#include <string>

#include "core/error.h"
#include "kernels/cpu/bandwidth.h"

namespace {

// AnonHugePages of this process in KiB (/proc/self/smaps_rollup), or -1 where unreadable.
long anon_huge_kib() {
  std::ifstream f("/proc/self/smaps_rollup");
  const std::string key = "AnonHugePages:";
  for (std::string line; std::getline(f, line);)
    if (line.compare(0, key.size(), key) == 0) return std::stol(line.substr(key.size()));
  return -1;
}

// The THP policy in force ("always", "madvise" or "never"), or "" where unreadable.
std::string thp_policy() {
  std::ifstream f("/sys/kernel/mm/transparent_hugepage/enabled");
  std::string word;
  while (f >> word)
    if (word.size() > 2 && word.front() == '[' && word.back() == ']')
      return word.substr(1, word.size() - 2);
  return "";
}

}  // namespace

TEST(ReadBandwidthProbe, MeasuresAFinitePositiveRate) {
  loom::kernels::ReadBandwidthProbe probe(2, size_t(16) << 20);
  for (int i = 0; i < 2; ++i) {
    const double gbs = probe.measure(2);
    EXPECT_TRUE(std::isfinite(gbs) && gbs > 0.0) << gbs;
  }
  const double once = loom::kernels::measure_read_bandwidth_gbs(1, size_t(4) << 20, 1);
  EXPECT_TRUE(std::isfinite(once) && once > 0.0) << once;
}

TEST(ReadBandwidthProbe, BadArgumentsThrow) {
  EXPECT_THROW(loom::kernels::ReadBandwidthProbe(1, size_t(1) << 19), loom::Error);
  EXPECT_THROW(loom::kernels::measure_read_bandwidth_gbs(1, size_t(4) << 20, 0), loom::Error);
  loom::kernels::ReadBandwidthProbe probe(1, size_t(2) << 20);
  EXPECT_THROW(probe.measure(0), loom::Error);
}

// The decoder's weights and KV pool are advised onto huge pages; a probe on 4 KiB pages read ~6%
// less on the session-23 Xeon and so flattered every fraction of it. At least one 2 MiB page of
// a 64 MiB probe must be huge (not all: the kernel may find too few free 2 MiB frames).
TEST(ReadBandwidthProbe, BufferIsOnHugePages) {
  const std::string policy = thp_policy();
  if (policy != "always" && policy != "madvise")
    GTEST_SKIP() << "SKIP: transparent huge pages are '" << policy << "' here";
  if (std::getenv("LOOM_HUGE_PAGES") && std::getenv("LOOM_HUGE_PAGES")[0] == '0')
    GTEST_SKIP() << "SKIP: LOOM_HUGE_PAGES=0 turns the advice off";
  const long before = anon_huge_kib();
  if (before < 0) GTEST_SKIP() << "SKIP: /proc/self/smaps_rollup is not readable";
  loom::kernels::ReadBandwidthProbe probe(1, size_t(64) << 20);
  const long after = anon_huge_kib();
  EXPECT_GE(after - before, 2048) << "AnonHugePages " << before << " -> " << after << " KiB";
}
