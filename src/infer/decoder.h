// infer/decoder.h: the KV-cached forward pass of the GPT / PanGu-α / CodeGeeX decoder.
//
// Glossary: N new token rows in a step (summed over sequences), B sequences in the step, C
// d_model, KV kv width, F d_ff, V vocab, L blocks, L' cached layers (L, plus the query layer).
//
// It computes exactly what model/stage.cpp computes for the same tokens, one step at a time:
// h0 = wte[token] + wpe[pos]; L pre-LN blocks (LayerNorm, q|k|v, causal attention, attn.out,
// residual, LayerNorm, ffn.up, GELU kind of the config, ffn.down, residual); the final LayerNorm;
// with a query layer, one more block on the final norm's output whose query input is row `pos`
// of the query layer's position table (its keys and values come from that block's LayerNorm);
// then the tied head: logits = h @ wte^T. Every linear goes through kernels::weight_matmul (in
// the weights' storage format); attention over the cache through
// attention::paged_attention_forward, the same kernel for prompt tokens and decoded tokens.
//
// Batch invariance: each row's arithmetic depends only on that row (weight_matmul, LayerNorm,
// GELU and paged attention are all per row with fixed reduction orders), so a sequence's logits
// are bitwise the same whether it runs alone or beside others, and whether a token was part of
// a prefill or decoded on its own.
//
// Not thread-safe (scratch buffers are members); one Decoder per step thread.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "attention/paged_attention.h"
#include "infer/kv_cache.h"
#include "infer/weights.h"

namespace loom::infer {

// One sequence's part of a step.
struct SeqStep {
  int64_t kv_seq = -1;               // KvCache sequence id, with blocks for pos + tokens.size()
  int64_t pos = 0;                   // tokens of this sequence already in the cache
  std::span<const int32_t> tokens;   // new tokens (>= 1): a prompt, or the last sampled token
};

class Decoder {
 public:
  explicit Decoder(const ModelWeights& weights);  // keeps a reference: weights outlive it

  const ModelWeights& weights() const { return w_; }
  // The cache geometry this model needs (L' layers, NKV, HD).
  KvCacheShape cache_shape() const;

  // Runs every sequence's new tokens, appends their K and V to `cache`, and writes the logits
  // of each sequence's LAST new token into logits (B, V). Throws loom::Error (before touching
  // the cache) on token ids outside [0, V), positions past max_seq or too few reserved blocks.
  void forward(KvCache& cache, std::span<const SeqStep> seqs, float* logits);

 private:
  struct Scratch;
  void layer(KvCache& cache, std::span<const SeqStep> seqs, int64_t cache_layer,
             const model::BlockOffsets& o, const BlockLinears& lin, float* x, const float* qin);

  const ModelWeights& w_;
  // Scratch, grown as needed (64-byte aligned so every row sees the same vector alignment).
  struct Buf {
    float* p = nullptr;
    size_t n = 0;
    float* get(size_t want);
    Buf() = default;
    Buf(const Buf&) = delete;
    Buf& operator=(const Buf&) = delete;
    ~Buf();
  };
  Buf x_, ln_, qkv_, att_, mid_, up_, act_, qin_, last_;
  std::vector<attention::PagedQuery> queries_;
  std::vector<int64_t> row_seq_, row_pos_;
};

}  // namespace loom::infer
