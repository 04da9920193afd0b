// data/shard.h: the token shard file format, its writer and its memory-mapped reader.
//
// A shard holds whole documents: each document's tokens end with the EOD token and the
// document index records where each one starts and ends and its language id (languages.h;
// -1 = unknown). Layout, little-endian:
//   [0, 64)      header
//       0  char[8] magic "LOOMTOK1"
//       8  u32     format version (kShardVersion)
//      12  u32     bytes per token: 2 (u16) or 4 (u32)
//      16  u64     token count N
//      24  u64     document count D
//      32  u64     vocab size V (every token < V)
//      40  u32     CRC-32C of everything after the header (tokens, padding, index)
//      44  u32[4]  reserved, zero
//      60  u32     CRC-32C of header bytes [0, 60)
//   [64, 64 + pad8(N * bytes per token))          tokens, zero-padded to a multiple of 8 bytes
//   then D x 24 bytes                             {u64 begin, u64 end, i32 language, u32 zero}
// Documents are contiguous and cover [0, N) in order. A reader rejects, naming the shard: a
// file shorter than the header or than the header says ("truncated"), a wrong magic, another
// version, a checksum mismatch, an index that is not contiguous or exceeds N, a header vocab
// outside [1, kMaxShardVocab] and any token >= the header's vocab. Header counts are bounded by
// the file size before they are multiplied, so no size computation can wrap.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

namespace loom::data {

inline constexpr uint32_t kShardVersion = 1;
inline constexpr int64_t kShardHeaderBytes = 64;
// Token ids are int32 everywhere (loader, embedding): a header may not claim a larger vocabulary.
inline constexpr int64_t kMaxShardVocab = int64_t(1) << 31;

struct ShardDocument {
  uint64_t begin = 0;  // first token (inclusive)
  uint64_t end = 0;    // one past the last token (its EOD)
  int32_t language = -1;
  uint32_t reserved = 0;
};
static_assert(sizeof(ShardDocument) == 24);

// Collects documents in memory and writes one shard file.
class ShardWriter {
 public:
  // token_bytes: 2 requires vocab_size <= 65536; 4 otherwise.
  ShardWriter(int64_t vocab_size, int token_bytes);
  // Appends one document (its tokens should already end with EOD). Throws loom::Error if a
  // token is outside [0, vocab_size).
  void add_document(std::span<const int32_t> tokens, int32_t language);
  int64_t token_count() const { return static_cast<int64_t>(tokens_.size()); }
  int64_t document_count() const { return static_cast<int64_t>(docs_.size()); }
  // Writes the shard atomically (path.tmp, then rename) and clears the writer.
  void write(const std::string& path);

 private:
  int64_t vocab_size_;
  int token_bytes_;
  std::vector<uint32_t> tokens_;  // (N)
  std::vector<ShardDocument> docs_;  // (D)
};

// A validated, read-only, memory-mapped shard. Movable, not copyable.
class ShardReader {
 public:
  // Maps and validates `path` (all checks above, including both checksums). Throws loom::Error
  // "shard '<path>': <problem>" on any failure.
  explicit ShardReader(const std::string& path);
  ~ShardReader();
  ShardReader(ShardReader&& other) noexcept;
  ShardReader& operator=(ShardReader&& other) noexcept;
  ShardReader(const ShardReader&) = delete;
  ShardReader& operator=(const ShardReader&) = delete;

  const std::string& path() const { return path_; }
  int64_t token_count() const { return token_count_; }
  int64_t vocab_size() const { return vocab_size_; }
  int token_bytes() const { return token_bytes_; }
  // The largest token id in the shard (-1 when empty); always < vocab_size().
  int64_t max_token() const { return max_token_; }
  std::span<const ShardDocument> documents() const { return docs_; }
  int32_t token(int64_t i) const {
    return token_bytes_ == 2 ? int32_t(static_cast<const uint16_t*>(tokens_)[i])
                             : int32_t(static_cast<const uint32_t*>(tokens_)[i]);
  }
  // out[k] = token(begin + k) for k in [0, n); requires begin + n <= token_count().
  void copy_tokens(int64_t begin, int64_t n, int32_t* out) const;
  // Index of the document holding token i (binary search).
  int64_t document_of(int64_t token_index) const;

 private:
  std::string path_;
  void* map_ = nullptr;
  size_t map_bytes_ = 0;
  const void* tokens_ = nullptr;
  int64_t token_count_ = 0;
  int64_t vocab_size_ = 0;
  int token_bytes_ = 0;
  int64_t max_token_ = -1;
  std::span<const ShardDocument> docs_;
};

}  // namespace loom::data
