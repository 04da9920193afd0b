// libFuzzer target: HumanEval-X problem and sample readers (eval/problems.h). The input is split
// at "\n====\n" into a problems file (python) and a samples file read against it.
#include <cstdint>
#include <string>

#include "core/error.h"
#include "eval/problems.h"
#include "fuzz_util.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  const size_t sep = text.find("\n====\n");
  const std::string problems = text.substr(0, sep);
  const std::string samples = sep == std::string::npos ? std::string() : text.substr(sep + 6);
  const std::string ppath = loom::fuzz::scratch_file(
      "humaneval_python.jsonl", reinterpret_cast<const uint8_t*>(problems.data()), problems.size());
  const std::string spath = loom::fuzz::scratch_file(
      "samples.jsonl", reinterpret_cast<const uint8_t*>(samples.data()), samples.size());
  try {
    const auto set = loom::eval::ProblemSet::load({ppath});
    (void)loom::eval::load_samples(spath, set, {});
    (void)loom::eval::canonical_samples(set);
  } catch (const loom::Error&) {
  }
  return 0;
}
