// model/config.h: the typed, strict description of a model.
//
// Glossary: V vocab, L n_layers (ordinary transformer blocks), C d_model, NH n_heads,
// NKV n_kv_heads, HD = C/NH head dim, KV = NKV*HD, F d_ff, S max_seq.
// With query_layer = true the PanGu-α / CodeGeeX top query layer sits on top of the L blocks (so
// PanGu-α 2.6B, "32 layers", is n_layers = 31 plus the query layer).
#pragma once

#include <cstdint>
#include <string>

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

  int64_t head_dim() const { return d_model / n_heads; }
  int64_t kv_dim() const { return n_kv_heads * head_dim(); }

  // Throws loom::Error naming the offending key, its value and what would be valid.
  void validate() const;
  // Total parameters (the tied head counted once). Throws loom::Error if it overflows int64.
  int64_t num_params() const;
  // A floor on the f32 activation bytes of one max_seq sequence (logits + per-layer buffers).
  int64_t sequence_activation_bytes() const;
  // Training FLOPs per token at sequence length T: 6 * (matmul weights incl. the head) plus
  // attention 6 * 2 * L' * T * C / 2 (causal halves the score and value products) where L'
  // counts the query layer. Forward only is a third of it.
  double train_flops_per_token(int64_t T) const;

  std::string to_toml() const;
};

// Parses TOML text (source names the file in errors). Unknown keys, wrong types and impossible
// values are errors that name the key and the allowed values.
ModelConfig model_config_from_toml(const std::string& text, const std::string& source);
ModelConfig load_model_config(const std::string& path);

const char* activation_name(Activation a);

}  // namespace loom::model
