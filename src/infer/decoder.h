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
// Tensor parallel (a tp group of size P with the weights of ModelWeights' TpShard): Megatron's
// split without sequence parallelism. Every rank holds all N rows; q|k|v and ffn.up run on its
// heads / columns (and its KV cache holds only its NKV/P kv heads); the attn.out and ffn.down
// partial sums are all-reduced before their (replicated) bias; the vocabulary-parallel
// embedding is all-reduced (one rank contributes each row, the rest zeros: exact) and the head's
// logits (B, V/P) all-gathered into (B, V), so every rank returns identical logits. Every member
// calls forward() with the same steps (collective). Logits equal tp = 1 within f32 rounding (the
// partial sums add in another order).
//
// Sparse (MoE, rre router) blocks: after LayerNorm2 each row goes to the expert
// model::rre_experts picks from (its sequence's domain, its token id), the rows are grouped by
// expert with model::moe_pack_slots (the training forward's dispatch), and each expert's FFN runs
// on its rows through weight_matmul in the weights' format; the output is used with weight 1, as
// in model/moe.cpp. Each row's arithmetic still depends only on that row (batch invariance holds).
//
// Not thread-safe (scratch buffers are members); one Decoder per step thread.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "attention/paged_attention.h"
#include "comm/process_group.h"
#include "infer/kv_cache.h"
#include "infer/weights.h"

namespace loom::infer {

// One sequence's part of a step.
struct SeqStep {
  int64_t kv_seq = -1;              // KvCache sequence id, with blocks for pos + tokens.size()
  int64_t pos = 0;                  // tokens of this sequence already in the cache
  std::span<const int32_t> tokens;  // new tokens (>= 1): a prompt, or the last sampled token
  // MoE (rre) models: the domain index (into cfg.moe.domains, ModelConfig::domain_index) every
  // token of this sequence is routed by; -1: the "other" domain (as GptStage's null domains).
  // Ignored by dense models.
  int32_t domain = -1;
};

// The KV cache geometry of a model: L' = n_layers (+1 with a query layer) cached layers, the
// kv heads of one of tp_size ranks, its head dim, K and V stored as kv_dtype. Needs no weights
// (the engine sizes its pool from it before loading them).
KvCacheShape kv_cache_shape(const model::ModelConfig& cfg, int64_t tp_size, DType kv_dtype);

class Decoder {
 public:
  // Keeps references: weights (and tp) outlive it. tp: null or a group whose size and rank
  // match weights.tp() (throws otherwise).
  explicit Decoder(const ModelWeights& weights, const comm::ProcessGroup* tp = nullptr);

  const ModelWeights& weights() const { return w_; }
  // The cache geometry this model needs (L' layers, NKV/P kv heads of this rank, HD), with K and
  // V stored as kv_dtype (f32 or bf16; bf16: each K and V element rounded to bf16 once, as it is
  // written; attention still accumulates in f32).
  KvCacheShape cache_shape(DType kv_dtype = DType::f32) const;

  // Runs every sequence's new tokens, appends their K and V to `cache`, and writes the logits
  // of each sequence's LAST new token into logits (B, V). Throws loom::Error (before touching
  // the cache) on token ids outside [0, V), positions past max_seq or too few reserved blocks.
  void forward(KvCache& cache, std::span<const SeqStep> seqs, float* logits);

  // As forward(), but writes the logits of EVERY new token into logits (N, V), N the step's new
  // tokens summed over sequences (sequence 0's tokens first, in order): scoring text (`loom eval
  // loss` through the inference weights). Row r's logits equal what forward() returns when r is
  // a sequence's last new token (same kernels, each row's arithmetic unchanged).
  void forward_all(KvCache& cache, std::span<const SeqStep> seqs, float* logits);

 private:
  void run(KvCache& cache, std::span<const SeqStep> seqs, float* logits, bool every_row);
  void layer(KvCache& cache, std::span<const SeqStep> seqs, int64_t cache_layer,
             const model::BlockOffsets& o, const BlockLinears& lin, const BlockExperts* experts,
             float* x, const float* qin, bool last_only);
  // The MoE FFN of a sparse block on M rows: x = experts(ln) + mid. toks, doms (M).
  void moe_ffn(const BlockExperts& ex, const float* ln, const float* mid, const int32_t* toks,
               const int32_t* doms, int64_t M, float* x);

  void all_reduce(float* buf, int64_t n);

  const ModelWeights& w_;
  const comm::ProcessGroup* tp_ = nullptr;  // null: no tensor parallelism
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
  Buf x_, ln_, qkv_, att_, mid_, act_, qin_, shard_logits_, gathered_, xs_, ys_;
  std::vector<attention::PagedQuery> queries_, last_queries_;
  std::vector<int64_t> row_seq_, row_pos_, last_row_;  // last_row_ (B): each sequence's last row
  std::vector<int32_t> row_tok_, row_dom_;             // (N) MoE: each row's token and domain
  std::vector<int32_t> last_tok_, last_dom_;           // (B) the same for the last rows
  std::vector<int32_t> slot_row_, row_slot_;           // MoE dispatch (model::moe_pack_slots)
  std::vector<int64_t> moe_offsets_;
};

}  // namespace loom::infer
