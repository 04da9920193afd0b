// GPT-2 byte-level BPE with CodeGeeX whitespace tokens, on the fixture in tests/data/tokenizer
// (same file formats as CodeGeeX's tokenizer folder, made small by make_fixture.py).
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/rng.h"
#include "data/byte_bpe_tokenizer.h"
#include "data/text_util.h"
#include "sample_corpus.h"

namespace loom::data {
namespace {

const std::string kFixture = std::string(LOOM_TEST_DATA_DIR) + "/tokenizer";

std::unique_ptr<Tokenizer> fixture() { return load_tokenizer(kFixture); }

TEST(ByteBpeTokenizer, LoadsCodeGeeXFormatFolder) {
  const auto tok = fixture();
  EXPECT_EQ(tok->kind(), "byte_bpe");
  EXPECT_EQ(tok->vocab_size(), 365 + 143);  // base vocab incl. <|endoftext|>, 143 extratokens
  EXPECT_EQ(tok->eod_id(), 364);
  const auto& bpe = dynamic_cast<const ByteBpeTokenizer&>(*tok);
  ASSERT_TRUE(bpe.has_whitespace_tokens());
  // CodeGeeX: n spaces -> <|extratoken_{n+8}|>, ids start right after <|endoftext|>.
  for (int n = 2; n <= 10; ++n) EXPECT_EQ(bpe.whitespace_id(n), 364 + n + 8);
}

TEST(ByteBpeTokenizer, MatchesReferenceEncoder) {
  // expected_ids.json was written by make_fixture.py: GPT-2's regex pre-tokenizer (Python
  // `regex` module), rank-ordered merges and CodeGeeX's whitespace string replacement.
  const auto tok = fixture();
  const auto cases = nlohmann::json::parse(read_file(kFixture + "/expected_ids.json"));
  ASSERT_FALSE(cases.empty());
  for (const auto& c : cases) {
    const auto text = c.at("text").get<std::string>();
    EXPECT_EQ(tok->encode(text), c.at("ids").get<std::vector<int32_t>>()) << text;
  }
}

TEST(ByteBpeTokenizer, WhitespaceRunsFollowCodeGeeX) {
  const auto tok = fixture();
  const auto& bpe = dynamic_cast<const ByteBpeTokenizer&>(*tok);
  const int32_t space = 220;  // "Ġ" (byte 0x20) in GPT-2's byte order
  const int32_t x = tok->encode("x")[0];
  EXPECT_EQ(tok->encode("  x"), (std::vector<int32_t>{bpe.whitespace_id(2), x}));
  // 12 = 10 + 2, greedy from the longest run.
  EXPECT_EQ(tok->encode(std::string(12, ' ') + "x"),
            (std::vector<int32_t>{bpe.whitespace_id(10), bpe.whitespace_id(2), x}));
  // 11 = 10 + a single space left in the text, where it joins what follows (" x" has no merge
  // in the fixture, so it stays two tokens).
  EXPECT_EQ(tok->encode(std::string(11, ' ') + "x"),
            (std::vector<int32_t>{bpe.whitespace_id(10), space, x}));
  // 40 spaces = 4 tokens.
  EXPECT_EQ(tok->encode(std::string(40, ' ')), std::vector<int32_t>(4, bpe.whitespace_id(10)));
}

TEST(ByteBpeTokenizer, SampleCorpusRoundTripsExactly) {
  const auto tok = fixture();
  for (const auto& [name, content] : testing::sample_files()) {
    EXPECT_EQ(tok->decode(tok->encode(content)), content) << name;
    EXPECT_EQ(tok->decode(tok->encode_document(Language::kPython, content)),
              "# language: Python\n" + content)
        << name;
  }
}

TEST(ByteBpeTokenizer, ArbitraryBytesRoundTrip) {
  const auto tok = fixture();
  // Random byte strings (invalid UTF-8 almost surely), biased towards spaces and newlines so
  // whitespace runs and pre-token boundaries are exercised too.
  for (uint64_t trial = 0; trial < 200; ++trial) {
    std::string s;
    const uint64_t len = rng_u64(7, trial, 0) % 300;
    for (uint64_t i = 0; i < len; ++i) {
      const uint64_t r = rng_u64(7, trial, i + 1);
      s.push_back(r % 4 == 0 ? ' ' : r % 11 == 0 ? '\n' : static_cast<char>(r >> 8));
    }
    EXPECT_EQ(tok->decode(tok->encode(s)), s) << "trial " << trial;
  }
  std::string all;
  for (int b = 0; b < 256; ++b) all.push_back(static_cast<char>(b));
  EXPECT_EQ(tok->decode(tok->encode(all)), all);
}

TEST(ByteBpeTokenizer, SaveToDirAndReload) {
  const auto tok = fixture();
  testing::ScratchDir dir("bpe_save");
  tok->save_to_dir(dir.path() + "/tok");
  const auto loaded = load_tokenizer(dir.path() + "/tok");
  EXPECT_EQ(loaded->kind(), "byte_bpe");
  for (const auto& [name, content] : testing::sample_files())
    EXPECT_EQ(loaded->encode(content), tok->encode(content)) << name;
}

TEST(ByteBpeTokenizer, BadFilesAreClearErrors) {
  const std::string vocab = read_file(kFixture + "/vocab.json");
  const std::string merges = read_file(kFixture + "/merges.txt");
  // Drop the byte token for 'A'.
  auto v = nlohmann::json::parse(vocab);
  v.erase("A");
  try {
    ByteBpeTokenizer t(v.dump(), "", "");
    FAIL() << "accepted a vocab without byte 0x41";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("0x41"), std::string::npos) << e.what();
  }
  EXPECT_THROW(ByteBpeTokenizer(vocab, "#version: 0.2\nq zz\n", ""), Error);  // unknown merge
  EXPECT_THROW(ByteBpeTokenizer("{not json", merges, ""), Error);
  const auto tok = fixture();
  EXPECT_THROW(tok->decode(std::vector<int32_t>{-1}), Error);
  EXPECT_THROW(tok->decode(std::vector<int32_t>{int32_t(tok->vocab_size())}), Error);
}

}  // namespace
}  // namespace loom::data
