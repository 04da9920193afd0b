// eval/languages.h: how each language's program is compiled, run and judged.
//
// Glossary
//   toolchain  the binaries a language needs (resolved to absolute paths once per run).
//   step       one sandboxed command: a compile (C++, Java, Go) or the run.
//   artifacts  files a compile step leaves for the run step (cached by the harness).
//   outcome    passed / failed (wrong answer) / compile_error / timeout / runtime_error /
//              sandbox_violation (the program hit a sandbox limit: output, memory, processes,
//              file size, a read-only file system or the missing network) / skipped (needs
//              something this machine cannot provide; never counted as a pass or a failure).
#pragma once

#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include "eval/problems.h"
#include "eval/program.h"
#include "eval/sandbox.h"

namespace loom::eval {

enum class Outcome {
  kPassed,
  kFailed,
  kCompileError,
  kTimeout,
  kRuntimeError,
  kSandboxViolation,
  kSkipped
};
inline constexpr Outcome kAllOutcomes[] = {Outcome::kPassed,       Outcome::kFailed,
                                           Outcome::kCompileError, Outcome::kTimeout,
                                           Outcome::kRuntimeError, Outcome::kSandboxViolation,
                                           Outcome::kSkipped};
// passed failed compile_error timeout runtime_error sandbox_violation skipped
std::string_view outcome_name(Outcome outcome);

// Where to look for tools. Relative names are searched on PATH; an empty name disables the tool.
struct ToolchainPaths {
  std::string python = "/usr/bin/python3";  // Debian's, which has numpy (the helper imports it)
  std::string gxx = "g++";
  std::string javac = "javac";
  std::string java = "java";
  std::string node = "node";
  std::string go = "go";
  std::string cargo = "cargo";
  std::string gocode = "/usr/share/gocode";  // golang-github-stretchr-testify-dev sources
  std::string include_dir = "/usr/include";
  std::vector<std::string> node_module_dirs = {"/usr/lib/node_modules",
                                               "/usr/local/lib/node_modules", "/usr/share/nodejs"};
};

struct Toolchain {
  Language language = Language::kPython;
  std::vector<std::string> tools;  // absolute paths, language-specific order
  std::string unavailable;         // non-empty: every sample of the language is skipped, why
  std::string version;             // one line, for the report
};

// Resolves the tools of `lang`. Throws loom::Error naming the Debian package to install when a
// tool is missing (Rust instead comes back `unavailable`: its crates cannot be had offline).
Toolchain resolve_toolchain(Language lang, const ToolchainPaths& paths);

// Why `program` cannot run on this machine (a missing npm package, header or crates), or "".
std::string missing_requirement(const Program& program, const ToolchainPaths& paths);

struct StepSpec {
  std::vector<std::string> argv;
  std::vector<std::string> env;
  SandboxLimits limits;
  std::vector<std::filesystem::path> extra_writable;
  mode_t umask = 022;
  std::vector<std::string> artifacts;  // compile only: files (or "*.class") the run needs
};

struct StepTimes {
  double run_seconds = 10.0;      // wall limit of a run (--timeout)
  double compile_seconds = 60.0;  // wall limit of a compile
};

// The compile step (nullopt for Python and JavaScript) and the run step for `program` placed
// in `dir`. `go_cache` is the shared Go build cache (writable during Go compiles only).
std::optional<StepSpec> compile_step(const Toolchain& tc, const Program& program,
                                     const std::filesystem::path& dir, const StepTimes& times,
                                     const std::filesystem::path& go_cache,
                                     const ToolchainPaths& paths);
StepSpec run_step(const Toolchain& tc, const Program& program, const std::filesystem::path& dir,
                  const StepTimes& times, const ToolchainPaths& paths);

struct Verdict {
  Outcome outcome = Outcome::kRuntimeError;
  std::string excerpt;  // at most ~400 bytes of the telling output
};
// Judges a compile: nullopt when it succeeded.
std::optional<Verdict> judge_compile(const SandboxResult& r);
Verdict judge_run(Language lang, const SandboxResult& r);

}  // namespace loom::eval
