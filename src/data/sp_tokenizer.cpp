// data/sp_tokenizer.cpp: SentencePiece BPE wrapper and trainer (see sp_tokenizer.h).
#include "data/sp_tokenizer.h"

#include <sentencepiece_processor.h>
#include <sentencepiece_trainer.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <unordered_map>

#include "core/error.h"
#include "data/text_util.h"

namespace loom::data {

namespace {

// SentencePiece's visible-space character; the normaliser maps ' ' to it.
constexpr std::string_view kSpaceSymbol = "\xE2\x96\x81";

std::string replace_all(std::string_view s, std::string_view from, std::string_view to) {
  std::string out;
  out.reserve(s.size());
  size_t pos = 0;
  while (true) {
    const size_t hit = s.find(from, pos);
    if (hit == std::string_view::npos) break;
    out.append(s.data() + pos, hit - pos);
    out.append(to.data(), to.size());
    pos = hit + from.size();
  }
  out.append(s.data() + pos, s.size() - pos);
  return out;
}

std::string byte_piece(int b) { return fmt::format("<0x{:02X}>", b); }

// Feeds pre-cut training pieces to SentencePiece.
class VectorIterator final : public sentencepiece::SentenceIterator {
 public:
  explicit VectorIterator(const std::vector<std::string>* items) : items_(items) {}
  bool done() const override { return index_ >= items_->size(); }
  void Next() override { ++index_; }
  const std::string& value() const override { return (*items_)[index_]; }
  sentencepiece::util::Status status() const override { return {}; }

 private:
  const std::vector<std::string>* items_;
  size_t index_ = 0;
};

}  // namespace

SentencePieceTokenizer::SentencePieceTokenizer(const std::string& serialized_model)
    : serialized_(serialized_model), sp_(std::make_unique<sentencepiece::SentencePieceProcessor>()) {
  const auto status = sp_->LoadFromSerializedProto(serialized_);
  LOOM_CHECK(status.ok(), "cannot parse SentencePiece model ({} bytes): {}", serialized_.size(),
             status.ToString());
  vocab_size_ = sp_->GetPieceSize();
  const int32_t unk = sp_->unk_id();
  eod_id_ = sp_->PieceToId(std::string(kEndOfText));
  LOOM_CHECK(eod_id_ != unk && eod_id_ >= 0,
             "SentencePiece model has no '{}' piece; loom needs it as the end-of-document token "
             "(train with loom data build, or add it as a user_defined_symbol)",
             kEndOfText);
  byte_ids_.assign(256, -1);
  for (int b = 0; b < 256; ++b) {
    const int32_t id = sp_->PieceToId(byte_piece(b));
    LOOM_CHECK(id != unk && sp_->IsByte(id),
               "SentencePiece model lacks byte piece {}; loom needs byte_fallback=true so every "
               "byte sequence round-trips",
               byte_piece(b));
    byte_ids_[b] = id;
  }
  tag_ids_.assign(kNumLanguages, -1);
  for (Language lang : all_languages()) {
    const int32_t id = sp_->PieceToId(replace_all(language_tag_line(lang), " ", kSpaceSymbol));
    if (id != unk) tag_ids_[static_cast<int32_t>(lang)] = id;
  }
  surfaces_.resize(vocab_size_);
  byte_of_id_.assign(vocab_size_, -1);
  for (int32_t id = 0; id < vocab_size_; ++id) {
    if (sp_->IsByte(id)) {
      const std::string& piece = sp_->IdToPiece(id);  // "<0xNN>"
      byte_of_id_[id] = static_cast<int16_t>(std::stoi(piece.substr(3, 2), nullptr, 16));
    } else if (sp_->IsControl(id) || sp_->IsUnknown(id)) {
      surfaces_[id].clear();  // <unk>/<s>/</s> carry no text
    } else {
      surfaces_[id] = replace_all(sp_->IdToPiece(id), kSpaceSymbol, " ");
    }
  }
}

SentencePieceTokenizer::~SentencePieceTokenizer() = default;

void SentencePieceTokenizer::encode_plain(std::string_view text, std::vector<int32_t>& out) const {
  if (text.empty()) return;
  std::vector<int> ids;
  const auto status = sp_->Encode(text, &ids);
  LOOM_CHECK(status.ok(), "SentencePiece encode failed on {} bytes: {}", text.size(),
             status.ToString());
  out.insert(out.end(), ids.begin(), ids.end());
}

std::vector<int32_t> SentencePieceTokenizer::encode(std::string_view text) const {
  // A literal U+2581 in the input would come back as ' ' (SentencePiece uses it for spaces), so
  // it is cut out and spelled with its three byte tokens.
  std::vector<int32_t> out;
  out.reserve(text.size() / 3 + 4);
  size_t pos = 0;
  while (true) {
    const size_t hit = text.find(kSpaceSymbol, pos);
    encode_plain(text.substr(pos, hit == std::string_view::npos ? std::string_view::npos : hit - pos),
                 out);
    if (hit == std::string_view::npos) break;
    for (unsigned char c : kSpaceSymbol) out.push_back(byte_ids_[c]);
    pos = hit + kSpaceSymbol.size();
  }
  return out;
}

std::string SentencePieceTokenizer::decode(std::span<const int32_t> ids) const {
  std::string out;
  out.reserve(ids.size() * 4);
  for (size_t i = 0; i < ids.size(); ++i) {
    const int32_t id = ids[i];
    LOOM_CHECK(id >= 0 && id < vocab_size_, "token id {} at position {} is outside [0, {})", id,
               i, vocab_size_);
    if (byte_of_id_[id] >= 0)
      out.push_back(static_cast<char>(byte_of_id_[id]));
    else
      out += surfaces_[id];
  }
  return out;
}

std::optional<int32_t> SentencePieceTokenizer::language_tag_id(Language lang) const {
  const int32_t id = tag_ids_.at(static_cast<size_t>(lang));
  if (id < 0) return std::nullopt;
  return id;
}

void SentencePieceTokenizer::save_to_dir(const std::string& dir) const {
  namespace fs = std::filesystem;
  std::error_code ec;
  fs::create_directories(dir, ec);
  LOOM_CHECK(!ec, "cannot create tokenizer directory '{}': {}", dir, ec.message());
  write_file_atomic(dir + "/tokenizer.model", serialized_);
  nlohmann::json meta = {{"kind", kind()},
                         {"model_file", "tokenizer.model"},
                         {"vocab_size", vocab_size_},
                         {"eod_id", eod_id_}};
  write_file_atomic(dir + "/tokenizer.json", meta.dump(2) + "\n");
}

std::unique_ptr<SentencePieceTokenizer> train_sentencepiece(
    const std::vector<std::string_view>& texts, const SentencePieceTrainOptions& options) {
  LOOM_CHECK(!texts.empty(), "cannot train a tokenizer on zero documents");
  LOOM_CHECK(options.max_sentence_bytes >= 256, "max_sentence_bytes={} is too small (>= 256)",
             options.max_sentence_bytes);
  // Cut documents at line ends into pieces SentencePiece accepts; pieces keep their "\n".
  std::vector<std::string> pieces;
  const auto limit = static_cast<size_t>(options.max_sentence_bytes);
  for (std::string_view text : texts) {
    LOOM_CHECK(is_valid_utf8(text), "training text is not valid UTF-8; filter it first");
    size_t pos = 0;
    while (pos < text.size()) {
      size_t end = std::min(text.size(), pos + limit);
      if (end < text.size()) {
        const size_t nl = text.rfind('\n', end - 1);
        if (nl != std::string_view::npos && nl >= pos) {
          end = nl + 1;
        } else {
          // One very long line: cut at a character boundary instead.
          while (end > pos + 1 && (static_cast<unsigned char>(text[end]) & 0xC0) == 0x80) --end;
        }
      }
      pieces.emplace_back(text.substr(pos, end - pos));
      pos = end;
    }
  }
  std::string user_symbols = fmt::format("\n,{}", kEndOfText);
  for (Language lang : all_languages())
    user_symbols += fmt::format(",{}", replace_all(language_tag_line(lang), " ", kSpaceSymbol));
  const std::unordered_map<std::string, std::string> args = {
      {"model_type", "bpe"},
      {"vocab_size", std::to_string(options.vocab_size)},
      {"normalization_rule_name", "identity"},
      {"remove_extra_whitespaces", "false"},
      {"add_dummy_prefix", "false"},
      {"allow_whitespace_only_pieces", "true"},
      {"split_digits", "true"},
      {"byte_fallback", "true"},
      {"character_coverage", fmt::format("{}", options.character_coverage)},
      {"max_sentence_length", std::to_string(options.max_sentence_bytes)},
      // 0 = use every piece: no random sampling, so training is deterministic.
      {"input_sentence_size", "0"},
      {"shuffle_input_sentence", "false"},
      {"max_sentencepiece_length", "16"},
      // vocab_size is an upper bound: a small corpus yields fewer pieces instead of failing.
      {"hard_vocab_limit", "false"},
      {"user_defined_symbols", user_symbols},
      {"unk_id", "0"},
      {"bos_id", "-1"},
      {"eos_id", "-1"},
      {"pad_id", "-1"},
      {"num_threads", std::to_string(std::max(1, options.num_threads))},
      {"minloglevel", "2"},
  };
  VectorIterator it(&pieces);
  std::string model;
  const auto status = sentencepiece::SentencePieceTrainer::Train(args, &it, &model);
  LOOM_CHECK(status.ok(),
             "SentencePiece training failed (vocab_size={}, {} training pieces): {}. A small "
             "corpus supports only a small vocab: lower --vocab",
             options.vocab_size, pieces.size(), status.ToString());
  return std::make_unique<SentencePieceTokenizer>(model);
}

}  // namespace loom::data
