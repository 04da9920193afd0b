// data/token_stream.cpp: synthetic Markov stream and the sharded, resumable window loader.
#include "data/token_stream.h"

#include <algorithm>
#include <filesystem>
#include <vector>

#include "core/error.h"
#include "core/rng.h"
#include "data/data_meta.h"
#include "data/shard.h"

namespace loom::data {

namespace {

void check_rank(int dp_rank, int dp_size) {
  LOOM_CHECK(dp_size >= 1 && dp_rank >= 0 && dp_rank < dp_size,
             "dp_rank={} must be in [0, dp_size={})", dp_rank, dp_size);
}

void check_batch(int32_t* tokens, int64_t B, int64_t T) {
  LOOM_CHECK(tokens != nullptr, "next_batch: tokens is null");
  LOOM_CHECK(B >= 1 && T >= 1, "next_batch: B={} and T={} must be >= 1", B, T);
}

// ---------------------------------------------------------------------------------------------
// Synthetic Markov chain.

class SyntheticStream final : public TokenStream {
 public:
  SyntheticStream(int64_t vocab, uint64_t seed, int dp_rank, int dp_size)
      : vocab_(vocab), seed_(seed), dp_rank_(dp_rank), dp_size_(dp_size) {
    LOOM_CHECK(vocab >= 2, "synthetic stream needs vocab >= 2, got {}", vocab);
    check_rank(dp_rank, dp_size);
    successors_.resize(static_cast<size_t>(vocab * kSyntheticSuccessors));  // (V, 4)
    const uint64_t stream = rng_stream_id("data.synthetic.successors");
    for (size_t k = 0; k < successors_.size(); ++k)
      successors_[k] = static_cast<int32_t>(rng_u64(seed, stream, k) % uint64_t(vocab));
  }

  void next_batch(int32_t* tokens, int32_t* langs, int64_t B, int64_t T) override {
    check_batch(tokens, B, T);
    LOOM_CHECK(T + 1 < (int64_t(1) << 24), "synthetic windows are limited to 2^24 tokens, T={}",
               T);
    const uint64_t stream = rng_stream_id("data.synthetic.tokens");
    // Cumulative successor probabilities 0.6, 0.2, 0.1, 0.1.
    static constexpr float kCumulative[kSyntheticSuccessors] = {0.6f, 0.8f, 0.9f, 1.0f};
    for (int64_t b = 0; b < B; ++b) {
      const uint64_t window = position_ + uint64_t(dp_rank_);  // group-global window index
      const uint64_t base = window << 24;
      int32_t* row = tokens + b * (T + 1);  // (T+1)
      row[0] = static_cast<int32_t>(rng_u64(seed_, stream, base) % uint64_t(vocab_));
      for (int64_t t = 1; t <= T; ++t) {
        const float u = rng_uniform(seed_, stream, base + uint64_t(t));
        int j = 0;
        while (j + 1 < kSyntheticSuccessors && u >= kCumulative[j]) ++j;
        row[t] = successors_[size_t(row[t - 1]) * kSyntheticSuccessors + j];
      }
      if (langs != nullptr) langs[b] = -1;
      position_ += uint64_t(dp_size_);
    }
  }

  nlohmann::json state() const override {
    return {{"kind", "synthetic"}, {"vocab", vocab_}, {"seed", seed_}, {"position", position_}};
  }

  void restore(const nlohmann::json& s) override {
    LOOM_CHECK(s.is_object() && s.value("kind", "") == "synthetic",
               "cannot restore a synthetic stream from state {}", s.dump());
    LOOM_CHECK(s.at("vocab").get<int64_t>() == vocab_ && s.at("seed").get<uint64_t>() == seed_,
               "synthetic stream state is for vocab={} seed={}, this stream has vocab={} seed={}",
               s.at("vocab").get<int64_t>(), s.at("seed").get<uint64_t>(), vocab_, seed_);
    position_ = s.at("position").get<uint64_t>();
  }

  int64_t vocab_size() const override { return vocab_; }

 private:
  int64_t vocab_;
  uint64_t seed_;
  int dp_rank_, dp_size_;
  uint64_t position_ = 0;             // group-global windows consumed
  std::vector<int32_t> successors_;   // (V, kSyntheticSuccessors)
};

// ---------------------------------------------------------------------------------------------
// Shards.

constexpr const char* kStateWhere = "data stream state (trainer_state.json key 'data')";
// The window order mixes (epoch * 4 + round) << 32 into a 64-bit counter: epochs stay below 2^30.
constexpr uint64_t kMaxEpoch = (uint64_t(1) << 30) - 1;

// s[key] as a non-negative integer <= max, or loom::Error naming the key, the value and the range.
uint64_t state_uint(const nlohmann::json& s, const char* key, uint64_t max) {
  LOOM_CHECK(s.contains(key), "{}: key '{}' is missing", kStateWhere, key);
  const auto& v = s.at(key);
  LOOM_CHECK(v.is_number_unsigned() || (v.is_number_integer() && v.get<int64_t>() >= 0),
             "{}: key '{}' must be a non-negative integer, found {}", kStateWhere, key, v.dump());
  const auto u = v.get<uint64_t>();
  LOOM_CHECK(u <= max, "{}: key '{}' is {}, outside [0, {}]; the checkpoint is corrupted or for "
             "other data", kStateWhere, key, u, max);
  return u;
}

class ShardStream final : public TokenStream {
 public:
  ShardStream(const std::string& data_dir, const std::string& split, uint64_t seed, int dp_rank,
              int dp_size)
      : split_(split), seed_(seed), dp_rank_(dp_rank), dp_size_(dp_size) {
    namespace fs = std::filesystem;
    check_rank(dp_rank, dp_size);
    LOOM_CHECK(split == "train" || split == "val", "split '{}' must be 'train' or 'val'", split);
    LOOM_CHECK(fs::is_directory(data_dir), "data directory '{}' does not exist", data_dir);
    std::vector<std::string> paths;
    for (const auto& e : fs::directory_iterator(data_dir)) {
      const std::string name = e.path().filename().string();
      if (e.is_regular_file() && name.starts_with(split + "_") && name.ends_with(".bin"))
        paths.push_back(e.path().string());
    }
    LOOM_CHECK(!paths.empty(),
               "no '{}_*.bin' shards in data directory '{}'; build them with `loom data build "
               "--source DIR --out {}`",
               split, data_dir, data_dir);
    // meta.json is the manifest: its list (validated, inside the directory) is what is read.
    const DataMeta meta = read_data_meta(data_dir);
    paths = meta_shard_paths(meta, data_dir, split);
    LOOM_CHECK(!paths.empty(), "'{}/meta.json' lists no {} shards", data_dir, split);
    std::sort(paths.begin(), paths.end());
    for (const auto& p : paths) {
      shards_.emplace_back(p);
      LOOM_CHECK(shards_.back().vocab_size() == shards_.front().vocab_size(),
                 "shard '{}' has vocab size {} but '{}' has {}; shards of one corpus must share "
                 "a tokenizer",
                 p, shards_.back().vocab_size(), paths.front(), shards_.front().vocab_size());
      fingerprint_tokens_ += shards_.back().token_count();
    }
    vocab_ = shards_.front().vocab_size();
    LOOM_CHECK(vocab_ == meta.vocab_size,
               "'{}/meta.json' says vocab_size {} but its shards have vocab {}; rebuild the data",
               data_dir, meta.vocab_size, vocab_);
  }

  void next_batch(int32_t* tokens, int32_t* langs, int64_t B, int64_t T) override {
    next_impl(tokens, langs, nullptr, B, T);
  }
  void next_batch_token_languages(int32_t* tokens, int32_t* token_langs, int64_t B,
                                  int64_t T) override {
    LOOM_CHECK(token_langs != nullptr, "next_batch_token_languages: token_langs is null");
    next_impl(tokens, nullptr, token_langs, B, T);
  }

  void next_impl(int32_t* tokens, int32_t* langs, int32_t* token_langs, int64_t B, int64_t T) {
    check_batch(tokens, B, T);
    if (T_ == 0) set_window(T);
    LOOM_CHECK(T == T_,
               "this {} stream was started with T={} and is now asked for T={}; open a new stream "
               "for another window length",
               split_, T_, T);
    for (int64_t b = 0; b < B; ++b) {
      if (position_ + uint64_t(dp_size_) > total_windows_) {  // the rest cannot go to every rank
        ++epoch_;
        position_ = 0;
      }
      const uint64_t w = permute_index(position_ + uint64_t(dp_rank_), total_windows_, seed_,
                                       epoch_);
      // Locate window w: shard s holds windows [window_begin_[s], window_begin_[s+1]).
      const size_t s = size_t(std::upper_bound(window_begin_.begin(), window_begin_.end(), w) -
                              window_begin_.begin()) - 1;
      const int64_t start = int64_t(w - window_begin_[s]) * T;
      shards_[s].copy_tokens(start, T + 1, tokens + b * (T + 1));
      if (langs != nullptr)
        langs[b] = shards_[s].documents()[size_t(shards_[s].document_of(start))].language;
      if (token_langs != nullptr)
        for (int64_t i = 0; i <= T; ++i)
          token_langs[b * (T + 1) + i] =
              shards_[s].documents()[size_t(shards_[s].document_of(start + i))].language;
      position_ += uint64_t(dp_size_);
    }
  }

  nlohmann::json state() const override {
    return {{"kind", "shards"},   {"split", split_},       {"seed", seed_},
            {"T", T_},            {"epoch", epoch_},       {"position", position_},
            {"shards", shards_.size()}, {"tokens", fingerprint_tokens_}, {"dp_size", dp_size_}};
  }

  void restore(const nlohmann::json& s) override {
    LOOM_CHECK(s.is_object() && s.value("kind", "") == "shards",
               "cannot restore a shard stream from state {}", s.dump());
    const auto shards = state_uint(s, "shards", UINT64_MAX);
    const auto toks = state_uint(s, "tokens", UINT64_MAX);
    LOOM_CHECK(s.contains("split") && s["split"].is_string(),
               "{}: key 'split' must be a string, found {}", kStateWhere,
               s.value("split", nlohmann::json()).dump());
    LOOM_CHECK(s.at("split").get<std::string>() == split_ && shards == shards_.size() &&
                   toks == uint64_t(fingerprint_tokens_),
               "data stream state is for split '{}' with {} shards / {} tokens, but this stream "
               "reads split '{}' with {} shards / {} tokens; resume with the same data directory",
               s.at("split").get<std::string>(), shards, toks, split_, shards_.size(),
               fingerprint_tokens_);
    const uint64_t seed = state_uint(s, "seed", UINT64_MAX);
    LOOM_CHECK(seed == seed_, "data stream state has seed {}, this stream seed {}", seed, seed_);
    // Every value is range-checked before it becomes state: a position past the epoch or a
    // negative one (read as 2^64 - 5) would otherwise silently restart or skip the data.
    const auto T = int64_t(state_uint(s, "T", uint64_t(INT32_MAX)));
    const uint64_t epoch = state_uint(s, "epoch", kMaxEpoch);
    T_ = 0;
    if (T > 0) set_window(T);
    const uint64_t position = state_uint(s, "position", T > 0 ? total_windows_ : 0);
    epoch_ = epoch;
    position_ = position;
  }

  int64_t vocab_size() const override { return vocab_; }

 private:
  void set_window(int64_t T) {
    window_begin_.assign(1, 0);
    for (const auto& sh : shards_) {
      const int64_t n = sh.token_count() > T ? (sh.token_count() - 1) / T : 0;
      window_begin_.push_back(window_begin_.back() + uint64_t(n));
    }
    total_windows_ = window_begin_.back();
    LOOM_CHECK(total_windows_ >= uint64_t(dp_size_),
               "the {} split has {} windows of T+1={} tokens, fewer than dp_size={}; use a "
               "smaller T or more data",
               split_, total_windows_, T + 1, dp_size_);
    T_ = T;
  }

  std::string split_;
  uint64_t seed_;
  int dp_rank_, dp_size_;
  std::vector<ShardReader> shards_;
  int64_t vocab_ = 0;
  int64_t fingerprint_tokens_ = 0;
  int64_t T_ = 0;                      // 0 until the first next_batch
  std::vector<uint64_t> window_begin_;  // (shards + 1) prefix sums of windows
  uint64_t total_windows_ = 0;
  uint64_t epoch_ = 0;
  uint64_t position_ = 0;  // group-global windows consumed in this epoch
};

}  // namespace

void TokenStream::next_batch_token_languages(int32_t* tokens, int32_t* token_langs, int64_t B,
                                             int64_t T) {
  next_batch(tokens, nullptr, B, T);
  LOOM_CHECK(token_langs != nullptr, "next_batch_token_languages: token_langs is null");
  std::fill(token_langs, token_langs + B * (T + 1), -1);
}

uint64_t permute_index(uint64_t i, uint64_t n, uint64_t seed, uint64_t epoch) {
  LOOM_ASSERT(i < n, "permute_index: {} >= {}", i, n);
  if (n <= 1) return i;
  int bits = 0;
  while ((uint64_t(1) << bits) < n) ++bits;
  const int half = (bits + 1) / 2;
  const uint64_t mask = (uint64_t(1) << half) - 1;
  const uint64_t stream = rng_stream_id("data.window_order");
  uint64_t x = i;
  do {  // cycle walking: re-permute until the value lands inside [0, n)
    uint64_t left = x >> half, right = x & mask;
    for (uint64_t round = 0; round < 4; ++round) {
      const uint64_t f = rng_u64(seed, stream, ((epoch * 4 + round) << 32) ^ right) & mask;
      const uint64_t next = left ^ f;
      left = right;
      right = next;
    }
    x = (left << half) | right;
  } while (x >= n);
  return x;
}

std::unique_ptr<TokenStream> make_synthetic_stream(int64_t vocab, uint64_t seed, int dp_rank,
                                                   int dp_size) {
  return std::make_unique<SyntheticStream>(vocab, seed, dp_rank, dp_size);
}

std::unique_ptr<TokenStream> open_shard_stream(const std::string& data_dir,
                                               const std::string& split, uint64_t seed,
                                               int dp_rank, int dp_size) {
  return std::make_unique<ShardStream>(data_dir, split, seed, dp_rank, dp_size);
}

}  // namespace loom::data
