// Interop proofs (issue 16): CodeGeeX and Hugging Face GPT-2 checkpoints built in their exact
// on-disk formats by tests/reference/interop_fixtures.py (Debian's python3-torch), converted by
// loom, give the logits and 64 greedy tokens of independent float64 PyTorch implementations of
// the original architectures; loom -> HF -> loom is bit-identical and the export loads in the
// PyTorch GPT-2 reference; hostile and broken files are refused with errors naming the problem.
#include <gtest/gtest.h>

#include <sys/stat.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <set>

#include "interop/model_checkpoint.h"
#include "interop/convert.h"
#include "checkpoint/safetensors.h"
#include "checkpoint/torch_file.h"
#include "core/error.h"
#include "data/byte_bpe_tokenizer.h"
#include "model/gpt.h"

namespace fs = std::filesystem;
using namespace loom;
using namespace loom::checkpoint;
using namespace loom::interop;
using loom::model::Activation;

namespace {

const std::string kScript = std::string(LOOM_SOURCE_DIR) + "/tests/reference/interop_fixtures.py";

bool torch_available() {
  return std::system("/usr/bin/python3 -c 'import torch' >/dev/null 2>&1") == 0;
}

// Fixtures are built once per test process, each kind on first use (cg, hf, bad: the modes of
// interop_fixtures.py), and removed when the process exits.
struct TempDir {
  fs::path path;
  ~TempDir() {
    std::error_code ec;
    if (!path.empty()) fs::remove_all(path, ec);
  }
};

const fs::path& fixtures() {
  static TempDir holder;
  static fs::path dir = [] {
    fs::path d = fs::temp_directory_path() / ("loom_interop_" + std::to_string(::getpid()));
    fs::remove_all(d);
    fs::create_directories(d);
    holder.path = d;
    return d;
  }();
  return dir;
}

// fixtures() / sub after generating it: sub is "cg" (codegeex), "hf" or "bad" (hostile).
fs::path fixture(const std::string& sub) {
  const fs::path d = fixtures() / sub;
  if (!fs::exists(d)) {
    const std::string mode = sub == "cg" ? "codegeex" : sub == "hf" ? "hf" : "hostile";
    std::string cmd = "/usr/bin/python3 " + kScript + " " + mode + " " + d.string();
    if (std::system(cmd.c_str()) != 0) throw std::runtime_error("fixture script failed: " + cmd);
  }
  return d;
}

#define REQUIRE_TORCH()                                                                      \
  if (!torch_available())                                                                    \
  GTEST_SKIP() << "SKIP: /usr/bin/python3 cannot import torch (install Debian's python3-torch)"

std::vector<float> read_f32(const SafetensorsFile& f, const std::string& name) {
  const TensorInfo& i = f.info(name);
  std::vector<float> v(size_t(shape_numel(i.shape)));
  f.read(name, DType::f32, i.shape, v.data());
  return v;
}
std::vector<int32_t> read_i32(const SafetensorsFile& f, const std::string& name) {
  const TensorInfo& i = f.info(name);
  std::vector<int32_t> v(size_t(shape_numel(i.shape)));
  f.read(name, DType::i32, i.shape, v.data());
  return v;
}

struct Loaded {
  model::ModelConfig cfg;
  std::vector<float> w;
  int64_t vocab_used = 0;
};
Loaded load(const std::string& dir) {
  CheckpointReader r(dir);
  Loaded l{r.config(), {}, r.config().vocab};
  model::ParamLayout layout(l.cfg);
  l.w.resize(size_t(layout.total()));
  r.load_weights(layout, l.w.data());
  if (r.trainer_state().contains("interop"))
    l.vocab_used = r.trainer_state()["interop"]["vocab_used"].get<int64_t>();
  return l;
}

// Compares loom's logits with the reference's (T, V0) logits over the real vocabulary rows, and
// loom's greedy continuation of `prompt` with the reference's. Returns max|d| / max|ref|.
double check_logits_and_greedy(const Loaded& m, const std::vector<int32_t>& tokens,
                               const std::vector<float>& ref, const std::vector<int32_t>& prompt,
                               const std::vector<int32_t>& greedy) {
  MemoryPool pool;
  model::Gpt g(m.cfg, pool, model::Precision::f32);
  std::memcpy(g.weights(), m.w.data(), m.w.size() * sizeof(float));
  const int64_t T = int64_t(tokens.size()), V = m.cfg.vocab, V0 = int64_t(ref.size()) / T;
  EXPECT_EQ(V0, m.vocab_used);
  std::vector<float> logits(size_t(T * V));
  g.all_logits(logits.data(), tokens.data(), 1, T);
  double err = 0, scale = 0;
  for (int64_t t = 0; t < T; ++t)
    for (int64_t v = 0; v < V0; ++v) {
      err = std::max(err, std::abs(double(logits[size_t(t * V + v)]) - ref[size_t(t * V0 + v)]));
      scale = std::max(scale, std::abs(double(ref[size_t(t * V0 + v)])));
    }
  // Greedy: full recompute each step (last_logits), argmax over the real vocabulary.
  std::vector<int32_t> seq = prompt;
  std::vector<float> last(static_cast<size_t>(V));
  for (size_t s = 0; s < greedy.size(); ++s) {
    g.last_logits(last.data(), seq.data(), 1, int64_t(seq.size()));
    seq.push_back(int32_t(std::max_element(last.begin(), last.begin() + V0) - last.begin()));
  }
  EXPECT_EQ(std::vector<int32_t>(seq.begin() + std::ptrdiff_t(prompt.size()), seq.end()), greedy)
      << "greedy tokens differ";
  return err / scale;
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const loom::Error& e) {
    return e.what();
  }
  return "(no error)";
}

// f32 forward vs the float64 reference: ~20 ops in sequence, each a few f32 ulps (6e-8) on
// values of order 1, with sums over C = 24..128 terms: 1e-6 observed; 1e-5 is the bound.
constexpr double kLogitTol = 1e-5;

}  // namespace

TEST(InteropCodeGeeX, ModuleNestedStateDictMatchesReference) {
  REQUIRE_TORCH();
  const fs::path cg = fixture("cg");
  ConvertOptions opt;
  opt.tokenizer_dir = (cg / "tokenizer").string();
  opt.n_heads = 4;
  const std::string out = (fixtures() / "out_cg_module").string();
  ConvertResult r = convert_codegeex((cg / "codegeex_module.pt").string(), out, opt);
  EXPECT_EQ(r.tensors, 3 + 3 * 16 + 2);  // 3 tables, 3 blocks of 16, final norm
  EXPECT_EQ(r.vocab_used, 290);          // 256 bytes + 14 merges + eod + 19 extratokens
  Loaded m = load(out);
  EXPECT_TRUE(m.cfg.query_layer);
  EXPECT_EQ(m.cfg.activation, model::Activation::fast_gelu);
  EXPECT_TRUE(fs::exists(fs::path(out) / "tokenizer" / "added_tokens.json"));
  SafetensorsFile ref((cg / "codegeex_ref.safetensors").string());
  // Reference logits cover all 300 rows; compare the 290 real ones plus check padding separately.
  auto full = read_f32(ref, "module_logits");
  auto tokens = read_i32(ref, "module_tokens");
  const int64_t T = int64_t(tokens.size()), V = 300;
  std::vector<float> used(size_t(T * 290));
  for (int64_t t = 0; t < T; ++t)
    std::memcpy(&used[size_t(t * 290)], &full[size_t(t * V)], 290 * sizeof(float));
  double err = check_logits_and_greedy(m, tokens, used, read_i32(ref, "prompt"),
                                       read_i32(ref, "module_greedy"));
  std::printf("codegeex module f32: max rel logit error %.3g\n", err);
  EXPECT_LT(err, kLogitTol);
}

TEST(InteropCodeGeeX, MegatronArgsSkippedWithWarningAndFp16Read) {
  REQUIRE_TORCH();
  const fs::path cg = fixture("cg");
  const std::string out = (fixtures() / "out_cg_args").string();
  ConvertResult r = convert_codegeex((cg / "codegeex_args.pt").string(), out, {});
  EXPECT_EQ(r.cfg.n_heads, 4) << "heads come from args.num_attention_heads";
  std::string all;
  for (auto& w : r.warnings) all += w + "\n";
  EXPECT_NE(all.find("args (argparse.Namespace object)"), std::string::npos) << all;
  EXPECT_NE(all.find("iteration"), std::string::npos) << all;
  Loaded m = load(out);
  SafetensorsFile ref((cg / "codegeex_ref.safetensors").string());
  auto tokens = read_i32(ref, "module_tokens");
  MemoryPool pool;
  model::Gpt g(m.cfg, pool, model::Precision::f32);
  std::memcpy(g.weights(), m.w.data(), m.w.size() * sizeof(float));
  const int64_t T = int64_t(tokens.size());
  std::vector<float> logits(size_t(T * m.cfg.vocab));
  g.all_logits(logits.data(), tokens.data(), 1, T);
  auto want = read_f32(ref, "args_logits");
  double err = 0, scale = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    err = std::max(err, std::abs(double(logits[i]) - want[i]));
    scale = std::max(scale, std::abs(double(want[i])));
  }
  std::printf("codegeex args fp16 weights: max rel logit error %.3g\n", err / scale);
  EXPECT_LT(err / scale, kLogitTol);  // fp16 -> f32 is exact, so the same bound holds
}

// Tensor-parallel shards (mp_rank_00..02, CodeGeeX's split rules, unequal torch.chunk sizes)
// merge to exactly the single file's weights.
TEST(InteropCodeGeeX, TensorParallelShardsMergeToTheSameWeights) {
  REQUIRE_TORCH();
  const fs::path cg = fixture("cg");
  ConvertOptions opt;
  opt.n_heads = 4;
  convert_codegeex((cg / "codegeex_module.pt").string(), (fixtures() / "cg_one").string(), opt);
  convert_codegeex((cg / "tp3").string(), (fixtures() / "cg_tp3").string(), opt);
  Loaded a = load((fixtures() / "cg_one").string()), b = load((fixtures() / "cg_tp3").string());
  ASSERT_EQ(a.w.size(), b.w.size());
  EXPECT_EQ(std::memcmp(a.w.data(), b.w.data(), a.w.size() * sizeof(float)), 0);
}

TEST(InteropCodeGeeX, LegacyFileGetsResaveInstructions) {
  REQUIRE_TORCH();
  std::string e = error_of([] {
    convert_codegeex((fixture("cg") / "codegeex_legacy.pt").string(),
                     (fixtures() / "out_legacy").string(), {});
  });
  EXPECT_NE(e.find("legacy (pre-1.6"), std::string::npos) << e;
  EXPECT_NE(e.find("torch.save(torch.load("), std::string::npos) << e;
  EXPECT_FALSE(fs::exists(fixtures() / "out_legacy"));
}

TEST(InteropCodeGeeX, PublishedShapesGiveTheShippedConfig) {
  // Shapes of the released codegeex_13b.pt (THUDM/CodeGeeX): the mapping must give
  // configs/models/codegeex-13b.toml exactly.
  std::map<std::string, Shape> s;
  const std::string lm = "language_model.";
  s[lm + "embedding.word_embeddings.weight"] = {52224, 5120};
  s[lm + "embedding.position_embeddings.weight"] = {2048, 5120};
  s[lm + "topQueryEmbedding.top_query_embeddings.weight"] = {2048, 5120};
  for (int i = 0; i < 39; ++i) {
    const std::string p = lm + "transformer.layers." + std::to_string(i) + ".";
    s[p + "input_layernorm.weight"] = {5120};
    s[p + "mlp.dense_h_to_4h.weight"] = {20480, 5120};
  }
  const model::ModelConfig want =
      model::load_model_config(std::string(LOOM_SOURCE_DIR) + "/configs/models/codegeex-13b.toml");
  std::vector<std::string> warnings;
  EXPECT_EQ(codegeex_config(s, 40, "", warnings).to_toml(), want.to_toml());
  EXPECT_TRUE(warnings.empty());
  // Without Megatron args the head count follows CodeGeeX's head dim 128, with a warning.
  EXPECT_EQ(codegeex_config(s, 0, "", warnings).to_toml(), want.to_toml());
  ASSERT_EQ(warnings.size(), 1u);
  EXPECT_NE(warnings[0].find("n_heads = 40"), std::string::npos);
  // A missing tensor is named.
  s.erase(lm + "embedding.position_embeddings.weight");
  std::string e = error_of([&] { codegeex_config(s, 40, "", warnings); });
  EXPECT_NE(e.find("position_embeddings.weight' is missing"), std::string::npos) << e;
}

// Converts the HF GPT-2 directory `src` (fixture `tag` in the reference file `ref_path`), checks
// logits and greedy tokens, then loom -> HF -> loom bit-identity and the exported model's logits
// computed by `logits_cmd` (a python command taking DIR TOKENS.i32 T OUT).
static void hf_case(const fs::path& src, const fs::path& ref_path, const std::string& tag,
             const std::string& logits_cmd, Activation act) {
  const std::string out = (fixtures() / ("out_" + src.filename().string())).string();
  ConvertResult r = convert_hf_gpt2(src.string(), out, {});
  EXPECT_EQ(r.cfg.vocab, 384) << "291 padded to a multiple of 128";
  EXPECT_EQ(r.vocab_used, 291);
  EXPECT_EQ(r.cfg.activation, act);
  Loaded m = load(out);
  // Padding rows are zero.
  const model::ParamLayout layout(m.cfg);
  for (int64_t i = 291 * m.cfg.d_model; i < 384 * m.cfg.d_model; ++i)
    ASSERT_EQ(m.w[size_t(layout.token_embedding() + i)], 0.0f);
  EXPECT_TRUE(fs::exists(fs::path(out) / "tokenizer" / "vocab.json"));
  EXPECT_TRUE(fs::exists(fs::path(out) / "tokenizer" / "merges.txt"));

  SafetensorsFile ref(ref_path.string());
  auto tokens = read_i32(ref, tag + "_tokens");
  double err = check_logits_and_greedy(m, tokens, read_f32(ref, tag + "_logits"),
                                       read_i32(ref, "prompt"), read_i32(ref, tag + "_greedy"));
  std::printf("%s: max rel logit error %.3g\n", src.filename().c_str(), err);
  EXPECT_LT(err, kLogitTol);

  // loom -> HF -> loom: bit-identical weights; the export loads in the PyTorch reference.
  const std::string exported = (fixtures() / ("export_" + src.filename().string())).string();
  export_hf_gpt2(out, exported);
  const std::string back = (fixtures() / ("back_" + src.filename().string())).string();
  convert_hf_gpt2(exported, back, {});
  Loaded m2 = load(back);
  EXPECT_EQ(m2.cfg.to_toml().substr(m2.cfg.to_toml().find('\n')),
            m.cfg.to_toml().substr(m.cfg.to_toml().find('\n')));  // all but the name
  ASSERT_EQ(m2.w.size(), m.w.size());
  EXPECT_EQ(std::memcmp(m2.w.data(), m.w.data(), m.w.size() * sizeof(float)), 0);
  const fs::path tok_file = fixtures() / ("tok_" + src.filename().string() + ".i32");
  {
    std::ofstream f(tok_file, std::ios::binary);
    f.write(reinterpret_cast<const char*>(tokens.data()), std::streamsize(tokens.size() * 4));
  }
  const std::string logits_out =
      (fixtures() / ("export_logits_" + src.filename().string() + ".safetensors")).string();
  std::string cmd = logits_cmd + " " + exported + " " + tok_file.string() + " " +
                    std::to_string(tokens.size()) + " " + logits_out;
  ASSERT_EQ(std::system(cmd.c_str()), 0) << cmd;
  SafetensorsFile ex(logits_out);
  auto a = read_f32(ex, "logits"), b = read_f32(ref, tag + "_logits");
  ASSERT_EQ(a.size(), b.size());
  double e2 = 0, sc = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    e2 = std::max(e2, std::abs(double(a[i]) - b[i]));
    sc = std::max(sc, std::abs(double(b[i])));
  }
  std::printf("%s exported: max rel logit error %.3g\n", src.filename().c_str(), e2 / sc);
  // Both sides are float64 forwards of the same f32 weights, rounded to f32 at the end.
  EXPECT_LT(e2 / sc, 1e-6) << "exported model's logits in the PyTorch reference";
}

class InteropHf : public ::testing::TestWithParam<const char*> {};

// st: model.safetensors, original gpt2 names, gelu_new; bin: pytorch_model.bin with
// transformer.* names, mask buffers, tied lm_head, gelu (erf), tokenizer.json only.
TEST_P(InteropHf, ConvertedLogitsGreedyAndBitIdenticalRoundTrip) {
  REQUIRE_TORCH();
  const std::string tag = GetParam();
  hf_case(fixture("hf") / ("hf_" + tag), fixture("hf") / "hf_ref.safetensors", tag,
          "/usr/bin/python3 " + kScript + " hf-logits",
          tag == "st" ? Activation::gelu : Activation::gelu_erf);
}

INSTANTIATE_TEST_SUITE_P(Interop, InteropHf, ::testing::Values("st", "bin"));

// Sharded inputs (index JSON; safetensors and pytorch_model.bin shards) convert to exactly the
// weights of the single-file hf_st.
TEST(InteropHfSharded, ShardsGiveTheSameWeightsAsOneFile) {
  REQUIRE_TORCH();
  const fs::path hf = fixture("hf");
  convert_hf_gpt2((hf / "hf_st").string(), (fixtures() / "one").string(), {});
  Loaded one = load((fixtures() / "one").string());
  for (const char* d : {"hf_st_sharded", "hf_bin_sharded"}) {
    SCOPED_TRACE(d);
    const std::string out = (fixtures() / (std::string("sh_") + d)).string();
    convert_hf_gpt2((hf / d).string(), out, {});
    Loaded m = load(out);
    ASSERT_EQ(m.w.size(), one.w.size());
    EXPECT_EQ(std::memcmp(m.w.data(), one.w.data(), m.w.size() * sizeof(float)), 0);
  }
}

// ---- storage dtypes (loom convert --dtype; the default keeps the source's) ----
namespace {

// Every weight's stored dtype in a loom checkpoint, "mixed" if they differ.
std::string stored_dtype(const std::string& dir) {
  CheckpointReader r(dir);
  model::ParamLayout layout(r.config());
  std::set<std::string> seen;
  for (const auto& s : layout.specs()) seen.insert(std::string(dtype_name(r.weight_dtype(s.name))));
  return seen.size() == 1 ? *seen.begin() : "mixed";
}

bool same_weights(const Loaded& a, const Loaded& b) {
  return a.w.size() == b.w.size() &&
         std::memcmp(a.w.data(), b.w.data(), a.w.size() * sizeof(float)) == 0;
}

// loom's logits (T, V) of a checkpoint for `tokens`.
std::vector<float> loom_logits(const Loaded& m, const std::vector<int32_t>& tokens) {
  MemoryPool pool;
  model::Gpt g(m.cfg, pool, model::Precision::f32);
  std::memcpy(g.weights(), m.w.data(), m.w.size() * sizeof(float));
  std::vector<float> logits(size_t(int64_t(tokens.size()) * m.cfg.vocab));
  g.all_logits(logits.data(), tokens.data(), 1, int64_t(tokens.size()));
  return logits;
}

double max_rel_diff(const std::vector<float>& a, const std::vector<float>& ref) {
  double e = 0, sc = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    e = std::max(e, std::abs(double(a[i]) - ref[i]));
    sc = std::max(sc, std::abs(double(ref[i])));
  }
  return e / sc;
}

// Tolerance of logits computed from weights rounded to a half type, against the f32 weights'
// logits, relative to the largest logit: each weight moves by at most u = 2^-11 (F16) or 2^-8
// (BF16) of itself; through the embedding sum, 2 blocks' matmuls of C = 24..96 random-sign terms
// and the tied head the relative logit change stays a small multiple of u (1.4-2.5 u observed);
// 16 u leaves room without admitting an f32-vs-f16 mix-up of a whole tensor.
double half_tolerance(const std::string& dt) { return 16.0 * std::ldexp(1.0, dt == "F16" ? -11 : -8); }

// `src_half` holds `src_f32`'s weights rounded to `dt` by torch. The default conversion keeps dt;
// it equals converting the f32 source with --dtype (loom rounds to nearest even, as torch does);
// --dtype f32 widens exactly; its logits are within the half type's tolerance of the f32 model's;
// loom -> HF -> loom keeps dt and is bit-identical (the export writes dt, torch_dtype named).
void half_case(const fs::path& src_f32, const fs::path& src_half, const std::string& dt,
               const std::vector<int32_t>& tokens, const std::string& tag) {
  SCOPED_TRACE(tag + " " + dt);
  const std::string lower = dt == "F16" ? "f16" : "bf16";
  const std::string kept = (fixtures() / ("dt_kept_" + tag)).string();
  ConvertResult r = convert_hf_gpt2(src_half.string(), kept, {});
  EXPECT_EQ(r.dtype, lower);
  EXPECT_EQ(stored_dtype(kept), dt);
  ConvertOptions to_half;
  to_half.dtype = lower;
  const std::string rounded = (fixtures() / ("dt_rounded_" + tag)).string();
  convert_hf_gpt2(src_f32.string(), rounded, to_half);
  EXPECT_EQ(stored_dtype(rounded), dt);
  const Loaded mk = load(kept), mr = load(rounded);
  EXPECT_TRUE(same_weights(mk, mr)) << "loom's rounding differs from torch's";
  ConvertOptions to_f32;
  to_f32.dtype = "f32";
  const std::string widened = (fixtures() / ("dt_widened_" + tag)).string();
  convert_hf_gpt2(src_half.string(), widened, to_f32);
  EXPECT_EQ(stored_dtype(widened), "F32");
  EXPECT_TRUE(same_weights(mk, load(widened))) << "widening is exact";
  // Size: half the f32 checkpoint's weights (plus the same header).
  const std::string full = (fixtures() / ("dt_full_" + tag)).string();
  convert_hf_gpt2(src_f32.string(), full, {});
  const auto b16 = fs::file_size(fs::path(kept) / "model.safetensors"),
             b32 = fs::file_size(fs::path(full) / "model.safetensors");
  EXPECT_LT(double(b16), 0.52 * double(b32));
  const Loaded m32 = load(full);
  const double err = max_rel_diff(loom_logits(mk, tokens), loom_logits(m32, tokens));
  std::printf("%s %s: logits vs the f32 model's: max rel %.3g (bound %.3g); model.safetensors "
              "%llu vs %llu bytes\n", tag.c_str(), dt.c_str(), err, half_tolerance(dt),
              (unsigned long long)b16, (unsigned long long)b32);
  EXPECT_LT(err, half_tolerance(dt));
  EXPECT_GT(err, 0.0);  // the weights really were rounded
  // Round trip.
  const std::string exported = (fixtures() / ("dt_export_" + tag)).string();
  export_hf_gpt2(kept, exported);
  SafetensorsFile ex((fs::path(exported) / "model.safetensors").string());
  for (auto& [name, info] : ex.tensors()) EXPECT_EQ(std::string(dtype_name(info.dtype)), dt) << name;
  nlohmann::json hc = nlohmann::json::parse(std::ifstream(fs::path(exported) / "config.json"));
  EXPECT_EQ(hc["torch_dtype"], dt == "F16" ? "float16" : "bfloat16");
  const std::string back = (fixtures() / ("dt_back_" + tag)).string();
  convert_hf_gpt2(exported, back, {});
  EXPECT_EQ(stored_dtype(back), dt);
  EXPECT_TRUE(same_weights(mk, load(back))) << "loom -> HF -> loom";
  EXPECT_EQ(fs::file_size(fs::path(back) / "model.safetensors"), b16);
}

}  // namespace

TEST(InteropDtype, HalfSourcesKeepTheirDtypeAndRoundTrip) {
  REQUIRE_TORCH();
  const fs::path hf = fixture("hf");
  SafetensorsFile ref((hf / "hf_ref.safetensors").string());
  const auto tokens = read_i32(ref, "st_tokens");
  half_case(hf / "hf_st", hf / "hf_st_f16", "F16", tokens, "st16");
  half_case(hf / "hf_st", hf / "hf_st_bf16", "BF16", tokens, "stbf");
  // The CodeGeeX release is fp16: its conversion keeps F16 and reads exactly as before.
  const std::string cg = (fixtures() / "dt_cg").string();
  ConvertResult r = convert_codegeex((fixture("cg") / "codegeex_args.pt").string(), cg, {});
  EXPECT_EQ(r.dtype, "f16");
  EXPECT_EQ(stored_dtype(cg), "F16");
  std::string e = error_of([&] {
    ConvertOptions o;
    o.dtype = "int8";
    convert_hf_gpt2((hf / "hf_st").string(), (fixtures() / "dt_bad").string(), o);
  });
  EXPECT_NE(e.find("storage dtype 'int8' is unknown; choose f32, bf16 or f16"), std::string::npos) << e;
}

// ---- Hugging Face transformers / tokenizers as the oracle (venv from PyPI; SKIP if it cannot be
// made here) ----
namespace {
const std::string kOracle = std::string(LOOM_SOURCE_DIR) + "/tests/reference/hf_oracle.py";

// The venv python, or "" with the reason in `why`.
std::string hf_python(std::string& why) {
  const std::string venv = std::string(LOOM_BINARY_DIR) + "/hf-venv";
  const std::string cmd = std::string(LOOM_SOURCE_DIR) + "/tests/reference/hf_venv.sh " + venv +
                          " > " + venv + ".status 2>&1";
  if (std::system(cmd.c_str()) != 0) {
    std::ifstream f(venv + ".status");
    std::getline(f, why);
    if (why.empty()) why = "SKIP: tests/reference/hf_venv.sh failed";
    return "";
  }
  return venv + "/bin/python";
}

const fs::path& transformers_fixtures(const std::string& py) {
  static fs::path d = [&] {
    fs::path p = fixtures() / "tf";
    std::string cmd = py + " " + kOracle + " model " + p.string() + " 2>/dev/null";
    if (std::system(cmd.c_str()) != 0) throw std::runtime_error("failed: " + cmd);
    return p;
  }();
  return d;
}
}  // namespace

class InteropTransformers : public ::testing::TestWithParam<const char*> {};

// A random GPT2LMHeadModel saved by save_pretrained (safetensors / pytorch_model.bin), converted:
// logits within 1e-5 of transformers' float64 forward, 64 equal greedy tokens; the loom export
// loads with GPT2LMHeadModel.from_pretrained and gives the same logits; loom -> HF -> loom is
// bit-identical.
TEST_P(InteropTransformers, GPT2LMHeadModelConvertsAndExportLoadsInTransformers) {
  REQUIRE_TORCH();
  std::string why;
  const std::string py = hf_python(why);
  if (py.empty()) GTEST_SKIP() << why;
  const std::string tag = GetParam();
  const fs::path& d = transformers_fixtures(py);
  hf_case(d / ("tf_" + tag), d / "tf_ref.safetensors", tag, py + " " + kOracle + " logits",
          tag == "st" ? Activation::gelu : Activation::gelu_erf);
}

INSTANTIATE_TEST_SUITE_P(Interop, InteropTransformers, ::testing::Values("st", "bin"));

// transformers' own half-precision save (GPT2LMHeadModel.half().save_pretrained): the conversion
// keeps F16, equals loom's rounding of the f32 save, its logits are within F16's tolerance of the
// f32 model's, and loom -> HF -> loom keeps it bit for bit.
TEST(InteropTransformersDtype, Fp16SavePretrainedKeepsF16) {
  REQUIRE_TORCH();
  std::string why;
  const std::string py = hf_python(why);
  if (py.empty()) GTEST_SKIP() << why;
  const fs::path& d = transformers_fixtures(py);
  SafetensorsFile ref((d / "tf_ref.safetensors").string());
  half_case(d / "tf_st", d / "tf_st_f16", "F16", read_i32(ref, "st_tokens"), "tf16");
}

// loom's byte-level BPE gives Hugging Face's ids (GPT2TokenizerFast, with CodeGeeX's whitespace
// recipe where the folder has its extratokens) for code in several languages, Unicode text,
// runs of 1..25 spaces, tabs, newlines and <|endoftext|>. (Invalid UTF-8, which the oracle
// cannot take, round-trips in tests/unit/data/test_byte_bpe.cpp.)
TEST(InteropTokenizer, IdsMatchHuggingFace) {
  std::string why;
  const std::string py = hf_python(why);
  if (py.empty()) GTEST_SKIP() << why;
  std::vector<std::string> texts = {
      "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
      "#include <vector>\nint main() {\n\tstd::vector<int> v{1, 2, 3};\n  return 0;\n}\n",
      "public class A {\n            void f() { System.out.println(\"hi\"); }\n}",
      "func main() {\n\tfmt.Println(\"héllo wörld — ✓ 日本語 🙂\")\n}",
      "x = 1  # it's ok, we'll see; they've done\r\n\n\n   \n",
      "a<|endoftext|>b the end",
      "1234567890 3.14159 0x1F  -42",
  };
  for (int n = 1; n <= 25; ++n) {  // (built with append: GCC 12's -Wrestrict misfires on a + b + c)
    std::string t = "a";
    t.append(size_t(n), ' ');
    texts.push_back(t + "b");
  }
  const fs::path texts_path = fixtures() / "tok_texts.json";
  std::ofstream(texts_path) << nlohmann::json(texts).dump();
  // The CodeGeeX-format fixture folder (143 extratokens) and a plain GPT-2 one.
  const fs::path& tf = transformers_fixtures(py);
  for (const fs::path& dir : {fs::path(LOOM_SOURCE_DIR) / "tests/data/tokenizer", tf / "tf_st"}) {
    SCOPED_TRACE(dir.string());
    const fs::path out = fixtures() / "tok_ids.json";
    std::string cmd = py + " " + kOracle + " tokenize " + dir.string() + " " +
                      texts_path.string() + " " + out.string() + " 2>/dev/null";
    ASSERT_EQ(std::system(cmd.c_str()), 0) << cmd;
    nlohmann::json want = nlohmann::json::parse(std::ifstream(out));
    auto tok = data::ByteBpeTokenizer::from_dir(dir.string());
    EXPECT_EQ(tok->has_whitespace_tokens(), want["whitespace_tokens"].get<bool>());
    int64_t n_ids = 0;
    for (size_t i = 0; i < texts.size(); ++i) {
      std::vector<int32_t> ids = tok->encode(texts[i]);
      EXPECT_EQ(ids, want["ids"][i].get<std::vector<int32_t>>()) << "text " << i << ": " << texts[i];
      n_ids += int64_t(ids.size());
      EXPECT_EQ(tok->decode(ids), texts[i]);
    }
    std::printf("%s: %zu texts, %lld ids equal to Hugging Face's\n", dir.filename().c_str(),
                texts.size(), (long long)n_ids);
  }
}

TEST(InteropExport, RefusesWhatGpt2CannotExpress) {
  REQUIRE_TORCH();
  const std::string ck = (fixtures() / "out_cg_module").string();
  if (!fs::exists(ck)) {
    ConvertOptions opt;
    opt.n_heads = 4;
    convert_codegeex((fixture("cg") / "codegeex_module.pt").string(), ck, opt);
  }
  std::string e = error_of([&] { export_hf_gpt2(ck, (fixtures() / "export_cg").string()); });
  EXPECT_NE(e.find("top query layer"), std::string::npos) << e;
}

TEST(InteropHostile, RefusedNamingWhatWasFoundAndNothingRuns) {
  REQUIRE_TORCH();
  const fs::path bad = fixture("bad");
  const std::string out = (fixtures() / "out_bad").string();
  auto cg = [&](const char* f) {
    return error_of([&] { convert_codegeex((bad / f).string(), out, {}); });
  };
  auto hf = [&](const char* d) {
    return error_of([&] { convert_hf_gpt2((bad / d).string(), out, {}); });
  };
  std::string e = cg("reduce_os_system.pt");
  EXPECT_NE(e.find("'posix.system'"), std::string::npos) << e;
  EXPECT_NE(e.find("nothing was executed"), std::string::npos) << e;
  e = cg("reduce_eval.pt");
  EXPECT_NE(e.find(".eval'"), std::string::npos) << e;
  EXPECT_FALSE(fs::exists(bad / "PWNED")) << "the payload ran";
  e = cg("truncated.pt");
  EXPECT_NE(e.find("truncated"), std::string::npos) << e;
  e = hf("hf_short");
  EXPECT_NE(e.find("file holds only"), std::string::npos) << e;
  e = hf("hf_dtype");
  EXPECT_NE(e.find("dtype 'F8_E4M3'"), std::string::npos) << e;
  e = hf("hf_shape");
  EXPECT_NE(e.find("'wte.weight' has shape [291, 24] but the model config implies [291, 30]"),
            std::string::npos) << e;
  EXPECT_FALSE(fs::exists(out)) << "a failed conversion must not leave a checkpoint";
}

// Parameters, strided views, storage offsets, shared storages, fp16 and bf16 read exactly.
TEST(InteropTorchFile, ParametersViewsAndHalfTypesReadExactly) {
  REQUIRE_TORCH();
  TorchFile f((fixture("bad") / "views.pt").string());
  std::map<std::string, TorchTensorRef> tensors;
  std::vector<std::string> skipped;
  flatten_state_dict(f.root(), "", tensors, skipped);
  EXPECT_TRUE(skipped.empty());
  SafetensorsFile ref((fixture("bad") / "views_ref.safetensors").string());
  ASSERT_EQ(tensors.size(), ref.tensors().size());
  for (auto& [name, t] : tensors) {
    SCOPED_TRACE(name);
    auto want = read_f32(ref, name);
    ASSERT_EQ(t.numel(), int64_t(want.size()));
    std::vector<float> got(want.size());
    f.read_f32(t, got.data());
    EXPECT_EQ(std::memcmp(got.data(), want.data(), want.size() * sizeof(float)), 0);
  }
  EXPECT_EQ(tensors.at("h").dtype, TorchDType::f16);
  EXPECT_EQ(tensors.at("b").dtype, TorchDType::bf16);
}

TEST(InteropPickle, RefusesNonDataOpcodesAndCallables) {
  // Hand-assembled protocol-2 pickles.
  using namespace std::string_literals;  // ""s keeps embedded NUL bytes
  auto err = [](const std::string& bytes) {
    return error_of([&] { unpickle_restricted(bytes, "test.pkl"); });
  };
  // REDUCE of an allowed storage class (not a rebuild function).
  EXPECT_NE(err("\x80\x02" "ctorch\nFloatStorage\n)R."s).find("'torch.FloatStorage', which does "
                                                             "not build"), std::string::npos);
  // REDUCE of a non-global (a string).
  EXPECT_NE(err("\x80\x02X\x01\x00\x00\x00" "a)R."s).find("calls a str"), std::string::npos);
  // INST, OBJ, EXT1: refused by opcode.
  EXPECT_NE(err("\x80\x02(ios\nsystem\n."s).find("INST"), std::string::npos);
  EXPECT_NE(err(std::string("\x80\x02\x82\x01.", 5)).find("EXT"), std::string::npos);
  // STACK_GLOBAL resolves through the same allowlist.
  EXPECT_NE(err("\x80\x02X\x02\x00\x00\x00" "osX\x06\x00\x00\x00" "system\x93."s).find("'os.system'"),
            std::string::npos);
  // Memo read never written, truncated string, missing STOP.
  EXPECT_NE(err("\x80\x02h\x05."s).find("memo entry 5"), std::string::npos);
  EXPECT_NE(err("\x80\x02X\xff\x00\x00\x00" "ab"s).find("truncated"), std::string::npos);
  EXPECT_NE(err("\x80\x02}"s).find("without a STOP"), std::string::npos);
  // _rebuild_from_type_v2 may only wrap tensor rebuilds for torch.Tensor / Parameter.
  EXPECT_NE(err("\x80\x02" "ctorch._tensor\n_rebuild_from_type_v2\n" "cposix\nsystem\n"s)
                .find("'posix.system'"), std::string::npos);
  EXPECT_NE(err("\x80\x02" "ctorch._tensor\n_rebuild_from_type_v2\n(ccollections\nOrderedDict\n"
                "ctorch\nTensor\n)}tR."s).find("wraps something other"), std::string::npos);
  // An OrderedDict with _metadata BUILD state and nested plain dicts is accepted.
  PyRef v = unpickle_restricted("\x80\x02" "ccollections\nOrderedDict\n)R}X\x01\x00\x00\x00" "k}sb."s,
                                "ok.pkl");
  EXPECT_EQ(v->kind, PyValue::Kind::dict);
}
