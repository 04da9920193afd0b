// infer/sampling.cpp: see sampling.h. Probabilities in double: the sums over V terms must not
// depend on summation luck, and it costs nothing next to the forward pass.
#include "infer/sampling.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <unordered_set>

#include "core/error.h"
#include "core/rng.h"
#include "kernels/cpu/elementwise.h"
#include "kernels/cpu/vec_math.h"

namespace loom::infer {

namespace {

// w[v] = exp((logits[v] - mx) / T) for every v, in double (kernels/cpu/vec_math.h: a few ulp of
// glibc's exp), and 0 for -inf and NaN logits: they are never candidates, so they carry no
// mass in the draw or the log-partition either. One vectorised pass: at V = 4096 and 32 rows a step,
// glibc's scalar exp, called twice per token (the log-partition and the candidates), took about a
// fifth of a loaded server's decode step.
void softmax_weights(std::span<const float> logits, double mx, double T, double* w) {
  const float* l = logits.data();
  const int64_t V = int64_t(logits.size());
  const double inv_t = 1.0 / T;
#pragma omp simd
  for (int64_t v = 0; v < V; ++v)
    w[v] = l[v] > -INFINITY ? kernels::vec::exp_f64((double(l[v]) - mx) * inv_t) : 0.0;
}

// candidate_set on weights computed by softmax_weights (mx: the largest logit).
Candidates candidates_from_weights(std::span<const float> logits, const double* weights,
                                   int32_t top_k, float top_p);

}  // namespace

void validate_sampling(const SamplingParams& p) {
  // NaN compares false with everything and inf divides every logit to 0: both would sample
  // garbage without an error, so only finite temperatures >= 0 are accepted.
  LOOM_CHECK(std::isfinite(p.temperature) && p.temperature >= 0.f,
             "temperature {} must be a finite number >= 0 (0 = greedy; 0.2-1.0 is usual)",
             p.temperature);
  LOOM_CHECK(std::isfinite(p.top_p) && p.top_p > 0.f && p.top_p <= 1.f,
             "top_p {} must be in (0, 1]", p.top_p);
  LOOM_CHECK(p.top_k >= 0, "top_k {} must be >= 0 (0 = off)", p.top_k);
  LOOM_CHECK(std::isfinite(p.repetition_penalty) && p.repetition_penalty > 0.f,
             "repetition_penalty {} must be a finite number > 0 (1 = off)", p.repetition_penalty);
  LOOM_CHECK(p.max_tokens >= 0, "max_tokens {} must be >= 0", p.max_tokens);
  LOOM_CHECK(p.logprobs >= -1 && p.logprobs <= 5, "logprobs {} must be in [0, 5] (-1 = none)",
             p.logprobs);
  for (const std::string& s : p.stop) LOOM_CHECK(!s.empty(), "stop strings must not be empty");
}

void apply_repetition_penalty(std::span<float> logits, std::span<const int32_t> context,
                              float penalty) {
  if (penalty == 1.f) return;
  std::unordered_set<int32_t> seen;
  for (int32_t t : context) {
    if (t < 0 || size_t(t) >= logits.size() || !seen.insert(t).second) continue;
    float& l = logits[size_t(t)];
    l = l > 0.f ? l / penalty : l * penalty;
  }
}

Candidates candidate_set(std::span<const float> logits, float temperature, int32_t top_k,
                         float top_p) {
  float mx = -INFINITY;
  for (float l : logits) mx = std::max(mx, l);  // (NaN never wins)
  if (!(mx > -INFINITY)) return {};
  std::vector<double> w(logits.size());
  softmax_weights(logits, mx, temperature > 0.f ? double(temperature) : 1.0, w.data());
  return candidates_from_weights(logits, w.data(), top_k, top_p);
}

namespace {

Candidates candidates_from_weights(std::span<const float> logits, const double* weights,
                                   int32_t top_k, float top_p) {
  Candidates c;
  const int64_t V = int64_t(logits.size());
  // (logit, token) pairs, so that sorting reads one array rather than indexing the logits.
  // w: its weight exp((logit - max) / T), from softmax_weights (the walks and the selection read
  // it several times).
  struct Cand {
    float logit;
    int32_t v;
    double w;
  };
  std::vector<Cand> idx;
  idx.reserve(size_t(V));
  for (int32_t v = 0; v < int32_t(V); ++v)
    if (logits[size_t(v)] > -INFINITY) idx.push_back({logits[size_t(v)], v, weights[v]});
  if (idx.empty()) return c;
  // Best first: larger logit, then smaller token id (a total order: the sorted prefix is unique,
  // whatever algorithm produced it).
  auto better = [](const Cand& a, const Cand& b) {
    return a.logit > b.logit || (a.logit == b.logit && a.v < b.v);
  };
  if (top_k > 0 && top_k < int64_t(idx.size())) {
    std::nth_element(idx.begin(), idx.begin() + (top_k - 1), idx.end(), better);
    idx.resize(size_t(top_k));
  }
  const int64_t keep = int64_t(idx.size());
  double z = 0;  // over the kept candidates (the largest logit is always among them)
  for (const Cand& e : idx) z += e.w;
  // The nucleus is the shortest best-first prefix reaching top_p. The 64 best are put in order
  // (a selection, then a sort of 64; with a peaked distribution the nucleus is within them);
  // beyond them the boundary is found by selection, halving the range that holds it
  // (nth_element puts the better half first; its mass decides which half), and only the last
  // <= 64 candidates are sorted. So a nucleus of most of V (a flat distribution: a randomly
  // initialised or lightly trained model at temperature 0.8) costs O(V) instead of a sort of V
  // (which took ~1 ms a row at V = 16k), and its members past the 64th come in selection order,
  // not best first; the draw walks them in that order, which the distribution does not depend
  // on. A selected half's mass is summed in its own order, so where top_p falls within rounding
  // (~1e-15) of a prefix's mass the boundary may differ by one from a full sort's. top_p = 1
  // keeps everything, unsorted past the 64 best.
  int64_t n = keep;
  double cum = 0;
  bool reached = false;
  auto walk = [&](int64_t from, int64_t to) {  // sequential prefix sums over sorted [from, to)
    for (int64_t i = from; i < to && !reached; ++i) {
      cum += idx[size_t(i)].w / z;
      if (top_p < 1.f && cum >= double(top_p)) {  // top_p = 1 keeps everything, whatever
        n = i + 1;                                // the rounding of cum
        reached = true;
      }
    }
  };
  const int64_t first = std::min<int64_t>(64, keep);  // the `first` best, in order
  if (first < keep) std::nth_element(idx.begin(), idx.begin() + first, idx.end(), better);
  std::sort(idx.begin(), idx.begin() + first, better);
  walk(0, first);
  if (!reached && first < keep && top_p < 1.f) {
    int64_t lo = first, hi = keep;  // the boundary lies in [lo, hi); [first, lo) is all in
    constexpr int64_t kSortBelow = 64;
    while (hi - lo > kSortBelow) {
      const int64_t mid = lo + (hi - lo) / 2;
      std::nth_element(idx.begin() + lo, idx.begin() + mid, idx.begin() + hi, better);
      double half = 0;
      for (int64_t i = lo; i < mid; ++i) half += idx[size_t(i)].w / z;
      if (cum + half >= double(top_p)) {
        hi = mid;
      } else {
        cum += half;
        lo = mid;
      }
    }
    std::sort(idx.begin() + lo, idx.begin() + hi, better);
    walk(lo, hi);
    if (!reached) n = hi;  // rounding left the sum a hair short: the whole range is in
  }
  double total = 0;
  c.tokens.resize(size_t(n));
  c.probs.resize(size_t(n));
  for (int64_t i = 0; i < n; ++i) {
    c.tokens[size_t(i)] = idx[size_t(i)].v;
    total += (c.probs[size_t(i)] = idx[size_t(i)].w);
  }
  for (double& q : c.probs) q /= total;
  return c;
}

}  // namespace

Sampled sample_token(std::span<const float> logits, const SamplingParams& p, uint64_t counter,
                     int32_t top_n) {
  const int64_t V = int64_t(logits.size());
  Sampled s;
  // log_softmax(logits / T), T = 1 when greedy.
  const double T = p.temperature > 0.f ? double(p.temperature) : 1.0;
  // The first largest logit (NaN never wins).
  const int32_t arg = int32_t(kernels::argmax_first(logits.data(), V));
  LOOM_CHECK(arg >= 0, "sampling: every one of the {} logits is -inf (all tokens masked)", V);
  const double mx = logits[size_t(arg)];
  // exp((logit - mx) / T), shared with the candidates; per thread, reused (a fresh vector of a
  // 50k vocabulary's doubles is an mmap and its page faults at every token).
  thread_local std::vector<double> w;
  w.resize(static_cast<size_t>(V));
  softmax_weights(logits, mx, T, w.data());
  double z = 0;
  for (int64_t v = 0; v < V; ++v) z += w[size_t(v)];
  const double log_z = std::log(z);
  auto logprob = [&](int32_t v) { return float((double(logits[size_t(v)]) - mx) / T - log_z); };

  if (p.temperature <= 0.f) {
    s.token = arg;
  } else if ((p.top_k <= 0 || p.top_k >= V) && p.top_p >= 1.f) {
    // No truncation: the candidate set would be the whole vocabulary, so the draw walks it in
    // token order (a fixed order, like the candidate set's; which token a given draw maps to
    // depends on the order, the distribution does not). Zero-weight (masked) tokens are never
    // reached: r z stays >= 0 across them.
    double r = double(rng_uniform(p.seed, kSampleStream, counter)) * z;
    s.token = arg;  // if rounding leaves r >= 0 past the end (r < z: never by more than ulps)
    for (int64_t v = 0; v < V; ++v) {
      r -= w[size_t(v)];
      if (r < 0) {
        s.token = int32_t(v);
        break;
      }
    }
  } else {
    const Candidates c = candidates_from_weights(logits, w.data(), p.top_k, p.top_p);
    double r = double(rng_uniform(p.seed, kSampleStream, counter));
    s.token = c.tokens.back();
    for (size_t i = 0; i < c.tokens.size(); ++i) {
      r -= c.probs[i];
      if (r < 0) {
        s.token = c.tokens[i];
        break;
      }
    }
  }
  s.logprob = logprob(s.token);
  if (top_n > 0) {
    std::vector<int32_t> idx(static_cast<size_t>(V));
    std::iota(idx.begin(), idx.end(), 0);
    const int64_t n = std::min<int64_t>(top_n, V);
    std::partial_sort(idx.begin(), idx.begin() + n, idx.end(), [&](int32_t a, int32_t b) {
      return logits[size_t(a)] > logits[size_t(b)] ||
             (logits[size_t(a)] == logits[size_t(b)] && a < b);
    });
    for (int64_t i = 0; i < n; ++i) s.top.emplace_back(idx[size_t(i)], logprob(idx[size_t(i)]));
  }
  return s;
}

TokenTexts::TokenTexts(const data::Tokenizer& tok) {
  texts_.resize(size_t(tok.vocab_size()));
  for (int32_t v = 0; v < int32_t(tok.vocab_size()); ++v)
    texts_[size_t(v)] = tok.decode(std::span<const int32_t>(&v, 1));
}

Healing heal_prompt(std::vector<int32_t>& prompt, const TokenTexts& texts) {
  Healing h;
  if (prompt.size() < 2) return h;
  h.token = prompt.back();
  h.healed = texts.text(h.token);
  prompt.pop_back();
  return h;
}

void mask_for_healing(std::span<float> logits, const Healing& h, const TokenTexts& texts,
                      int32_t eod) {
  if (h.healed.empty()) return;
  for (int64_t v = 0; v < int64_t(logits.size()); ++v)
    if (v >= texts.size() || v == eod ||
        texts.text(int32_t(v)).compare(0, h.healed.size(), h.healed) != 0)
      logits[size_t(v)] = -INFINITY;
}

}  // namespace loom::infer
