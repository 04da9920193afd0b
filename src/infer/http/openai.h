// infer/http/openai.h: OpenAI `/v1/completions` wire format: parsing and validating a request
// body, the error object, and the JSON of responses and stream chunks. No sockets here, so each
// rule is testable on its own; the request contract is written in server.h.
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "infer/service.h"

namespace loom::infer::openai {

// An error the client gets as {"error":{"message","type","param","code"}} with an HTTP status.
struct ApiError {
  int status = 400;
  std::string type = "invalid_request_error";
  std::string code;   // "" -> null
  std::string param;  // "" -> null
  std::string message;
  int retry_after_s = 0;  // > 0: a Retry-After header (429)
};
nlohmann::json error_body(const ApiError& e);
// Shorthands; `param` names the offending field ("" for none).
ApiError invalid_request(std::string message, std::string param = "", std::string code = "");

// One prompt as the client wrote it.
struct Prompt {
  bool is_text = true;
  std::string text;             // is_text
  std::vector<int32_t> tokens;  // !is_text (filled for text prompts by the server)
};

struct CompletionRequest {
  std::optional<std::string> model;
  std::vector<Prompt> prompts;
  int64_t max_tokens = 16;
  float temperature = 1.f;
  float top_p = 1.f;
  int32_t top_k = 0;
  float repetition_penalty = 1.f;
  int32_t n = 1;
  std::optional<int64_t> seed;
  std::vector<std::string> stop;
  std::string stop_rule;
  std::string domain;  // extension: MoE (rre) models' domain ("" = the server's default)
  bool echo = false;
  int32_t logprobs = -1;  // -1 = none
  bool stream = false;
  bool include_usage = false;
  bool ignore_eos = false;
  std::optional<bool> token_healing;
  std::optional<bool> cut_to_context;
};

struct Limits {
  int64_t max_tokens_limit = 4096;
  int32_t max_n = 16;
};

// Parses and validates a request body. Throws ApiError (status 400) naming the field, the value
// it got and what is allowed. Model name and context length are checked by the server.
CompletionRequest parse_completion_request(const std::string& body, const Limits& limits);

// Serializes with invalid UTF-8 replaced (a token may be part of a multi-byte character).
std::string dump(const nlohmann::json& j);

// Number of Unicode code points in UTF-8 text (OpenAI's text_offset counts characters).
int64_t utf8_length(const std::string& s);

// Logprobs of one choice (or of one stream chunk) in OpenAI's completions layout.
struct LogprobsAccumulator {
  std::vector<std::string> tokens;
  std::vector<float> token_logprobs;
  std::vector<std::vector<TopLogprob>> top;
  std::vector<int64_t> text_offset;
  bool empty() const { return tokens.empty(); }
  nlohmann::json to_json() const;
};

}  // namespace loom::infer::openai
