// `loom eval loss --checkpoint DIR --tokens FILE [--seq T] [--batch B] [--domain NAME]`: loss of
// a checkpoint on a raw little-endian uint32 token file, in nats per predicted token. MoE (rre)
// models route every token by --domain (default: the model's "other"; the file carries no
// languages).
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <vector>

#include "interop/model_checkpoint.h"
#include "cli.h"
#include "core/error.h"
#include "model/gpt.h"

namespace {

void add_eval_loss(CLI::App& root, loom::cli::Context& ctx) {
  struct Opts {
    std::string checkpoint, tokens, domain;
    int64_t seq = 0, batch = 4;
  };
  auto o = std::make_shared<Opts>();
  CLI::App* eval = loom::cli::subcommand_path(root, "eval", "evaluate models and samples");
  CLI::App* sub = eval->add_subcommand("loss", "loss and perplexity of a checkpoint on tokens");
  sub->add_option("--checkpoint", o->checkpoint, "checkpoint directory")->required();
  sub->add_option("--tokens", o->tokens, "raw little-endian uint32 token ids")->required();
  sub->add_option("--seq", o->seq, "window length T (default: the model's max_seq)");
  sub->add_option("--batch", o->batch, "windows per forward pass");
  sub->add_option("--domain", o->domain,
                  "MoE (rre) models: the domain of every token, e.g. python (default: \"other\")");
  sub->callback([o, &ctx] {
    using namespace loom;
    LOOM_CHECK(o->seq >= 0, "--seq {} must be positive (or omitted for the model's max_seq)",
               o->seq);
    LOOM_CHECK(o->batch >= 1, "--batch {} must be at least 1", o->batch);
    // A directory opens as a stream whose size reads as 2^63 - 1: require a regular file.
    std::error_code ec;
    LOOM_CHECK(std::filesystem::is_regular_file(o->tokens, ec),
               "--tokens '{}' is not a regular file (a raw little-endian uint32 token file is "
               "expected)",
               o->tokens);
    std::ifstream f(o->tokens, std::ios::binary | std::ios::ate);
    LOOM_CHECK(f.good(), "cannot open token file '{}'", o->tokens);
    const int64_t bytes = int64_t(f.tellg());
    LOOM_CHECK(bytes >= 0, "cannot read the size of token file '{}'", o->tokens);
    LOOM_CHECK(bytes % 4 == 0, "token file '{}' has {} bytes, not a multiple of 4 (uint32 ids)",
               o->tokens, bytes);
    std::vector<uint32_t> ids(size_t(bytes / 4));
    f.seekg(0);
    f.read(reinterpret_cast<char*>(ids.data()), bytes);
    interop::CheckpointReader r(o->checkpoint);
    const model::ModelConfig& cfg = r.config();
    for (size_t i = 0; i < ids.size(); ++i)
      LOOM_CHECK(ids[i] < uint64_t(cfg.vocab),
                 "token file '{}': id {} at index {} is outside the model's vocabulary [0, {})",
                 o->tokens, ids[i], i, cfg.vocab);
    // MoE: every token in --domain (null domains: GptStage puts them in "other").
    const int32_t domain = o->domain.empty() ? -1 : cfg.domain_index(o->domain);
    const int64_t T = o->seq > 0 ? o->seq : cfg.max_seq;
    LOOM_CHECK(T <= cfg.max_seq, "--seq {} exceeds the model's max_seq {}", T, cfg.max_seq);
    LOOM_CHECK(int64_t(ids.size()) >= 2, "token file '{}' holds {} tokens; need at least 2",
               o->tokens, ids.size());
    MemoryPool pool;
    model::Gpt m(cfg, pool, model::Precision::f32);
    r.load_weights(m.layout(), m.weights());
    // Consecutive windows of T+1 tokens overlapping by one, so every token after the first is
    // predicted exactly once; the last window may be shorter.
    double sum = 0;
    int64_t count = 0;
    const int64_t n = int64_t(ids.size());
    for (int64_t start = 0; start + 1 < n; start += T) {
      int64_t len = std::min(T, n - 1 - start);
      std::vector<int32_t> w(size_t(len + 1));
      for (int64_t i = 0; i <= len; ++i) w[size_t(i)] = int32_t(ids[size_t(start + i)]);
      const std::vector<int32_t> d(size_t(len), domain);
      model::LossSum l = m.forward_loss(w.data(), 1, len, domain >= 0 ? d.data() : nullptr);
      sum += l.sum;
      count += l.count;
    }
    double loss = sum / double(count);
    nlohmann::json j = {{"tokens", count}, {"loss", loss}, {"ppl", std::exp(loss)}};
    std::printf("%s\n", j.dump().c_str());
    ctx.exit_code = 0;
  });
}

}  // namespace

LOOM_REGISTER_COMMAND(eval_loss, add_eval_loss);
