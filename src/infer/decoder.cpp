// infer/decoder.cpp: the KV-cached forward (see decoder.h). The order of operations inside a
// block follows model/block.cpp's block_forward exactly (matmul, then bias, then residual), so
// the cached decode differs from recomputation only by the kernels' own rounding.
#include "infer/decoder.h"

#include <cmath>
#include <cstdlib>
#include <cstring>

#include "core/error.h"
#include "kernels/cpu/activation.h"
#include "kernels/cpu/elementwise.h"
#include "kernels/cpu/embedding.h"
#include "kernels/cpu/layernorm.h"
#include "model/moe.h"

namespace loom::infer {

namespace K = loom::kernels;

float* Decoder::Buf::get(size_t want) {
  if (want > n) {
    std::free(p);
    const size_t bytes = ((want * 4 + 63) / 64) * 64;
    p = static_cast<float*>(std::aligned_alloc(64, bytes));
    LOOM_CHECK(p, "decoder: cannot allocate {} bytes of scratch", bytes);
    n = want;
  }
  return p;
}

Decoder::Buf::~Buf() { std::free(p); }

Decoder::Decoder(const ModelWeights& weights, const comm::ProcessGroup* tp)
    : w_(weights), tp_(tp && tp->size() > 1 ? tp : nullptr) {
  const int P = tp_ ? tp_->size() : 1, r = tp_ ? tp_->rank() : 0;
  LOOM_CHECK(P == w_.tp().size && r == w_.tp().rank,
             "decoder: the weights are tp shard {} of {} but the tp group is rank {} of {}; load "
             "the weights with the group's TpShard",
             w_.tp().rank, w_.tp().size, r, P);
}

void Decoder::all_reduce(float* buf, int64_t n) {
  if (tp_) tp_->all_reduce(comm::BufferRef(buf, n, DType::f32)).wait();
}

KvCacheShape kv_cache_shape(const model::ModelConfig& c, int64_t tp_size, DType kv_dtype) {
  KvCacheShape s;
  s.layers = c.n_layers + (c.query_layer ? 1 : 0);
  s.kv_heads = c.n_kv_heads / tp_size;
  s.head_dim = c.head_dim();
  s.dtype = kv_dtype;
  return s;
}

KvCacheShape Decoder::cache_shape(DType kv_dtype) const {
  return kv_cache_shape(w_.config(), w_.tp().size, kv_dtype);
}

static K::GeluKind gelu_kind(model::Activation a) {
  return a == model::Activation::fast_gelu  ? K::GeluKind::fast
         : a == model::Activation::gelu_erf ? K::GeluKind::erf
                                            : K::GeluKind::tanh;
}

static K::MatmulEpilogue gelu_epilogue(model::Activation a) {
  K::MatmulEpilogue e;
  e.gelu = true;
  e.gelu_kind = gelu_kind(a);
  return e;
}

// One pre-LN block on x (N,C), in place. qin (N,C): the query layer's query input, or null.
void Decoder::layer(KvCache& cache, std::span<const SeqStep> seqs, int64_t cache_layer,
                    const model::BlockOffsets& o, const BlockLinears& lin,
                    const BlockExperts* experts, float* x, const float* qin, bool last_only) {
  const model::ModelConfig& cfg = w_.config();
  // This rank's widths (tp P: Cq = C/P, KV = KV/P, F = F/P; all rows N on every rank).
  const int64_t P = w_.tp().size;
  const int64_t N = int64_t(row_seq_.size()), C = cfg.d_model, Cq = C / P, KV = cfg.kv_dim() / P,
                F = cfg.d_ff / P;
  const int64_t S = Cq + 2 * KV;
  float* ln = ln_.get(size_t(N * C));     // (N,C)
  float* qkv = qkv_.get(size_t(N * S));   // (N, Cq+2KV)
  float* att = att_.get(size_t(N * Cq));  // (N,Cq)
  float* mid = mid_.get(size_t(N * C));   // (N,C)

  // ln1 = LayerNorm1(x); q|k|v = ln1 @ Wqkv^T + b (query layer: q from qin)    (N, Cq+2KV)
  K::layernorm_forward(ln, nullptr, nullptr, x, w_.f32(o.norm1_w), w_.f32(o.norm1_b), N, C,
                       cfg.norm_eps);
  if (!qin) {
    K::weight_matmul(qkv, S, ln, N, lin.qkv, w_.f32(o.b_qkv));
  } else {
    K::weight_matmul(qkv, S, qin, N, weight_rows(lin.qkv, 0, Cq), w_.f32(o.b_qkv));
    K::weight_matmul(qkv + Cq, S, ln, N, weight_rows(lin.qkv, Cq, 2 * KV), w_.f32(o.b_qkv) + Cq);
  }
  // Append k, v of every new row to the cache, then attend: row r at position p sees p+1 keys.
  for (int64_t r = 0; r < N; ++r) {
    const SeqStep& sq = seqs[size_t(row_seq_[size_t(r)])];
    const int64_t p = row_pos_[size_t(r)];
    cache.write_row(sq.kv_seq, cache_layer, p, qkv + r * S + Cq, qkv + r * S + Cq + KV);
  }
  attention::PagedShape ps;
  ps.NH = cfg.n_heads / P;
  ps.NKV = cfg.n_kv_heads / P;
  ps.HD = cfg.head_dim();
  ps.block_tokens = cache.shape().block_tokens;
  ps.block_stride = cache.block_elems();
  ps.kv_dtype = cache.shape().dtype;
  ps.q_stride = S;
  ps.o_stride = Cq;
  ps.scale = 1.0f / std::sqrt(float(ps.HD));  // as model/block.cpp
  // The model's last layer: only each sequence's last row reaches the logits, so once every
  // row's K and V are cached the rest runs on those rows alone, moved to rows [0, B) of x and
  // of the q part of qkv (row b's source row r_b >= b: moving in order overwrites nothing
  // still needed). Each row's arithmetic is unchanged.
  int64_t M = N;  // rows from here on
  const attention::PagedQuery* queries = queries_.data();
  if (last_only) {
    M = int64_t(seqs.size());
    last_queries_.resize(size_t(M));
    for (int64_t b = 0; b < M; ++b) {
      const int64_t r = last_row_[size_t(b)];
      last_queries_[size_t(b)] = queries_[size_t(r)];
      if (r == b) continue;
      std::memcpy(qkv + b * S, qkv + r * S, size_t(Cq) * 4);
      std::memcpy(x + b * C, x + r * C, size_t(C) * 4);
    }
    queries = last_queries_.data();
  }
  attention::paged_attention_forward(att, qkv, queries, M,
                                     cache.k_base(cache_layer), cache.v_base(cache_layer), ps);

  // mid = (att @ Wo^T + bo) + x                                                   (M,C)
  // (tp: this rank's heads give a partial sum; the replicated bias goes on after the sum)
  if (!tp_) {
    K::MatmulEpilogue plus_x;  // the residual added in the matmul's tiles (the same add)
    plus_x.residual = x;
    K::weight_matmul(mid, C, att, M, lin.out, w_.f32(o.b_out), plus_x);
  } else {
    K::weight_matmul(mid, C, att, M, lin.out, nullptr);
    all_reduce(mid, M * C);
    K::bias_add_rows(mid, w_.f32(o.b_out), M, C);
    K::add_inplace(mid, x, M * C);
  }
  K::layernorm_forward(ln, nullptr, nullptr, mid, w_.f32(o.norm2_w), w_.f32(o.norm2_b), M, C,
                       cfg.norm_eps);
  if (experts && experts->sparse()) {
    // x = MoE(ln2) + mid (tp = 1: ParamLayout refuses MoE under tp)                (M,C)
    moe_ffn(*experts, ln, mid, last_only ? last_tok_.data() : row_tok_.data(),
            last_only ? last_dom_.data() : row_dom_.data(), M, x);
    return;
  }
  // act = gelu(ln2 @ Wup^T + bup), the GELU applied in the matmul's tiles (bitwise
  // bias_gelu_forward's; the up projection's columns are this rank's under tp)   (M,F)
  float* act = act_.get(size_t(N * F));  // (N,F)
  K::weight_matmul(act, F, ln, M, lin.up, w_.f32(o.b_up), gelu_epilogue(cfg.activation));
  // x = (act @ Wdown^T + bdown) + mid                                             (M,C)
  if (!tp_) {
    K::MatmulEpilogue plus_mid;
    plus_mid.residual = mid;
    K::weight_matmul(x, C, act, M, lin.down, w_.f32(o.b_down), plus_mid);
  } else {
    K::weight_matmul(x, C, act, M, lin.down, nullptr);
    all_reduce(x, M * C);
    K::bias_add_rows(x, w_.f32(o.b_down), M, C);
    K::add_inplace(x, mid, M * C);
  }
}

void Decoder::moe_ffn(const BlockExperts& ex, const float* ln, const float* mid,
                      const int32_t* toks, const int32_t* doms, int64_t M, float* x) {
  const model::ModelConfig& cfg = w_.config();
  const int64_t C = cfg.d_model, Fe = cfg.moe.expert_d_ff, E = cfg.moe.experts;
  // Routing and dispatch as the training forward (model/moe.h): one expert per row (rre).
  const std::vector<int32_t> expert = model::rre_experts(cfg, w_.f32(ex.table), toks, doms, M);
  slot_row_.resize(size_t(M));
  row_slot_.resize(size_t(M));
  model::moe_pack_slots(expert.data(), M, /*k=*/1, E, moe_offsets_, slot_row_.data(),
                        row_slot_.data());
  // xs = ln rows in slot order; per expert: ys = gelu(xs @ Wup_e^T + bup_e) @ Wdown_e^T + bdown_e
  float* xs = xs_.get(size_t(M * C));    // (M,C)
  float* ys = ys_.get(size_t(M * C));    // (M,C)
  float* act = act_.get(size_t(M * Fe));  // (M,Fe)
  for (int64_t s = 0; s < M; ++s)
    std::memcpy(xs + s * C, ln + int64_t(slot_row_[size_t(s)]) * C, size_t(C) * 4);
  for (int64_t e = 0; e < E; ++e) {
    const int64_t a = moe_offsets_[size_t(e)], n = moe_offsets_[size_t(e + 1)] - a;
    if (n == 0) continue;
    K::weight_matmul(act + a * Fe, Fe, xs + a * C, n, ex.up[size_t(e)],
                     w_.f32(ex.up_b[size_t(e)]), gelu_epilogue(cfg.activation));
    K::weight_matmul(ys + a * C, C, act + a * Fe, n, ex.down[size_t(e)],
                     w_.f32(ex.down_b[size_t(e)]));
  }
  // x[r] = ys[slot(r)] + mid[r] (the expert's weight is 1)
  for (int64_t r = 0; r < M; ++r) {
    const float* y = ys + int64_t(row_slot_[size_t(r)]) * C;
    float* xr = x + r * C;
    const float* mr = mid + r * C;
    for (int64_t c = 0; c < C; ++c) xr[c] = y[c] + mr[c];
  }
}

void Decoder::forward(KvCache& cache, std::span<const SeqStep> seqs, float* logits) {
  run(cache, seqs, logits, /*every_row=*/false);
}

void Decoder::forward_all(KvCache& cache, std::span<const SeqStep> seqs, float* logits) {
  run(cache, seqs, logits, /*every_row=*/true);
}

void Decoder::run(KvCache& cache, std::span<const SeqStep> seqs, float* logits, bool every_row) {
  const model::ModelConfig& cfg = w_.config();
  const int64_t C = cfg.d_model, V = cfg.vocab, B = int64_t(seqs.size());
  LOOM_CHECK(B >= 1, "decoder step with no sequences");
  // Validate everything before the cache is touched.
  const bool moe = cfg.moe.enabled();
  int64_t N = 0;
  for (int64_t b = 0; b < B; ++b) {
    const SeqStep& sq = seqs[size_t(b)];
    const int64_t n = int64_t(sq.tokens.size());
    LOOM_CHECK(n >= 1, "decoder: sequence {} of the step has no new tokens", b);
    LOOM_CHECK(sq.pos >= 0 && sq.pos + n <= cfg.max_seq,
               "decoder: sequence {} would reach position {} but the model's context (max_seq) "
               "is {} tokens",
               b, sq.pos + n, cfg.max_seq);
    LOOM_CHECK(cache.capacity(sq.kv_seq) >= sq.pos + n,
               "decoder: KV sequence {} has room for {} tokens, the step needs {}", sq.kv_seq,
               cache.capacity(sq.kv_seq), sq.pos + n);
    K::check_token_ids(sq.tokens.data(), 1, n, V);
    if (moe)
      LOOM_CHECK(sq.domain >= -1 && sq.domain < cfg.moe.num_domains(),
                 "decoder: sequence {} has domain {}, outside [0, {}) (domains {}; -1: the "
                 "default)",
                 b, sq.domain, cfg.moe.num_domains(), fmt::join(cfg.moe.domains, ", "));
    N += n;
  }
  row_seq_.resize(size_t(N));
  row_pos_.resize(size_t(N));
  queries_.resize(size_t(N));
  last_row_.resize(size_t(B));
  if (moe) {
    row_tok_.resize(size_t(N));
    row_dom_.resize(size_t(N));
    last_tok_.resize(size_t(B));
    last_dom_.resize(size_t(B));
  }
  for (int64_t b = 0, r = 0; b < B; ++b) {
    const SeqStep& sq = seqs[size_t(b)];
    last_row_[size_t(b)] = r + int64_t(sq.tokens.size()) - 1;
    if (moe) {
      const int32_t d = sq.domain >= 0 ? sq.domain : int32_t(cfg.moe.other_domain());
      std::copy(sq.tokens.begin(), sq.tokens.end(), row_tok_.begin() + r);
      std::fill_n(row_dom_.begin() + r, sq.tokens.size(), d);
      last_tok_[size_t(b)] = sq.tokens.back();
      last_dom_[size_t(b)] = d;
    }
    const std::vector<int32_t>& table = cache.block_table(sq.kv_seq);
    for (int64_t i = 0; i < int64_t(sq.tokens.size()); ++i, ++r) {
      row_seq_[size_t(r)] = b;
      row_pos_[size_t(r)] = sq.pos + i;
      queries_[size_t(r)] = {table.data(), int64_t(table.size()), sq.pos + i + 1};
    }
  }

  // h0 = wte[tokens] + wpe[pos .. pos+n)                                           (N,C)
  float* x = x_.get(size_t(N * C));
  if (!tp_) {
    for (int64_t b = 0, r = 0; b < B; ++b) {
      const SeqStep& sq = seqs[size_t(b)];
      const int64_t n = int64_t(sq.tokens.size());
      K::embedding_forward(x + r * C, sq.tokens.data(), w_.token_embedding(),
                           w_.position_embedding(), 1, n, C, V, sq.pos);
      r += n;
    }
  } else {
    // Vocabulary-parallel: the rank holding a token's row writes wte + wpe, the others zeros;
    // the sum over tp is then exactly tp = 1's row.
    const int64_t Vl = V / w_.tp().size, lo = Vl * w_.tp().rank;
    for (int64_t b = 0, r = 0; b < B; ++b) {
      const SeqStep& sq = seqs[size_t(b)];
      for (int64_t i = 0; i < int64_t(sq.tokens.size()); ++i, ++r) {
        const int64_t t = sq.tokens[size_t(i)] - lo;
        float* xr = x + r * C;
        const float* pe = w_.position_embedding() + (sq.pos + i) * C;
        if (t >= 0 && t < Vl) {
          const float* te = w_.token_embedding() + t * C;
          for (int64_t c = 0; c < C; ++c) xr[c] = te[c] + pe[c];
        } else {
          std::fill(xr, xr + C, 0.f);
        }
      }
    }
    all_reduce(x, N * C);
  }
  // The last layer of the model (the query layer, else the last block) leaves only each
  // sequence's last row, in rows [0, B) of x (every_row: all N rows stay).
  for (int64_t l = 0; l < cfg.n_layers; ++l)
    layer(cache, seqs, l, w_.block(l), w_.block_linears(l), &w_.block_experts(l), x, nullptr,
          /*last_only=*/!every_row && !cfg.query_layer && l == cfg.n_layers - 1);
  const int64_t rows = (cfg.query_layer || every_row) ? N : B;
  const int64_t R = every_row ? N : B;  // logit rows

  // final LayerNorm (into mid_, then copied back so the query layer can run in place) (rows,C)
  float* fin = mid_.get(size_t(rows * C));
  K::layernorm_forward(fin, nullptr, nullptr, x, w_.final_norm_w(), w_.final_norm_b(), rows, C,
                       cfg.norm_eps);
  std::memcpy(x, fin, size_t(rows * C) * 4);
  if (cfg.query_layer) {
    // The query input of row r is row pos_r of the query layer's position table.     (N,C)
    float* qin = qin_.get(size_t(N * C));
    for (int64_t r = 0; r < N; ++r)
      std::memcpy(qin + r * C, w_.query_position() + row_pos_[size_t(r)] * C, size_t(C) * 4);
    layer(cache, seqs, cfg.n_layers, w_.query_block(), w_.query_linears(), nullptr, x, qin,
          /*last_only=*/!every_row);
  }

  // logits of each sequence's last new row (rows [0, B) of x), or of every row: h (R,C) @ wte^T
  //                                                                                    (R,V)
  const float* last = x;
  if (!tp_) {
    K::weight_matmul(logits, V, last, R, w_.head(), nullptr);
    return;
  }
  // tp: this rank's vocabulary rows (R, V/P), gathered as (P, R, V/P), then laid out (R, V).
  const int64_t P = w_.tp().size, Vl = V / P;
  float* mine = shard_logits_.get(size_t(R * Vl));
  float* all = gathered_.get(size_t(P * R * Vl));
  K::weight_matmul(mine, Vl, last, R, w_.head(), nullptr);
  tp_->all_gather(comm::BufferRef(mine, R * Vl, DType::f32),
                  comm::BufferRef(all, P * R * Vl, DType::f32))
      .wait();
  for (int64_t p = 0; p < P; ++p)
    for (int64_t b = 0; b < R; ++b)
      std::memcpy(logits + b * V + p * Vl, all + (p * R + b) * Vl, size_t(Vl) * 4);
}

}  // namespace loom::infer
