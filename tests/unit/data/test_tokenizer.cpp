// SentencePiece tokenizer: training settings keep code intact, exact round trips, persistence.
#include <gtest/gtest.h>

#include <filesystem>

#include "core/error.h"
#include "data/sp_tokenizer.h"
#include "data/text_util.h"
#include "data/tokenizer.h"
#include "sample_corpus.h"

namespace loom::data {
namespace {

// One small tokenizer shared by the tests of this file (training takes about a second).
const SentencePieceTokenizer& small_tokenizer() {
  static const std::unique_ptr<SentencePieceTokenizer> tok = [] {
    const auto texts = testing::training_texts(200);
    std::vector<std::string_view> views(texts.begin(), texts.end());
    SentencePieceTrainOptions o;
    o.vocab_size = 800;
    return train_sentencepiece(views, o);
  }();
  return *tok;
}

TEST(SentencePieceTokenizer, SampleCorpusRoundTripsExactly) {
  const auto& tok = small_tokenizer();
  for (const auto& [name, content] : testing::sample_files()) {
    const auto ids = tok.encode(content);
    EXPECT_EQ(tok.decode(ids), content) << name;
    for (Language lang : all_languages()) {
      const auto doc = tok.encode_document(lang, content);
      EXPECT_EQ(tok.decode(doc), language_tag_line(lang) + "\n" + content) << name;
    }
  }
}

TEST(SentencePieceTokenizer, EveryValidUtf8CharacterRoundTrips) {
  const auto& tok = small_tokenizer();
  // Control characters, Latin-1, CJK, astral plane, U+2581 (SentencePiece's space symbol).
  std::string text;
  for (int c = 1; c < 128; ++c) text.push_back(char(c));
  text += "\xC2\x80\xC3\xBF\xE2\x96\x81\xE2\x96\x81x\xE4\xB8\xAD\xF0\x9F\x98\x80\xF4\x8F\xBF\xBF";
  ASSERT_TRUE(is_valid_utf8(text));
  EXPECT_EQ(tok.decode(tok.encode(text)), text);
  EXPECT_EQ(tok.decode(tok.encode("")), "");
  EXPECT_EQ(tok.decode(tok.encode(" ")), " ");
  EXPECT_EQ(tok.decode(tok.encode("\n\n  ")), "\n\n  ");
}

TEST(SentencePieceTokenizer, IndentationRunsAreSingleTokens) {
  const auto& tok = small_tokenizer();
  // The training text indents by 4 and 8 spaces after newlines; with whitespace-only pieces
  // allowed, "\n" + 8 spaces costs at most 2 tokens (the newline symbol and one run).
  const auto ids = tok.encode("\n        return x");
  ASSERT_GE(ids.size(), 2u);
  EXPECT_EQ(tok.decode({ids.data(), 2}), "\n        ");
  // Newline is a user-defined symbol: always its own token.
  EXPECT_EQ(tok.encode("\n").size(), 1u);
}

TEST(SentencePieceTokenizer, TagLinesAndEodAreSingleTokens) {
  const auto& tok = small_tokenizer();
  for (Language lang : all_languages()) {
    const auto id = tok.language_tag_id(lang);
    ASSERT_TRUE(id.has_value()) << language_name(lang);
    const auto ids = tok.encode(language_tag_line(lang));
    ASSERT_EQ(ids.size(), 1u) << language_tag_line(lang);
    EXPECT_EQ(ids[0], *id);
    EXPECT_EQ(tok.encode_document(lang, "x = 1\n").front(), *id);
  }
  const auto eod = tok.encode("<|endoftext|>");
  ASSERT_EQ(eod.size(), 1u);
  EXPECT_EQ(eod[0], tok.eod_id());
  EXPECT_EQ(tok.decode(std::vector<int32_t>{tok.eod_id()}), "<|endoftext|>");
}

TEST(SentencePieceTokenizer, TrainingIsDeterministic) {
  const auto texts = testing::training_texts(50);
  std::vector<std::string_view> views(texts.begin(), texts.end());
  SentencePieceTrainOptions o;
  o.vocab_size = 500;
  const auto a = train_sentencepiece(views, o);
  const auto b = train_sentencepiece(views, o);
  EXPECT_EQ(a->serialized_model(), b->serialized_model());
}

TEST(SentencePieceTokenizer, SaveAndLoadGiveTheSameIds) {
  const auto& tok = small_tokenizer();
  testing::ScratchDir dir("sp_save");
  tok.save_to_dir(dir.path() + "/tok");
  const auto loaded = load_tokenizer(dir.path() + "/tok");
  EXPECT_EQ(loaded->kind(), "sentencepiece");
  EXPECT_EQ(loaded->vocab_size(), tok.vocab_size());
  EXPECT_EQ(loaded->eod_id(), tok.eod_id());
  for (const auto& [name, content] : testing::sample_files())
    EXPECT_EQ(loaded->encode(content), tok.encode(content)) << name;
  // A bare .model file also loads.
  const auto from_file = load_tokenizer(dir.path() + "/tok/tokenizer.model");
  EXPECT_EQ(from_file->encode("def f(): pass"), tok.encode("def f(): pass"));
}

TEST(SentencePieceTokenizer, BadInputIsAClearError) {
  const auto& tok = small_tokenizer();
  const std::vector<int32_t> bad = {0, int32_t(tok.vocab_size())};
  try {
    tok.decode(bad);
    FAIL() << "decode accepted an out-of-range id";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(std::to_string(tok.vocab_size())), std::string::npos)
        << e.what();
  }
  EXPECT_THROW(SentencePieceTokenizer("not a model"), Error);
  testing::ScratchDir dir("sp_bad");
  EXPECT_THROW(load_tokenizer(dir.path()), Error);             // empty directory
  EXPECT_THROW(load_tokenizer(dir.path() + "/missing"), Error);  // no such path
  std::vector<std::string_view> none;
  EXPECT_THROW(train_sentencepiece(none, {}), Error);
}

// Loader errors name the file (and the key): a bare parser message says nothing of where.
TEST(LoadTokenizer, ErrorsNameTheFileAndKey) {
  testing::ScratchDir dir("tok_named");
  auto expect = [](const std::string& path, const std::vector<std::string>& needles) {
    try {
      load_tokenizer(path);
      FAIL() << "loaded " << path;
    } catch (const Error& e) {
      for (const auto& n : needles)
        EXPECT_NE(std::string(e.what()).find(n), std::string::npos) << e.what();
    }
  };
  write_file_atomic(dir.path() + "/broken.model", "not a sentencepiece model");
  expect(dir.path() + "/broken.model", {dir.path() + "/broken.model", "cannot parse"});
  std::filesystem::create_directories(dir.path() + "/t");
  write_file_atomic(dir.path() + "/t/tokenizer.json", R"({"kind": 7})");
  expect(dir.path() + "/t", {"tokenizer.json", "key 'kind' must be a string, found 7"});
  write_file_atomic(dir.path() + "/t/tokenizer.json",
                    R"({"kind": "sentencepiece", "model_file": "../../../../etc/passwd"})");
  expect(dir.path() + "/t", {"key 'model_file'", "contains '..'"});
  std::filesystem::create_directories(dir.path() + "/bpe");
  write_file_atomic(dir.path() + "/bpe/vocab.json", R"({"a": "1"})");
  write_file_atomic(dir.path() + "/bpe/merges.txt", "#version: 0.2\n");
  expect(dir.path() + "/bpe", {dir.path() + "/bpe", "vocab.json"});
}

}  // namespace
}  // namespace loom::data
