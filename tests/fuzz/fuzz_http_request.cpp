// libFuzzer target: the /v1/completions request parser of `loom serve`
// (infer::openai::parse_completion_request). Accepted outcomes: a parsed request whose fields are
// within the limits, or an ApiError with a 4xx status and a message. Anything else (a crash, a
// sanitizer report, another exception type escaping, an accepted value outside the limits) is a
// finding.
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "infer/http/openai.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  namespace oa = loom::infer::openai;
  const std::string body(reinterpret_cast<const char*>(data), size);
  const oa::Limits limits;
  try {
    const oa::CompletionRequest r = oa::parse_completion_request(body, limits);
    if (r.max_tokens < 0 || r.max_tokens > limits.max_tokens_limit) std::abort();
    if (r.n < 1 || r.n > limits.max_n) std::abort();
    if (!std::isfinite(r.temperature) || r.temperature < 0.f) std::abort();
    if (!(r.top_p > 0.f && r.top_p <= 1.f)) std::abort();
    if (r.prompts.empty()) std::abort();
    (void)oa::dump(oa::error_body(oa::invalid_request("x")));
  } catch (const oa::ApiError& e) {
    if (e.status < 400 || e.status >= 500 || e.message.empty()) std::abort();
  }
  return 0;
}
