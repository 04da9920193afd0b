// data/sp_tokenizer.h: SentencePiece BPE trained on code.
//
// Training settings keep code intact: identity normalisation (no NFKC, no whitespace folding,
// no dummy prefix), whitespace-only pieces allowed so indentation runs ("▁▁▁▁▁▁▁▁") become single
// tokens, byte fallback so any UTF-8 character outside the learned alphabet is spelled as
// <0xNN> byte tokens, and user-defined symbols for "\n", EOD and every language tag line.
// Decoding is done by loom (not SentencePiece's decoder) so that byte pieces and a literal
// U+2581 in the source survive exactly.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "data/tokenizer.h"

namespace sentencepiece {
class SentencePieceProcessor;
}

namespace loom::data {

struct SentencePieceTrainOptions {
  int64_t vocab_size = 16384;  // upper bound: a small corpus may give fewer pieces
  // Training text is cut at line boundaries into pieces of at most this many bytes
  // (SentencePiece drops longer "sentences").
  int64_t max_sentence_bytes = 8192;
  // Characters covering this fraction of the training text get their own piece; the rest use
  // byte fallback.
  double character_coverage = 0.9999;
  int num_threads = 2;
};

class SentencePieceTokenizer final : public Tokenizer {
 public:
  // From a serialized ModelProto (the bytes of a .model file). Throws loom::Error if it does not
  // parse or lacks byte fallback pieces or the EOD symbol.
  explicit SentencePieceTokenizer(const std::string& serialized_model);
  ~SentencePieceTokenizer() override;

  std::string kind() const override { return "sentencepiece"; }
  std::vector<int32_t> encode(std::string_view text) const override;
  std::string decode(std::span<const int32_t> ids) const override;
  int64_t vocab_size() const override { return vocab_size_; }
  int32_t eod_id() const override { return eod_id_; }
  std::optional<int32_t> language_tag_id(Language lang) const override;
  void save_to_dir(const std::string& dir) const override;

  const std::string& serialized_model() const { return serialized_; }

 private:
  void encode_plain(std::string_view text, std::vector<int32_t>& out) const;

  std::string serialized_;
  std::unique_ptr<sentencepiece::SentencePieceProcessor> sp_;
  int64_t vocab_size_ = 0;
  int32_t eod_id_ = -1;
  std::vector<int32_t> byte_ids_;      // (256) id of <0xNN>
  std::vector<int32_t> tag_ids_;       // (kNumLanguages) id of each tag line, -1 if absent
  std::vector<std::string> surfaces_;  // (V) decoded text of each non-byte piece
  std::vector<int16_t> byte_of_id_;    // (V) byte value of a byte piece, -1 otherwise
};

// Trains a tokenizer on `texts` (each a document, e.g. tag line + "\n" + file content). Texts
// must be valid UTF-8 (the caller filters; SentencePiece would silently replace invalid bytes).
// Deterministic for the same texts and options. Throws loom::Error with SentencePiece's message
// on failure (e.g. vocab_size too large for a tiny corpus).
std::unique_ptr<SentencePieceTokenizer> train_sentencepiece(
    const std::vector<std::string_view>& texts, const SentencePieceTrainOptions& options);

}  // namespace loom::data
