// data/data_meta.cpp: strict reader of DATA_DIR/meta.json (see data_meta.h).
#include "data/data_meta.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "data/languages.h"
#include "data/shard.h"
#include "data/text_util.h"

namespace loom::data {

namespace fs = std::filesystem;

void check_path_inside(const std::string& data_dir, const std::string& rel,
                       const std::string& what) {
  const fs::path p(rel);
  LOOM_CHECK(!rel.empty() && p.is_relative(),
             "{}: '{}' must be a non-empty path relative to the data directory '{}'", what, rel,
             data_dir);
  for (const auto& part : p)
    LOOM_CHECK(part != "..",
               "{}: '{}' contains '..'; files named by meta.json must stay inside the data "
               "directory '{}'",
               what, rel, data_dir);
  // Symlinks may still lead out: compare the resolved paths.
  std::error_code ec;
  const fs::path root = fs::weakly_canonical(fs::path(data_dir), ec);
  const fs::path full = fs::weakly_canonical(fs::path(data_dir) / p, ec);
  const std::string r = root.string(), f = full.string();
  LOOM_CHECK(f.size() > r.size() && f.compare(0, r.size(), r) == 0 && f[r.size()] == '/',
             "{}: '{}' resolves to '{}', outside the data directory '{}'", what, rel, f, r);
}

DataMeta read_data_meta(const std::string& data_dir) {
  const std::string path = data_dir + "/meta.json";
  std::error_code ec;  // the error_code forms: a name too long or unreadable is "not there"
  LOOM_CHECK(fs::is_regular_file(path, ec),
             "'{}' is missing; a data directory is written by `loom data build --out {}`", path,
             data_dir);
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(read_file(path));
  } catch (const nlohmann::json::exception& e) {
    LOOM_FAIL("'{}' is not valid JSON ({}); rebuild the data with `loom data build`", path,
              e.what());
  }
  LOOM_CHECK(j.is_object(), "'{}' must hold a JSON object, found a {}", path, j.type_name());
  auto key = [&](const char* k, nlohmann::json::value_t type, const char* type_name)
      -> const nlohmann::json& {
    LOOM_CHECK(j.contains(k), "'{}': key '{}' is missing", path, k);
    const auto& v = j.at(k);
    const bool ok = type == nlohmann::json::value_t::number_unsigned
                        ? v.is_number_integer()
                        : v.type() == type;
    LOOM_CHECK(ok, "'{}': key '{}' must be {}, found {}", path, k, type_name, v.dump());
    return v;
  };
  const auto& format = key("format", nlohmann::json::value_t::string, "a string");
  LOOM_CHECK(format == "loom-token-shards",
             "'{}': key 'format' is {}, expected \"loom-token-shards\"", path, format.dump());
  const auto& version = key("shard_version", nlohmann::json::value_t::number_unsigned,
                            "an integer");
  LOOM_CHECK(version == kShardVersion,
             "'{}': key 'shard_version' is {}, this build reads {}; rebuild the corpus", path,
             version.dump(), kShardVersion);
  DataMeta m;
  const auto& vocab = key("vocab_size", nlohmann::json::value_t::number_unsigned, "an integer");
  LOOM_CHECK(vocab.get<int64_t>() >= 1 && vocab.get<int64_t>() <= kMaxShardVocab,
             "'{}': key 'vocab_size' is {}, outside [1, {}]", path, vocab.dump(), kMaxShardVocab);
  m.vocab_size = vocab.get<int64_t>();
  if (j.contains("tokenizer_dir")) {
    const auto& t = key("tokenizer_dir", nlohmann::json::value_t::string, "a string");
    m.tokenizer_dir = t.get<std::string>();
    check_path_inside(data_dir, m.tokenizer_dir, fmt::format("'{}': key 'tokenizer_dir'", path));
  }
  const auto& shards = key("shards", nlohmann::json::value_t::object, "an object");
  for (const auto& [split, list] : shards.items()) {
    LOOM_CHECK(list.is_array(), "'{}': key 'shards.{}' must be an array, found {}", path, split,
               list.dump());
    auto& names = m.shards[split];
    for (size_t i = 0; i < list.size(); ++i) {
      const std::string where = fmt::format("'{}': key 'shards.{}[{}].file'", path, split, i);
      LOOM_CHECK(list[i].is_object() && list[i].contains("file") && list[i]["file"].is_string(),
                 "{} must be a string, found {}", where, list[i].dump());
      const std::string name = list[i]["file"].get<std::string>();
      check_path_inside(data_dir, name, where);
      names.push_back(name);
    }
  }
  return m;
}

std::vector<int64_t> read_token_counts(const std::string& data_dir, int64_t* vocab) {
  const DataMeta meta = read_data_meta(data_dir);
  const std::string path = data_dir + "/" + kTokenCountsFile;
  std::error_code ec;
  const auto bytes = std::filesystem::file_size(path, ec);
  LOOM_CHECK(!ec,
             "'{}' is missing ({}): the data was built without per-language token counts; rebuild "
             "it with `loom data build` or use rre_table = \"uniform\"",
             path, ec.message());
  const uint64_t want = uint64_t(kNumLanguages) * uint64_t(meta.vocab_size) * 8;
  LOOM_CHECK(bytes == want,
             "'{}' has {} bytes but {} languages x vocab {} x 8 = {} were expected; rebuild the "
             "data",
             path, bytes, kNumLanguages, meta.vocab_size, want);
  std::vector<int64_t> counts(size_t(want / 8));
  std::ifstream f(path, std::ios::binary);
  f.read(reinterpret_cast<char*>(counts.data()), std::streamsize(want));
  LOOM_CHECK(f.good(), "cannot read '{}'", path);
  for (int64_t c : counts)
    LOOM_CHECK(c >= 0, "'{}' holds a negative count {}: the file is corrupted; rebuild the data",
               path, c);
  *vocab = meta.vocab_size;
  return counts;
}

std::vector<std::string> meta_shard_paths(const DataMeta& meta, const std::string& data_dir,
                                          const std::string& split) {
  std::vector<std::string> listed;
  if (auto it = meta.shards.find(split); it != meta.shards.end()) listed = it->second;
  std::error_code ec;
  for (const auto& name : listed)
    LOOM_CHECK(fs::is_regular_file(fs::path(data_dir) / name, ec),
               "'{}/meta.json' lists {} shard '{}', but '{}/{}' does not exist; rebuild the data "
               "with `loom data build`",
               data_dir, split, name, data_dir, name);
  std::vector<std::string> sorted = listed;
  std::sort(sorted.begin(), sorted.end());
  if (fs::is_directory(data_dir, ec))
    for (const auto& e : fs::directory_iterator(data_dir, ec)) {
      const std::string name = e.path().filename().string();
      if (name.starts_with(split + "_") && name.ends_with(".bin"))
        LOOM_CHECK(std::binary_search(sorted.begin(), sorted.end(), name),
                   "shard '{}' is not listed in '{}/meta.json' (shards.{}); remove it or rebuild "
                   "the data with `loom data build`",
                   e.path().string(), data_dir, split);
    }
  std::vector<std::string> paths;
  for (const auto& name : sorted) paths.push_back(data_dir + "/" + name);
  return paths;
}

}  // namespace loom::data
