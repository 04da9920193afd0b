// `loom data build`: source trees -> tokenizer + token shards (data/corpus_builder.h).
// `loom data verify`: opens and checksums every shard of a data directory, prints a summary.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "cli.h"
#include "core/checked.h"
#include "core/error.h"
#include "data/data_meta.h"
#include "data/corpus_builder.h"
#include "data/shard.h"
#include "data/tokenizer.h"

namespace {

struct BuildArgs {
  loom::data::CorpusBuildOptions options;
  std::string stats_json;  // optional extra copy of the report
};

struct VerifyArgs {
  std::string data_dir;
};

void add_data(CLI::App& root, loom::cli::Context& ctx) {
  CLI::App* data = loom::cli::subcommand_path(root, "data", "build and inspect token corpora");

  auto build_args = std::make_shared<BuildArgs>();
  CLI::App* build = data->add_subcommand(
      "build", "walk source trees, train a tokenizer (or use --tokenizer), write token shards");
  auto& o = build_args->options;
  build->add_option("--source", o.sources, "source directory (repeatable)")->required();
  build->add_option("--out", o.out_dir, "output directory for shards, tokenizer and stats")
      ->required();
  build->add_option("--vocab", o.vocab_size, "vocabulary size of the trained tokenizer")
      ->capture_default_str();
  build->add_option("--tokenizer", o.tokenizer_path,
                    "use this tokenizer instead of training one (directory or .model file)");
  build->add_option("--val-fraction", o.val_fraction, "share of documents held out")
      ->capture_default_str();
  build->add_option("--max-file-bytes", o.max_file_bytes, "skip larger files")
      ->capture_default_str();
  build->add_option("--shard-tokens", o.shard_tokens, "tokens per shard")->capture_default_str();
  build->add_option("--train-bytes", o.tokenizer_train_bytes,
                    "bytes of text used to train the tokenizer")
      ->capture_default_str();
  build->add_option("--threads", o.num_threads, "encode threads (0: default)");
  build->add_option("--stats-json", build_args->stats_json,
                    "also write the report to this file (always written to OUT/stats.json)");
  build->callback([build_args, &ctx] {
    auto opts = build_args->options;
    opts.progress = [](const std::string& line) {
      std::fprintf(stderr, "%s\n", line.c_str());
      std::fflush(stderr);
    };
    const loom::data::CorpusReport report = loom::data::build_corpus(opts);
    std::printf("%s", report.table().c_str());
    std::printf("wrote %s/{train_*,val_*}.bin, tokenizer/, stats.json, meta.json\n",
                opts.out_dir.c_str());
    if (!build_args->stats_json.empty()) {
      std::FILE* f = std::fopen(build_args->stats_json.c_str(), "w");
      LOOM_CHECK(f != nullptr, "cannot write '{}'", build_args->stats_json);
      const std::string js = report.to_json().dump(2) + "\n";
      std::fwrite(js.data(), 1, js.size(), f);
      std::fclose(f);
    }
    ctx.exit_code = 0;
  });

  auto verify_args = std::make_shared<VerifyArgs>();
  CLI::App* verify = data->add_subcommand(
      "verify", "check every shard of a data directory (magic, version, checksums, index)");
  verify->add_option("--data", verify_args->data_dir, "data directory (from loom data build)")
      ->required();
  verify->callback([verify_args, &ctx] {
    namespace fs = std::filesystem;
    const std::string& dir = verify_args->data_dir;
    LOOM_CHECK(fs::is_directory(dir), "data directory '{}' does not exist", dir);
    // meta.json first: it names the files (inside the directory) that are checked below.
    const loom::data::DataMeta meta = loom::data::read_data_meta(dir);
    std::vector<std::string> paths;
    for (const char* split : {"train", "val"})
      for (auto& p : loom::data::meta_shard_paths(meta, dir, split)) paths.push_back(p);
    LOOM_CHECK(!paths.empty(),
               "no train_*.bin / val_*.bin shards in '{}'; build them with `loom data build`",
               dir);
    int64_t tokens = 0, documents = 0;
    // Unigram statistics of the training shards: the entropy (nats per token) of a model that
    // knows only token frequencies, the bar a trained model's validation loss must clear.
    // Token ids are < the shard's vocab (ShardReader checks every one); counts are sized by the
    // largest id seen, and kept in a map when that is too large for a table.
    constexpr int64_t kMaxCountTable = int64_t(1) << 24;
    std::vector<int64_t> counts;
    std::unordered_map<int32_t, int64_t> sparse_counts;
    int64_t train_tokens = 0;
    for (const auto& p : paths) {
      loom::data::ShardReader r(p);
      LOOM_CHECK(r.vocab_size() == meta.vocab_size,
                 "shard '{}' has vocab {} but '{}/meta.json' says vocab_size {}; rebuild the data",
                 p, r.vocab_size(), dir, meta.vocab_size);
      if (fs::path(p).filename().string().starts_with("train_")) {
        const int64_t table = std::min(r.max_token() + 1, kMaxCountTable);
        if (int64_t(counts.size()) < table) counts.resize(size_t(table), 0);
        for (int64_t i = 0; i < r.token_count(); ++i) {
          const int32_t t = r.token(i);
          if (t < kMaxCountTable) ++counts[size_t(t)];
          else ++sparse_counts[t];
        }
        train_tokens = loom::checked_add(train_tokens, r.token_count(), "training token count");
      }
      std::printf("%s: %lld tokens, %zu documents, %d-byte tokens, vocab %lld: ok\n", p.c_str(),
                  static_cast<long long>(r.token_count()), r.documents().size(), r.token_bytes(),
                  static_cast<long long>(r.vocab_size()));
      tokens = loom::checked_add(tokens, r.token_count(), "total token count");
      documents = loom::checked_add(documents, static_cast<int64_t>(r.documents().size()),
                                    "total document count");
    }
    const std::string tok_dir = dir + "/" + (meta.tokenizer_dir.empty() ? "tokenizer"
                                                                        : meta.tokenizer_dir);
    if (fs::exists(tok_dir)) {
      auto tok = loom::data::load_tokenizer(tok_dir);
      LOOM_CHECK(tok->vocab_size() == meta.vocab_size,
                 "tokenizer '{}' has vocab {} but '{}/meta.json' says vocab_size {}", tok_dir,
                 tok->vocab_size(), dir, meta.vocab_size);
      std::printf("tokenizer: %s, vocab %lld, eod %d\n", tok->kind().c_str(),
                  static_cast<long long>(tok->vocab_size()), tok->eod_id());
    }
    std::printf("%zu shards, %lld tokens, %lld documents: ok\n", paths.size(),
                static_cast<long long>(tokens), static_cast<long long>(documents));
    for (const auto& [t, c] : sparse_counts) {
      (void)t;
      counts.push_back(c);
    }
    double entropy = 0;
    for (int64_t c : counts)
      if (c > 0) {
        double p = double(c) / double(train_tokens);
        entropy -= p * std::log(p);
      }
    std::printf("unigram entropy of the training tokens: %.4f nats/token\n", entropy);
    ctx.exit_code = 0;
  });
}

}  // namespace

LOOM_REGISTER_COMMAND(data, add_data);
