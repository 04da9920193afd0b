// Run-directory guards: no silent overwrite of a run, one `loom train` per directory, and
// metrics.jsonl cut back to the resumed step.
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <sstream>

#include "core/error.h"
#include "train/run_dir.h"

namespace loom::train {
namespace {

namespace fs = std::filesystem;

struct Scratch {
  Scratch() {
    path = (fs::temp_directory_path() / ("loom_run_dir_" + std::to_string(::getpid()))).string();
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~Scratch() { fs::remove_all(path); }
  std::string path;
};

std::string slurp(const std::string& p) {
  std::ifstream f(p);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

void expect_error_with(const std::function<void()>& fn, const std::string& what) {
  try {
    fn();
    FAIL() << "no error, expected: " << what;
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(what), std::string::npos) << e.what();
  }
}

TEST(RunDir, ExistingRunNeedsResumeOrOverwrite) {
  Scratch s;
  const std::string run = s.path + "/run";
  check_run_dir_free(run, false, false);  // missing: free
  fs::create_directories(run);
  check_run_dir_free(run, false, false);  // empty: free
  std::ofstream(run + "/metrics.jsonl") << "{\"step\":1}\n";
  expect_error_with([&] { check_run_dir_free(run, false, false); },
                    "run directory '" + run + "' already holds a run ('metrics.jsonl' exists)");
  check_run_dir_free(run, true, false);
  check_run_dir_free(run, false, true);
  fs::remove(run + "/metrics.jsonl");
  fs::create_directories(run + "/ckpt");
  expect_error_with([&] { check_run_dir_free(run, false, false); }, "--overwrite");
}

TEST(RunDir, SecondRunOnTheSameDirectoryRefuses) {
  Scratch s;
  const std::string run = s.path + "/run";
  {
    RunDirLock first = claim_run_dir(run, false, false, true);
    EXPECT_TRUE(first.held());
    // flock locks belong to an open file description: a second open in this process conflicts
    // exactly as a second process would.
    expect_error_with([&] { RunDirLock second(run); },
                      "run directory '" + run + "' is in use by loom train pid " +
                          std::to_string(::getpid()));
    // The lock file alone does not make the directory an existing run (other ranks check it).
    check_run_dir_free(run, false, false);
  }
  RunDirLock again(run);  // released with the first
  EXPECT_TRUE(again.held());
}

TEST(RunDir, TruncateMetricsToTheResumedStep) {
  Scratch s;
  const std::string m = s.path + "/metrics.jsonl";
  std::ofstream(m) << "{\"step\":1,\"loss\":5}\n{\"step\":2,\"loss\":4}\n{\"step\":3,\"loss\":3}\n"
                      "{\"step\":4,\"loss\":2}\n{\"step\":5,\"lo";  // torn by a kill
  EXPECT_EQ(truncate_metrics(m, 2), 3);
  EXPECT_EQ(slurp(m), "{\"step\":1,\"loss\":5}\n{\"step\":2,\"loss\":4}\n");
  EXPECT_EQ(truncate_metrics(m, 2), 0);  // already clean: untouched
  EXPECT_EQ(truncate_metrics(s.path + "/missing.jsonl", 3), 0);
  EXPECT_FALSE(fs::exists(s.path + "/missing.jsonl"));
}

}  // namespace
}  // namespace loom::train
