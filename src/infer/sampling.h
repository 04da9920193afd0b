// infer/sampling.h: choosing the next token from logits, and token healing.
//
// Glossary: V vocab (the model's, padding included).
//
// Order of operations (CodeGeeX's sampler, plus a CTRL repetition penalty):
//   1. repetition penalty on every distinct token of the context (prompt + generated):
//      logit / p if logit > 0, else logit * p;
//   2. logprobs = log_softmax(logits / T) (T = 1 when greedy): what TokenEvent reports;
//   3. greedy (T = 0): the first index of the largest logit; otherwise
//      softmax(logits / T) -> top-k (k = 0: off) -> top-p over the renormalised top-k set,
//      keeping the first token at which the cumulative probability reaches p -> one draw
//      u = rng_uniform(seed, kSampleStream, counter) over that set (walked best first for its
//      64 best, then in selection order; with top-k off and top-p = 1, the whole vocabulary in
//      token order).
// Masked tokens (vocabulary padding, token healing) carry -inf and are never chosen.
// The draw depends only on (seed, counter) and the row's logits, never on other requests.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "data/tokenizer.h"
#include "infer/service.h"

namespace loom::infer {

inline constexpr uint64_t kSampleStream = 3;  // the Philox stream of sampling draws

// Throws loom::Error naming the parameter, its value and the valid range.
void validate_sampling(const SamplingParams& p);

// CTRL repetition penalty, once per distinct token in `context`; penalty 1 is a no-op.
void apply_repetition_penalty(std::span<float> logits, std::span<const int32_t> context,
                              float penalty);

// The candidate set of steps 3: token ids best first (ties: lower id first) for the first 64
// of them, the rest of the set in a deterministic selection order (sampling.cpp: a nucleus of
// most of a large vocabulary is found without sorting it), and their probabilities
// renormalised over the set. Empty when every logit is -inf.
struct Candidates {
  std::vector<int32_t> tokens;
  std::vector<double> probs;
};
Candidates candidate_set(std::span<const float> logits, float temperature, int32_t top_k,
                         float top_p);

struct Sampled {
  int32_t token = -1;
  float logprob = 0.f;
  std::vector<std::pair<int32_t, float>> top;  // top_n best (token, logprob), best first
};
// Steps 2-3 on `logits` (after the penalty and masks). Throws if every logit is -inf.
Sampled sample_token(std::span<const float> logits, const SamplingParams& p, uint64_t counter,
                     int32_t top_n);

// Token healing: a prompt that ends inside what training text makes one token (a trailing
// space: "def " is "def" + " name" in code but encodes as "def" + " ") is backed up by its last
// token, and the first sampled token must start with that token's text, so the model continues
// from a boundary it has seen.
class TokenTexts {
 public:
  explicit TokenTexts(const data::Tokenizer& tok);  // decodes every token once
  const std::string& text(int32_t id) const { return texts_.at(size_t(id)); }
  int64_t size() const { return int64_t(texts_.size()); }

 private:
  std::vector<std::string> texts_;
};

struct Healing {
  std::string healed;  // text of the backed-up token ("" when nothing was backed up)
  int32_t token = -1;  // the backed-up token
};
// Pops the last token of `prompt` (if it has more than one) and returns what it removed.
Healing heal_prompt(std::vector<int32_t>& prompt, const TokenTexts& texts);
// First step only: -inf on every token whose text does not start with h.healed, and on eod.
void mask_for_healing(std::span<float> logits, const Healing& h, const TokenTexts& texts,
                      int32_t eod);

}  // namespace loom::infer
