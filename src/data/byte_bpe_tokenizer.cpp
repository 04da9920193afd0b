// data/byte_bpe_tokenizer.cpp: GPT-2 byte-level BPE + CodeGeeX whitespace tokens.
#include "data/byte_bpe_tokenizer.h"

#include <locale.h>
#include <wctype.h>

#include <filesystem>
#include <limits>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "data/text_util.h"

namespace loom::data {

namespace {

// GPT-2's byte -> code point table: printable Latin-1 bytes map to themselves, the other 68
// bytes to 256, 257, ... in byte order, so every byte has a visible, non-space character.
std::array<uint32_t, 256> byte_to_codepoint() {
  std::array<uint32_t, 256> table{};
  std::array<bool, 256> printable{};
  for (int b = 33; b <= 126; ++b) printable[b] = true;
  for (int b = 161; b <= 172; ++b) printable[b] = true;
  for (int b = 174; b <= 255; ++b) printable[b] = true;
  uint32_t next = 256;
  for (int b = 0; b < 256; ++b) table[b] = printable[b] ? uint32_t(b) : next++;
  return table;
}

void append_utf8(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out.push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out.push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out.push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out.push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

// Decodes one UTF-8 character at s[i]; returns its byte length (1 for an invalid byte, whose
// code point is reported as 0xFFFFFFFF).
int next_char(std::string_view s, size_t i, uint32_t& cp) {
  const auto c = static_cast<unsigned char>(s[i]);
  cp = 0xFFFFFFFFu;
  if (c < 0x80) {
    cp = c;
    return 1;
  }
  int len = (c & 0xE0) == 0xC0 ? 2 : (c & 0xF0) == 0xE0 ? 3 : (c & 0xF8) == 0xF0 ? 4 : 0;
  if (len == 0 || i + len > s.size()) return 1;
  if (!is_valid_utf8(s.substr(i, len))) return 1;
  uint32_t v = c & (0x7F >> len);
  for (int k = 1; k < len; ++k) v = (v << 6) | (static_cast<unsigned char>(s[i + k]) & 0x3F);
  cp = v;
  return len;
}

enum class CharClass : uint8_t { kLetter, kNumber, kSpace, kOther };

bool is_unicode_space(uint32_t cp) {
  switch (cp) {
    case 0x09: case 0x0A: case 0x0B: case 0x0C: case 0x0D: case 0x20: case 0x85: case 0xA0:
    case 0x1680: case 0x2028: case 0x2029: case 0x202F: case 0x205F: case 0x3000:
      return true;
    default:
      return cp >= 0x2000 && cp <= 0x200A;
  }
}

// glibc's UTF-8 character classes; created once, read-only afterwards.
locale_t utf8_locale() {
  static const locale_t loc = newlocale(LC_CTYPE_MASK, "C.UTF-8", static_cast<locale_t>(0));
  return loc;
}

CharClass classify(uint32_t cp) {
  if (cp == 0xFFFFFFFFu) return CharClass::kOther;
  if (cp < 0x80) {
    if ((cp >= 'a' && cp <= 'z') || (cp >= 'A' && cp <= 'Z')) return CharClass::kLetter;
    if (cp >= '0' && cp <= '9') return CharClass::kNumber;
    if (is_unicode_space(cp)) return CharClass::kSpace;
    return CharClass::kOther;
  }
  if (is_unicode_space(cp)) return CharClass::kSpace;
  const locale_t loc = utf8_locale();
  if (loc != static_cast<locale_t>(0)) {
    if (iswalpha_l(static_cast<wint_t>(cp), loc)) return CharClass::kLetter;
    if (iswalnum_l(static_cast<wint_t>(cp), loc)) return CharClass::kNumber;
  }
  return CharClass::kOther;
}

// One character of the text being pre-tokenized.
struct Char {
  uint32_t offset;
  uint32_t cp;
  CharClass cls;
};

// Splits `text` into GPT-2 pre-tokens, calling emit(begin_byte, end_byte) for each.
template <typename Emit>
void pretokenize(std::string_view text, Emit&& emit) {
  std::vector<Char> chars;
  chars.reserve(text.size());
  for (size_t i = 0; i < text.size();) {
    uint32_t cp;
    const int len = next_char(text, i, cp);
    chars.push_back({static_cast<uint32_t>(i), cp, classify(cp)});
    i += len;
  }
  const size_t n = chars.size();
  auto off = [&](size_t k) { return k < n ? size_t(chars[k].offset) : text.size(); };
  auto is_ascii = [&](size_t k, char c) { return k < n && chars[k].cp == uint32_t(c); };
  size_t i = 0;
  while (i < n) {
    // Contractions: 's 't 'm 'd 're 've 'll.
    if (chars[i].cp == '\'') {
      size_t len = 0;
      if (is_ascii(i + 1, 's') || is_ascii(i + 1, 't') || is_ascii(i + 1, 'm') ||
          is_ascii(i + 1, 'd'))
        len = 2;
      if ((is_ascii(i + 1, 'r') && is_ascii(i + 2, 'e')) ||
          (is_ascii(i + 1, 'v') && is_ascii(i + 2, 'e')) ||
          (is_ascii(i + 1, 'l') && is_ascii(i + 2, 'l')))
        len = 3;
      if (len > 0) {
        emit(off(i), off(i + len));
        i += len;
        continue;
      }
    }
    // " ?\p{L}+", " ?\p{N}+", " ?[^\s\p{L}\p{N}]+": an optional space, then one class run.
    size_t j = i;
    if (chars[i].cp == ' ' && i + 1 < n && chars[i + 1].cls != CharClass::kSpace) j = i + 1;
    if (chars[j].cls != CharClass::kSpace) {
      const CharClass c = chars[j].cls;
      size_t e = j + 1;
      while (e < n && chars[e].cls == c) ++e;
      emit(off(i), off(e));
      i = e;
      continue;
    }
    // "\s+(?!\S)|\s+": a whitespace run; if text follows, its last character is left to prefix
    // (when it is ' ') or stand before the text.
    size_t e = i + 1;
    while (e < n && chars[e].cls == CharClass::kSpace) ++e;
    if (e == n || e - i == 1) {
      emit(off(i), off(e));
      i = e;
    } else {
      emit(off(i), off(e - 1));
      i = e - 1;
    }
  }
}

int32_t json_id(const nlohmann::json& v, const std::string& what, const std::string& key) {
  LOOM_CHECK(v.is_number_integer(), "{}: value of '{}' is not an integer id", what, key);
  const auto id = v.get<int64_t>();
  LOOM_CHECK(id >= 0 && id < std::numeric_limits<int32_t>::max(), "{}: id {} of '{}' out of range",
             what, id, key);
  return static_cast<int32_t>(id);
}

}  // namespace

ByteBpeTokenizer::ByteBpeTokenizer(std::string vocab_json, std::string merges_txt,
                                   std::string added_tokens_json)
    : vocab_json_(std::move(vocab_json)),
      merges_txt_(std::move(merges_txt)),
      added_tokens_json_(std::move(added_tokens_json)) {
  nlohmann::json vocab, added = nlohmann::json::object();
  try {
    vocab = nlohmann::json::parse(vocab_json_);
    if (!added_tokens_json_.empty()) added = nlohmann::json::parse(added_tokens_json_);
  } catch (const nlohmann::json::exception& e) {
    LOOM_FAIL("vocab.json/added_tokens.json is not valid JSON: {}", e.what());
  }
  LOOM_CHECK(vocab.is_object() && !vocab.empty(), "vocab.json must be a non-empty object");
  LOOM_CHECK(added.is_object(), "added_tokens.json must be an object {{token: id}}");

  std::unordered_map<std::string, int32_t> token_to_id;
  int32_t max_id = -1;
  for (auto& [tok, v] : vocab.items()) {
    const int32_t id = json_id(v, "vocab.json", tok);
    token_to_id[tok] = id;
    max_id = std::max(max_id, id);
  }
  std::unordered_map<int32_t, std::string> added_by_id;
  for (auto& [tok, v] : added.items()) {
    const int32_t id = json_id(v, "added_tokens.json", tok);
    added_by_id[id] = tok;
    max_id = std::max(max_id, id);
  }
  vocab_size_ = int64_t(max_id) + 1;
  surfaces_.assign(vocab_size_, {});
  known_.assign(vocab_size_, 0);

  // Ordinary tokens decode through the inverse byte table.
  const auto b2c = byte_to_codepoint();
  std::unordered_map<uint32_t, uint8_t> c2b;
  for (int b = 0; b < 256; ++b) c2b[b2c[b]] = static_cast<uint8_t>(b);
  for (auto& [tok, id] : token_to_id) {
    std::string bytes;
    bool ok = true;
    for (size_t i = 0; i < tok.size();) {
      uint32_t cp;
      i += next_char(tok, i, cp);
      auto it = c2b.find(cp);
      if (it == c2b.end()) {
        ok = false;
        break;
      }
      bytes.push_back(static_cast<char>(it->second));
    }
    // Tokens outside the byte alphabet (e.g. "<|endoftext|>") decode to their own text.
    surfaces_[id] = ok ? bytes : tok;
    known_[id] = 1;
  }
  for (int b = 0; b < 256; ++b) {
    std::string ch;
    append_utf8(ch, b2c[b]);
    auto it = token_to_id.find(ch);
    LOOM_CHECK(it != token_to_id.end(),
               "vocab.json lacks the byte token '{}' for byte 0x{:02X}; a byte-level BPE vocab "
               "must contain all 256 byte tokens",
               ch, b);
    byte_ids_[b] = it->second;
  }
  const std::string eot(kEndOfText);
  if (auto it = token_to_id.find(eot); it != token_to_id.end()) eod_id_ = it->second;
  ws_ids_.fill(-1);
  for (auto& [id, tok] : added_by_id) {
    surfaces_[id] = tok;
    known_[id] = 1;
    if (tok == eot) eod_id_ = id;
  }
  LOOM_CHECK(eod_id_ >= 0, "neither vocab.json nor added_tokens.json has '{}'", kEndOfText);
  // CodeGeeX: <|extratoken_{k+8}|> stands for k spaces, k in [2, 10].
  std::array<int32_t, 11> ws{};
  ws.fill(-1);
  bool all = true;
  for (int k = 2; k <= 10; ++k) {
    const std::string name = fmt::format("<|extratoken_{}|>", k + 8);
    int32_t id = -1;
    for (auto& [aid, tok] : added_by_id)
      if (tok == name) id = aid;
    ws[k] = id;
    all = all && id >= 0;
  }
  if (all) {
    ws_ids_ = ws;
    for (int k = 2; k <= 10; ++k) surfaces_[ws_ids_[k]] = std::string(size_t(k), ' ');
  }

  // merges.txt: optional "#version" header, then "left right" per line in rank order.
  int32_t rank = 0;
  size_t pos = 0, line_no = 0;
  while (pos < merges_txt_.size()) {
    size_t end = merges_txt_.find('\n', pos);
    if (end == std::string::npos) end = merges_txt_.size();
    std::string_view line(merges_txt_.data() + pos, end - pos);
    pos = end + 1;
    ++line_no;
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    if (line.empty() || (line_no == 1 && line.starts_with("#version"))) continue;
    const size_t sp = line.find(' ');
    LOOM_CHECK(sp != std::string_view::npos && sp > 0 && sp + 1 < line.size(),
               "merges.txt line {}: expected 'left right', got '{}'", line_no, line);
    const std::string left(line.substr(0, sp)), right(line.substr(sp + 1));
    auto l = token_to_id.find(left), r = token_to_id.find(right),
         m = token_to_id.find(left + right);
    LOOM_CHECK(l != token_to_id.end() && r != token_to_id.end() && m != token_to_id.end(),
               "merges.txt line {}: '{}' + '{}' uses a token missing from vocab.json", line_no,
               left, right);
    const uint64_t key = (uint64_t(uint32_t(l->second)) << 32) | uint32_t(r->second);
    merges_.emplace(key, std::make_pair(rank++, m->second));  // first (best) rank wins
  }
}

std::unique_ptr<ByteBpeTokenizer> ByteBpeTokenizer::from_dir(const std::string& dir) {
  namespace fs = std::filesystem;
  const std::string added_path = dir + "/added_tokens.json";
  std::string added = fs::exists(added_path) ? read_file(added_path) : std::string();
  return std::make_unique<ByteBpeTokenizer>(read_file(dir + "/vocab.json"),
                                            read_file(dir + "/merges.txt"), std::move(added));
}

void ByteBpeTokenizer::bpe_word(std::string_view word, std::vector<int32_t>& out) const {
  std::vector<int32_t> syms;  // (len) current symbols of this pre-token
  syms.reserve(word.size());
  for (unsigned char c : word) syms.push_back(byte_ids_[c]);
  while (syms.size() >= 2) {
    int32_t best_rank = std::numeric_limits<int32_t>::max(), best_id = -1;
    uint64_t best_key = 0;
    for (size_t k = 0; k + 1 < syms.size(); ++k) {
      const uint64_t key = (uint64_t(uint32_t(syms[k])) << 32) | uint32_t(syms[k + 1]);
      auto it = merges_.find(key);
      if (it != merges_.end() && it->second.first < best_rank) {
        best_rank = it->second.first;
        best_id = it->second.second;
        best_key = key;
      }
    }
    if (best_id < 0) break;
    // Merge every occurrence of the best pair, left to right (GPT-2's rule).
    std::vector<int32_t> next;
    next.reserve(syms.size());
    for (size_t k = 0; k < syms.size(); ++k) {
      if (k + 1 < syms.size() &&
          ((uint64_t(uint32_t(syms[k])) << 32) | uint32_t(syms[k + 1])) == best_key) {
        next.push_back(best_id);
        ++k;
      } else {
        next.push_back(syms[k]);
      }
    }
    syms.swap(next);
  }
  out.insert(out.end(), syms.begin(), syms.end());
}

void ByteBpeTokenizer::encode_plain(std::string_view text, std::vector<int32_t>& out) const {
  pretokenize(text, [&](size_t b, size_t e) { bpe_word(text.substr(b, e - b), out); });
}

void ByteBpeTokenizer::encode_spaces_and_plain(std::string_view text,
                                               std::vector<int32_t>& out) const {
  if (!has_whitespace_tokens()) {
    encode_plain(text, out);
    return;
  }
  // Plain text runs from `plain_begin`; runs of >= 2 spaces are cut out as whitespace tokens.
  size_t plain_begin = 0, i = 0;
  while (i < text.size()) {
    if (text[i] != ' ') {
      ++i;
      continue;
    }
    size_t e = i;
    while (e < text.size() && text[e] == ' ') ++e;
    const size_t run = e - i;
    if (run < 2) {
      i = e;
      continue;
    }
    encode_plain(text.substr(plain_begin, i - plain_begin), out);
    for (size_t k = 0; k < run / 10; ++k) out.push_back(ws_ids_[10]);
    const size_t rest = run % 10;
    if (rest >= 2) out.push_back(ws_ids_[rest]);
    // A single leftover space stays in the text, in front of what follows.
    plain_begin = rest == 1 ? e - 1 : e;
    i = e;
  }
  encode_plain(text.substr(plain_begin), out);
}

std::vector<int32_t> ByteBpeTokenizer::encode(std::string_view text) const {
  std::vector<int32_t> out;
  out.reserve(text.size() / 3 + 4);
  size_t pos = 0;
  while (true) {
    const size_t hit = text.find(kEndOfText, pos);
    const size_t end = hit == std::string_view::npos ? text.size() : hit;
    encode_spaces_and_plain(text.substr(pos, end - pos), out);
    if (hit == std::string_view::npos) break;
    out.push_back(eod_id_);
    pos = hit + kEndOfText.size();
  }
  return out;
}

std::string ByteBpeTokenizer::decode(std::span<const int32_t> ids) const {
  std::string out;
  out.reserve(ids.size() * 4);
  for (size_t i = 0; i < ids.size(); ++i) {
    const int32_t id = ids[i];
    LOOM_CHECK(id >= 0 && id < vocab_size_ && known_[id],
               "token id {} at position {} is not in the vocabulary (size {})", id, i,
               vocab_size_);
    out += surfaces_[id];
  }
  return out;
}

void ByteBpeTokenizer::save_to_dir(const std::string& dir) const {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  LOOM_CHECK(!ec, "cannot create tokenizer directory '{}': {}", dir, ec.message());
  write_file_atomic(dir + "/vocab.json", vocab_json_);
  write_file_atomic(dir + "/merges.txt", merges_txt_);
  if (!added_tokens_json_.empty()) write_file_atomic(dir + "/added_tokens.json", added_tokens_json_);
  nlohmann::json meta = {{"kind", kind()},
                         {"vocab_size", vocab_size_},
                         {"eod_id", eod_id_},
                         {"whitespace_tokens", has_whitespace_tokens()}};
  write_file_atomic(dir + "/tokenizer.json", meta.dump(2) + "\n");
}

}  // namespace loom::data
