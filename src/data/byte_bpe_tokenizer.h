// data/byte_bpe_tokenizer.h: GPT-2 byte-level BPE (vocab.json + merges.txt + added_tokens.json)
// with CodeGeeX's whitespace tokens, so a CodeGeeX-format tokenizer folder works with loom.
//
// Encoding, in order:
//   1. the literal "<|endoftext|>" becomes the EOD id;
//   2. if the added tokens include <|extratoken_10|>..<|extratoken_18|> (CodeGeeX), a run of n
//      spaces becomes floor(n/10) x ws(10), then ws(n%10) if n%10 >= 2, and a single leftover
//      space stays in the text in front of what follows (CodeGeeX's greedy longest-first string
//      replacement, ws(k) = <|extratoken_{k+8}|>);
//   3. the rest is split by GPT-2's pre-tokenizer pattern ('s 't 're 've 'm 'll 'd, ?letters,
//      ?digits, ?other, whitespace runs), each piece is mapped byte-by-byte to GPT-2's printable
//      byte alphabet and merged by merge rank.
// Letters/digits outside ASCII are classified with glibc's C.UTF-8 tables, which can differ from
// Unicode \p{L}/\p{N} on rare characters (ids may then differ from Hugging Face's; the round
// trip is unaffected). Bytes that are not valid UTF-8 are single "other" characters, so any byte
// string round-trips. Other added tokens appearing literally in text are encoded as plain text.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "data/tokenizer.h"

namespace loom::data {

class ByteBpeTokenizer final : public Tokenizer {
 public:
  // From the contents of vocab.json, merges.txt and added_tokens.json (empty string if none).
  // Throws loom::Error if the vocab lacks one of the 256 byte tokens or "<|endoftext|>", or a
  // merge names a token that is not in the vocab.
  ByteBpeTokenizer(std::string vocab_json, std::string merges_txt, std::string added_tokens_json);
  // Reads DIR/vocab.json, DIR/merges.txt and (optional) DIR/added_tokens.json.
  static std::unique_ptr<ByteBpeTokenizer> from_dir(const std::string& dir);

  std::string kind() const override { return "byte_bpe"; }
  std::vector<int32_t> encode(std::string_view text) const override;
  std::string decode(std::span<const int32_t> ids) const override;
  int64_t vocab_size() const override { return vocab_size_; }
  int32_t eod_id() const override { return eod_id_; }
  std::optional<int32_t> language_tag_id(Language) const override { return std::nullopt; }
  void save_to_dir(const std::string& dir) const override;

  // Whether CodeGeeX whitespace tokens are in use, and the id for a run of n in [2, 10] spaces.
  bool has_whitespace_tokens() const { return ws_ids_[2] >= 0; }
  int32_t whitespace_id(int n) const { return ws_ids_.at(n); }

 private:
  void encode_plain(std::string_view text, std::vector<int32_t>& out) const;
  void encode_spaces_and_plain(std::string_view text, std::vector<int32_t>& out) const;
  void bpe_word(std::string_view word, std::vector<int32_t>& out) const;

  std::string vocab_json_, merges_txt_, added_tokens_json_;  // kept for save_to_dir
  int64_t vocab_size_ = 0;
  int32_t eod_id_ = -1;
  std::array<int32_t, 256> byte_ids_{};       // token id of each raw byte
  std::array<int32_t, 11> ws_ids_{};          // [n] id of a run of n spaces, -1 if none
  std::vector<std::string> surfaces_;         // (V) decoded bytes of each id
  std::vector<uint8_t> known_;                // (V) 1 if the id has a token
  // (left id << 32 | right id) -> (rank, merged id)
  std::unordered_map<uint64_t, std::pair<int32_t, int32_t>> merges_;
};

}  // namespace loom::data
