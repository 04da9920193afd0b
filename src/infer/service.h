// infer/service.h: the contract between whoever generates text (infer::Engine, continuous
// batching over the KV-cached decoder) and whoever asks for it (loom generate, loom serve, the
// HumanEval-X generator). The HTTP server depends only on this interface, so it is tested
// against a scripted service as well as the real engine.
//
// Glossary: request = one prompt and its sampling parameters, producing ONE sequence (an OpenAI
// request with n > 1 submits n requests with seeds seed, seed+1, ...).
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace loom::infer {

enum class FinishReason : uint8_t {
  none,       // still running
  stop,       // a stop string, a stop rule or the end-of-document token
  length,     // max_tokens reached, or the model's context is full
  cancelled,  // cancel() or the service shut down without draining
  error       // see TokenEvent::error
};
const char* finish_reason_name(FinishReason r);  // "stop", "length", "cancelled", "error", "none"

struct SamplingParams {
  float temperature = 0.f;         // 0 = greedy; finite, >= 0
  float top_p = 1.f;               // (0, 1]
  int32_t top_k = 0;               // 0 = off
  float repetition_penalty = 1.f;  // > 0; 1 = off (CTRL-style: logit/p if > 0 else logit*p)
  uint64_t seed = 0;               // counter-based: token i of this request uses (seed, i) only
  int64_t max_tokens = 16;         // >= 0
  std::vector<std::string> stop;   // stop strings; matched text is excluded from the output
  std::string stop_rule;           // "" or a HumanEval-X language ("python", "cpp", ...): its rule
  bool token_healing = true;       // back up the prompt's last token (as `loom generate` does)
  int32_t logprobs = -1;           // -1: none; 0..5: chosen token's logprob plus that many top
  bool ignore_eod = false;         // keep generating past the end-of-document token
};

struct TopLogprob {
  int32_t token;
  std::string text;
  float logprob;
};

// One step of one request. Delivered in order per request, from the service's thread.
struct TokenEvent {
  int64_t request_id = 0;
  std::string text;     // decoded text this event adds (may be empty: a partial UTF-8 character
                        // or text held back while it could still start a stop string)
  int32_t token = -1;   // the token sampled at this step (-1 on a final event without a token)
  float logprob = 0.f;  // log-probability of `token` (after temperature, before top-k/top-p)
  std::vector<TopLogprob> top;  // SamplingParams::logprobs entries, best first
  FinishReason finish = FinishReason::none;  // != none: last event of this request
  std::string error;                         // finish == error: why
  int64_t prompt_tokens = 0;                 // set on the last event
  int64_t completion_tokens = 0;             // set on the last event
};

struct Request {
  std::vector<int32_t> prompt;  // token ids (non-empty)
  SamplingParams params;
  // Sparse (MoE, rre) models: the domain every token of this request is routed by, by name
  // (ModelConfig::domain_index: "python", "cpp", ...); "" = the service's default. An unknown
  // name, or any name for a model without domains, is refused as invalid, listing the domains.
  std::string domain;
  // Called for every event of this request, from the service's thread; must not block for long
  // and must not call back into the service except cancel().
  std::function<void(const TokenEvent&)> on_event;
};

// Why submit() refused a request; the server maps each to an HTTP status.
struct SubmitResult {
  enum class Status : uint8_t { ok, queue_full, too_long, invalid, shutting_down };
  Status status = Status::ok;
  int64_t request_id = -1;  // ok: the id events carry
  std::string message;      // otherwise: names the values and the limit
};

class CompletionService {
 public:
  virtual ~CompletionService() = default;
  // Thread-safe. Queues the request (bounded queue) or refuses it at once; never blocks on
  // generation.
  virtual SubmitResult submit(Request request) = 0;
  // Thread-safe. The request finishes with FinishReason::cancelled at the next step (its last
  // event is still delivered); unknown or finished ids are ignored.
  virtual void cancel(int64_t request_id) = 0;
  // Model facts for /v1/models and request validation.
  virtual int64_t context_length() const = 0;  // prompt + generated tokens must fit
  virtual std::string model_name() const = 0;
  // Tokenizer access for prompts given as text and for echo.
  virtual std::vector<int32_t> encode(const std::string& text) const = 0;
  virtual std::string decode(const std::vector<int32_t>& tokens) const = 0;
  // Stops admitting requests; finishes (drain) or cancels those queued and running; returns when
  // none is left. Thread-safe, idempotent.
  virtual void shutdown(bool drain) = 0;
};

}  // namespace loom::infer
