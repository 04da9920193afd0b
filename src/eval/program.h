// eval/program.h: assembling the program that tests one sample, exactly as the official
// HumanEval-X harness does (THUDM/CodeGeeX codegeex/benchmark; see docs/eval.md):
//   Python      import helper + prompt + generation cut at its first unindented line + "\n" +
//               test + "\n"                                                   -> main.py
//   C++         each helper #include missing from the prompt, one per line, + "\n" + prompt +
//               generation + "\n" + test; "-lcrypto -lssl" when the task id contains "162"
//                                                                             -> test.cpp
//   Java        prompt + generation + "\n" + test                             -> Main.java
//   JavaScript  prompt + generation + "\n" + test                             -> test.js
//   Go          test_setup + "\n" + [import (...) of the helper packages the generation uses
//               as "pkg." + "\n"] + prompt without its import block + generation + "\n" + test
//                                                                             -> main_test.go
//   Rust        "\nfn main(){ \n } \n" + declaration + prompt + generation + test
//                                                                             -> src/main.rs
// Pure functions: no file system access. What the program needs from the machine (an npm
// package, a header, crates) is listed in `requires` for the runner to check; known dataset
// traps that apply are listed in `notes` (notes/codegeex.md 2.4).
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "eval/problems.h"

namespace loom::eval {

struct Program {
  Language language = Language::kPython;
  std::string file_name;                // the file the source is written to
  std::string source;
  std::vector<std::string> link_flags;  // C++ only
  // "npm:<package>", "header:<path under /usr/include>", "crates:<a,b,c>"
  std::vector<std::string> requirements;
  std::vector<std::string> notes;
};

Program assemble_program(const Problem& problem, const std::string& generation);

// The official Python post-processing: keep lines up to (not including) the first non-empty
// line that starts with neither a space nor a tab.
std::string truncate_python_generation(std::string_view generation);

}  // namespace loom::eval
