// data/token_stream.h: where training windows come from.
//
// Glossary: B windows per batch (per data-parallel rank), T tokens per input row, so a window is
// T+1 consecutive tokens; dp_rank/dp_size this rank's place in the data-parallel group. Every
// stream is deterministic: the windows depend only on (data, seed, dp_rank, dp_size, T), never
// on timing or thread count.
//
// Positions are shared by the group: all dp ranks of a group advance in lockstep (each
// next_batch call consumes B windows on every rank), so state() is the same on every rank and
// one copy in the checkpoint restores all of them. Window k of the group's sequence (k = 0, 1, ...)
// goes to rank k % dp_size, so ranks never share a window.
#pragma once

#include <cstdint>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>

namespace loom::data {

// A source of training windows. next_batch fills tokens (B, T+1) int32 row-major: row i is one
// window of T+1 consecutive tokens (inputs = [:, :T], targets = [:, 1:]), and langs (B) with each
// window's language id (of its first token's document; -1 if unknown) if langs != nullptr.
class TokenStream {
 public:
  virtual ~TokenStream() = default;
  virtual void next_batch(int32_t* tokens, int32_t* langs, int64_t B, int64_t T) = 0;
  // next_batch, and token_langs (B, T+1): the language id of every token's own document (windows
  // span documents; -1 unknown). The sparse expert router reads these (model/moe.h). The default
  // (streams without documents) fills -1.
  virtual void next_batch_token_languages(int32_t* tokens, int32_t* token_langs, int64_t B,
                                          int64_t T);
  virtual nlohmann::json state() const = 0;               // position, exactly restorable
  virtual void restore(const nlohmann::json& state) = 0;  // throws loom::Error if incompatible
  virtual int64_t vocab_size() const = 0;
};

// Synthetic tokens drawn from a seed (no files), for tests and benchmarks: a fixed random
// first-order Markov chain over `vocab` tokens (each token has kSyntheticSuccessors likely
// successors with probabilities 0.6/0.2/0.1/0.1, drawn from the seed through core/rng.h), so a
// model can learn it and the loss falls well below log(vocab) (the chain's entropy is about
// 1.09 nats per token; a model that only learns it reaches that). Rank r of dp_size gets its own
// disjoint deterministic stream. Windows are independent chains (the first token uniform).
inline constexpr int kSyntheticSuccessors = 4;
std::unique_ptr<TokenStream> make_synthetic_stream(int64_t vocab, uint64_t seed, int dp_rank,
                                                   int dp_size);

// Shards in `data_dir` (written by `loom data build`): split "train" or "val", i.e. the files
// DATA_DIR/<split>_*.bin in name order. Each epoch is the set of all windows that start at a
// multiple of T inside a shard (windows never cross shards), visited in a seeded pseudo-random
// order that changes every epoch; the last (#windows mod dp_size) windows of an epoch's order
// are dropped so every rank sees the same count. Every shard is validated (checksums) when the
// stream opens. Throws loom::Error if the directory has no such shards or they disagree on V.
// state() records (epoch, position, T, seed and a fingerprint of the data); restore() rejects
// another data set, seed or T, and accepts another dp_size (the position is group-global).
std::unique_ptr<TokenStream> open_shard_stream(const std::string& data_dir,
                                               const std::string& split, uint64_t seed,
                                               int dp_rank, int dp_size);

// A bijection of [0, n) chosen by (seed, epoch): a 4-round Feistel network over the next even
// power of two with cycle walking. O(1) memory, so epochs of billions of windows need no table.
// Exposed for tests.
uint64_t permute_index(uint64_t i, uint64_t n, uint64_t seed, uint64_t epoch);

}  // namespace loom::data
