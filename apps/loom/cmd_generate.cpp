// `loom generate --checkpoint DIR --prompt TEXT [--max-tokens N] [--temperature T] [--top-p P]
//  [--seed S] [--tokenizer PATH]`: sampling from a checkpoint. Simple and exact: every token
// re-runs the forward pass over the (window of the) context; the inference work makes it fast.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <numeric>
#include <vector>

#include "interop/model_checkpoint.h"
#include "cli.h"
#include "core/error.h"
#include "core/rng.h"
#include "data/tokenizer.h"
#include "model/gpt.h"

namespace {

// Samples from softmax(logits / temperature) restricted to the smallest set of tokens whose
// probability reaches top_p; temperature 0 is greedy. u is uniform in [0,1).
int32_t sample(const std::vector<float>& logits, float temperature, float top_p, float u) {
  const int64_t V = int64_t(logits.size());
  if (temperature <= 0.f)
    return int32_t(std::max_element(logits.begin(), logits.end()) - logits.begin());
  std::vector<int32_t> idx(static_cast<size_t>(V));
  std::iota(idx.begin(), idx.end(), 0);
  std::sort(idx.begin(), idx.end(), [&](int32_t a, int32_t b) {
    return logits[size_t(a)] > logits[size_t(b)] || (logits[size_t(a)] == logits[size_t(b)] && a < b);
  });
  std::vector<double> p(static_cast<size_t>(V));
  double mx = logits[size_t(idx[0])], z = 0;
  for (int64_t i = 0; i < V; ++i) z += (p[size_t(i)] = std::exp((logits[size_t(idx[size_t(i)])] - mx) / temperature));
  int64_t keep = V;
  double cum = 0;
  for (int64_t i = 0; i < V; ++i) {
    cum += p[size_t(i)] / z;
    if (cum >= top_p) {
      keep = i + 1;
      break;
    }
  }
  double total = 0;
  for (int64_t i = 0; i < keep; ++i) total += p[size_t(i)];
  double r = double(u) * total;
  for (int64_t i = 0; i < keep; ++i) {
    r -= p[size_t(i)];
    if (r <= 0) return idx[size_t(i)];
  }
  return idx[size_t(keep - 1)];
}

void add_generate(CLI::App& root, loom::cli::Context& ctx) {
  struct Opts {
    std::string checkpoint, prompt, tokenizer;
    int64_t max_tokens = 64;
    float temperature = 0.8f, top_p = 0.95f;
    uint64_t seed = 1;
    bool no_heal = false;
  };
  auto o = std::make_shared<Opts>();
  CLI::App* sub = root.add_subcommand("generate", "sample a completion from a checkpoint");
  sub->add_option("--checkpoint", o->checkpoint, "checkpoint directory")->required();
  sub->add_option("--prompt", o->prompt, "prompt text")->required();
  sub->add_option("--max-tokens", o->max_tokens, "tokens to generate");
  sub->add_option("--temperature", o->temperature, "sampling temperature (0 = greedy)");
  sub->add_option("--top-p", o->top_p, "nucleus sampling mass");
  sub->add_option("--seed", o->seed, "sampling seed");
  sub->add_option("--tokenizer", o->tokenizer, "tokenizer (default: DIR/tokenizer)");
  sub->add_flag("--no-token-healing", o->no_heal,
                "keep the prompt's last token as encoded (default: back it up and let the first "
                "sampled token complete it)");
  sub->callback([o, &ctx] {
    using namespace loom;
    LOOM_CHECK(o->top_p > 0.f && o->top_p <= 1.f, "--top-p {} must be in (0, 1]", o->top_p);
    // NaN compares false with everything and inf divides every logit to 0: both would sample
    // garbage without an error, so only finite temperatures >= 0 are accepted.
    LOOM_CHECK(std::isfinite(o->temperature) && o->temperature >= 0.f,
               "--temperature {} must be a finite number >= 0 (0 = greedy; 0.2-1.0 is usual)",
               o->temperature);
    LOOM_CHECK(o->max_tokens >= 0, "--max-tokens {} must be >= 0", o->max_tokens);
    interop::CheckpointReader r(o->checkpoint);
    const model::ModelConfig& cfg = r.config();
    std::string tok_path = o->tokenizer.empty() ? r.dir() + "/tokenizer" : o->tokenizer;
    auto tok = data::load_tokenizer(tok_path);
    LOOM_CHECK(tok->vocab_size() <= cfg.vocab,
               "tokenizer '{}' has {} tokens but the model's vocab is {}", tok_path,
               tok->vocab_size(), cfg.vocab);
    MemoryPool pool;
    model::Gpt m(cfg, pool, model::Precision::f32);
    r.load_weights(m.layout(), m.weights());
    std::vector<int32_t> ids = tok->encode(o->prompt);
    LOOM_CHECK(!ids.empty(), "the prompt encodes to no tokens");
    // Token healing: a prompt often ends inside what the training text makes one token (a
    // trailing space: "def " is "def" + " name" in code, but encodes as "def" + " "). Back up
    // the last token and require the first sampled token to start with its text, so the model
    // continues from a boundary it has seen.
    std::string healed;
    std::vector<std::string> pieces;
    if (!o->no_heal && ids.size() > 1) {
      healed = tok->decode(std::span<const int32_t>(&ids.back(), 1));
      ids.pop_back();
      pieces.resize(size_t(tok->vocab_size()));
      for (int32_t v = 0; v < int32_t(tok->vocab_size()); ++v)
        pieces[size_t(v)] = tok->decode(std::span<const int32_t>(&v, 1));
    }
    std::vector<int32_t> out;
    std::vector<float> logits(size_t(cfg.vocab));
    for (int64_t i = 0; i < o->max_tokens; ++i) {
      int64_t start = std::max<int64_t>(0, int64_t(ids.size()) - cfg.max_seq);
      std::vector<int32_t> window(ids.begin() + start, ids.end());
      m.last_logits(logits.data(), window.data(), 1, int64_t(window.size()));
      // Tokens the tokenizer cannot produce (vocab padding) are never sampled.
      for (int64_t v = tok->vocab_size(); v < cfg.vocab; ++v) logits[size_t(v)] = -INFINITY;
      if (i == 0 && !healed.empty())
        for (int64_t v = 0; v < tok->vocab_size(); ++v)
          if (pieces[size_t(v)].compare(0, healed.size(), healed) != 0 || v == tok->eod_id())
            logits[size_t(v)] = -INFINITY;
      int32_t next = sample(logits, o->temperature, o->top_p, rng_uniform(o->seed, 3, uint64_t(i)));
      if (next == tok->eod_id()) break;
      ids.push_back(next);
      out.push_back(next);
    }
    std::string text = tok->decode(out);
    // The healed text is re-emitted by the first sampled token.
    std::fwrite(o->prompt.data(), 1, o->prompt.size() - healed.size(), stdout);
    std::fwrite(text.data(), 1, text.size(), stdout);
    std::printf("\n");
    ctx.exit_code = 0;
  });
}

}  // namespace

LOOM_REGISTER_COMMAND(generate, add_generate);
