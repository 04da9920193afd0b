#include "model/config.h"

#include <fstream>
#include <set>
#include <sstream>
#include <toml++/toml.h>

#include "core/checked.h"
#include "core/config_file.h"
#include "core/error.h"

namespace loom::model {

const char* activation_name(Activation a) {
  switch (a) {
    case Activation::gelu: return "gelu";
    case Activation::fast_gelu: return "fast_gelu";
    case Activation::gelu_erf: return "gelu_erf";
  }
  return "?";
}

void ModelConfig::validate() const {
  auto positive = [&](const char* key, int64_t v) {
    LOOM_CHECK(v > 0, "model '{}': {} = {} must be positive", name, key, v);
  };
  positive("vocab", vocab);
  positive("n_layers", n_layers);
  positive("d_model", d_model);
  positive("n_heads", n_heads);
  positive("n_kv_heads", n_kv_heads);
  positive("d_ff", d_ff);
  positive("max_seq", max_seq);
  LOOM_CHECK(vocab < (int64_t(1) << 31), "model '{}': vocab = {} exceeds int32 token ids", name,
             vocab);
  // Upper bounds, far above any real model, so that every product below stays exact and a typo
  // (an extra digit, 2^40 layers) is an error here rather than an allocation that never ends.
  auto at_most = [&](const char* key, int64_t v, int64_t limit, const char* why) {
    LOOM_CHECK(v <= limit, "model '{}': {} = {} exceeds the limit {} ({}); use a smaller {}",
               name, key, v, limit, why, key);
  };
  at_most("n_layers", n_layers, kMaxLayers, "deeper than any trained transformer by 100x");
  at_most("d_model", d_model, kMaxWidth, "2^20");
  at_most("d_ff", d_ff, kMaxWidth * 4, "4 * 2^20");
  at_most("n_heads", n_heads, d_model, "d_model: a head has at least one channel");
  at_most("max_seq", max_seq, kMaxSeq, "2^24 tokens");
  const int64_t params = num_params();
  LOOM_CHECK(params <= kMaxParams,
             "model '{}': {} parameters exceed the limit {} (2^42); check n_layers = {}, d_model = "
             "{}, d_ff = {}, vocab = {}, max_seq = {}",
             name, params, kMaxParams, n_layers, d_model, d_ff, vocab, max_seq);
  const int64_t act = sequence_activation_bytes();
  LOOM_CHECK(act <= kMaxSequenceActivationBytes,
             "model '{}': one sequence of max_seq = {} tokens needs at least {} bytes of "
             "activations, over the limit {} (1 PiB); use a smaller max_seq, n_layers or vocab",
             name, max_seq, act, kMaxSequenceActivationBytes);
  LOOM_CHECK(d_model % n_heads == 0,
             "model '{}': n_heads = {} must divide d_model = {} (head dim = d_model / n_heads)",
             name, n_heads, d_model);
  if (n_heads % n_kv_heads != 0) {
    std::string valid;
    for (int64_t k = 1; k <= n_heads; ++k)
      if (n_heads % k == 0) valid += (valid.empty() ? "" : ", ") + std::to_string(k);
    LOOM_FAIL("model '{}': n_kv_heads = {} must divide n_heads = {}; choose one of {}", name,
              n_kv_heads, n_heads, valid);
  }
  LOOM_CHECK(norm_eps > 0.f && norm_eps < 1.f, "model '{}': norm_eps = {} must be in (0, 1)", name,
             norm_eps);
  LOOM_CHECK(tied_head, "model '{}': tied_head = false is not supported (loom ties the LM head "
             "to embed.token.weight, as PanGu-α and CodeGeeX do)", name);
}

int64_t ModelConfig::num_params() const {
  // Checked: validate() calls this on values straight from the file, before any other bound.
  auto mul = [&](int64_t a, int64_t b) { return checked_mul(a, b, "model parameter count"); };
  auto add = [&](int64_t a, int64_t b) { return checked_add(a, b, "model parameter count"); };
  const int64_t C = d_model, F = d_ff, KV = mul(n_kv_heads, head_dim());
  const int64_t attn = add(add(mul(C, C), C), add(mul(2, add(mul(KV, C), KV)), add(mul(C, C), C)));
  const int64_t ffn = add(add(mul(F, C), F), add(mul(C, F), C));
  const int64_t block = add(mul(4, C), add(attn, ffn));  // two norms
  int64_t n = add(add(mul(vocab, C), mul(max_seq, C)), add(mul(n_layers, block), mul(2, C)));
  if (query_layer) n = add(n, add(mul(max_seq, C), block));
  return n;
}

int64_t ModelConfig::sequence_activation_bytes() const {
  // Per token: the logits row (V) and, per layer, the residual, norm, qkv and attention output
  // (about 4C) and the FFN hidden (F), all f32. Real training stores more (see memory.h); this
  // is the floor that must fit before anything else is worth computing.
  auto mul = [&](int64_t a, int64_t b) { return checked_mul(a, b, "activation bytes"); };
  auto add = [&](int64_t a, int64_t b) { return checked_add(a, b, "activation bytes"); };
  const int64_t layers = add(n_layers, query_layer ? 1 : 0);
  const int64_t per_token = add(vocab, mul(layers, add(mul(4, d_model), d_ff)));
  return mul(mul(max_seq, per_token), 4);
}

double ModelConfig::train_flops_per_token(int64_t T) const {
  const double C = double(d_model), F = double(d_ff), KV = double(kv_dim());
  const double layers = double(n_layers + (query_layer ? 1 : 0));
  const double matmul_weights = layers * (2 * C * C + 2 * KV * C + 2 * C * F) + double(vocab) * C;
  // Causal attention: q.k and p.v each cost 2*T*C per token over the visible half: 2*T*C total.
  const double attention = layers * 2.0 * double(T) * C;
  return 6.0 * matmul_weights + 3.0 * attention;
}

std::string ModelConfig::to_toml() const {
  std::ostringstream o;
  o << "name = \"" << name << "\"\n"
    << "vocab = " << vocab << "\nn_layers = " << n_layers << "\nd_model = " << d_model
    << "\nn_heads = " << n_heads << "\nn_kv_heads = " << n_kv_heads << "\nd_ff = " << d_ff
    << "\nmax_seq = " << max_seq << "\nactivation = \"" << activation_name(activation) << "\"\n"
    << "norm_eps = " << fmt::format("{}", norm_eps) << "\nquery_layer = "
    << (query_layer ? "true" : "false") << "\ntied_head = " << (tied_head ? "true" : "false")
    << "\n";
  return o.str();
}

ModelConfig model_config_from_toml(const std::string& text, const std::string& source) {
  toml::table tbl;
  try {
    tbl = toml::parse(text, source);
  } catch (const toml::parse_error& e) {
    LOOM_FAIL("{}: TOML syntax error at line {}: {}", source, e.source().begin.line,
              std::string(e.description()));
  }
  // A model file may have its keys at the top level or under [model].
  const toml::table* t = &tbl;
  if (auto* m = tbl["model"].as_table()) t = m;
  static const std::set<std::string> kKeys = {"name",     "vocab",      "n_layers",
                                              "d_model",  "n_heads",    "n_kv_heads",
                                              "d_ff",     "max_seq",    "activation",
                                              "norm_eps", "query_layer", "tied_head"};
  for (auto& [k, v] : *t) {
    std::string key(k.str());
    if (!kKeys.count(key)) {
      std::string allowed;
      for (auto& a : kKeys) allowed += (allowed.empty() ? "" : ", ") + a;
      LOOM_FAIL("{}: unknown model key '{}'; allowed keys: {}", source, key, allowed);
    }
  }
  ModelConfig c;
  auto get_int = [&](const char* key, int64_t& out, bool required) {
    auto node = (*t)[key];
    if (!node) {
      LOOM_CHECK(!required, "{}: missing required model key '{}'", source, key);
      return;
    }
    // is_integer first: value<int64_t>() converts a float such as 5e20 with undefined behaviour
    // (found by fuzz_model_toml).
    LOOM_CHECK(node.is_integer(), "{}: model key '{}' must be an integer", source, key);
    out = *node.value<int64_t>();
  };
  if (auto n = (*t)["name"]) {
    LOOM_CHECK(n.is_string(), "{}: model key 'name' must be a string", source);
    c.name = *n.value<std::string>();
  }
  get_int("vocab", c.vocab, true);
  get_int("n_layers", c.n_layers, true);
  get_int("d_model", c.d_model, true);
  get_int("n_heads", c.n_heads, true);
  get_int("n_kv_heads", c.n_kv_heads, false);
  if (c.n_kv_heads == 0) c.n_kv_heads = c.n_heads;
  get_int("d_ff", c.d_ff, true);
  get_int("max_seq", c.max_seq, true);
  if (auto a = (*t)["activation"]) {
    auto s = a.value<std::string>();
    LOOM_CHECK(s && (*s == "gelu" || *s == "fast_gelu" || *s == "gelu_erf"),
               "{}: activation must be \"gelu\" (tanh form), \"gelu_erf\" (exact) or "
               "\"fast_gelu\"", source);
    c.activation = *s == "gelu"        ? Activation::gelu
                   : *s == "gelu_erf" ? Activation::gelu_erf
                                      : Activation::fast_gelu;
  }
  if (auto e = (*t)["norm_eps"]) {
    auto v = e.value<double>();
    LOOM_CHECK(v.has_value(), "{}: norm_eps must be a number", source);
    // Range before the float conversion (out of float range it is undefined behaviour).
    LOOM_CHECK(*v > 0 && *v < 1, "{}: norm_eps = {} must be in (0, 1)", source, *v);
    c.norm_eps = float(*v);
  }
  auto get_bool = [&](const char* key, bool& out) {
    if (auto b = (*t)[key]) {
      LOOM_CHECK(b.is_boolean(), "{}: model key '{}' must be true or false", source, key);
      out = *b.value<bool>();
    }
  };
  get_bool("query_layer", c.query_layer);
  get_bool("tied_head", c.tied_head);
  if (c.name == "unnamed") {
    auto slash = source.find_last_of('/');
    std::string base = source.substr(slash == std::string::npos ? 0 : slash + 1);
    c.name = base.substr(0, base.rfind(".toml"));
  }
  c.validate();
  return c;
}

ModelConfig load_model_config(const std::string& path) {
  return model_config_from_toml(read_config_file(path, "model config"), path);
}

}  // namespace loom::model
