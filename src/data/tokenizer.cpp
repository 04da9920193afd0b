// data/tokenizer.cpp: shared Tokenizer helpers and kind detection for load_tokenizer.
#include "data/tokenizer.h"

#include <filesystem>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "data/byte_bpe_tokenizer.h"
#include "data/sp_tokenizer.h"
#include "data/text_util.h"

namespace loom::data {

std::vector<int32_t> Tokenizer::encode_document(Language lang, std::string_view content) const {
  std::string text = language_tag_line(lang);
  text += '\n';
  text += content;
  return encode(text);
}

std::unique_ptr<Tokenizer> load_tokenizer(const std::string& path) {
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
    const std::string kind = meta.value("kind", "");
    if (kind == "sentencepiece")
      return std::make_unique<SentencePieceTokenizer>(
          read_file(path + "/" + meta.value("model_file", "tokenizer.model")));
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

}  // namespace loom::data
