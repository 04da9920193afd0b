// Token shard format: round trip and detection of every kind of damage.
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>

#include "core/error.h"
#include "data/shard.h"
#include "data/text_util.h"
#include "data/token_stream.h"
#include "sample_corpus.h"

namespace loom::data {
namespace {

// Writes a shard with 3 documents of known tokens; returns its path.
std::string write_sample(const std::string& dir, int token_bytes, int64_t vocab) {
  ShardWriter w(vocab, token_bytes);
  std::vector<int32_t> a = {1, 2, 3, 0}, b = {int32_t(vocab - 1), 5, 0}, c = {7, 0};
  w.add_document(a, 0);
  w.add_document(b, 5);
  w.add_document(c, -1);
  const std::string path = dir + "/train_00000.bin";
  w.write(path);
  return path;
}

// Expects ShardReader(path) to throw a message containing the path and `what`.
void expect_rejected(const std::string& path, const std::string& what) {
  try {
    ShardReader r(path);
    FAIL() << "shard accepted, expected: " << what;
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find(path), std::string::npos) << msg;
    EXPECT_NE(msg.find(what), std::string::npos) << msg;
  }
}

TEST(Shard, RoundTripBothWidths) {
  testing::ScratchDir dir("shard_rt");
  for (int width : {2, 4}) {
    const int64_t vocab = width == 2 ? 65536 : 100000;
    const std::string path = write_sample(dir.path(), width, vocab);
    ShardReader r(path);
    EXPECT_EQ(r.token_bytes(), width);
    EXPECT_EQ(r.vocab_size(), vocab);
    ASSERT_EQ(r.token_count(), 9);
    std::vector<int32_t> all(9);
    r.copy_tokens(0, 9, all.data());
    EXPECT_EQ(all, (std::vector<int32_t>{1, 2, 3, 0, int32_t(vocab - 1), 5, 0, 7, 0}));
    ASSERT_EQ(r.documents().size(), 3u);
    EXPECT_EQ(r.documents()[1].begin, 4u);
    EXPECT_EQ(r.documents()[1].end, 7u);
    EXPECT_EQ(r.documents()[1].language, 5);
    EXPECT_EQ(r.documents()[2].language, -1);
    EXPECT_EQ(r.document_of(0), 0);
    EXPECT_EQ(r.document_of(6), 1);
    EXPECT_EQ(r.document_of(8), 2);
  }
}

TEST(Shard, WriterRejectsOutOfRangeTokens) {
  ShardWriter w(100, 2);
  EXPECT_THROW(w.add_document(std::vector<int32_t>{5, 100}, 0), Error);
  EXPECT_THROW(ShardWriter(70000, 2), Error);  // does not fit u16
}

class ShardDamage : public ::testing::Test {
 protected:
  void SetUp() override {
    path_ = write_sample(dir_.path(), 2, 1000);
    bytes_ = read_file(path_);
  }
  void rewrite(const std::string& bytes) { write_file_atomic(path_, bytes); }
  testing::ScratchDir dir_{"shard_damage"};
  std::string path_, bytes_;
};

TEST_F(ShardDamage, FlippedTokenByte) {
  bytes_[kShardHeaderBytes + 2] ^= 0x01;
  rewrite(bytes_);
  expect_rejected(path_, "checksum mismatch");
}

TEST_F(ShardDamage, FlippedIndexByte) {
  bytes_[bytes_.size() - 10] ^= 0x40;
  rewrite(bytes_);
  expect_rejected(path_, "checksum mismatch");
}

TEST_F(ShardDamage, FlippedHeaderByte) {
  bytes_[20] ^= 0x01;  // token count
  rewrite(bytes_);
  expect_rejected(path_, "header checksum mismatch");
}

TEST_F(ShardDamage, Truncated) {
  rewrite(bytes_.substr(0, bytes_.size() - 5));
  expect_rejected(path_, "truncated");
  rewrite(bytes_.substr(0, 20));
  expect_rejected(path_, "truncated");
  rewrite("");
  expect_rejected(path_, "truncated");
}

TEST_F(ShardDamage, TrailingGarbage) {
  rewrite(bytes_ + "xx");
  expect_rejected(path_, "trailing bytes");
}

TEST_F(ShardDamage, WrongMagic) {
  std::memcpy(bytes_.data(), "GGUF\0\0\0\0", 8);
  rewrite(bytes_);
  expect_rejected(path_, "wrong magic");
}

TEST_F(ShardDamage, WrongVersion) {
  // A well-formed shard from a future format: valid header checksum, version 2.
  const uint32_t version = 2;
  std::memcpy(bytes_.data() + 8, &version, 4);
  const uint32_t crc = crc32c(0, bytes_.data(), 60);
  std::memcpy(bytes_.data() + 60, &crc, 4);
  rewrite(bytes_);
  expect_rejected(path_, "unsupported version 2");
}

TEST_F(ShardDamage, LoaderNamesTheBadShard) {
  testing::write_meta_for_shards(dir_.path(), 1000);
  bytes_[kShardHeaderBytes] ^= 0x10;
  rewrite(bytes_);
  try {
    open_shard_stream(dir_.path(), "train", 1, 0, 1);
    FAIL() << "loader accepted a corrupted shard";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("train_00000.bin"), std::string::npos) << e.what();
  }
}

// Hostile headers: well-formed (both checksums valid) but with counts that lie. Each used to
// crash `loom data verify` or be accepted; now each is rejected naming the shard.
class ShardHostileHeader : public ShardDamage {
 protected:
  // Overwrites the u64 header field at `offset` and fixes the header checksum.
  void set_u64(size_t offset, uint64_t v) {
    std::memcpy(bytes_.data() + offset, &v, 8);
    const uint32_t crc = crc32c(0, bytes_.data(), 60);
    std::memcpy(bytes_.data() + 60, &crc, 4);
    rewrite(bytes_);
  }
};

TEST_F(ShardHostileHeader, VocabZero) {
  set_u64(32, 0);
  expect_rejected(path_, "header vocab size 0 is outside");
}

TEST_F(ShardHostileHeader, TokenAtOrAboveVocab) {
  set_u64(32, 5);  // the sample holds tokens up to 999
  expect_rejected(path_, "outside the header's vocabulary [0, 5)");
}

TEST_F(ShardHostileHeader, HugeVocab) {
  set_u64(32, uint64_t(1) << 40);
  expect_rejected(path_, "is outside [1, 2147483648]");
}

TEST_F(ShardHostileHeader, DocumentIndexOverflow) {
  // 3 + 2^61 documents of 24 bytes wrap to the real 72 bytes: the size check used to pass and
  // the index check read past the end of the mapping.
  set_u64(24, 3 + (uint64_t(1) << 61));
  expect_rejected(path_, "truncated: header says 2305843009213693955 documents");
}

TEST_F(ShardHostileHeader, TokenCountOverflow) {
  // 2^63 + 9 two-byte tokens wrap to the real 18 bytes; the count used to read as negative.
  set_u64(16, (uint64_t(1) << 63) + 9);
  expect_rejected(path_, "truncated: header says 9223372036854775817 tokens");
}

TEST(Shard, MaxTokenIsReported) {
  testing::ScratchDir dir("shard_max");
  ShardReader r(write_sample(dir.path(), 2, 1000));
  EXPECT_EQ(r.max_token(), 999);
}

TEST(Shard, Crc32cKnownValue) {
  // The standard CRC-32C check value ("123456789" -> 0xE3069283).
  EXPECT_EQ(crc32c(0, "123456789", 9), 0xE3069283u);
  // Incremental equals one-shot.
  EXPECT_EQ(crc32c(crc32c(0, "12345", 5), "6789", 4), 0xE3069283u);
}

}  // namespace
}  // namespace loom::data
