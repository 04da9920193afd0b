// Tests for `loom quantize` (infer::quantize_checkpoint) and for loading stored-dtype checkpoints
// into infer::ModelWeights: an int8 checkpoint loads the very bytes and scales that quantizing
// its f32 source at load time (--int8) gives, so the decoder's logits are bit-identical; a bf16
// one likewise against --dtype bf16; the weight matrices shrink ~4x (int8) / 2x (bf16) on disk;
// BF16 / F16 checkpoints from `loom convert` load; training refuses an int8 checkpoint.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <vector>

#include "checkpoint/sharded.h"
#include "core/memory_pool.h"
#include "core/rng.h"
#include "infer/decoder.h"
#include "infer/weights.h"
#include "interop/model_checkpoint.h"
#include "model/gpt.h"

namespace fs = std::filesystem;

namespace loom::infer {
namespace {

model::ModelConfig config(bool query_layer, int64_t nkv) {
  model::ModelConfig c;
  c.name = "quantize-test";
  c.vocab = 96;
  c.n_layers = 2;
  c.d_model = 64;
  c.n_heads = 4;
  c.n_kv_heads = nkv;
  c.d_ff = 128;
  c.max_seq = 64;
  c.activation = model::Activation::fast_gelu;
  c.query_layer = query_layer;
  c.validate();
  return c;
}

struct Dir {
  fs::path path;
  explicit Dir(const std::string& tag)
      : path(fs::temp_directory_path() / ("loom_quant_" + tag + "_" + std::to_string(::getpid()))) {
    fs::remove_all(path);
  }
  ~Dir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  std::string operator/(const std::string& s) const { return (path / s).string(); }
};

// An f32 checkpoint of a perturbed model (biases and norms off their init values, one all-zero
// row in a linear: its scale is 0), with a tokenizer-like extra file.
// MoE (rre): the routing table (not trainable: integer expert indices) is left as initialised.
std::vector<float> write_f32_checkpoint(const model::ModelConfig& cfg, const std::string& dir,
                                        const std::string& zero_row = "blocks.1.ffn.up.weight") {
  MemoryPool pool;
  model::Gpt g(cfg, pool, model::Precision::f32);
  g.init_weights(5);
  const model::ParamLayout& layout = g.layout();
  std::vector<float> w(g.weights(), g.weights() + layout.total());
  for (const auto& s : layout.specs()) {
    if (!s.trainable) continue;
    for (int64_t i = s.offset; i < s.offset + s.numel; ++i)
      w[size_t(i)] = 4.f * w[size_t(i)] + 0.05f * rng_normal(9, 2, uint64_t(i));
  }
  const model::ParamSpec& up = layout.find(zero_row);
  std::fill(w.begin() + up.offset + 3 * up.shape[1], w.begin() + up.offset + 4 * up.shape[1], 0.f);
  interop::save_checkpoint(dir, cfg, layout, w.data(), {}, {{"step", 7}},
                           [](const std::string& staging) {
                             fs::create_directories(staging + "/tokenizer");
                             std::ofstream(staging + "/tokenizer/vocab.json") << "{}";
                           });
  return w;
}

// Last-token logits of each prompt through the KV-cached decoder (one prefill step each); MoE
// models route every token by `domain` (-1: the model's "other").
std::vector<std::vector<float>> logits_of(const ModelWeights& w,
                                          const std::vector<std::vector<int32_t>>& prompts,
                                          int32_t domain = -1) {
  Decoder dec(w);
  const int64_t V = w.config().vocab;
  KvCache cache(dec.cache_shape(), dec.cache_shape().block_bytes() * 64, w.config().max_seq);
  std::vector<std::vector<float>> out;
  for (const auto& p : prompts) {
    const int64_t s = cache.create();
    EXPECT_TRUE(cache.reserve(s, int64_t(p.size())));
    std::vector<float> l(static_cast<size_t>(V));
    std::vector<SeqStep> st = {{s, 0, p, domain}};
    dec.forward(cache, st, l.data());
    out.push_back(l);
    cache.release(s);
  }
  return out;
}

std::vector<std::vector<int32_t>> prompts(int64_t V) {
  std::vector<std::vector<int32_t>> ps;
  for (int64_t n : {1, 5, 17, 40}) {
    std::vector<int32_t> p(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) p[size_t(i)] = int32_t(rng_u64(31, uint64_t(n), uint64_t(i)) % uint64_t(V));
    ps.push_back(p);
  }
  return ps;
}

void expect_same_view(const WeightView& a, const WeightView& b, const char* what) {
  ASSERT_EQ(a.format, b.format) << what;
  ASSERT_EQ(a.N, b.N) << what;
  ASSERT_EQ(a.K, b.K) << what;
  const size_t es = a.format == WeightFormat::f32 ? 4 : a.format == WeightFormat::bf16 ? 2 : 1;
  EXPECT_EQ(std::memcmp(a.data, b.data, size_t(a.N * a.K) * es), 0) << what << ": data differ";
  if (a.format == WeightFormat::int8_row) {
    EXPECT_EQ(std::memcmp(a.scales, b.scales, size_t(a.N) * sizeof(float)), 0)
        << what << ": scales differ";
  }
}

class Quantize : public ::testing::TestWithParam<bool> {};  // query layer on / off

TEST_P(Quantize, Int8CheckpointEqualsLoadTimeInt8Bitwise) {
  const model::ModelConfig cfg = config(GetParam(), 2);
  Dir d("int8");
  write_f32_checkpoint(cfg, d / "f32");
  const QuantizeResult r = quantize_checkpoint(d / "f32", d / "int8", WeightFormat::int8_row);
  const int64_t linears = 6 * (cfg.n_layers + (cfg.query_layer ? 1 : 0));
  EXPECT_EQ(r.quantized, linears);

  // Stored: I8 linears with F32 row scales, everything else F32; tokenizer copied; provenance.
  interop::CheckpointReader q(d / "int8");
  EXPECT_EQ(q.weight_dtype("blocks.0.attn.k.weight"), DType::i8);
  EXPECT_EQ(q.weight_dtype("embed.token.weight"), DType::f32);
  EXPECT_EQ(q.weight_dtype("blocks.0.ffn.up.bias"), DType::f32);
  EXPECT_TRUE(fs::exists(d / "int8/tokenizer/vocab.json"));
  EXPECT_EQ(q.trainer_state()["quantized"]["linears"], "int8");
  EXPECT_EQ(q.trainer_state()["step"], 7);

  // On disk: the weight matrices (int8 + one f32 scale per row) are ~4x smaller.
  const double ratio = double(r.linear_bytes_in) / double(r.linear_bytes_out);
  std::printf("linears: %lld -> %lld bytes (%.2fx); all weights %lld -> %lld; file %llu bytes\n",
              (long long)r.linear_bytes_in, (long long)r.linear_bytes_out, ratio,
              (long long)r.weight_bytes_in, (long long)r.weight_bytes_out,
              (unsigned long long)r.file_bytes_out);
  // 4 bytes -> 1 byte + 4 per row of K >= 64 columns: ratio = 4K / (K + 4) >= 3.76.
  EXPECT_GT(ratio, 3.7);
  EXPECT_LT(ratio, 4.0);
  const auto f32_file = fs::file_size(d / "f32/model.safetensors");
  EXPECT_LT(r.file_bytes_out, f32_file);

  // Loaded: the same int8 bytes and scales as quantizing the f32 checkpoint at load time.
  for (WeightFormat head : {WeightFormat::f32, WeightFormat::bf16}) {
    const ModelWeights a = ModelWeights::load(d / "f32", WeightFormat::int8_row, head);
    const ModelWeights b = ModelWeights::load(d / "int8", WeightFormat::int8_row, head);
    EXPECT_EQ(b.linear_format(), WeightFormat::int8_row);
    for (int64_t i = 0; i < cfg.n_layers; ++i) {
      expect_same_view(a.block_linears(i).qkv, b.block_linears(i).qkv, "qkv");
      expect_same_view(a.block_linears(i).out, b.block_linears(i).out, "out");
      expect_same_view(a.block_linears(i).up, b.block_linears(i).up, "up");
      expect_same_view(a.block_linears(i).down, b.block_linears(i).down, "down");
    }
    if (cfg.query_layer) expect_same_view(a.query_linears().qkv, b.query_linears().qkv, "q-qkv");
    expect_same_view(a.head(), b.head(), "head");
    EXPECT_EQ(a.matmul_weight_bytes(), b.matmul_weight_bytes());
    const auto ps = prompts(cfg.vocab);
    const auto la = logits_of(a, ps), lb = logits_of(b, ps);
    for (size_t i = 0; i < ps.size(); ++i)
      EXPECT_EQ(std::memcmp(la[i].data(), lb[i].data(), la[i].size() * sizeof(float)), 0)
          << "prompt " << i << ": logits differ";
  }
  // Asking an int8 checkpoint for f32 linears still runs its int8 weights (with a warning).
  const ModelWeights c = ModelWeights::load(d / "int8", WeightFormat::f32, WeightFormat::f32);
  EXPECT_EQ(c.linear_format(), WeightFormat::int8_row);

  // The training path reads int8 as dequantized f32 (scale * q, exactly the kernel's W).
  const model::ParamLayout layout(cfg);
  std::vector<float> deq(size_t(layout.total()));
  q.load_weights(layout, deq.data());
  const model::ParamSpec& s = layout.find("blocks.0.attn.out.weight");
  std::vector<int8_t> qq(size_t(s.numel));
  std::vector<float> sc(size_t(s.shape[0]));
  q.load_int8(s, qq.data(), sc.data());
  for (int64_t i = 0; i < s.numel; ++i)
    ASSERT_EQ(deq[size_t(s.offset + i)], sc[size_t(i / s.shape[1])] * float(qq[size_t(i)]));

  // Errors: quantizing twice, and the MoE / f32 refusals name the fix.
  try {
    quantize_checkpoint(d / "int8", d / "again", WeightFormat::int8_row);
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("already int8-quantized"), std::string::npos) << e.what();
  }
  EXPECT_THROW(quantize_checkpoint(d / "f32", d / "x", WeightFormat::f32), Error);
  EXPECT_FALSE(fs::exists(d / "again"));
}

TEST_P(Quantize, Bf16CheckpointEqualsLoadTimeBf16) {
  const model::ModelConfig cfg = config(GetParam(), 4);
  Dir d("bf16");
  write_f32_checkpoint(cfg, d / "f32");
  const QuantizeResult r = quantize_checkpoint(d / "f32", d / "bf16", WeightFormat::bf16);
  EXPECT_EQ(r.linear_bytes_in, 2 * r.linear_bytes_out);
  interop::CheckpointReader q(d / "bf16");
  EXPECT_EQ(q.weight_dtype("blocks.1.attn.q.weight"), DType::bf16);
  EXPECT_EQ(q.weight_dtype("embed.position.weight"), DType::f32);
  const ModelWeights a = ModelWeights::load(d / "f32", WeightFormat::bf16, WeightFormat::bf16);
  const ModelWeights b = ModelWeights::load(d / "bf16", WeightFormat::bf16, WeightFormat::bf16);
  for (int64_t i = 0; i < cfg.n_layers; ++i) {
    expect_same_view(a.block_linears(i).qkv, b.block_linears(i).qkv, "qkv");
    expect_same_view(a.block_linears(i).down, b.block_linears(i).down, "down");
  }
  const auto ps = prompts(cfg.vocab);
  const auto la = logits_of(a, ps), lb = logits_of(b, ps);
  for (size_t i = 0; i < ps.size(); ++i)
    EXPECT_EQ(std::memcmp(la[i].data(), lb[i].data(), la[i].size() * sizeof(float)), 0);
}

INSTANTIATE_TEST_SUITE_P(Infer, Quantize, ::testing::Bool(),
                         [](const auto& i) { return i.param ? "query_layer" : "plain"; });

// Streaming load from a checkpoint equals the whole-buffer constructor (f32 and int8 at load).
TEST(QuantizeLoad, StreamedLoadEqualsFlatConstructor) {
  const model::ModelConfig cfg = config(true, 2);
  Dir d("stream");
  const std::vector<float> w = write_f32_checkpoint(cfg, d / "f32");
  for (WeightFormat f : {WeightFormat::f32, WeightFormat::int8_row}) {
    const ModelWeights a(cfg, w.data(), f, WeightFormat::f32);
    const ModelWeights b = ModelWeights::load(d / "f32", f, WeightFormat::f32);
    expect_same_view(a.block_linears(1).up, b.block_linears(1).up, "up");
    expect_same_view(a.head(), b.head(), "head");
    EXPECT_EQ(std::memcmp(a.token_embedding(), b.token_embedding(),
                          size_t(cfg.vocab * cfg.d_model) * sizeof(float)), 0);
    const auto ps = prompts(cfg.vocab);
    const auto la = logits_of(a, ps), lb = logits_of(b, ps);
    for (size_t i = 0; i < ps.size(); ++i)
      EXPECT_EQ(std::memcmp(la[i].data(), lb[i].data(), la[i].size() * sizeof(float)), 0);
  }
}

model::ModelConfig tiny_moe() {
  return model::load_model_config(std::string(LOOM_TEST_DATA_DIR) +
                                  "/../../configs/models/tiny-moe.toml");
}

// An rre MoE checkpoint (configs/models/tiny-moe.toml: the top block sparse, 4 domains x 2
// experts, query layer): `loom quantize` converts every expert's up and down linear per output
// row too, and the int8 checkpoint gives bitwise the logits of its f32 source quantized at load
// time, in every domain.
TEST(QuantizeMoe, Int8CheckpointEqualsLoadTimeInt8Bitwise) {
  const model::ModelConfig cfg = tiny_moe();
  ASSERT_TRUE(cfg.moe.enabled() && cfg.moe.router == model::Router::rre);
  Dir d("moe");
  write_f32_checkpoint(cfg, d / "f32", "blocks.1.moe.experts.3.up.weight");
  const QuantizeResult r = quantize_checkpoint(d / "f32", d / "int8", WeightFormat::int8_row);
  // Dense blocks and the query layer: q, k, v, out, up, down; sparse: q, k, v, out + 2 per expert.
  int64_t linears = cfg.query_layer ? 6 : 0;
  for (int64_t i = 0; i < cfg.n_layers; ++i)
    linears += cfg.moe.is_sparse(i) ? 4 + 2 * cfg.moe.experts : 6;
  EXPECT_EQ(r.quantized, linears);
  const double ratio = double(r.linear_bytes_in) / double(r.linear_bytes_out);
  EXPECT_GT(ratio, 3.7);  // 4K / (K + 4) for K >= 64 columns
  EXPECT_LT(ratio, 4.0);

  interop::CheckpointReader q(d / "int8");
  EXPECT_EQ(q.weight_dtype("blocks.1.moe.experts.0.up.weight"), DType::i8);
  EXPECT_EQ(q.weight_dtype("blocks.1.moe.experts.7.down.weight"), DType::i8);
  EXPECT_EQ(q.weight_dtype("blocks.1.moe.experts.0.up.bias"), DType::f32);
  EXPECT_EQ(q.weight_dtype("blocks.1.moe.rre_table"), DType::f32);  // integer indices, kept
  EXPECT_EQ(q.weight_dtype("blocks.0.ffn.up.weight"), DType::i8);

  const ModelWeights a = ModelWeights::load(d / "f32", WeightFormat::int8_row, WeightFormat::f32);
  const ModelWeights b = ModelWeights::load(d / "int8", WeightFormat::int8_row, WeightFormat::f32);
  EXPECT_EQ(b.linear_format(), WeightFormat::int8_row);
  int64_t sparse_blocks = 0;
  for (int64_t i = 0; i < cfg.n_layers; ++i) {
    expect_same_view(a.block_linears(i).qkv, b.block_linears(i).qkv, "qkv");
    const BlockExperts& ea = a.block_experts(i);
    const BlockExperts& eb = b.block_experts(i);
    ASSERT_EQ(ea.sparse(), eb.sparse());
    if (!ea.sparse()) continue;
    ++sparse_blocks;
    ASSERT_EQ(ea.up.size(), size_t(cfg.moe.experts));
    for (size_t e = 0; e < ea.up.size(); ++e) {
      expect_same_view(ea.up[e], eb.up[e], "expert up");
      expect_same_view(ea.down[e], eb.down[e], "expert down");
      EXPECT_EQ(eb.up[e].format, WeightFormat::int8_row);
    }
    // The zeroed row of expert 3's up: scale 0 (an all-zero row quantizes to zeros).
    EXPECT_EQ(eb.up[3].scales[3], 0.f);
  }
  EXPECT_EQ(sparse_blocks, 1);
  EXPECT_EQ(a.matmul_weight_bytes(), b.matmul_weight_bytes());
  const auto ps = prompts(cfg.vocab);
  for (int32_t dom = -1; dom < int32_t(cfg.moe.num_domains()); ++dom) {
    const auto la = logits_of(a, ps, dom), lb = logits_of(b, ps, dom);
    for (size_t i = 0; i < ps.size(); ++i)
      EXPECT_EQ(std::memcmp(la[i].data(), lb[i].data(), la[i].size() * sizeof(float)), 0)
          << "domain " << dom << " prompt " << i << ": logits differ";
  }
  // The int8 experts really run: the logits differ from the f32 model's (by a little).
  const ModelWeights f = ModelWeights::load(d / "f32", WeightFormat::f32, WeightFormat::f32);
  const auto lf = logits_of(f, ps, 0), l8 = logits_of(b, ps, 0);
  EXPECT_NE(std::memcmp(lf[1].data(), l8[1].data(), lf[1].size() * sizeof(float)), 0);
}

// A topk MoE checkpoint is refused, naming the router and what to do instead; nothing written.
TEST(QuantizeMoe, TopkRefusedWithReason) {
  model::ModelConfig cfg = tiny_moe();
  cfg.moe.router = model::Router::topk;
  cfg.moe.domains.clear();
  cfg.moe.experts_per_domain = 0;
  cfg.moe.experts = 4;
  cfg.moe.top_k = 2;
  cfg.validate();
  Dir d("topk");
  write_f32_checkpoint(cfg, d / "f32", "blocks.0.ffn.up.weight");
  try {
    quantize_checkpoint(d / "f32", d / "int8", WeightFormat::int8_row);
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("topk router"), std::string::npos) << m;
    EXPECT_NE(m.find("rre MoE models only"), std::string::npos) << m;
  }
  EXPECT_FALSE(fs::exists(d / "int8"));
}

}  // namespace
}  // namespace loom::infer
