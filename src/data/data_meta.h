// data/data_meta.h: DATA_DIR/meta.json, the manifest `loom data build` writes beside the shards.
//
// read_data_meta(dir) parses and validates it before any shard is opened (by `loom data verify`
// and by every shard stream, hence `loom train`). It throws loom::Error naming the file and the
// key when meta.json is missing, is not a JSON object, has another "format" or "shard_version",
// has a key of the wrong type, or names a file (tokenizer_dir, shards.<split>[i].file) that is
// absolute, contains "..", or otherwise resolves outside the data directory. It does not open
// the shards (ShardReader validates those).
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace loom::data {

struct DataMeta {
  std::string tokenizer_dir;  // relative to the data directory ("" if absent)
  int64_t vocab_size = 0;
  // split ("train", "val") -> shard file names relative to the data directory, in order
  std::map<std::string, std::vector<std::string>> shards;
};

DataMeta read_data_meta(const std::string& data_dir);

// Per-language token counts of the train split, written by the corpus builder (`loom data
// build`): DATA_DIR/token_counts.i64, int64 little-endian (kNumLanguages, V) row-major. Returns
// the counts and sets *vocab. Throws loom::Error naming the file if it is missing (data built
// before it existed: rebuild) or its size is not kNumLanguages * V * 8 for meta.json's V.
inline constexpr const char* kTokenCountsFile = "token_counts.i64";
std::vector<int64_t> read_token_counts(const std::string& data_dir, int64_t* vocab);

// The shards of `split` ("train"/"val"), as paths DATA_DIR/<file> in name order. Throws
// loom::Error naming the file if a file listed in meta.json does not exist, or a
// DATA_DIR/<split>_*.bin on disk is not listed (a stray shard would silently change the data).
std::vector<std::string> meta_shard_paths(const DataMeta& meta, const std::string& data_dir,
                                          const std::string& split);

// Throws loom::Error unless `rel` is a relative path with no ".." component that stays inside
// `data_dir` after resolving symlinks. `what` names the key in messages.
void check_path_inside(const std::string& data_dir, const std::string& rel,
                       const std::string& what);

}  // namespace loom::data
