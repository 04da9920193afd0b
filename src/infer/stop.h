// infer/stop.h: when generated text ends, and how much of it may be shown yet.
//
// The completion text (everything generated after the prompt) is checked after every token:
//   - stop strings: the first occurrence of any of them ends the completion; the matched text
//     and everything after it are excluded;
//   - a HumanEval-X language rule (CodeGeeX's codegeex/benchmark/utils.py):
//       python: a non-empty line that starts at column 0 (not space or tab) ends the function
//               body; the completion ends before that line's newline. The text's first line
//               counts only if the prompt ended at a line start (`at_line_start`).
//       cpp, java, js, go, rust: the first '}' that makes count('}') == count('{') + 1 closes
//               the function; the completion ends after it.
// Streaming: text that could still become the start of a stop string (a suffix that is a
// prefix of one), a trailing newline that a column-0 line could follow (python), and an
// incomplete UTF-8 character at the end are held back until they are decided.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>
#include <vector>

namespace loom::infer {

enum class StopRule { none, python, braces };

// "" -> none; python (py); cpp (c++), java, js (javascript), go (golang), rust -> braces.
// Throws loom::Error naming the accepted names.
StopRule stop_rule_from_name(const std::string& name);

class TextStopper {
 public:
  TextStopper() = default;
  TextStopper(std::vector<std::string> stop_strings, StopRule rule, bool at_line_start);

  struct Verdict {
    bool stopped = false;  // true: the completion is text[0, end)
    size_t end = 0;        // stopped: completion length; else: bytes safe to show
  };
  Verdict check(std::string_view text) const;

 private:
  std::vector<std::string> stops_;
  StopRule rule_ = StopRule::none;
  bool at_line_start_ = false;
};

// Length of the longest prefix of `text` that does not end inside a UTF-8 character.
size_t complete_utf8_prefix(std::string_view text);

}  // namespace loom::infer
