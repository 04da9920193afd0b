// eval/harness.h: HumanEval-X functional-correctness evaluation (the `loom eval humaneval-x` job).
//
// Glossary: n = samples of a problem that ran (skipped ones excluded), c = those that passed,
// k = the pass@k budget. slot = worker index (its sandbox uid).
//
// evaluate_humaneval_x() loads the problem files and the samples (or each problem's canonical
// solution), checks the toolchains of the languages present, and runs every sample through the
// sandbox on a pool of `workers` threads: assemble (program.h) -> compile, cached by program text
// -> run -> judge (languages.h). Results come back in input order (problem file order, then
// sample index), whatever the number of workers. pass@k is computed per language and over all
// problems (micro average). Failure behaviour: bad input and missing toolchains throw
// loom::Error before anything runs; a sample that cannot run here is "skipped" with the reason;
// nothing generated ever runs outside the sandbox. Scratch files are removed on return.
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "eval/languages.h"
#include "eval/problems.h"

namespace loom::eval {

struct EvalProgress {
  int64_t done = 0;
  int64_t total = 0;
  double elapsed_seconds = 0.0;
};

struct HarnessOptions {
  std::vector<std::filesystem::path> problem_files;
  std::filesystem::path samples_file;  // JSON Lines {"task_id", "generation"}; unused if canonical
  bool canonical = false;              // evaluate each problem's canonical solution instead
  std::vector<int64_t> ks = {1, 10, 100};
  int workers = 0;                     // 0: one per available core
  double timeout_seconds = 10.0;       // wall limit of each run
  double compile_timeout_seconds = 60.0;
  std::vector<Language> languages;     // empty: all present in the problem files
  bool allow_network = false;          // allow unisolated runs where namespaces are unavailable
  std::filesystem::path scratch_parent;  // empty: the system temporary directory
  std::filesystem::path go_cache_dir;    // empty: a fresh cache inside the scratch directory
  ToolchainPaths toolchains;
  std::function<void(const EvalProgress&)> progress;  // called after each sample, serialised
};

struct SampleResult {
  std::string task_id;
  Language language = Language::kPython;
  int64_t sample_index = 0;
  Outcome outcome = Outcome::kRuntimeError;
  std::string excerpt;
  double compile_seconds = 0.0;
  double run_seconds = 0.0;
  bool compile_cached = false;
  std::vector<std::string> notes;  // known traps that applied to this program
};

struct PassAtKValue {
  int64_t k = 0;
  std::optional<double> value;  // nullopt: some problem has fewer than k samples
};

struct LanguageSummary {
  Language language = Language::kPython;
  std::string toolchain;              // version line, or why the language cannot run
  int64_t problems = 0;               // problems with at least one sample that ran
  int64_t samples = 0;
  std::map<Outcome, int64_t> counts;
  std::vector<PassAtKValue> pass_at_k;
  double busy_seconds = 0.0;          // sum of compile+run wall time over its samples
};

struct EvalReport {
  std::vector<SampleResult> results;
  std::vector<LanguageSummary> languages;
  std::vector<PassAtKValue> overall_pass_at_k;
  std::string sandbox;                // Sandbox::describe()
  bool isolated = false;
  int workers = 0;
  double wall_seconds = 0.0;
  std::vector<std::string> warnings;  // problems without samples, skipped tasks, traps
};

EvalReport evaluate_humaneval_x(const HarnessOptions& options);

// results.jsonl (one line per sample) and summary.json in `out_dir` (created if missing).
void write_report(const EvalReport& report, const std::filesystem::path& out_dir);
nlohmann::json summary_json(const EvalReport& report);
nlohmann::json result_json(const SampleResult& result);
// The per-language table printed by the CLI.
std::string format_table(const EvalReport& report);

}  // namespace loom::eval
