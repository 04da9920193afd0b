#include "core/log.h"

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace loom {

namespace {
LogLevel initial_level() {
  const char* v = std::getenv("LOOM_LOG");
  if (!v) return LogLevel::info;
  if (!std::strcmp(v, "debug")) return LogLevel::debug;
  if (!std::strcmp(v, "warn")) return LogLevel::warn;
  if (!std::strcmp(v, "error")) return LogLevel::error;
  if (!std::strcmp(v, "off")) return LogLevel::off;
  return LogLevel::info;
}
std::atomic<int> g_level{int(initial_level())};
std::atomic<int> g_rank{0};
std::atomic<int> g_world{1};
const auto g_start = std::chrono::steady_clock::now();
}  // namespace

void set_log_level(LogLevel level) { g_level = int(level); }
LogLevel log_level() { return LogLevel(g_level.load()); }
void set_log_rank(int rank, int world) {
  g_rank = rank;
  g_world = world;
}

void log_line(LogLevel level, const std::string& msg) {
  static const char* kNames[] = {"debug", "info", "warn", "error", "off"};
  double t = std::chrono::duration<double>(std::chrono::steady_clock::now() - g_start).count();
  std::string prefix = fmt::format("[{:8.2f}s {}]", t, kNames[int(level)]);
  if (g_world > 1) prefix += fmt::format("[rank {}/{}]", g_rank.load(), g_world.load());
  std::string line = prefix + " " + msg + "\n";
  std::fwrite(line.data(), 1, line.size(), stderr);
}

}  // namespace loom
