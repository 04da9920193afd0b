// model/config.h: the typed, strict description of a model.
//
// Glossary: V vocab, L n_layers (ordinary transformer blocks), C d_model, NH n_heads,
// NKV n_kv_heads, HD = C/NH head dim, KV = NKV*HD, F d_ff, S max_seq.
// With query_layer = true the PanGu-α / CodeGeeX top query layer sits on top of the L blocks (so
// PanGu-α 2.6B, "32 layers", is n_layers = 31 plus the query layer).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace loom::model {

// gelu: tanh approximation (GPT-2); gelu_erf: exact erf GELU (Hugging Face "gelu");
// fast_gelu: x * sigmoid(1.702 x) (MindSpore FastGelu, PanGu-α / CodeGeeX).
enum class Activation { gelu, fast_gelu, gelu_erf };

// Limits validate() enforces (each far above real models; they keep sizes exact in int64).
inline constexpr int64_t kMaxLayers = int64_t(1) << 14;
inline constexpr int64_t kMaxWidth = int64_t(1) << 20;
inline constexpr int64_t kMaxSeq = int64_t(1) << 24;
inline constexpr int64_t kMaxParams = int64_t(1) << 42;
inline constexpr int64_t kMaxSequenceActivationBytes = int64_t(1) << 50;

// Sparse mixture-of-experts FFNs (PanGu-Σ; notes/pangu_moe.md). A sparse block replaces its
// dense FFN by `experts` expert FFNs (each C -> expert_d_ff -> C with the model's activation and
// biases) and a router:
//   rre:  Random Routed Experts (PanGu-Σ, Ren et al. 2023, arXiv 2303.10845). No learned gate.
//         Level 1: the token's domain d picks its group, experts [d*G, (d+1)*G) (G =
//         experts_per_domain, experts = G * #domains). Level 2: a fixed table (D, V) maps the
//         token id to an expert within the group. The table is a frozen (non-trainable) tensor
//         of the model, `blocks.i.moe.rre_table`, stored in checkpoints; built "uniform" (Philox
//         draws from the seed) or "balanced" (from per-domain token counts, longest-processing-
//         time greedy so each expert's expected load is even; see model/moe.h). The expert's
//         output is used as is (weight 1). Routing depends only on (domain, token id).
//   topk: a learned gate (Shazeer et al. 2017; GShard, Lepikhin et al. 2020; Switch, Fedus et
//         al. 2021): p = softmax(x Wg^T) over experts, each token goes to its top_k experts with
//         combine weight p_e, each expert takes at most capacity = ceil(top_k * N *
//         capacity_factor / experts) of a micro-batch's N tokens (later tokens are dropped: their
//         FFN output is 0, the residual passes), and the auxiliary balance loss aux_loss_coef *
//         E * sum_e f_e P_e (Switch eq. 4; f_e the fraction of the N*top_k choices that picked
//         e before capacity, P_e the mean gate probability) is added per sparse block and
//         micro-batch.
enum class Router { rre, topk };
enum class RreTable { uniform, balanced };

struct MoeConfig {
  std::vector<int64_t> sparse_layers;  // sorted block indices with an MoE FFN (empty: dense)
  int64_t experts = 0;                 // E, per sparse block
  int64_t expert_d_ff = 0;             // Fe (0 in a file means "= d_ff")
  Router router = Router::rre;
  // rre: domain names, e.g. ["python", "cpp", "other"]; languages (data/languages.h, compared
  // case-insensitively, "c++" also as "cpp") map to the domain of their name, every other
  // language and unknown-language tokens to "other", which must be listed when there are two or
  // more domains (a single domain, as in an extracted sub-model, takes every token). Names that
  // are no language are allowed (PanGu-Σ's natural-language domains): loom's code corpus sends them
  // no tokens, but a caller passing domain indices can.
  std::vector<std::string> domains;
  int64_t experts_per_domain = 0;  // G (rre): experts = G * domains.size()
  RreTable rre_table = RreTable::uniform;
  int64_t top_k = 1;               // topk
  double capacity_factor = 1.25;   // topk
  double aux_loss_coef = 0.01;     // topk

  bool enabled() const { return !sparse_layers.empty(); }
  bool is_sparse(int64_t layer) const;
  int64_t num_domains() const { return int64_t(domains.size()); }
  // Experts each token visits: top_k for topk, 1 for rre.
  int64_t k() const { return router == Router::topk ? top_k : 1; }
  // Domain index of "other" (-1 if missing); a model with a single domain (an extracted sub-model,
  // `loom extract`) sends every token to it, so "other" is required only with two or more.
  int64_t other_domain() const;
};

struct ModelConfig {
  std::string name = "unnamed";
  int64_t vocab = 0;
  int64_t n_layers = 0;
  int64_t d_model = 0;
  int64_t n_heads = 0;
  int64_t n_kv_heads = 0;  // 0 in a file means "= n_heads"
  int64_t d_ff = 0;
  int64_t max_seq = 0;
  Activation activation = Activation::gelu;
  float norm_eps = 1e-5f;
  bool query_layer = false;
  bool tied_head = true;  // loom always ties the head to embed.token.weight
  MoeConfig moe;          // [moe]; no sparse layers: a dense model

  int64_t head_dim() const { return d_model / n_heads; }
  int64_t kv_dim() const { return n_kv_heads * head_dim(); }

  // Throws loom::Error naming the offending key, its value and what would be valid.
  void validate() const;
  // Total trainable parameters (the tied head counted once; MoE: every expert, not the frozen
  // rre tables). Throws loom::Error if it overflows int64.
  int64_t num_params() const;
  // Parameters one token uses (MoE: k experts per sparse block, plus the gate); = num_params()
  // for a dense model.
  int64_t active_params() const;
  // Elements of the flat parameter buffer: num_params() plus the rre tables (sparse blocks x
  // domains x vocab).
  int64_t num_buffer_elements() const;
  // Domain index (into moe.domains) of each language id of data/languages.h, in id order; the
  // unknown language (-1) maps to other_domain(). Empty for a model without rre.
  std::vector<int32_t> language_domains() const;
  // Domain index of a domain given by name (`--domain`, a request's "domain"): a domain name or a
  // language's display name mapping to one ("C++" -> "cpp"), case-insensitive. Throws loom::Error
  // listing the model's domains for an unknown name, and for a model without rre domains.
  int32_t domain_index(const std::string& name) const;
  // A floor on the f32 activation bytes of one max_seq sequence (logits + per-layer buffers).
  int64_t sequence_activation_bytes() const;
  // Training FLOPs per token at sequence length T: 6 * (matmul weights incl. the head) plus
  // attention 6 * 2 * L' * T * C / 2 (causal halves the score and value products) where L'
  // counts the query layer. Forward only is a third of it.
  double train_flops_per_token(int64_t T) const;

  std::string to_toml() const;

  // Context parallelism over cp ranks: sparse blocks with the topk router are refused (their
  // expert capacity and load-balancing aux loss are computed over the rows a rank holds, so
  // under cp they would become per cp shard and differ from the cp = 1 model). rre routes each
  // token by itself and runs under any cp. Throws loom::Error naming the alternatives.
  void check_context_parallel(int cp) const;
};

// Parses TOML text (source names the file in errors). Unknown keys, wrong types and impossible
// values are errors that name the key and the allowed values.
ModelConfig model_config_from_toml(const std::string& text, const std::string& source);
ModelConfig load_model_config(const std::string& path);

const char* activation_name(Activation a);
const char* router_name(Router r);

}  // namespace loom::model
