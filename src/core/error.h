// core/error.h: loom's two kinds of error.
//
// LOOM_CHECK(cond, fmt, args...)  for what a user or caller got wrong. Throws loom::Error whose
//   message names the quantities, their values and the fix, e.g.
//   LOOM_CHECK(n_heads % tp == 0, "tp={} must divide n_heads={}; choose tp in {{{}}}", ...).
//   The message is formatted with fmt (so literal braces are written {{ }}).
// LOOM_ASSERT(cond, fmt, args...) for broken invariants: throws loom::InternalError with
//   "internal error, please report" and the file and line.
// LOOM_FAIL(fmt, args...)         throws loom::Error unconditionally.
//
// Library code never exits or aborts on a recoverable error; the CLI catches loom::Error at the
// top and prints it.
#pragma once

#include <fmt/format.h>  // provides: fmt::format

#include <stdexcept>
#include <string>

namespace loom {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& msg) : std::runtime_error(msg) {}
};

class InternalError : public Error {
 public:
  explicit InternalError(const std::string& msg) : Error(msg) {}
};

// A collective or point-to-point operation did not finish within its timeout.
class TimeoutError : public Error {
 public:
  explicit TimeoutError(const std::string& msg) : Error(msg) {}
};

namespace detail {
[[noreturn]] void throw_check(const char* cond, const char* file, int line, const std::string& msg);
[[noreturn]] void throw_assert(const char* cond, const char* file, int line,
                               const std::string& msg);
inline std::string format_or_empty() { return {}; }
template <typename... Args>
std::string format_or_empty(fmt::format_string<Args...> f, Args&&... args) {
  return fmt::format(f, std::forward<Args>(args)...);
}
}  // namespace detail

}  // namespace loom

#define LOOM_CHECK(cond, ...)                                                              \
  do {                                                                                     \
    if (!(cond)) [[unlikely]]                                                              \
      ::loom::detail::throw_check(#cond, __FILE__, __LINE__,                               \
                                  ::loom::detail::format_or_empty(__VA_ARGS__));           \
  } while (0)

#define LOOM_ASSERT(cond, ...)                                                             \
  do {                                                                                     \
    if (!(cond)) [[unlikely]]                                                              \
      ::loom::detail::throw_assert(#cond, __FILE__, __LINE__,                              \
                                   ::loom::detail::format_or_empty(__VA_ARGS__));          \
  } while (0)

#define LOOM_FAIL(...) \
  ::loom::detail::throw_check(nullptr, __FILE__, __LINE__, ::fmt::format(__VA_ARGS__))
