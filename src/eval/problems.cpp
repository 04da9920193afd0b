// eval/problems.cpp: reading HumanEval-X problem and sample files (JSON Lines, maybe gzipped).
#include "eval/problems.h"

#include <zlib.h>

#include <algorithm>
#include <cctype>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "core/error.h"

namespace loom::eval {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

std::string lower(std::string_view s) {
  std::string out(s);
  for (char& c : out) c = char(std::tolower(static_cast<unsigned char>(c)));
  return out;
}

// Calls fn(line_number, line) for every non-blank line.
template <typename Fn>
void for_each_line(const std::string& text, Fn&& fn) {
  int64_t number = 0;
  size_t start = 0;
  while (start <= text.size()) {
    size_t end = text.find('\n', start);
    if (end == std::string::npos) end = text.size();
    ++number;
    std::string_view line(text.data() + start, end - start);
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    const bool blank = std::all_of(line.begin(), line.end(),
                                   [](char c) { return std::isspace(static_cast<unsigned char>(c)); });
    if (!blank) fn(number, line);
    if (end == text.size()) break;
    start = end + 1;
  }
}

json parse_line(const fs::path& file, int64_t number, std::string_view line) {
  json j;
  try {
    j = json::parse(line);
  } catch (const json::exception& e) {
    // parse_error, and also out_of_range for a number such as 47E899 (found by fuzz_humaneval).
    LOOM_FAIL("{}:{}: malformed JSON ({}); every line must be one JSON object", file.string(),
              number, e.what());
  }
  LOOM_CHECK(j.is_object(), "{}:{}: expected a JSON object, got {}", file.string(), number,
             j.type_name());
  return j;
}

std::string string_field(const json& j, const char* key, bool required, const fs::path& file,
                         int64_t number) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) {
    LOOM_CHECK(!required, "{}:{}: field '{}' is missing; HumanEval-X records need task_id, prompt, "
               "canonical_solution and test", file.string(), number, key);
    return {};
  }
  LOOM_CHECK(it->is_string(), "{}:{}: field '{}' must be a string, got {}", file.string(), number,
             key, it->type_name());
  return it->get<std::string>();
}

std::string known_prefixes() {
  std::string s;
  for (Language l : kAllLanguages) s += (s.empty() ? "" : ", ") + std::string(task_prefix(l));
  return s;
}

}  // namespace

std::string_view language_name(Language lang) {
  switch (lang) {
    case Language::kPython: return "python";
    case Language::kCpp: return "cpp";
    case Language::kJava: return "java";
    case Language::kJavaScript: return "js";
    case Language::kGo: return "go";
    case Language::kRust: return "rust";
  }
  return "?";
}

std::string_view task_prefix(Language lang) {
  switch (lang) {
    case Language::kPython: return "Python";
    case Language::kCpp: return "CPP";
    case Language::kJava: return "Java";
    case Language::kJavaScript: return "JavaScript";
    case Language::kGo: return "Go";
    case Language::kRust: return "Rust";
  }
  return "?";
}

Language parse_language(std::string_view text) {
  const std::string t = lower(text);
  for (Language l : kAllLanguages)
    if (t == language_name(l) || t == lower(task_prefix(l))) return l;
  if (t == "py" || t == "python3") return Language::kPython;
  if (t == "c++" || t == "cxx") return Language::kCpp;
  if (t == "javascript" || t == "node") return Language::kJavaScript;
  if (t == "golang") return Language::kGo;
  if (t == "rs") return Language::kRust;
  LOOM_FAIL("unknown language '{}'; choose one of python, cpp, java, js, go, rust", text);
}

std::optional<Language> language_of_task(std::string_view task_id) {
  const size_t slash = task_id.find('/');
  if (slash == std::string_view::npos) return std::nullopt;
  const std::string_view prefix = task_id.substr(0, slash);
  for (Language l : kAllLanguages)
    if (prefix == task_prefix(l)) return l;
  return std::nullopt;
}

std::string read_file_maybe_gz(const fs::path& file) {
  LOOM_CHECK(fs::exists(file), "file '{}' does not exist", file.string());
  LOOM_CHECK(fs::is_regular_file(file), "'{}' is not a regular file", file.string());
  const std::string name = file.filename().string();
  if (name.size() > 3 && name.compare(name.size() - 3, 3, ".gz") == 0) {
    gzFile gz = gzopen(file.c_str(), "rb");
    LOOM_CHECK(gz != nullptr, "cannot open '{}' for reading", file.string());
    std::string out;
    char buf[1 << 16];
    for (;;) {
      const int n = gzread(gz, buf, sizeof buf);
      if (n < 0) {
        int code = 0;
        const std::string msg = gzerror(gz, &code);
        gzclose(gz);
        LOOM_FAIL("'{}' is not a valid gzip file ({}); decompress it or fix the download",
                  file.string(), msg);
      }
      if (n == 0) break;
      out.append(buf, size_t(n));
    }
    gzclose(gz);
    return out;
  }
  std::ifstream in(file, std::ios::binary);
  LOOM_CHECK(in.good(), "cannot open '{}' for reading", file.string());
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

ProblemSet ProblemSet::load(const std::vector<fs::path>& files) {
  LOOM_CHECK(!files.empty(), "no problem files given; pass --problems humaneval_<lang>.jsonl[.gz]");
  ProblemSet set;
  for (const fs::path& file : files) {
    const std::string text = read_file_maybe_gz(file);
    int64_t records = 0;
    for_each_line(text, [&](int64_t number, std::string_view line) {
      const json j = parse_line(file, number, line);
      Problem p;
      p.task_id = string_field(j, "task_id", true, file, number);
      const auto lang = language_of_task(p.task_id);
      LOOM_CHECK(lang.has_value(),
                 "{}:{}: task_id '{}' has an unknown language prefix; HumanEval-X prefixes are {}",
                 file.string(), number, p.task_id, known_prefixes());
      p.language = *lang;
      p.prompt = string_field(j, "prompt", true, file, number);
      p.canonical_solution = string_field(j, "canonical_solution", true, file, number);
      p.test = string_field(j, "test", true, file, number);
      p.declaration = string_field(j, "declaration", false, file, number);
      p.example_test = string_field(j, "example_test", false, file, number);
      p.import_block = string_field(j, "import", false, file, number);
      p.test_setup = string_field(j, "test_setup", false, file, number);
      if (p.language == Language::kGo)
        LOOM_CHECK(!p.test_setup.empty(),
                   "{}:{}: Go task '{}' has no test_setup (package main and the testing imports)",
                   file.string(), number, p.task_id);
      p.origin = fmt::format("{}:{}", file.string(), number);
      auto [it, inserted] = set.index_.emplace(p.task_id, set.problems_.size());
      LOOM_CHECK(inserted, "{}: task_id '{}' already defined at {}", p.origin, p.task_id,
                 set.problems_[it->second].origin);
      set.problems_.push_back(std::move(p));
      ++records;
    });
    LOOM_CHECK(records > 0, "problem file '{}' has no records", file.string());
  }
  return set;
}

const Problem* ProblemSet::find(std::string_view task_id) const {
  auto it = index_.find(task_id);
  return it == index_.end() ? nullptr : &problems_[it->second];
}

void ProblemSet::keep_languages(const std::vector<Language>& languages) {
  if (languages.empty()) return;
  std::vector<Problem> kept;
  for (Problem& p : problems_)
    if (std::find(languages.begin(), languages.end(), p.language) != languages.end())
      kept.push_back(std::move(p));
  problems_ = std::move(kept);
  index_.clear();
  for (size_t i = 0; i < problems_.size(); ++i) index_.emplace(problems_[i].task_id, i);
}

std::vector<Sample> load_samples(const fs::path& file, const ProblemSet& problems,
                                 const std::vector<Language>& languages) {
  const std::string text = read_file_maybe_gz(file);
  std::vector<Sample> samples;
  std::map<std::string, int64_t> next_index;
  for_each_line(text, [&](int64_t number, std::string_view line) {
    const json j = parse_line(file, number, line);
    Sample s;
    s.line = number;
    s.task_id = string_field(j, "task_id", true, file, number);
    const auto lang = language_of_task(s.task_id);
    LOOM_CHECK(lang.has_value(),
               "{}:{}: sample task_id '{}' has an unknown language prefix; HumanEval-X prefixes "
               "are {}",
               file.string(), number, s.task_id, known_prefixes());
    if (!languages.empty() &&
        std::find(languages.begin(), languages.end(), *lang) == languages.end())
      return;  // filtered out by --lang
    LOOM_CHECK(problems.find(s.task_id) != nullptr,
               "{}:{}: sample for task '{}', which is not in the problem files; pass the "
               "matching --problems file or remove the sample",
               file.string(), number, s.task_id);
    auto g = j.find("generation");
    LOOM_CHECK(g != j.end() && g->is_string(),
               "{}:{}: sample needs a string field 'generation' (the code that continues the "
               "prompt)", file.string(), number);
    s.generation = g->get<std::string>();
    s.index = next_index[s.task_id]++;
    samples.push_back(std::move(s));
  });
  LOOM_CHECK(!samples.empty(), "samples file '{}' has no samples for the selected languages",
             file.string());
  return samples;
}

std::vector<Sample> canonical_samples(const ProblemSet& problems) {
  std::vector<Sample> samples;
  for (const Problem& p : problems.problems()) {
    Sample s;
    s.task_id = p.task_id;
    s.generation = p.canonical_solution;
    samples.push_back(std::move(s));
  }
  return samples;
}

}  // namespace loom::eval
