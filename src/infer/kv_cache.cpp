// infer/kv_cache.cpp: the paged KV pool (see kv_cache.h).
#include "infer/kv_cache.h"

#include <cstring>

#include "attention/paged_attention.h"
#include "core/error.h"
#include "core/memory_pool.h"

namespace loom::infer {

KvCache::KvCache(const KvCacheShape& shape, int64_t budget_bytes, int64_t max_seq_tokens)
    : shape_(shape) {
  LOOM_CHECK(shape.layers > 0 && shape.kv_heads > 0 && shape.head_dim > 0 && shape.block_tokens > 0,
             "KV cache shape must be positive: layers={} kv_heads={} head_dim={} block_tokens={}",
             shape.layers, shape.kv_heads, shape.head_dim, shape.block_tokens);
  LOOM_CHECK(shape.dtype == DType::f32 || shape.dtype == DType::bf16,
             "KV cache dtype {} is not supported; choose f32 or bf16", dtype_name(shape.dtype));
  LOOM_CHECK(max_seq_tokens > 0, "KV cache: max_seq_tokens={} must be > 0", max_seq_tokens);
  const int64_t bb = shape.block_bytes();
  const int64_t need = blocks_for(max_seq_tokens);
  num_blocks_ = budget_bytes > 0 ? budget_bytes / bb : 0;
  LOOM_CHECK(num_blocks_ >= need,
             "KV cache budget of {} bytes holds {} blocks of {} tokens ({} bytes each), but one "
             "sequence of the model's context ({} tokens) needs {} blocks = {} bytes; raise the "
             "KV budget to at least {} bytes (or shorten the context)",
             budget_bytes, num_blocks_, shape.block_tokens, bb, max_seq_tokens, need, need * bb,
             need * bb);
  LOOM_CHECK(num_blocks_ < (int64_t(1) << 31), "KV cache: {} blocks exceed the int32 block ids",
             num_blocks_);
  pool_.reserve(size_t(num_blocks_ * bb));  // advised onto huge pages before it is written
  advise_huge_pages(pool_.data(), size_t(num_blocks_ * bb));
  pool_.assign(size_t(num_blocks_ * bb), std::byte{0});
  free_.reserve(size_t(num_blocks_));
  for (int64_t p = num_blocks_ - 1; p >= 0; --p) free_.push_back(int32_t(p));
}

int64_t KvCache::create() {
  const int64_t id = next_id_++;
  tables_.emplace(id, std::vector<int32_t>{});
  return id;
}

bool KvCache::reserve(int64_t seq, int64_t tokens) {
  auto it = tables_.find(seq);
  LOOM_CHECK(it != tables_.end(), "KV cache: unknown sequence {}", seq);
  const int64_t want = blocks_for(tokens) - int64_t(it->second.size());
  if (want <= 0) return true;
  if (want > int64_t(free_.size())) return false;
  for (int64_t i = 0; i < want; ++i) {
    it->second.push_back(free_.back());
    free_.pop_back();
  }
  return true;
}

void KvCache::release(int64_t seq) {
  auto it = tables_.find(seq);
  if (it == tables_.end()) return;
  for (auto b = it->second.rbegin(); b != it->second.rend(); ++b) free_.push_back(*b);
  tables_.erase(it);
}

int64_t KvCache::capacity(int64_t seq) const {
  return int64_t(block_table(seq).size()) * shape_.block_tokens;
}

const std::vector<int32_t>& KvCache::block_table(int64_t seq) const {
  auto it = tables_.find(seq);
  LOOM_CHECK(it != tables_.end(), "KV cache: unknown sequence {}", seq);
  return it->second;
}

int64_t KvCache::slot_offset(int64_t seq, int64_t layer, int64_t pos, int kind) const {
  const std::vector<int32_t>& t = block_table(seq);
  const int64_t BT = shape_.block_tokens;
  LOOM_ASSERT(pos >= 0 && pos / BT < int64_t(t.size()) && layer >= 0 && layer < shape_.layers,
              "KV row pos={} layer={} outside the {} reserved tokens of sequence {}", pos, layer,
              int64_t(t.size()) * BT, seq);
  return int64_t(t[size_t(pos / BT)]) * block_elems() +
         (kind ? v_offset(layer) : k_offset(layer)) + (pos % BT) * shape_.head_dim;
}

void KvCache::write_row(int64_t seq, int64_t layer, int64_t pos, const float* k, const float* v) {
  std::byte* kd = pool_.data() + slot_offset(seq, layer, pos, 0) * elem_bytes();
  std::byte* vd = pool_.data() + slot_offset(seq, layer, pos, 1) * elem_bytes();
  attention::kv_row_store(k, kd, shape_.kv_heads, shape_.head_dim, head_stride(), shape_.dtype);
  attention::kv_row_store(v, vd, shape_.kv_heads, shape_.head_dim, head_stride(), shape_.dtype);
}

void KvCache::read_row(int64_t seq, int64_t layer, int64_t pos, float* k, float* v) const {
  const std::byte* ks = pool_.data() + slot_offset(seq, layer, pos, 0) * elem_bytes();
  const std::byte* vs = pool_.data() + slot_offset(seq, layer, pos, 1) * elem_bytes();
  attention::kv_row_load(ks, k, shape_.kv_heads, shape_.head_dim, head_stride(), shape_.dtype);
  attention::kv_row_load(vs, v, shape_.kv_heads, shape_.head_dim, head_stride(), shape_.dtype);
}

}  // namespace loom::infer
