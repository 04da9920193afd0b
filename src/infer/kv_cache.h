// infer/kv_cache.h: the paged (block-allocated) KV cache that every running sequence shares.
//
// Glossary: L' cached layers (the L blocks plus the top query layer when the model has one),
// NKV kv heads, HD head dim, KV = NKV*HD, BT tokens per block (16), P physical blocks.
//
// Layout: one pool of P blocks, in the cache's element type (f32, or bf16: half the bytes per
// token, so twice the tokens in the same memory). Block p holds, for every cached layer l, K then
// V, each head-major (attention/paged_attention.h: one kv head's BT tokens are contiguous):
//   pool[p][l][0] = K (NKV, BT, HD) and pool[p][l][1] = V (NKV, BT, HD),
// so block p starts at element p * block_elems() and layer l's K at + l * 2 * BT * KV.
// A sequence owns a block table: logical block i (its tokens [i*BT, (i+1)*BT)) lives in physical
// block table[i]. Sequences of any length share the pool; nothing is ever copied or moved, and
// the only waste is the unused tail of each sequence's last block.
// Rows are written from f32 by attention::kv_row_store (bf16 rounds to nearest even, the only
// rounding a bf16 cache adds, and stores each head in the kernel's paired order where its head
// dim is a multiple of 32: attention/paged_attention.h); the kernel reads them widened to f32
// (exact) and accumulates in f32.
//
// Ownership and failure: the cache owns the pool. reserve() either gives a sequence all the
// blocks it asks for or changes nothing and returns false (the engine admits a request only when
// its whole prompt + max_tokens fits, so a running sequence never waits for memory). Not
// thread-safe: the engine's step thread is its only user.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <vector>

#include "core/aligned.h"
#include "core/dtype.h"

namespace loom::infer {

// "f32" / "bf16", as the --kv-dtype flag spells them.
inline const char* kv_dtype_name(DType t) { return t == DType::bf16 ? "bf16" : "f32"; }

struct KvCacheShape {
  int64_t layers = 0;         // L' (cached layers, query layer included)
  int64_t kv_heads = 0;       // NKV
  int64_t head_dim = 0;       // HD
  int64_t block_tokens = 16;  // BT
  DType dtype = DType::f32;   // element type of K and V: f32 or bf16
  int64_t kv_dim() const { return kv_heads * head_dim; }
  // Elements of one block: 2 (K and V) * L' * BT * KV.
  int64_t block_elems() const { return 2 * layers * block_tokens * kv_dim(); }
  // Bytes of one block: block_elems() * (4 for f32, 2 for bf16).
  int64_t block_bytes() const { return block_elems() * int64_t(dtype_size(dtype)); }
};

class KvCache {
 public:
  // Sizes the pool to floor(budget_bytes / block_bytes) blocks. Throws loom::Error naming the
  // bytes needed and the fix if one sequence of max_seq_tokens tokens would not fit, or if the
  // dtype is neither f32 nor bf16.
  KvCache(const KvCacheShape& shape, int64_t budget_bytes, int64_t max_seq_tokens);

  const KvCacheShape& shape() const { return shape_; }
  int64_t num_blocks() const { return num_blocks_; }
  int64_t pool_bytes() const { return num_blocks_ * shape_.block_bytes(); }
  int64_t free_blocks() const { return int64_t(free_.size()); }
  int64_t blocks_for(int64_t tokens) const {
    return (tokens + shape_.block_tokens - 1) / shape_.block_tokens;
  }
  int64_t block_elems() const { return shape_.block_elems(); }

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

  // Stores K and V (KV floats each) of token `pos` of `seq` in cached layer `layer`, converted
  // to the cache's dtype. read_row gives them back widened to f32 (tests).
  void write_row(int64_t seq, int64_t layer, int64_t pos, const float* k, const float* v);
  void read_row(int64_t seq, int64_t layer, int64_t pos, float* k, float* v) const;
  // Element offset in the pool of that token's K (kind 0) or V (kind 1) of kv head 0; kv head
  // kh's follows at + kh * head_stride().
  int64_t slot_offset(int64_t seq, int64_t layer, int64_t pos, int kind) const;
  int64_t head_stride() const { return shape_.block_tokens * shape_.head_dim; }
  // Layer `layer`'s K (resp. V) of physical block 0, in the pool's dtype: the bases the paged
  // attention kernel reads from, with block stride block_elems().
  const void* k_base(int64_t layer) const { return pool_.data() + k_offset(layer) * elem_bytes(); }
  const void* v_base(int64_t layer) const { return pool_.data() + v_offset(layer) * elem_bytes(); }
  int64_t k_offset(int64_t layer) const {
    return layer * 2 * shape_.block_tokens * shape_.kv_dim();
  }
  int64_t v_offset(int64_t layer) const {
    return k_offset(layer) + shape_.block_tokens * shape_.kv_dim();
  }

 private:
  int64_t elem_bytes() const { return int64_t(dtype_size(shape_.dtype)); }

  KvCacheShape shape_;
  int64_t num_blocks_ = 0;
  // (P, L', 2, NKV, BT, HD) elements of shape_.dtype, cache-line aligned (core/aligned.h)
  AlignedVector<std::byte> pool_;
  std::vector<int32_t> free_;  // free physical blocks (a stack: the last freed is reused first)
  std::map<int64_t, std::vector<int32_t>> tables_;  // sequence id -> block table
  int64_t next_id_ = 0;
};

}  // namespace loom::infer
