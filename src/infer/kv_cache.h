// infer/kv_cache.h: the paged (block-allocated) KV cache that every running sequence shares.
//
// Glossary: L' cached layers (the L blocks plus the top query layer when the model has one),
// NKV kv heads, HD head dim, KV = NKV*HD, BT tokens per block (16), P physical blocks.
//
// Layout: one f32 pool of P blocks. Block p holds, for every cached layer l, K then V:
//   pool[p][l][0] = K (BT, NKV, HD) and pool[p][l][1] = V (BT, NKV, HD),
// so block p starts at p * block_floats() and layer l's K at + l * 2 * BT * KV.
// A sequence owns a block table: logical block i (its tokens [i*BT, (i+1)*BT)) lives in physical
// block table[i]. Sequences of any length share the pool; nothing is ever copied or moved, and
// the only waste is the unused tail of each sequence's last block.
//
// Ownership and failure: the cache owns the pool. reserve() either gives a sequence all the
// blocks it asks for or changes nothing and returns false (the engine admits a request only when
// its whole prompt + max_tokens fits, so a running sequence never waits for memory). Not
// thread-safe: the engine's step thread is its only user.
#pragma once

#include <cstdint>
#include <map>
#include <vector>

namespace loom::infer {

struct KvCacheShape {
  int64_t layers = 0;         // L' (cached layers, query layer included)
  int64_t kv_heads = 0;       // NKV
  int64_t head_dim = 0;       // HD
  int64_t block_tokens = 16;  // BT
  int64_t kv_dim() const { return kv_heads * head_dim; }
  // Bytes of one block: 2 (K and V) * L' * BT * KV * 4.
  int64_t block_bytes() const { return 2 * layers * block_tokens * kv_dim() * 4; }
};

class KvCache {
 public:
  // Sizes the pool to floor(budget_bytes / block_bytes) blocks. Throws loom::Error naming the
  // bytes needed and the fix if one sequence of max_seq_tokens tokens would not fit.
  KvCache(const KvCacheShape& shape, int64_t budget_bytes, int64_t max_seq_tokens);

  const KvCacheShape& shape() const { return shape_; }
  int64_t num_blocks() const { return num_blocks_; }
  int64_t free_blocks() const { return int64_t(free_.size()); }
  int64_t blocks_for(int64_t tokens) const {
    return (tokens + shape_.block_tokens - 1) / shape_.block_tokens;
  }
  int64_t block_floats() const { return shape_.block_bytes() / 4; }

  // A new empty sequence; returns its id.
  int64_t create();
  // Makes sequence `seq` own enough blocks for `tokens` tokens in total. Returns false and
  // changes nothing if the free list is too short. Throws on an unknown id.
  bool reserve(int64_t seq, int64_t tokens);
  // Returns every block of `seq` to the free list and forgets the id (unknown ids: no-op).
  void release(int64_t seq);
  // Capacity in tokens currently owned by `seq`.
  int64_t capacity(int64_t seq) const;
  const std::vector<int32_t>& block_table(int64_t seq) const;

  // Row of K (resp. V) for token `pos` of `seq` in cached layer `layer`: KV floats.
  float* k_row(int64_t seq, int64_t layer, int64_t pos);
  float* v_row(int64_t seq, int64_t layer, int64_t pos);
  // Base of the pool and the offsets the paged attention kernel needs.
  const float* pool() const { return pool_.data(); }
  int64_t k_offset(int64_t layer) const {
    return layer * 2 * shape_.block_tokens * shape_.kv_dim();
  }
  int64_t v_offset(int64_t layer) const {
    return k_offset(layer) + shape_.block_tokens * shape_.kv_dim();
  }

 private:
  float* row(int64_t seq, int64_t layer, int64_t pos, int kind);

  KvCacheShape shape_;
  int64_t num_blocks_ = 0;
  std::vector<float> pool_;    // (P, L', 2, BT, NKV, HD)
  std::vector<int32_t> free_;  // free physical blocks (a stack: the last freed is reused first)
  std::map<int64_t, std::vector<int32_t>> tables_;  // sequence id -> block table
  int64_t next_id_ = 0;
};

}  // namespace loom::infer
