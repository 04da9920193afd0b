// `loom data build`: source trees -> tokenizer + token shards (data/corpus_builder.h).
// `loom data verify`: opens and checksums every shard of a data directory, prints a summary.
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "cli.h"
#include "core/error.h"
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
    std::vector<std::string> paths;
    for (const auto& e : fs::directory_iterator(dir)) {
      const std::string name = e.path().filename().string();
      if ((name.starts_with("train_") || name.starts_with("val_")) && name.ends_with(".bin"))
        paths.push_back(e.path().string());
    }
    LOOM_CHECK(!paths.empty(),
               "no train_*.bin / val_*.bin shards in '{}'; build them with `loom data build`",
               dir);
    std::sort(paths.begin(), paths.end());
    int64_t tokens = 0, documents = 0;
    // Unigram statistics of the training shards: the entropy (nats per token) of a model that
    // knows only token frequencies, the bar a trained model's validation loss must clear.
    std::vector<int64_t> counts;
    int64_t train_tokens = 0;
    for (const auto& p : paths) {
      loom::data::ShardReader r(p);
      if (fs::path(p).filename().string().starts_with("train_")) {
        if (int64_t(counts.size()) < r.vocab_size()) counts.resize(size_t(r.vocab_size()), 0);
        for (int64_t i = 0; i < r.token_count(); ++i) ++counts[size_t(r.token(i))];
        train_tokens += r.token_count();
      }
      std::printf("%s: %lld tokens, %zu documents, %d-byte tokens, vocab %lld: ok\n", p.c_str(),
                  static_cast<long long>(r.token_count()), r.documents().size(), r.token_bytes(),
                  static_cast<long long>(r.vocab_size()));
      tokens += r.token_count();
      documents += static_cast<int64_t>(r.documents().size());
    }
    if (fs::exists(dir + "/tokenizer")) {
      auto tok = loom::data::load_tokenizer(dir + "/tokenizer");
      std::printf("tokenizer: %s, vocab %lld, eod %d\n", tok->kind().c_str(),
                  static_cast<long long>(tok->vocab_size()), tok->eod_id());
    }
    std::printf("%zu shards, %lld tokens, %lld documents: ok\n", paths.size(),
                static_cast<long long>(tokens), static_cast<long long>(documents));
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
