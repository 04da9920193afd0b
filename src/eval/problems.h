// eval/problems.h: HumanEval-X problem files and sample files.
//
// Glossary
//   problem  one HumanEval-X record: task_id ("Python/0", "CPP/12", "Java/3", "JavaScript/7",
//            "Go/5", "Rust/1"), prompt, declaration, canonical_solution, test, example_test, and
//            for Go also import and test_setup.
//   sample   one generated continuation of a problem's prompt: {"task_id", "generation"}; a task
//            may have several, numbered 0, 1, ... in file order (the sample index).
//
// Files are JSON Lines, optionally gzip-compressed (name ending in .gz). Every error names the
// file and the 1-based line and says what to fix; nothing is half-loaded (loaders throw
// loom::Error and return nothing).
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace loom::eval {

enum class Language { kPython, kCpp, kJava, kJavaScript, kGo, kRust };
inline constexpr Language kAllLanguages[] = {Language::kPython,     Language::kCpp,
                                             Language::kJava,       Language::kJavaScript,
                                             Language::kGo,         Language::kRust};

// Short name used on the command line and in reports: python cpp java js go rust.
std::string_view language_name(Language lang);
// The task_id prefix HumanEval-X uses: Python CPP Java JavaScript Go Rust.
std::string_view task_prefix(Language lang);
// Accepts a short name, a task prefix or a common alias (c++, javascript, golang, py),
// case-insensitively. Throws loom::Error listing the accepted names.
Language parse_language(std::string_view text);
// The language of a task id from its prefix ("CPP/3" -> kCpp); nullopt when unknown.
std::optional<Language> language_of_task(std::string_view task_id);

struct Problem {
  std::string task_id;
  Language language = Language::kPython;
  std::string prompt;
  std::string declaration;
  std::string canonical_solution;
  std::string test;
  std::string example_test;
  std::string import_block;  // Go: the "import" field
  std::string test_setup;    // Go: the "test_setup" field
  std::string origin;        // "file:line", for messages
};

class ProblemSet {
 public:
  // Reads every file in order. Throws on a missing or unreadable file, malformed JSON (with the
  // line number), a record without task_id/prompt/test/canonical_solution, an unknown language
  // prefix, or a task id given twice.
  static ProblemSet load(const std::vector<std::filesystem::path>& files);

  const std::vector<Problem>& problems() const { return problems_; }
  const Problem* find(std::string_view task_id) const;
  // Keeps only problems in `languages` (no-op when empty). Order is preserved.
  void keep_languages(const std::vector<Language>& languages);

 private:
  std::vector<Problem> problems_;
  std::map<std::string, size_t, std::less<>> index_;
};

struct Sample {
  std::string task_id;
  int64_t index = 0;  // 0-based, per task, in file order
  std::string generation;
  int64_t line = 0;   // 1-based line in the samples file (0 for canonical samples)
};

// Reads {"task_id", "generation"} lines. Samples whose language is not in `languages` (when
// non-empty) are dropped; any other sample must name a problem of `problems`, else loom::Error
// with the line number.
std::vector<Sample> load_samples(const std::filesystem::path& file, const ProblemSet& problems,
                                 const std::vector<Language>& languages);

// One sample per problem whose generation is the canonical solution.
std::vector<Sample> canonical_samples(const ProblemSet& problems);

// Whole file as bytes; transparently gunzips names ending in ".gz". Throws naming the file.
std::string read_file_maybe_gz(const std::filesystem::path& file);

}  // namespace loom::eval
