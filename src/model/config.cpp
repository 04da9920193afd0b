#include "model/config.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <fstream>
#include <fmt/ranges.h>
#include <set>
#include <sstream>
#include <toml++/toml.h>

#include "core/checked.h"
#include "core/config_file.h"
#include "core/error.h"
#include "data/languages.h"

namespace loom::model {

const char* router_name(Router r) { return r == Router::rre ? "rre" : "topk"; }

void ModelConfig::check_context_parallel(int cp) const {
  LOOM_CHECK(cp <= 1 || !moe.enabled() || moe.router != Router::topk,
             "model '{}': cp = {} with moe.router = \"topk\" is not supported: the topk router's "
             "expert capacity and aux (load-balancing) loss are computed over the rows a rank "
             "holds, so under context parallelism they would be per cp shard and differ from the "
             "unsplit model; use moe.router = \"rre\" (routes each token by itself, exact under "
             "cp) or cp = 1",
             name, cp);
}

bool MoeConfig::is_sparse(int64_t layer) const {
  return std::binary_search(sparse_layers.begin(), sparse_layers.end(), layer);
}

int64_t MoeConfig::other_domain() const {
  if (domains.size() == 1) return 0;  // one domain (an extracted model) takes every token
  for (size_t i = 0; i < domains.size(); ++i)
    if (domains[i] == "other") return int64_t(i);
  return -1;
}

namespace {
std::string lower(std::string_view s) {
  std::string o(s);
  for (char& ch : o) ch = char(std::tolower(static_cast<unsigned char>(ch)));
  return o;
}
// The domain names a language answers to: its display name lower-cased, and "cpp" for C++.
bool language_matches(data::Language l, const std::string& domain) {
  const std::string n = lower(data::language_name(l));
  return domain == n || (n == "c++" && domain == "cpp");
}

void validate_moe(const ModelConfig& m) {
  const MoeConfig& e = m.moe;
  if (!e.enabled()) {
    LOOM_CHECK(e.experts == 0,
               "model '{}': moe.experts = {} but no block is sparse; set moe.sparse_layers, "
               "moe.sparse_every or moe.sparse_top",
               m.name, e.experts);
    return;
  }
  for (size_t i = 0; i < e.sparse_layers.size(); ++i) {
    const int64_t l = e.sparse_layers[i];
    LOOM_CHECK(l >= 0 && l < m.n_layers,
               "model '{}': moe sparse layer {} is outside the blocks [0, {}) (the query layer "
               "stays dense)",
               m.name, l, m.n_layers);
    LOOM_CHECK(i == 0 || l > e.sparse_layers[i - 1],
               "model '{}': moe sparse layers must be ascending without repeats (got {} after {})",
               m.name, l, i ? e.sparse_layers[i - 1] : 0);
  }
  LOOM_CHECK(e.expert_d_ff >= 1 && e.expert_d_ff <= kMaxWidth * 4,
             "model '{}': moe.expert_d_ff = {} must be in [1, 2^22]", m.name, e.expert_d_ff);
  if (e.router == Router::rre) {
    LOOM_CHECK(!e.domains.empty(),
               "model '{}': the rre router needs moe.domains (e.g. [\"python\", \"other\"])",
               m.name);
    std::set<std::string> seen;
    for (const std::string& d : e.domains) {
      LOOM_CHECK(seen.insert(d).second, "model '{}': moe domain '{}' is listed twice", m.name, d);
      LOOM_CHECK(!d.empty(), "model '{}': moe domain names must not be empty", m.name);
    }
    LOOM_CHECK(e.num_domains() == 1 || e.other_domain() >= 0,
               "model '{}': moe.domains {} has no \"other\" domain; add \"other\" (it takes "
               "every language not listed and tokens of unknown language)",
               m.name, fmt::format("{}", fmt::join(e.domains, ", ")));
    LOOM_CHECK(e.experts_per_domain >= 1,
               "model '{}': moe.experts_per_domain = {} leaves a domain with no experts; each "
               "domain needs at least 1 (experts = experts_per_domain * {} domains)",
               m.name, e.experts_per_domain, e.domains.size());
    LOOM_CHECK(e.experts == e.experts_per_domain * e.num_domains(),
               "model '{}': moe.experts = {} but experts_per_domain = {} x {} domains = {}; set "
               "experts = {} (or leave it out)",
               m.name, e.experts, e.experts_per_domain, e.num_domains(),
               e.experts_per_domain * e.num_domains(), e.experts_per_domain * e.num_domains());
  }
  LOOM_CHECK(e.experts >= 1 && e.experts <= (int64_t(1) << 20),
             "model '{}': moe.experts = {} must be in [1, 2^20]", m.name, e.experts);
  if (e.router == Router::topk) {
    LOOM_CHECK(e.top_k >= 1 && e.top_k <= e.experts,
               "model '{}': moe.top_k = {} must be in [1, experts = {}]", m.name, e.top_k,
               e.experts);
    LOOM_CHECK(e.capacity_factor > 0 && e.capacity_factor <= 1e6,
               "model '{}': moe.capacity_factor = {} must be in (0, 1e6]", m.name,
               e.capacity_factor);
    LOOM_CHECK(e.aux_loss_coef >= 0 && e.aux_loss_coef <= 1e3,
               "model '{}': moe.aux_loss_coef = {} must be in [0, 1000]", m.name, e.aux_loss_coef);
  }
}
}  // namespace

int32_t ModelConfig::domain_index(const std::string& name) const {
  LOOM_CHECK(moe.enabled() && moe.router == Router::rre,
             "model '{}' has no domains ({}), so a domain ('{}') does not apply; leave the "
             "domain out",
             this->name,
             moe.enabled() ? fmt::format("its sparse blocks use the {} router",
                                         router_name(moe.router))
                           : std::string("it is dense"),
             name);
  const std::string want = lower(name);
  for (size_t i = 0; i < moe.domains.size(); ++i)
    if (lower(moe.domains[i]) == want) return int32_t(i);
  // A language's display name ("C++", "Python") names the domain it maps to.
  for (data::Language l : data::all_languages())
    if (lower(data::language_name(l)) == want)
      for (size_t i = 0; i < moe.domains.size(); ++i)
        if (language_matches(l, moe.domains[i])) return int32_t(i);
  LOOM_FAIL("unknown domain '{}' for model '{}'; its domains are: {}", name, this->name,
            fmt::format("{}", fmt::join(moe.domains, ", ")));
}

std::vector<int32_t> ModelConfig::language_domains() const {
  if (!moe.enabled() || moe.router != Router::rre) return {};
  std::vector<int32_t> out;
  for (data::Language l : data::all_languages()) {
    int32_t d = int32_t(moe.other_domain());
    for (size_t i = 0; i < moe.domains.size(); ++i)
      if (language_matches(l, moe.domains[i])) d = int32_t(i);
    out.push_back(d);
  }
  return out;
}

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
  validate_moe(*this);
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
  if (moe.enabled()) {
    // Each sparse block: E expert FFNs (and the topk gate (E,C)) instead of the dense FFN.
    const int64_t Fe = moe.expert_d_ff, ns = int64_t(moe.sparse_layers.size());
    const int64_t expert = add(add(mul(Fe, C), Fe), add(mul(C, Fe), C));
    int64_t sparse = mul(moe.experts, expert);
    if (moe.router == Router::topk) sparse = add(sparse, mul(moe.experts, C));
    n = add(n - mul(ns, ffn), mul(ns, sparse));
  }
  return n;
}

int64_t ModelConfig::active_params() const {
  int64_t n = num_params();
  if (!moe.enabled()) return n;
  const int64_t C = d_model, Fe = moe.expert_d_ff, ns = int64_t(moe.sparse_layers.size());
  const int64_t expert = 2 * Fe * C + Fe + C;
  return n - ns * (moe.experts - moe.k()) * expert;
}

int64_t ModelConfig::num_buffer_elements() const {
  int64_t n = num_params();
  if (moe.enabled() && moe.router == Router::rre)
    n = checked_add(n,
                    checked_mul(int64_t(moe.sparse_layers.size()),
                                checked_mul(moe.num_domains(), vocab, "rre tables"), "rre tables"),
                    "model buffer size");
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
  double matmul_weights = layers * (2 * C * C + 2 * KV * C + 2 * C * F) + double(vocab) * C;
  if (moe.enabled()) {
    // A sparse block's FFN costs k experts' products (and the topk gate) instead of the dense.
    const double Fe = double(moe.expert_d_ff), ns = double(moe.sparse_layers.size());
    matmul_weights += ns * (double(moe.k()) * 2 * C * Fe - 2 * C * F);
    if (moe.router == Router::topk) matmul_weights += ns * double(moe.experts) * C;
  }
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
  if (moe.enabled()) {
    o << "\n[moe]\nsparse_layers = [" << fmt::format("{}", fmt::join(moe.sparse_layers, ", "))
      << "]\nexperts = " << moe.experts << "\nexpert_d_ff = " << moe.expert_d_ff
      << "\nrouter = \"" << router_name(moe.router) << "\"\n";
    if (moe.router == Router::rre) {
      o << "domains = [";
      for (size_t i = 0; i < moe.domains.size(); ++i)
        o << (i ? ", " : "") << "\"" << moe.domains[i] << "\"";
      o << "]\nexperts_per_domain = " << moe.experts_per_domain << "\nrre_table = \""
        << (moe.rre_table == RreTable::uniform ? "uniform" : "balanced") << "\"\n";
    } else {
      o << "top_k = " << moe.top_k << "\ncapacity_factor = "
        << fmt::format("{}", moe.capacity_factor)
        << "\naux_loss_coef = " << fmt::format("{}", moe.aux_loss_coef) << "\n";
    }
  }
  return o.str();
}

namespace {
// [moe]: which blocks are sparse (exactly one of sparse_layers, sparse_every, sparse_top), the
// experts and the router's settings. Unknown keys and settings of the other router are errors.
void parse_moe(const toml::table& t, ModelConfig& c, const std::string& source) {
  static const std::set<std::string> kCommon = {"sparse_layers", "sparse_every", "sparse_top",
                                                "experts", "expert_d_ff", "router"};
  static const std::set<std::string> kRre = {"domains", "experts_per_domain", "rre_table"};
  static const std::set<std::string> kTopk = {"top_k", "capacity_factor", "aux_loss_coef"};
  MoeConfig& e = c.moe;
  if (auto r = t["router"]) {
    auto s = r.value<std::string>();
    LOOM_CHECK(s && (*s == "rre" || *s == "topk"),
               "{}: moe.router = {} is unknown; use \"rre\" (random routed experts, PanGu-Σ) or "
               "\"topk\" (learned top-k gate)",
               source, s ? "\"" + *s + "\"" : std::string("(not a string)"));
    e.router = *s == "rre" ? Router::rre : Router::topk;
  }
  for (auto& [k, v] : t) {
    std::string key(k.str());
    const bool ok = kCommon.count(key) ||
                    (e.router == Router::rre ? kRre.count(key) : kTopk.count(key));
    if (!ok) {
      std::string allowed;
      for (auto* set : {&kCommon, e.router == Router::rre ? &kRre : &kTopk})
        for (auto& a : *set) allowed += (allowed.empty() ? "" : ", ") + a;
      LOOM_FAIL("{}: unknown moe key '{}' for router \"{}\"; allowed keys: {}", source, key,
                router_name(e.router), allowed);
    }
  }
  auto get_int = [&](const char* key, int64_t& out) {
    if (auto n = t[key]) {
      LOOM_CHECK(n.is_integer(), "{}: moe key '{}' must be an integer", source, key);
      out = *n.value<int64_t>();
    }
  };
  auto get_num = [&](const char* key, double& out) {
    if (auto n = t[key]) {
      auto v = n.value<double>();
      LOOM_CHECK(v && std::isfinite(*v), "{}: moe key '{}' must be a finite number", source, key);
      out = *v;
    }
  };
  int choices = 0;
  if (auto l = t["sparse_layers"]) {
    ++choices;
    auto* arr = l.as_array();
    LOOM_CHECK(arr, "{}: moe.sparse_layers must be a list of block indices, e.g. [1, 3]", source);
    for (auto& x : *arr) {
      LOOM_CHECK(x.is_integer(), "{}: moe.sparse_layers must hold integers", source);
      e.sparse_layers.push_back(*x.value<int64_t>());
    }
    LOOM_CHECK(!e.sparse_layers.empty(), "{}: moe.sparse_layers is empty", source);
  }
  int64_t every = 0, top = 0;
  get_int("sparse_every", every);
  get_int("sparse_top", top);
  if (t["sparse_every"]) {
    ++choices;
    LOOM_CHECK(every >= 1 && every <= c.n_layers,
               "{}: moe.sparse_every = {} must be in [1, n_layers = {}] (blocks k-1, 2k-1, ... "
               "are sparse)",
               source, every, c.n_layers);
    for (int64_t l = every - 1; l < c.n_layers; l += every) e.sparse_layers.push_back(l);
  }
  if (t["sparse_top"]) {
    ++choices;
    LOOM_CHECK(top >= 1 && top <= c.n_layers,
               "{}: moe.sparse_top = {} must be in [1, n_layers = {}] (the top blocks are sparse)",
               source, top, c.n_layers);
    for (int64_t l = c.n_layers - top; l < c.n_layers; ++l) e.sparse_layers.push_back(l);
  }
  LOOM_CHECK(choices == 1,
             "{}: [moe] needs exactly one of sparse_layers (list), sparse_every (k: every k-th "
             "block) or sparse_top (n: the top n blocks); got {}",
             source, choices);
  get_int("experts", e.experts);
  get_int("expert_d_ff", e.expert_d_ff);
  if (e.expert_d_ff == 0) e.expert_d_ff = c.d_ff;
  if (e.router == Router::rre) {
    if (auto d = t["domains"]) {
      auto* arr = d.as_array();
      LOOM_CHECK(arr, "{}: moe.domains must be a list of names, e.g. [\"python\", \"other\"]",
                 source);
      for (auto& x : *arr) {
        auto s = x.value<std::string>();
        LOOM_CHECK(s.has_value(), "{}: moe.domains must hold strings", source);
        e.domains.push_back(*s);
      }
    }
    get_int("experts_per_domain", e.experts_per_domain);
    if (!t["experts"]) e.experts = e.experts_per_domain * int64_t(e.domains.size());
    if (auto r = t["rre_table"]) {
      auto s = r.value<std::string>();
      LOOM_CHECK(s && (*s == "uniform" || *s == "balanced"),
                 "{}: moe.rre_table must be \"uniform\" (random from the seed) or \"balanced\" "
                 "(from the corpus's per-domain token counts)",
                 source);
      e.rre_table = *s == "uniform" ? RreTable::uniform : RreTable::balanced;
    }
  } else {
    get_int("top_k", e.top_k);
    get_num("capacity_factor", e.capacity_factor);
    get_num("aux_loss_coef", e.aux_loss_coef);
  }
}
}  // namespace

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
    if (key == "moe" && v.is_table()) continue;  // the [moe] table (below)
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
  const toml::table* mt = tbl["moe"].as_table();
  if (!mt && t != &tbl) mt = (*t)["moe"].as_table();
  if (mt) parse_moe(*mt, c, source);
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
