// data/shard.cpp: shard writer and validating mmap reader (format in shard.h).
#include "data/shard.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstddef>
#include <cstring>
#include <utility>

#include "core/error.h"
#include "data/text_util.h"

namespace loom::data {

namespace {

constexpr char kMagic[8] = {'L', 'O', 'O', 'M', 'T', 'O', 'K', '1'};

struct Header {
  char magic[8];
  uint32_t version;
  uint32_t token_bytes;
  uint64_t token_count;
  uint64_t doc_count;
  uint64_t vocab_size;
  uint32_t payload_crc;
  uint32_t reserved[4];
  uint32_t header_crc;
};
static_assert(sizeof(Header) == kShardHeaderBytes);

uint64_t padded_token_bytes(uint64_t n, uint64_t width) { return (n * width + 7) / 8 * 8; }

}  // namespace

ShardWriter::ShardWriter(int64_t vocab_size, int token_bytes)
    : vocab_size_(vocab_size), token_bytes_(token_bytes) {
  LOOM_CHECK(token_bytes == 2 || token_bytes == 4, "token_bytes={} must be 2 or 4", token_bytes);
  LOOM_CHECK(vocab_size > 0 && (token_bytes == 4 || vocab_size <= 65536),
             "vocab_size={} does not fit {}-byte tokens (u16 holds at most 65536)", vocab_size,
             token_bytes);
}

void ShardWriter::add_document(std::span<const int32_t> tokens, int32_t language) {
  const uint64_t begin = tokens_.size();
  for (int32_t t : tokens) {
    LOOM_CHECK(t >= 0 && t < vocab_size_, "token {} outside [0, {}) in document {}", t,
               vocab_size_, docs_.size());
    tokens_.push_back(static_cast<uint32_t>(t));
  }
  docs_.push_back({begin, tokens_.size(), language, 0});
}

void ShardWriter::write(const std::string& path) {
  Header h{};
  std::memcpy(h.magic, kMagic, 8);
  h.version = kShardVersion;
  h.token_bytes = static_cast<uint32_t>(token_bytes_);
  h.token_count = tokens_.size();
  h.doc_count = docs_.size();
  h.vocab_size = static_cast<uint64_t>(vocab_size_);
  const uint64_t tok_bytes = padded_token_bytes(tokens_.size(), token_bytes_);
  std::string body(tok_bytes + docs_.size() * sizeof(ShardDocument), '\0');  // after the header
  if (token_bytes_ == 2) {
    auto* p = reinterpret_cast<uint16_t*>(body.data());
    for (size_t i = 0; i < tokens_.size(); ++i) p[i] = static_cast<uint16_t>(tokens_[i]);
  } else {
    std::memcpy(body.data(), tokens_.data(), tokens_.size() * 4);
  }
  std::memcpy(body.data() + tok_bytes, docs_.data(), docs_.size() * sizeof(ShardDocument));
  h.payload_crc = crc32c(0, body.data(), body.size());
  h.header_crc = crc32c(0, &h, offsetof(Header, header_crc));
  std::string file(reinterpret_cast<const char*>(&h), sizeof(h));
  file += body;
  write_file_atomic(path, file);
  tokens_.clear();
  docs_.clear();
}

ShardReader::ShardReader(const std::string& path) : path_(path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  LOOM_CHECK(fd >= 0, "shard '{}': cannot open: {}", path, std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    LOOM_FAIL("shard '{}': fstat failed: {}", path, std::strerror(err));
  }
  const auto size = static_cast<uint64_t>(st.st_size);
  if (size < sizeof(Header)) {
    ::close(fd);
    LOOM_FAIL("shard '{}': truncated: {} bytes, shorter than the {}-byte header", path, size,
              sizeof(Header));
  }
  void* map = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
  const int err = errno;
  ::close(fd);
  LOOM_CHECK(map != MAP_FAILED, "shard '{}': mmap of {} bytes failed: {}", path, size,
             std::strerror(err));
  map_ = map;
  map_bytes_ = size;
  try {
    Header h;
    std::memcpy(&h, map_, sizeof(h));
    LOOM_CHECK(std::memcmp(h.magic, kMagic, 8) == 0,
               "shard '{}': wrong magic (not a loom token shard, expected \"LOOMTOK1\")", path);
    LOOM_CHECK(h.version == kShardVersion,
               "shard '{}': unsupported version {} (this build reads version {}); rebuild the "
               "corpus with this loom",
               path, h.version, kShardVersion);
    LOOM_CHECK(crc32c(0, &h, offsetof(Header, header_crc)) == h.header_crc,
               "shard '{}': header checksum mismatch (header corrupted)", path);
    LOOM_CHECK(h.token_bytes == 2 || h.token_bytes == 4, "shard '{}': bad token width {}", path,
               h.token_bytes);
    // Every count in the header is bounded by the file size before it enters a product, so a
    // corrupted or hostile header cannot wrap the expected size around to the real one.
    LOOM_CHECK(h.vocab_size >= 1 && h.vocab_size <= uint64_t(kMaxShardVocab),
               "shard '{}': header vocab size {} is outside [1, {}] (token ids are int32); the "
               "file is corrupted, rebuild it with `loom data build`",
               path, h.vocab_size, kMaxShardVocab);
    LOOM_CHECK(h.token_bytes == 4 || h.vocab_size <= 65536,
               "shard '{}': header vocab size {} does not fit its 2-byte tokens (at most 65536)",
               path, h.vocab_size);
    const uint64_t body = size - sizeof(Header);
    LOOM_CHECK(h.token_count <= body / h.token_bytes,
               "shard '{}': truncated: header says {} tokens of {} bytes, but only {} bytes follow "
               "the header",
               path, h.token_count, h.token_bytes, body);
    const uint64_t tok_bytes = padded_token_bytes(h.token_count, h.token_bytes);
    const uint64_t index_room = body >= tok_bytes ? body - tok_bytes : 0;
    LOOM_CHECK(h.doc_count <= index_room / sizeof(ShardDocument),
               "shard '{}': truncated: header says {} documents ({} bytes each), but only {} "
               "bytes follow the tokens",
               path, h.doc_count, sizeof(ShardDocument), index_room);
    const uint64_t expect = sizeof(Header) + tok_bytes + h.doc_count * sizeof(ShardDocument);
    LOOM_CHECK(size >= expect, "shard '{}': truncated: {} bytes, header says {}", path, size,
               expect);
    LOOM_CHECK(size == expect, "shard '{}': {} trailing bytes after the document index", path,
               size - expect);
    const auto* base = static_cast<const unsigned char*>(map_);
    LOOM_CHECK(crc32c(0, base + sizeof(Header), size - sizeof(Header)) == h.payload_crc,
               "shard '{}': checksum mismatch in tokens/document index (file corrupted)", path);
    token_bytes_ = static_cast<int>(h.token_bytes);
    token_count_ = static_cast<int64_t>(h.token_count);
    vocab_size_ = static_cast<int64_t>(h.vocab_size);
    tokens_ = base + sizeof(Header);
    // Token ids index embedding tables and counters downstream: one out-of-range id would be
    // an out-of-bounds access there, so the whole file is checked here, once.
    int64_t max_token = -1;
    for (int64_t i = 0; i < token_count_; ++i) {
      const int32_t t = token(i);  // u32 ids >= 2^31 read as negative
      if (t < 0 || uint64_t(t) >= h.vocab_size)
        LOOM_FAIL("shard '{}': token {} at position {} is outside the header's vocabulary [0, {}); "
                  "the file is corrupted, rebuild it with `loom data build`",
                  path, token_bytes_ == 4 ? uint64_t(static_cast<const uint32_t*>(tokens_)[i])
                                          : uint64_t(t),
                  i, h.vocab_size);
      max_token = std::max<int64_t>(max_token, t);
    }
    max_token_ = max_token;
    docs_ = {reinterpret_cast<const ShardDocument*>(base + sizeof(Header) + tok_bytes),
             static_cast<size_t>(h.doc_count)};
    uint64_t at = 0;
    for (size_t d = 0; d < docs_.size(); ++d) {
      LOOM_CHECK(docs_[d].begin == at && docs_[d].end > docs_[d].begin &&
                     docs_[d].end <= h.token_count,
                 "shard '{}': document {} spans [{}, {}), expected to start at {} and end by {}",
                 path, d, docs_[d].begin, docs_[d].end, at, h.token_count);
      at = docs_[d].end;
    }
    LOOM_CHECK(at == h.token_count, "shard '{}': documents cover {} of {} tokens", path, at,
               h.token_count);
  } catch (...) {
    ::munmap(map_, map_bytes_);
    map_ = nullptr;
    throw;
  }
}

ShardReader::~ShardReader() {
  if (map_ != nullptr) ::munmap(map_, map_bytes_);
}

ShardReader::ShardReader(ShardReader&& o) noexcept { *this = std::move(o); }

ShardReader& ShardReader::operator=(ShardReader&& o) noexcept {
  if (this != &o) {
    if (map_ != nullptr) ::munmap(map_, map_bytes_);
    path_ = std::move(o.path_);
    map_ = std::exchange(o.map_, nullptr);
    map_bytes_ = std::exchange(o.map_bytes_, 0);
    tokens_ = o.tokens_;
    token_count_ = o.token_count_;
    vocab_size_ = o.vocab_size_;
    token_bytes_ = o.token_bytes_;
    max_token_ = o.max_token_;
    docs_ = o.docs_;
  }
  return *this;
}

void ShardReader::copy_tokens(int64_t begin, int64_t n, int32_t* out) const {
  LOOM_ASSERT(begin >= 0 && n >= 0 && begin + n <= token_count_, "copy [{}, +{}) of {} tokens",
              begin, n, token_count_);
  if (token_bytes_ == 2) {
    const auto* p = static_cast<const uint16_t*>(tokens_) + begin;
    for (int64_t k = 0; k < n; ++k) out[k] = p[k];
  } else {
    const auto* p = static_cast<const uint32_t*>(tokens_) + begin;
    for (int64_t k = 0; k < n; ++k) out[k] = static_cast<int32_t>(p[k]);
  }
}

int64_t ShardReader::document_of(int64_t token_index) const {
  auto it = std::upper_bound(docs_.begin(), docs_.end(), uint64_t(token_index),
                             [](uint64_t v, const ShardDocument& d) { return v < d.begin; });
  return static_cast<int64_t>(it - docs_.begin()) - 1;
}

}  // namespace loom::data
