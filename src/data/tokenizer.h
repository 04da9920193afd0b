// data/tokenizer.h: text <-> token ids, for training data and for generation.
//
// Glossary: V vocab size; EOD end-of-document token ("<|endoftext|>"); a *tag* is the language
// tag line (data/languages.h). Two kinds implement the interface:
//   - "sentencepiece": BPE trained on code by loom (data/sp_tokenizer.h);
//   - "byte_bpe": GPT-2 byte-level BPE read from vocab.json + merges.txt (+ added_tokens.json),
//     with CodeGeeX's whitespace tokens (data/byte_bpe_tokenizer.h).
// Contract shared by both: decode(encode(text)) == text for every byte string `text` (invalid
// UTF-8 included for byte_bpe; for sentencepiece, any valid UTF-8 text); encode/decode are const
// and safe to call from several threads at once. The literal text "<|endoftext|>" encodes to
// eod_id() (as GPT-2 does), and decode(eod_id()) gives it back, so the round trip still holds.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "data/languages.h"

namespace loom::data {

inline constexpr std::string_view kEndOfText = "<|endoftext|>";

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;
  // "sentencepiece" or "byte_bpe"; written to tokenizer.json by save_to_dir.
  virtual std::string kind() const = 0;
  virtual std::vector<int32_t> encode(std::string_view text) const = 0;
  // Throws loom::Error naming the id if any id is outside [0, vocab_size()).
  virtual std::string decode(std::span<const int32_t> ids) const = 0;
  virtual int64_t vocab_size() const = 0;
  virtual int32_t eod_id() const = 0;
  // The single token of `lang`'s tag line if the vocabulary has one (sentencepiece tokenizers
  // trained by loom do), else nullopt (byte_bpe: the tag line is ordinary text).
  virtual std::optional<int32_t> language_tag_id(Language lang) const = 0;
  // Writes everything load_from_dir needs into `dir` (created if missing): tokenizer.json
  // ({"kind": ...}) plus the model files. Overwrites files of the same names.
  virtual void save_to_dir(const std::string& dir) const = 0;

  // Tokens of one training document: tag line, "\n", content. No EOD (the caller appends it).
  std::vector<int32_t> encode_document(Language lang, std::string_view content) const;
};

// Loads a tokenizer saved by save_to_dir, detecting the kind: `path` may be
//   - a directory with tokenizer.json (written by loom),
//   - a directory with vocab.json + merges.txt (a GPT-2 / CodeGeeX tokenizer folder),
//   - a SentencePiece .model file (or a directory holding exactly one tokenizer.model/sp.model).
// Throws loom::Error naming the path and what is missing.
std::unique_ptr<Tokenizer> load_tokenizer(const std::string& path);

}  // namespace loom::data
