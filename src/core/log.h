// core/log.h: leveled logging to stderr.
//
// LOOM_LOG_INFO("step {} loss {:.4f}", step, loss). Lines carry the elapsed time and, once
// set_log_rank() is called by a multi-rank program, "[rank r/w]". The level and the rank prefix
// are process-wide settings (a log sink, not parallel state).
#pragma once

#include <fmt/format.h>

#include <string>

namespace loom {

enum class LogLevel : int { debug = 0, info = 1, warn = 2, error = 3, off = 4 };

void set_log_level(LogLevel level);
LogLevel log_level();
// Prefix every line with "[rank r/w]" (w > 1 only).
void set_log_rank(int rank, int world);
void log_line(LogLevel level, const std::string& msg);

}  // namespace loom

#define LOOM_LOG_AT(level, ...)                                                   \
  do {                                                                            \
    if (static_cast<int>(level) >= static_cast<int>(::loom::log_level()))         \
      ::loom::log_line(level, ::fmt::format(__VA_ARGS__));                        \
  } while (0)
#define LOOM_LOG_DEBUG(...) LOOM_LOG_AT(::loom::LogLevel::debug, __VA_ARGS__)
#define LOOM_LOG_INFO(...) LOOM_LOG_AT(::loom::LogLevel::info, __VA_ARGS__)
#define LOOM_LOG_WARN(...) LOOM_LOG_AT(::loom::LogLevel::warn, __VA_ARGS__)
#define LOOM_LOG_ERROR(...) LOOM_LOG_AT(::loom::LogLevel::error, __VA_ARGS__)
