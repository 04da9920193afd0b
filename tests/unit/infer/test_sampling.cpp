// Tests for infer/sampling.h and infer/stop.h: top-k / top-p candidate sets, repetition penalty,
// greedy ties, seed reproducibility and the draw's distribution, logprobs, token healing, stop
// strings with streaming holdback, and the HumanEval-X stop rules.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <numeric>

#include "core/error.h"
#include "core/rng.h"
#include "infer/sampling.h"
#include "infer/stop.h"

namespace loom::infer {
namespace {

std::vector<float> log_probs(std::vector<double> p) {
  std::vector<float> l;
  for (double x : p) l.push_back(float(std::log(x)));
  return l;
}

TEST(Sampling, TopKKeepsTheKBestTiesByLowerId) {
  const std::vector<float> l = {1, 3, 2, 5, 4, 5};
  Candidates c = candidate_set(l, 1.f, 2, 1.f);
  EXPECT_EQ(c.tokens, (std::vector<int32_t>{3, 5}));
  c = candidate_set(l, 1.f, 4, 1.f);
  EXPECT_EQ(c.tokens, (std::vector<int32_t>{3, 5, 4, 1}));
  double sum = 0;
  for (double p : c.probs) sum += p;
  EXPECT_NEAR(sum, 1.0, 1e-12);
}

TEST(Sampling, TopPKeepsTheFirstTokenThatReachesP) {
  const std::vector<float> l = log_probs({0.15, 0.5, 0.05, 0.3});
  EXPECT_EQ(candidate_set(l, 1.f, 0, 0.45f).tokens, (std::vector<int32_t>{1}));
  EXPECT_EQ(candidate_set(l, 1.f, 0, 0.7f).tokens, (std::vector<int32_t>{1, 3}));
  EXPECT_EQ(candidate_set(l, 1.f, 0, 0.9f).tokens, (std::vector<int32_t>{1, 3, 0}));
  EXPECT_EQ(candidate_set(l, 1.f, 0, 1.f).tokens.size(), 4u);
  // Renormalised over the set: 0.5 / 0.8 and 0.3 / 0.8.
  Candidates c = candidate_set(l, 1.f, 0, 0.7f);
  EXPECT_NEAR(c.probs[0], 0.625, 1e-6);
  // top-p applies to the top-k set renormalised: top-2 = {0.5, 0.3} -> {0.625, 0.375}; p = 0.6
  // keeps the first only.
  EXPECT_EQ(candidate_set(l, 1.f, 2, 0.6f).tokens, (std::vector<int32_t>{1}));
  // Temperature sharpens: at T = 0.1 the best token alone has > 0.99.
  EXPECT_EQ(candidate_set(l, 0.1f, 0, 0.99f).tokens, (std::vector<int32_t>{1}));
  // -inf (masked) tokens are never candidates.
  std::vector<float> m = l;
  m[1] = -INFINITY;
  EXPECT_EQ(candidate_set(m, 1.f, 0, 1.f).tokens, (std::vector<int32_t>{3, 0, 2}));
}

// Over a large vocabulary (where the nucleus is found by sorting the 64 best, then by
// selection) the set equals a full sort's, for several top_p and top_k, on peaked logits and on
// flat ones (a nucleus of most of V): the first 64 in the same order, the rest as a set, each
// token with its renormalised probability.
TEST(Sampling, NucleusOverALargeVocabularyEqualsFullSort) {
  const int64_t V = 5003;
  std::vector<float> l(static_cast<size_t>(V));
  for (float sigma : {3.f, 0.05f}) {
    SCOPED_TRACE(testing::Message() << "logits ~ N(0, " << sigma << ")");
    rng_fill_normal(l.data(), V, 0.f, sigma, 8, 1, 0);
    l[17] = l[4000] = 9.f * sigma / 3.f;  // a tie: the lower id first
    if (sigma < 1.f) {
      l[100] = l[2000] = l[3000] = 0.01f;  // ties inside a large nucleus
    }
    for (float T : {0.5f, 1.f})
      for (int32_t k : {0, 7, 300, 2000})
        for (float p : {0.3f, 0.9f, 0.999f, 1.f}) {
          std::vector<int32_t> idx(static_cast<size_t>(V));
          std::iota(idx.begin(), idx.end(), 0);
          std::sort(idx.begin(), idx.end(), [&](int32_t a, int32_t b) {
            return l[size_t(a)] > l[size_t(b)] || (l[size_t(a)] == l[size_t(b)] && a < b);
          });
          if (k > 0) idx.resize(size_t(k));
          double z = 0, cum = 0;
          for (int32_t v : idx) z += std::exp((double(l[size_t(v)]) - l[size_t(idx[0])]) / T);
          size_t n = idx.size();
          for (size_t i = 0; i < idx.size(); ++i) {
            cum += std::exp((double(l[size_t(idx[i])]) - l[size_t(idx[0])]) / T) / z;
            if (p < 1.f && cum >= p) {
              n = i + 1;
              break;
            }
          }
          idx.resize(n);
          const Candidates got = candidate_set(l, T, k, p);
          ASSERT_EQ(got.tokens.size(), idx.size()) << "T " << T << " k " << k << " p " << p;
          const size_t ordered = std::min<size_t>(n, 64);
          EXPECT_TRUE(std::equal(idx.begin(), idx.begin() + long(ordered), got.tokens.begin()))
              << "T " << T << " k " << k << " p " << p;
          std::vector<int32_t> want_rest(idx.begin() + long(ordered), idx.end()),
              got_rest(got.tokens.begin() + long(ordered), got.tokens.end());
          std::sort(want_rest.begin(), want_rest.end());
          std::sort(got_rest.begin(), got_rest.end());
          EXPECT_EQ(got_rest, want_rest) << "T " << T << " k " << k << " p " << p;
          // The probabilities: the weights renormalised over the nucleus.
          double zn = 0;
          for (int32_t v : idx) zn += std::exp((double(l[size_t(v)]) - l[size_t(idx[0])]) / T);
          ASSERT_EQ(got.probs.size(), idx.size());
          for (size_t i = 0; i < idx.size(); ++i)
            EXPECT_NEAR(got.probs[i],
                        std::exp((double(l[size_t(got.tokens[i])]) - l[size_t(idx[0])]) / T) / zn,
                        1e-12)
                << "T " << T << " k " << k << " p " << p << " rank " << i;
          if (sigma < 1.f && k == 0 && p == 0.9f) {
            EXPECT_GT(n, 1024u);  // the selection stage ran
          }
        }
  }
}

TEST(Sampling, RepetitionPenaltyIsCtrlOncePerDistinctToken) {
  std::vector<float> l = {2.f, -2.f, 1.f, 0.5f};
  const std::vector<int32_t> ctx = {0, 1, 1, 0, 0, 7};  // 7 is out of range: ignored
  apply_repetition_penalty(l, ctx, 2.f);
  EXPECT_EQ(l, (std::vector<float>{1.f, -4.f, 1.f, 0.5f}));
  apply_repetition_penalty(l, ctx, 1.f);
  EXPECT_EQ(l, (std::vector<float>{1.f, -4.f, 1.f, 0.5f}));
}

TEST(Sampling, GreedyTakesTheFirstMaximum) {
  SamplingParams p;
  EXPECT_EQ(sample_token(std::vector<float>{0, 3, 1, 3}, p, 0, 0).token, 1);
  EXPECT_THROW(sample_token(std::vector<float>(3, -INFINITY), p, 0, 0), Error);
}

// With top-k off and top-p = 1 the draw walks the whole vocabulary in token order (no candidate
// set): the frequencies still follow the distribution when it is not sorted by token id, and a
// masked (-inf) token between others is never drawn.
TEST(Sampling, UntruncatedDrawFollowsAnUnsortedDistributionAndSkipsMaskedTokens) {
  std::vector<float> l = log_probs({0.2, 0.2, 0.4, 0.2});
  l[1] = -INFINITY;  // masked: the others renormalise to 0.25, 0.5, 0.25
  SamplingParams p;
  p.temperature = 1.f;
  p.seed = 7;
  std::map<int32_t, int> count;
  const int n = 6000;
  for (int i = 0; i < n; ++i) ++count[sample_token(l, p, uint64_t(i), 0).token];
  EXPECT_EQ(count[1], 0);
  // Binomial standard deviation <= sqrt(0.25/6000) ~ 0.0065: 0.03 is > 4 sigma.
  EXPECT_NEAR(count[0] / double(n), 0.25, 0.03);
  EXPECT_NEAR(count[2] / double(n), 0.5, 0.03);
  EXPECT_NEAR(count[3] / double(n), 0.25, 0.03);
  // A NaN logit is never a candidate either: it weighs nothing, the draw and the logprobs of
  // the others stay as they were (the truncated path drops it the same way).
  std::vector<float> with_nan = l;
  with_nan[3] = std::numeric_limits<float>::quiet_NaN();
  std::map<int32_t, int> c2;
  for (int i = 0; i < n; ++i) {
    const Sampled s = sample_token(with_nan, p, uint64_t(i), 0);
    ++c2[s.token];
    ASSERT_TRUE(std::isfinite(s.logprob));
  }
  EXPECT_EQ(c2[1] + c2[3], 0);
  EXPECT_NEAR(c2[0] / double(n), 1.0 / 3, 0.03);
  EXPECT_NEAR(c2[2] / double(n), 2.0 / 3, 0.03);
  SamplingParams k = p;
  k.top_k = 3;  // the three unmasked tokens: the same distribution through the candidate set
  std::map<int32_t, int> c3;
  for (int i = 0; i < n; ++i) ++c3[sample_token(l, k, uint64_t(i), 0).token];
  EXPECT_EQ(c3[1], 0);
  EXPECT_NEAR(c3[2] / double(n), 0.5, 0.03);
}

TEST(Sampling, SeedAndCounterDetermineTheDrawAndItFollowsTheDistribution) {
  const std::vector<float> l = log_probs({0.5, 0.3, 0.2});
  SamplingParams p;
  p.temperature = 1.f;
  p.seed = 42;
  std::map<int32_t, int> count;
  const int n = 6000;
  for (int i = 0; i < n; ++i) {
    const int32_t t = sample_token(l, p, uint64_t(i), 0).token;
    EXPECT_EQ(t, sample_token(l, p, uint64_t(i), 0).token);  // reproducible
    ++count[t];
  }
  // Binomial standard deviation sqrt(0.25/6000) ~ 0.0065: 0.03 is > 4 sigma.
  EXPECT_NEAR(count[0] / double(n), 0.5, 0.03);
  EXPECT_NEAR(count[1] / double(n), 0.3, 0.03);
  EXPECT_NEAR(count[2] / double(n), 0.2, 0.03);
  // Another seed gives another sequence.
  SamplingParams q = p;
  q.seed = 43;
  int differ = 0;
  for (int i = 0; i < 100; ++i)
    differ += sample_token(l, p, uint64_t(i), 0).token != sample_token(l, q, uint64_t(i), 0).token;
  EXPECT_GT(differ, 20);
}

TEST(Sampling, LogprobsAfterTemperatureAndTopList) {
  const std::vector<float> l = {1.f, 3.f, 2.f};
  SamplingParams p;  // greedy: T = 1 for logprobs
  Sampled s = sample_token(l, p, 0, 2);
  const double z = std::exp(1.0) + std::exp(3.0) + std::exp(2.0);
  EXPECT_EQ(s.token, 1);
  EXPECT_NEAR(s.logprob, 3.0 - std::log(z), 1e-6);
  ASSERT_EQ(s.top.size(), 2u);
  EXPECT_EQ(s.top[0].first, 1);
  EXPECT_EQ(s.top[1].first, 2);
  EXPECT_NEAR(s.top[1].second, 2.0 - std::log(z), 1e-6);
  p.temperature = 0.5f;
  s = sample_token(l, p, 0, 0);
  const double z2 = std::exp(2.0) + std::exp(6.0) + std::exp(4.0);
  EXPECT_NEAR(s.logprob, 2.0 * l[size_t(s.token)] - std::log(z2), 1e-6);
}

TEST(Sampling, ValidationNamesTheParameter) {
  SamplingParams p;
  p.temperature = NAN;
  EXPECT_THROW(validate_sampling(p), Error);
  p = {};
  p.top_p = 0.f;
  EXPECT_THROW(validate_sampling(p), Error);
  p = {};
  p.repetition_penalty = 0.f;
  EXPECT_THROW(validate_sampling(p), Error);
  p = {};
  p.logprobs = 6;
  EXPECT_THROW(validate_sampling(p), Error);
  p = {};
  p.stop = {""};
  EXPECT_THROW(validate_sampling(p), Error);
  try {
    p = {};
    p.temperature = -1.f;
    validate_sampling(p);
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("temperature -1 must be a finite number >= 0"),
              std::string::npos);
  }
}

TEST(TokenHealing, BacksUpTheLastTokenAndMasksNonExtensions) {
  auto tok = data::load_tokenizer(std::string(LOOM_TEST_DATA_DIR) + "/tokenizer");
  TokenTexts texts(*tok);
  std::vector<int32_t> ids = tok->encode("def ");
  ASSERT_GE(ids.size(), 2u);
  const std::vector<int32_t> orig = ids;
  Healing h = heal_prompt(ids, texts);
  EXPECT_EQ(ids.size(), orig.size() - 1);
  EXPECT_EQ(h.healed, texts.text(orig.back()));
  std::vector<float> l(size_t(tok->vocab_size()) + 3, 0.f);  // + vocabulary padding
  mask_for_healing(l, h, texts, tok->eod_id());
  int64_t allowed = 0;
  for (int32_t v = 0; v < int32_t(l.size()); ++v)
    if (l[size_t(v)] > -INFINITY) {
      ++allowed;
      EXPECT_LT(v, tok->vocab_size());
      EXPECT_EQ(texts.text(v).compare(0, h.healed.size(), h.healed), 0) << v;
    }
  EXPECT_GE(allowed, 1);
  EXPECT_EQ(l[size_t(tok->eod_id())], -INFINITY);
  // One-token prompts are not healed.
  std::vector<int32_t> one = {orig[0]};
  EXPECT_TRUE(heal_prompt(one, texts).healed.empty());
  EXPECT_EQ(one.size(), 1u);
}

TEST(Stop, StopStringsExcludeTheMatchAndHoldBackPossiblePrefixes) {
  TextStopper s({"\n\n", "END"}, StopRule::none, true);
  auto v = s.check("abc\n");
  EXPECT_FALSE(v.stopped);
  EXPECT_EQ(v.end, 3u);  // "\n" may start "\n\n"
  v = s.check("abc\n\nx");
  EXPECT_TRUE(v.stopped);
  EXPECT_EQ(v.end, 3u);
  v = s.check("xxEN");
  EXPECT_EQ(v.end, 2u);
  v = s.check("xxENx");
  EXPECT_FALSE(v.stopped);
  EXPECT_EQ(v.end, 5u);
  v = s.check("aEND\n\n");  // the first occurrence wins
  EXPECT_TRUE(v.stopped);
  EXPECT_EQ(v.end, 1u);
  // An incomplete UTF-8 character is held back ("é" is C3 A9).
  TextStopper none;
  EXPECT_EQ(none.check("a\xC3").end, 1u);
  EXPECT_EQ(none.check("a\xC3\xA9").end, 3u);
  EXPECT_EQ(none.check("\xE2\x82").end, 0u);
}

TEST(Stop, PythonRuleEndsAtAColumnZeroLine) {
  TextStopper s({}, StopRule::python, true);
  auto v = s.check("    return x\n");
  EXPECT_FALSE(v.stopped);
  EXPECT_EQ(v.end, 12u);  // the newline waits: a column-0 line may follow
  v = s.check("    return x\n\n    y = 1");
  EXPECT_FALSE(v.stopped);
  EXPECT_EQ(v.end, 23u);
  v = s.check("    return x\n\nprint(f(1))");
  EXPECT_TRUE(v.stopped);
  EXPECT_EQ(v.end, 13u);  // before the newline of the column-0 line
  v = s.check("    return x\ndef g");
  EXPECT_TRUE(v.stopped);
  EXPECT_EQ(v.end, 12u);
  // The first line counts only when the prompt ended at a line start.
  EXPECT_TRUE(s.check("x = 1").stopped);
  TextStopper mid({}, StopRule::python, false);
  v = mid.check("x + 1\n    return y");
  EXPECT_FALSE(v.stopped);
  EXPECT_EQ(v.end, 18u);
  EXPECT_TRUE(mid.check("x + 1\nif").stopped);
}

TEST(Stop, BraceRuleEndsAfterTheClosingBrace) {
  TextStopper s({}, StopRule::braces, true);
  auto v = s.check("  if (a) { b(); }\n  return 1;\n}\nint main() {}");
  EXPECT_TRUE(v.stopped);
  EXPECT_EQ(v.end, 31u);
  v = s.check("  if (a) { b(); }\n");
  EXPECT_FALSE(v.stopped);
  EXPECT_EQ(v.end, 18u);
  EXPECT_EQ(stop_rule_from_name("java"), StopRule::braces);
  EXPECT_EQ(stop_rule_from_name("python"), StopRule::python);
  EXPECT_EQ(stop_rule_from_name(""), StopRule::none);
  EXPECT_THROW(stop_rule_from_name("cobol"), Error);
}

}  // namespace
}  // namespace loom::infer
