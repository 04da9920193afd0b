// infer/http/openai.cpp: parsing and validating /v1/completions bodies.
//
// Strictness: unknown fields are refused with their name (a typo such as "max_token" would
// otherwise silently give 16 tokens), and every type is checked with a message that repeats the
// value the client sent, so a client never has to guess which field was wrong.
#include "infer/http/openai.h"

#include <fmt/format.h>

#include <cmath>
#include <limits>
#include <set>

namespace loom::infer::openai {

using nlohmann::json;

ApiError invalid_request(std::string message, std::string param, std::string code) {
  ApiError e;
  e.status = 400;
  e.message = std::move(message);
  e.param = std::move(param);
  e.code = std::move(code);
  return e;
}

json error_body(const ApiError& e) {
  json err = {{"message", e.message},
              {"type", e.type},
              {"param", e.param.empty() ? json(nullptr) : json(e.param)},
              {"code", e.code.empty() ? json(nullptr) : json(e.code)}};
  return json{{"error", std::move(err)}};
}

std::string dump(const json& j) { return j.dump(-1, ' ', false, json::error_handler_t::replace); }

int64_t utf8_length(const std::string& s) {
  int64_t n = 0;
  for (unsigned char c : s) n += (c & 0xC0) != 0x80;
  return n;
}

json LogprobsAccumulator::to_json() const {
  json tops = json::array();
  for (const auto& entries : top) {
    json t = json::object();
    for (const auto& e : entries) t[e.text] = e.logprob;  // same text twice: the best one stays
    tops.push_back(std::move(t));
  }
  return json{{"tokens", tokens},
              {"token_logprobs", token_logprobs},
              {"top_logprobs", std::move(tops)},
              {"text_offset", text_offset}};
}

namespace {

// A short rendering of a client's value for error messages (long values are cut).
std::string show(const json& v) {
  std::string s = dump(v);
  if (s.size() > 80) s = s.substr(0, 77) + "...";
  return s;
}

const char* type_name(const json& v) {
  switch (v.type()) {
    case json::value_t::null: return "null";
    case json::value_t::boolean: return "boolean";
    case json::value_t::string: return "string";
    case json::value_t::array: return "array";
    case json::value_t::object: return "object";
    case json::value_t::number_float: return "number";
    default: return "integer";
  }
}

[[noreturn]] void wrong_type(const std::string& field, const char* want, const json& v) {
  throw invalid_request(fmt::format("'{}' must be {}, got {} {}", field, want, type_name(v),
                                    show(v)),
                        field, "invalid_type");
}

int64_t get_int(const json& v, const std::string& field, int64_t lo, int64_t hi) {
  if (!v.is_number_integer()) wrong_type(field, "an integer", v);
  // Unsigned values above int64's range arrive as number_unsigned; treat them as too large.
  if (v.is_number_unsigned() && v.get<uint64_t>() > uint64_t(std::numeric_limits<int64_t>::max()))
    throw invalid_request(fmt::format("'{}' = {} is out of range: it must be in [{}, {}]", field,
                                      show(v), lo, hi),
                          field, "invalid_value");
  const int64_t x = v.get<int64_t>();
  if (x < lo || x > hi)
    throw invalid_request(
        fmt::format("'{}' = {} is out of range: it must be in [{}, {}]", field, x, lo, hi), field,
        "invalid_value");
  return x;
}

double get_number(const json& v, const std::string& field) {
  if (!v.is_number()) wrong_type(field, "a number", v);
  const double x = v.get<double>();
  if (!std::isfinite(x))
    throw invalid_request(fmt::format("'{}' must be finite, got {}", field, x), field,
                          "invalid_value");
  return x;
}

bool get_bool(const json& v, const std::string& field) {
  if (!v.is_boolean()) wrong_type(field, "a boolean (true or false)", v);
  return v.get<bool>();
}

std::vector<int32_t> get_token_array(const json& a, const std::string& field) {
  std::vector<int32_t> tokens;
  tokens.reserve(a.size());
  for (size_t i = 0; i < a.size(); ++i) {
    const std::string name = fmt::format("{}[{}]", field, i);
    tokens.push_back(int32_t(get_int(a[i], name, 0, std::numeric_limits<int32_t>::max())));
  }
  return tokens;
}

std::vector<Prompt> parse_prompt(const json& v) {
  const char* want = "a string, an array of strings, an array of token ids or an array of "
                     "arrays of token ids";
  std::vector<Prompt> prompts;
  if (v.is_string()) {
    prompts.push_back(Prompt{true, v.get<std::string>(), {}});
  } else if (v.is_array()) {
    if (v.empty())
      throw invalid_request("'prompt' is an empty array; send at least one prompt", "prompt",
                            "invalid_value");
    if (v[0].is_number_integer()) {
      prompts.push_back(Prompt{false, {}, get_token_array(v, "prompt")});
    } else if (v[0].is_string()) {
      for (size_t i = 0; i < v.size(); ++i) {
        if (!v[i].is_string()) wrong_type(fmt::format("prompt[{}]", i), "a string", v[i]);
        prompts.push_back(Prompt{true, v[i].get<std::string>(), {}});
      }
    } else if (v[0].is_array()) {
      for (size_t i = 0; i < v.size(); ++i) {
        const std::string name = fmt::format("prompt[{}]", i);
        if (!v[i].is_array()) wrong_type(name, "an array of token ids", v[i]);
        prompts.push_back(Prompt{false, {}, get_token_array(v[i], name)});
      }
    } else {
      wrong_type("prompt[0]", "a string, a token id or an array of token ids", v[0]);
    }
  } else {
    wrong_type("prompt", want, v);
  }
  return prompts;
}

}  // namespace

CompletionRequest parse_completion_request(const std::string& body, const Limits& limits) {
  json j;
  try {
    j = json::parse(body);
  } catch (const json::exception& e) {  // parse_error, and out_of_range for a number like 1E400
    throw invalid_request(fmt::format("the request body is not valid JSON: {}", e.what()), "",
                          "invalid_json");
  }
  if (!j.is_object())
    throw invalid_request(
        fmt::format("the request body must be a JSON object, got {} {}", type_name(j), show(j)),
        "", "invalid_json");

  static const std::set<std::string> known = {
      "model",        "prompt",         "max_tokens",     "temperature",      "top_p",
      "top_k",        "n",              "seed",           "stop",             "echo",
      "logprobs",     "stream",         "stream_options", "suffix",           "user",
      "best_of",      "logit_bias",     "presence_penalty", "frequency_penalty",
      "repetition_penalty", "stop_rule", "ignore_eos",    "token_healing",    "cut_to_context",
      "domain"};
  for (const auto& [key, value] : j.items())
    if (!known.count(key))
      throw invalid_request(
          fmt::format("unrecognized request argument '{}'; this server accepts OpenAI's "
                      "completions fields and the extensions top_k, repetition_penalty, "
                      "stop_rule, ignore_eos, token_healing, cut_to_context and domain",
                      key),
          key, "unknown_parameter");

  CompletionRequest r;
  auto has = [&](const char* k) { return j.contains(k) && !j[k].is_null(); };

  if (has("suffix")) {
    if (!j["suffix"].is_string()) wrong_type("suffix", "a string", j["suffix"]);
    if (!j["suffix"].get<std::string>().empty())
      throw invalid_request(
          "'suffix' (fill-in-the-middle) is not supported: this model was trained left to right "
          "only and cannot complete text between a prefix and a suffix; send the prefix as "
          "'prompt' without 'suffix'",
          "suffix", "unsupported_parameter");
  }
  if (has("model")) {
    if (!j["model"].is_string()) wrong_type("model", "a string", j["model"]);
    r.model = j["model"].get<std::string>();
  }
  if (!has("prompt"))
    throw invalid_request("'prompt' is required", "prompt", "missing_required_parameter");
  r.prompts = parse_prompt(j["prompt"]);

  if (has("max_tokens")) r.max_tokens = get_int(j["max_tokens"], "max_tokens", 0,
                                                 limits.max_tokens_limit);
  if (has("temperature")) {
    const double t = get_number(j["temperature"], "temperature");
    if (t < 0 || t > 2)
      throw invalid_request(fmt::format("'temperature' = {} must be in [0, 2]", t), "temperature",
                            "invalid_value");
    r.temperature = float(t);
  }
  if (has("top_p")) {
    const double p = get_number(j["top_p"], "top_p");
    if (!(p > 0 && p <= 1))
      throw invalid_request(fmt::format("'top_p' = {} must be in (0, 1]", p), "top_p",
                            "invalid_value");
    r.top_p = float(p);
  }
  if (has("top_k")) {
    const int64_t k = get_int(j["top_k"], "top_k", -1, std::numeric_limits<int32_t>::max());
    r.top_k = k < 0 ? 0 : int32_t(k);  // vLLM's -1 and our 0 both mean off
  }
  if (has("repetition_penalty")) {
    const double p = get_number(j["repetition_penalty"], "repetition_penalty");
    if (!(p > 0))
      throw invalid_request(fmt::format("'repetition_penalty' = {} must be > 0 (1 = off)", p),
                            "repetition_penalty", "invalid_value");
    r.repetition_penalty = float(p);
  }
  if (has("n")) r.n = int32_t(get_int(j["n"], "n", 1, limits.max_n));
  if (has("best_of")) {
    const int64_t b = get_int(j["best_of"], "best_of", 1, limits.max_n);
    if (b != r.n)
      throw invalid_request(
          fmt::format("'best_of' = {} is not supported (it must equal n = {}): the server "
                      "returns every sample it generates",
                      b, r.n),
          "best_of", "unsupported_parameter");
  }
  if (int64_t(r.n) * int64_t(r.prompts.size()) > limits.max_n)
    throw invalid_request(fmt::format("{} prompts x n = {} asks for {} completions; at most {} "
                                      "per request",
                                      r.prompts.size(), r.n, int64_t(r.n) * r.prompts.size(),
                                      limits.max_n),
                          "n", "invalid_value");
  if (has("seed")) r.seed = get_int(j["seed"], "seed", std::numeric_limits<int64_t>::min(),
                                    std::numeric_limits<int64_t>::max());
  if (has("stop")) {
    const json& s = j["stop"];
    if (s.is_string()) {
      if (!s.get<std::string>().empty()) r.stop.push_back(s.get<std::string>());
    } else if (s.is_array()) {
      if (s.size() > 4)
        throw invalid_request(fmt::format("'stop' has {} strings; at most 4 are allowed",
                                          s.size()),
                              "stop", "invalid_value");
      for (size_t i = 0; i < s.size(); ++i) {
        if (!s[i].is_string()) wrong_type(fmt::format("stop[{}]", i), "a string", s[i]);
        if (s[i].get<std::string>().empty())
          throw invalid_request(fmt::format("'stop[{}]' is an empty string", i), "stop",
                                "invalid_value");
        r.stop.push_back(s[i].get<std::string>());
      }
    } else {
      wrong_type("stop", "a string or an array of up to 4 strings", s);
    }
  }
  if (has("stop_rule")) {
    if (!j["stop_rule"].is_string()) wrong_type("stop_rule", "a string", j["stop_rule"]);
    r.stop_rule = j["stop_rule"].get<std::string>();
  }
  if (has("domain")) {
    if (!j["domain"].is_string()) wrong_type("domain", "a string", j["domain"]);
    r.domain = j["domain"].get<std::string>();
  }
  if (has("echo")) r.echo = get_bool(j["echo"], "echo");
  if (has("logprobs")) r.logprobs = int32_t(get_int(j["logprobs"], "logprobs", 0, 5));
  if (r.echo && r.logprobs >= 0)
    throw invalid_request(
        "'echo' together with 'logprobs' is not supported: the server does not score prompt "
        "tokens; use one or the other",
        "logprobs", "unsupported_parameter");
  if (has("stream")) r.stream = get_bool(j["stream"], "stream");
  if (has("stream_options")) {
    const json& so = j["stream_options"];
    if (!so.is_object()) wrong_type("stream_options", "an object", so);
    for (const auto& [key, value] : so.items()) {
      if (key != "include_usage")
        throw invalid_request(
            fmt::format("unrecognized field 'stream_options.{}'; only include_usage is known",
                        key),
            "stream_options", "unknown_parameter");
      if (!value.is_null()) r.include_usage = get_bool(value, "stream_options.include_usage");
    }
  }
  if (has("user") && !j["user"].is_string()) wrong_type("user", "a string", j["user"]);
  if (has("logit_bias")) {
    if (!j["logit_bias"].is_object()) wrong_type("logit_bias", "an object", j["logit_bias"]);
    if (!j["logit_bias"].empty())
      throw invalid_request("'logit_bias' is not supported by this server; leave it out",
                            "logit_bias", "unsupported_parameter");
  }
  for (const char* pen : {"presence_penalty", "frequency_penalty"}) {
    if (has(pen) && get_number(j[pen], pen) != 0)
      throw invalid_request(fmt::format("'{}' = {} is not supported (only 0); use the extension "
                                        "'repetition_penalty' instead",
                                        pen, get_number(j[pen], pen)),
                            pen, "unsupported_parameter");
  }
  if (has("ignore_eos")) r.ignore_eos = get_bool(j["ignore_eos"], "ignore_eos");
  if (has("token_healing")) r.token_healing = get_bool(j["token_healing"], "token_healing");
  if (has("cut_to_context")) r.cut_to_context = get_bool(j["cut_to_context"], "cut_to_context");
  return r;
}

}  // namespace loom::infer::openai
