// infer/stop.cpp: stop strings, HumanEval-X stop rules and streaming holdback (see stop.h).
#include "infer/stop.h"

#include <algorithm>

#include "core/error.h"

namespace loom::infer {

StopRule stop_rule_from_name(const std::string& name) {
  if (name.empty()) return StopRule::none;
  if (name == "python" || name == "py") return StopRule::python;
  for (const char* b : {"cpp", "c++", "java", "js", "javascript", "go", "golang", "rust"})
    if (name == b) return StopRule::braces;
  LOOM_FAIL(
      "unknown stop rule '{}'; choose one of python, cpp, java, js, go, rust (or \"\" for "
      "none)",
      name);
}

TextStopper::TextStopper(std::vector<std::string> stop_strings, StopRule rule, bool at_line_start)
    : stops_(std::move(stop_strings)), rule_(rule), at_line_start_(at_line_start) {
  for (const std::string& s : stops_) LOOM_CHECK(!s.empty(), "stop strings must not be empty");
}

size_t complete_utf8_prefix(std::string_view t) {
  const size_t n = t.size();
  for (size_t back = 1; back <= 4 && back <= n; ++back) {
    const unsigned char c = static_cast<unsigned char>(t[n - back]);
    if ((c & 0xC0) == 0x80) continue;  // continuation byte: keep looking for the lead
    const size_t need = c < 0x80             ? 1
                        : (c & 0xE0) == 0xC0 ? 2
                        : (c & 0xF0) == 0xE0 ? 3
                        : (c & 0xF8) == 0xF0 ? 4
                                             : 1;
    return need > back ? n - back : n;
  }
  return n;
}

namespace {
bool is_blank(std::string_view line) {
  return std::all_of(line.begin(), line.end(), [](char c) {
    return c == ' ' || c == '\t' || c == '\r' || c == '\f' || c == '\v';
  });
}
}  // namespace

TextStopper::Verdict TextStopper::check(std::string_view text) const {
  Verdict v;
  size_t stop_at = std::string_view::npos;
  for (const std::string& s : stops_) stop_at = std::min(stop_at, text.find(s));
  if (rule_ == StopRule::braces) {
    int64_t open = 0, close = 0;
    for (size_t i = 0; i < text.size() && i < stop_at; ++i) {
      if (text[i] == '{') ++open;
      if (text[i] == '}' && ++close == open + 1) {
        stop_at = i + 1;
        break;
      }
    }
  } else if (rule_ == StopRule::python) {
    // Lines start at 0 (if the prompt ended at a line start) and after every '\n'.
    size_t start = at_line_start_ ? 0 : text.find('\n');
    if (start != std::string_view::npos && !at_line_start_) ++start;
    while (start != std::string_view::npos && start < text.size() && start < stop_at) {
      const size_t nl = text.find('\n', start);
      const std::string_view line =
          text.substr(start, nl == std::string_view::npos ? nl : nl - start);
      if (!line.empty() && line[0] != ' ' && line[0] != '\t' && !is_blank(line)) {
        stop_at = std::min(stop_at, start == 0 ? size_t(0) : start - 1);  // before its newline
        break;
      }
      start = nl == std::string_view::npos ? nl : nl + 1;
    }
  }
  if (stop_at != std::string_view::npos) {
    v.stopped = true;
    v.end = stop_at;
    return v;
  }
  size_t safe = complete_utf8_prefix(text);
  // A suffix that is a proper prefix of a stop string may still become one.
  for (const std::string& s : stops_) {
    const size_t longest = std::min(s.size() - 1, text.size());
    for (size_t len = longest; len > 0; --len)
      if (text.compare(text.size() - len, len, s, 0, len) == 0) {
        safe = std::min(safe, text.size() - len);
        break;
      }
  }
  if (rule_ == StopRule::python) {
    // An empty last line (text ends with '\n') can still become a column-0 line: hold back
    // its newline, where the completion would end. The first line is undecided only when empty.
    if (!text.empty() && text.back() == '\n') safe = std::min(safe, text.size() - 1);
    if (at_line_start_ && text.find('\n') == std::string_view::npos && is_blank(text) &&
        (text.empty() || (text[0] != ' ' && text[0] != '\t')))
      safe = 0;
  }
  v.end = safe;
  return v;
}

}  // namespace loom::infer
