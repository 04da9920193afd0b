#include "core/error.h"

#include <cstring>

namespace loom::detail {

namespace {
const char* basename_of(const char* path) {
  const char* slash = std::strrchr(path, '/');
  return slash ? slash + 1 : path;
}
}  // namespace

// User errors carry only the message: the user needs the values and the fix, not our file name.
// The location is kept in parentheses at the end for bug reports.
void throw_check(const char* cond, const char* file, int line, const std::string& msg) {
  std::string m = msg.empty() ? fmt::format("check failed: {}", cond ? cond : "?") : msg;
  m += fmt::format(" ({}:{})", basename_of(file), line);
  throw Error(m);
}

void throw_assert(const char* cond, const char* file, int line, const std::string& msg) {
  throw InternalError(fmt::format("internal error, please report: {} failed at {}:{}{}{}", cond,
                                  basename_of(file), line, msg.empty() ? "" : ": ", msg));
}

}  // namespace loom::detail
