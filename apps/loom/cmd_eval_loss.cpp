// `loom eval loss --checkpoint DIR (--tokens FILE | --data DIR [--split val]) [--seq T]
//  [--batch B] [--max-tokens N] [--dtype f32|bf16] [--int8] [--kv-dtype auto|f32|bf16]
//  [--domain NAME]`: loss of a checkpoint on a raw
// little-endian uint32 token file or on a split of a `loom data build` corpus, in nats per
// predicted token.
//
// Without --dtype / --int8 the loss is the training forward's (model::Gpt::forward_loss, f32).
// With either, it goes through the inference weights (infer::ModelWeights in that storage format,
// the same flags as `loom generate`: --int8 puts the linears in int8 per output row, the tied
// head stays in --dtype) and the KV-cached decoder (infer::Decoder::forward_all), so it measures
// what quantisation does to the model that `loom generate` / `loom serve` run; --kv-dtype (as
// theirs: auto = bf16 with --dtype bf16) stores the KV cache's K and V in f32 or bf16, and alone
// also selects this path.
//
// MoE (rre) models route every token by --domain (default: the model's "other"; the file
// carries no languages), on either path.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <vector>

#include "cli.h"
#include "core/error.h"
#include "data/data_meta.h"
#include "data/shard.h"
#include "infer/decoder.h"
#include "infer/kv_cache.h"
#include "infer/weights.h"
#include "interop/model_checkpoint.h"
#include "kv_flags.h"
#include "model/gpt.h"

namespace {

// log-sum-exp of a row minus the target's logit, in f64 (as kernels::cross_entropy_head).
double row_loss(const float* logits, int64_t V, int32_t target) {
  float m = logits[0];
  for (int64_t v = 1; v < V; ++v) m = std::max(m, logits[v]);
  double s = 0;
  for (int64_t v = 0; v < V; ++v) s += std::exp(double(logits[v]) - double(m));
  return double(m) + std::log(s) - double(logits[target]);
}

// Loss sum over the windows through the inference weights: `batch` windows at a time, each a
// sequence of the KV cache, prefilled with forward_all (every position's logits).
void infer_loss(const std::string& checkpoint, const loom::infer::WeightFormats& formats,
                loom::infer::WeightFormat* linears, loom::infer::WeightFormat* head,
                loom::DType kv_dtype,
                const std::vector<uint32_t>& ids, int64_t T, int64_t batch, int32_t domain,
                double* sum, int64_t* count) {
  using namespace loom;
  infer::ModelWeights w = infer::ModelWeights::load(checkpoint, formats);
  *linears = w.linear_format();  // what ran (an int8 checkpoint's linears are int8 whatever asked)
  *head = w.head().format;
  infer::Decoder dec(w);
  const infer::KvCacheShape shape = dec.cache_shape(kv_dtype);
  const int64_t blocks = (T + shape.block_tokens - 1) / shape.block_tokens;
  infer::KvCache cache(shape, blocks * shape.block_bytes() * batch, T);
  const int64_t n = int64_t(ids.size()), V = w.config().vocab;
  std::vector<int64_t> starts;
  for (int64_t start = 0; start + 1 < n; start += T) starts.push_back(start);
  std::vector<std::vector<int32_t>> win;
  std::vector<infer::SeqStep> steps;
  std::vector<float> logits;
  for (size_t g = 0; g < starts.size(); g += size_t(batch)) {
    const size_t B = std::min(starts.size() - g, size_t(batch));
    win.assign(B, {});
    steps.clear();
    int64_t rows = 0;
    for (size_t b = 0; b < B; ++b) {
      const int64_t start = starts[g + b], len = std::min(T, n - 1 - start);
      win[b].resize(size_t(len + 1));
      for (int64_t i = 0; i <= len; ++i) win[b][size_t(i)] = int32_t(ids[size_t(start + i)]);
      const int64_t seq = cache.create();
      LOOM_CHECK(cache.reserve(seq, len), "eval loss: KV cache too small for {} tokens", len);
      steps.push_back({seq, 0, std::span<const int32_t>(win[b].data(), size_t(len)), domain});
      rows += len;
    }
    logits.resize(size_t(rows * V));
    dec.forward_all(cache, steps, logits.data());
    int64_t r = 0;
    for (size_t b = 0; b < B; ++b) {
      const int64_t len = int64_t(steps[b].tokens.size());
      for (int64_t i = 0; i < len; ++i, ++r)
        *sum += row_loss(logits.data() + r * V, V, win[b][size_t(i + 1)]);
      *count += len;
      cache.release(steps[b].kv_seq);
    }
  }
}

void add_eval_loss(CLI::App& root, loom::cli::Context& ctx) {
  struct Opts {
    std::string checkpoint, tokens, data, split = "val", dtype, domain;
    int64_t seq = 0, batch = 4, max_tokens = 0;
    std::string head_dtype = "auto";
    bool int8 = false, int8_head = false;
    loom::cli::KvFlags kv;
  };
  auto o = std::make_shared<Opts>();
  CLI::App* eval = loom::cli::subcommand_path(root, "eval", "evaluate models and samples");
  CLI::App* sub = eval->add_subcommand("loss", "loss and perplexity of a checkpoint on tokens");
  sub->add_option("--checkpoint", o->checkpoint, "checkpoint directory")->required();
  sub->add_option("--tokens", o->tokens, "raw little-endian uint32 token ids");
  sub->add_option("--data", o->data, "a `loom data build` directory (instead of --tokens)");
  sub->add_option("--split", o->split, "split of --data: val or train")->capture_default_str();
  sub->add_option("--max-tokens", o->max_tokens, "only the first N tokens (0 = all)");
  sub->add_option("--seq", o->seq, "window length T (default: the model's max_seq)");
  sub->add_option("--batch", o->batch, "windows per forward pass");
  sub->add_option("--domain", o->domain,
                  "MoE (rre) models: the domain of every token, e.g. python (default: \"other\")");
  sub->add_option("--dtype", o->dtype,
                  "evaluate through the inference weights stored as f32 or bf16 (as loom "
                  "generate); default: the training forward in f32");
  sub->add_flag("--int8", o->int8,
                "evaluate through the inference weights with the linears in int8 per output row "
                "and the tied head (--head-dtype to store the head otherwise)");
  sub->add_flag("--int8-head", o->int8_head, "with --int8: --head-dtype int8 (the default since --int8 quantizes the head)");
  sub->add_option("--head-dtype", o->head_dtype,
                  "tied LM head storage: auto (int8 with --int8, else --dtype), f32, bf16 or int8")
      ->check(CLI::IsMember({"auto", "f32", "bf16", "int8"}));
  loom::cli::add_kv_dtype_flag(sub, o->kv);
  sub->callback([o, &ctx] {
    using namespace loom;
    LOOM_CHECK(o->seq >= 0, "--seq {} must be positive (or omitted for the model's max_seq)",
               o->seq);
    LOOM_CHECK(o->batch >= 1, "--batch {} must be at least 1", o->batch);
    LOOM_CHECK(o->max_tokens >= 0, "--max-tokens {} must be >= 0 (0 = all)", o->max_tokens);
    LOOM_CHECK(o->tokens.empty() != o->data.empty(),
               "give exactly one of --tokens FILE (raw uint32 ids) or --data DIR (a corpus from "
               "`loom data build`)");
    std::vector<uint32_t> ids;
    if (!o->tokens.empty()) {
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
      ids.resize(size_t(bytes / 4));
      f.seekg(0);
      f.read(reinterpret_cast<char*>(ids.data()), bytes);
    } else {
      // The split's shards in order, documents concatenated (each ends with its EOD token).
      const data::DataMeta meta = data::read_data_meta(o->data);
      for (const std::string& path : data::meta_shard_paths(meta, o->data, o->split)) {
        data::ShardReader sh(path);
        std::vector<int32_t> t(size_t(sh.token_count()));
        sh.copy_tokens(0, sh.token_count(), t.data());
        ids.insert(ids.end(), t.begin(), t.end());
      }
      LOOM_CHECK(!ids.empty(), "--data '{}' has no tokens in split '{}'", o->data, o->split);
    }
    if (o->max_tokens > 0 && int64_t(ids.size()) > o->max_tokens) ids.resize(size_t(o->max_tokens));
    const bool infer_path = !o->dtype.empty() || o->int8 || o->int8_head ||
                            o->head_dtype != "auto" || o->kv.dtype != "auto";
    infer::WeightFormats wf;
    if (infer_path)
      wf = infer::weight_formats_from_flags(o->dtype.empty() ? "f32" : o->dtype, o->int8, o->int8_head,
      o->head_dtype);
    infer::WeightFormat head = wf.head, lin = wf.linears;
    const DType kv_dtype = infer::kv_dtype_from_flag(o->kv.dtype, wf.base);
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
    // Consecutive windows of T+1 tokens overlapping by one, so every token after the first is
    // predicted exactly once; the last window may be shorter.
    double sum = 0;
    int64_t count = 0;
    const int64_t n = int64_t(ids.size());
    if (infer_path) {
      infer_loss(o->checkpoint, wf, &lin, &head, kv_dtype, ids, T, o->batch, domain, &sum, &count);
    } else {
      MemoryPool pool;
      model::Gpt m(cfg, pool, model::Precision::f32);
      r.load_weights(m.layout(), m.weights());
      for (int64_t start = 0; start + 1 < n; start += T) {
        int64_t len = std::min(T, n - 1 - start);
        std::vector<int32_t> w(size_t(len + 1));
        for (int64_t i = 0; i <= len; ++i) w[size_t(i)] = int32_t(ids[size_t(start + i)]);
        const std::vector<int32_t> d(size_t(len), domain);
        model::LossSum l = m.forward_loss(w.data(), 1, len, domain >= 0 ? d.data() : nullptr);
        sum += l.sum;
        count += l.count;
      }
    }
    double loss = sum / double(count);
    nlohmann::json j = {{"tokens", count}, {"loss", loss}, {"ppl", std::exp(loss)}};
    if (infer_path) {
      j["weights"] = infer::weight_format_name(lin);
      j["head"] = infer::weight_format_name(head);
      j["kv"] = infer::kv_dtype_name(kv_dtype);
    } else {
      j["weights"] = "f32 (training forward)";
    }
    std::printf("%s\n", j.dump().c_str());
    ctx.exit_code = 0;
  });
}

}  // namespace

LOOM_REGISTER_COMMAND(eval_loss, add_eval_loss);
