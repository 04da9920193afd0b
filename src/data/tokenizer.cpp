// data/tokenizer.cpp: shared Tokenizer helpers and kind detection for load_tokenizer.
#include "data/tokenizer.h"

#include <filesystem>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "data/byte_bpe_tokenizer.h"
#include "data/data_meta.h"
#include "data/sp_tokenizer.h"
#include "data/text_util.h"

namespace loom::data {

std::vector<int32_t> Tokenizer::encode_document(Language lang, std::string_view content) const {
  std::string text = language_tag_line(lang);
  text += '\n';
  text += content;
  return encode(text);
}

namespace {

std::unique_ptr<Tokenizer> load_tokenizer_unnamed(const std::string& path) {
  namespace fs = std::filesystem;
  LOOM_CHECK(fs::exists(path), "tokenizer path '{}' does not exist", path);
  if (fs::is_regular_file(path)) {
    LOOM_CHECK(path.ends_with(".model"),
               "tokenizer file '{}' is not a SentencePiece .model; pass a .model file or a "
               "directory (tokenizer.json, or vocab.json + merges.txt)",
               path);
    return std::make_unique<SentencePieceTokenizer>(read_file(path));
  }
  const std::string meta_path = path + "/tokenizer.json";
  if (fs::exists(meta_path)) {
    nlohmann::json meta;
    try {
      meta = nlohmann::json::parse(read_file(meta_path));
    } catch (const nlohmann::json::exception& e) {
      LOOM_FAIL("'{}' is not valid JSON: {}", meta_path, e.what());
    }
    LOOM_CHECK(meta.is_object(), "'{}' must hold a JSON object", meta_path);
    auto string_key = [&](const char* key, const char* fallback) {
      if (!meta.contains(key)) return std::string(fallback);
      LOOM_CHECK(meta[key].is_string(), "'{}': key '{}' must be a string, found {}", meta_path,
                 key, meta[key].dump());
      return meta[key].get<std::string>();
    };
    const std::string kind = string_key("kind", "");
    if (kind == "sentencepiece") {
      const std::string model_file = string_key("model_file", "tokenizer.model");
      check_path_inside(path, model_file, fmt::format("'{}': key 'model_file'", meta_path));
      return std::make_unique<SentencePieceTokenizer>(read_file(path + "/" + model_file));
    }
    if (kind == "byte_bpe") return ByteBpeTokenizer::from_dir(path);
    LOOM_FAIL("'{}' has kind '{}'; expected 'sentencepiece' or 'byte_bpe'", meta_path, kind);
  }
  if (fs::exists(path + "/vocab.json") && fs::exists(path + "/merges.txt"))
    return ByteBpeTokenizer::from_dir(path);
  for (const char* name : {"tokenizer.model", "sp.model"})
    if (fs::exists(path + "/" + name))
      return std::make_unique<SentencePieceTokenizer>(read_file(path + "/" + name));
  LOOM_FAIL(
      "no tokenizer in '{}': expected tokenizer.json (saved by loom), vocab.json + merges.txt "
      "(GPT-2/CodeGeeX), or tokenizer.model (SentencePiece)",
      path);
}

}  // namespace

std::unique_ptr<Tokenizer> load_tokenizer(const std::string& path) {
  // The parsers below report what is wrong but not where: name the tokenizer in every error.
  try {
    return load_tokenizer_unnamed(path);
  } catch (const Error& e) {
    const std::string msg = e.what();
    if (msg.find(path) != std::string::npos) throw;
    throw Error(fmt::format("tokenizer '{}': {}", path, msg));
  } catch (const nlohmann::json::exception& e) {
    throw Error(fmt::format("tokenizer '{}': {}", path, e.what()));
  } catch (const std::filesystem::filesystem_error& e) {
    throw Error(fmt::format("tokenizer '{}': {}", path, e.what()));
  }
}

}  // namespace loom::data
