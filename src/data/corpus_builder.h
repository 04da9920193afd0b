// data/corpus_builder.h: source trees -> tokenizer + token shards (`loom data build`).
//
// Pipeline: walk the sources (sorted, symlinks not followed, VCS/cache folders skipped) ->
// detect the language by extension or shebang -> skip, with a count per reason, files that are
// unknown_language, oversized, empty, unreadable, binary (a NUL byte), non_utf8, generated
// (a "generated"/"do not edit" marker in the first lines), minified (a line over
// max_line_bytes or a mean line over max_mean_line_bytes) or duplicate (same content hash as an
// earlier file) -> document = tag line + "\n" + content -> held-out split by content hash ->
// train a SentencePiece tokenizer on the train documents (or load a given one) -> encode in
// parallel, check each document decodes to the same bytes (else skip: roundtrip_mismatch) ->
// write OUT/train_NNNNN.bin and OUT/val_NNNNN.bin (each document + EOD), OUT/tokenizer/,
// OUT/stats.json (the report) and OUT/meta.json. Old *_NNNNN.bin shards in OUT are removed.
// The whole accepted corpus is held in memory (fine for tens of GB of RAM per GB of code).
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace loom::data {

struct CorpusBuildOptions {
  std::vector<std::string> sources;  // directories (or single files)
  std::string out_dir;
  int64_t vocab_size = 16384;        // when training a tokenizer
  std::string tokenizer_path;        // non-empty: use this tokenizer (see load_tokenizer)
  int64_t max_file_bytes = 1 << 20;
  int64_t max_line_bytes = 1000;
  double max_mean_line_bytes = 100.0;
  double val_fraction = 0.01;        // share of documents held out (by content hash)
  int64_t shard_tokens = int64_t(1) << 26;  // a shard closes once it holds this many tokens
  int64_t tokenizer_train_bytes = int64_t(8) << 20;  // text used to train the tokenizer
  int num_threads = 0;               // 0: core/threads.h default
  // Progress lines (phase, files, bytes, tokens/s); empty: silent.
  std::function<void(const std::string&)> progress;
};

struct LanguageStats {
  int64_t files = 0;
  int64_t bytes = 0;   // source bytes (without the tag line)
  int64_t tokens = 0;  // tokens written, including tag line and EOD
};

struct CorpusReport {
  int64_t files_seen = 0;
  int64_t files_kept = 0;
  int64_t bytes_kept = 0;
  int64_t train_tokens = 0;
  int64_t val_tokens = 0;
  int64_t train_documents = 0;
  int64_t val_documents = 0;
  int64_t vocab_size = 0;
  std::string tokenizer_kind;
  bool tokenizer_trained = false;
  std::map<std::string, LanguageStats> languages;  // by language name
  std::map<std::string, int64_t> skipped;          // reason -> files
  double seconds_scan = 0, seconds_tokenizer = 0, seconds_encode = 0, seconds_total = 0;
  double tokens_per_second = 0;  // encode phase

  nlohmann::json to_json() const;
  // A fixed-width table: language, files, bytes, tokens, then totals and skip reasons.
  std::string table() const;
};

// Runs the pipeline above. Throws loom::Error for a missing source, a source tree with no usable
// file (the report's skip counts are in the message), or an unwritable output directory.
CorpusReport build_corpus(const CorpusBuildOptions& options);

}  // namespace loom::data
