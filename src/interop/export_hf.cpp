// checkpoint/export_hf.cpp: loom -> Hugging Face GPT-2 (see interop.h).
//
// Inverse of the GPT-2 import: loom's (rows, in) q, k, v matrices become the columns of one
// Conv1D (in, 3C) c_attn, the other matrices are transposed to Conv1D (in, out), the vocabulary
// keeps only its real rows (trainer_state's interop.vocab_used), and config.json describes the
// same model, so importing the export gives the original weights bit for bit.
#include <cstring>
#include <deque>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "interop/model_checkpoint.h"
#include "interop/convert.h"
#include "checkpoint/safetensors.h"
#include "core/config_file.h"
#include "core/error.h"
#include "model/params.h"

namespace fs = std::filesystem;

namespace loom::interop {

using namespace loom::checkpoint;  // the model-free formats and commit protocol below


namespace {

// A JSON or text file the user named (errors say which file and why it cannot be read).
std::string read_text(const std::string& path) { return read_config_file(path, "file"); }

void export_hf_gpt2_impl(const std::string& ckpt_dir, const std::string& out_dir) {
  CheckpointReader r(ckpt_dir);
  const model::ModelConfig& c = r.config();
  LOOM_CHECK(!r.has_int8_weights(), "'{}' holds int8-quantized weights (`loom quantize`); "
             "Hugging Face GPT-2 has no int8 layout: export the checkpoint it was quantized from",
             ckpt_dir);
  LOOM_CHECK(!c.query_layer, "'{}': model '{}' has the PanGu-α/CodeGeeX top query layer, which "
             "GPT-2's architecture cannot express", ckpt_dir, c.name);
  LOOM_CHECK(c.n_kv_heads == c.n_heads, "'{}': model '{}' uses grouped-query attention "
             "(n_kv_heads = {} < n_heads = {}), which GPT-2 cannot express", ckpt_dir, c.name,
             c.n_kv_heads, c.n_heads);
  LOOM_CHECK(c.tied_head, "'{}': untied head cannot be expressed", ckpt_dir);
  LOOM_CHECK(!c.moe.enabled(), "'{}': model '{}' has sparse (MoE) blocks ({} router), which "
             "GPT-2's architecture cannot express", ckpt_dir, c.name,
             model::router_name(c.moe.router));
  int64_t V0 = c.vocab;
  const auto& st = r.trainer_state();
  if (st.contains("interop") && st["interop"].contains("vocab_used"))
    V0 = st["interop"]["vocab_used"].get<int64_t>();
  LOOM_CHECK(V0 > 0 && V0 <= c.vocab, "'{}': recorded vocab_used {} is outside (0, {}]", ckpt_dir,
             V0, c.vocab);
  const model::ParamLayout layout(c);
  const int64_t C = c.d_model, F = c.d_ff;
  // Each output tensor gets its own buffer, loaded (and transposed) one tensor at a time, so the
  // peak is the exported model plus one loom tensor (write_safetensors takes them all at once).
  // Each keeps its loom tensor's stored dtype (F32, F16 or BF16; values narrowed back exactly,
  // since they were widened from that dtype), so loom -> HF -> loom is bit-identical.
  std::deque<std::vector<char>> keep;
  std::vector<TensorToWrite> out;
  auto stored = [&](std::vector<float> v, DType dt) -> const void* {
    keep.emplace_back(v.size() * dtype_size(dt));
    void* d = keep.back().data();
    if (dt == DType::f32) std::memcpy(d, v.data(), v.size() * sizeof(float));
    else if (dt == DType::bf16) convert_f32_to_bf16(v.data(), static_cast<bf16*>(d), v.size());
    else convert_f32_to_f16(v.data(), static_cast<uint16_t*>(d), v.size());
    return d;
  };
  // The dtype of the HF tensor made from these loom tensors: theirs if they agree, else F32.
  auto dtype_of = [&](const std::vector<std::string>& parts) {
    DType dt = r.weight_dtype(parts.at(0));
    for (const auto& p : parts)
      if (r.weight_dtype(p) != dt) return DType::f32;
    return dt;
  };
  // Elements [0, count) of loom tensor `name` (count < 0: all of it; the tensors adjacent to it
  // in the flat buffer follow when count exceeds its size, as for the q, k, v biases).
  auto load = [&](const std::string& name, int64_t count = -1) {
    const model::ParamSpec& sp = layout.find(name);
    std::vector<float> v(size_t(count < 0 ? sp.numel : count));
    r.load_weights_packed(layout, v.data(), sp.offset, sp.offset + int64_t(v.size()));
    return v;
  };
  auto add = [&](const std::string& hf_name, Shape shape, const std::string& loom_name,
                 int64_t count = -1, std::vector<std::string> parts = {}) {
    if (parts.empty()) parts = {loom_name};
    const DType dt = dtype_of(parts);
    out.push_back({hf_name, dt, std::move(shape), stored(load(loom_name, count), dt)});
  };
  // loom (rows, in) matrices stacked along rows -> Conv1D (in, sum of rows).
  auto conv1d = [&](const std::string& hf_name, const std::vector<std::string>& parts,
                    int64_t in) {
    int64_t out_cols = 0;
    for (auto& p : parts) out_cols += layout.find(p).shape[0];
    std::vector<float> t(size_t(in * out_cols));  // (in, out_cols)
    float* d = t.data();
    int64_t c0 = 0;
    for (auto& p : parts) {
      const std::vector<float> m = load(p);
      const int64_t rows = layout.find(p).shape[0];
      for (int64_t r2 = 0; r2 < rows; ++r2)
        for (int64_t i = 0; i < in; ++i) d[i * out_cols + c0 + r2] = m[size_t(r2 * in + i)];
      c0 += rows;
    }
    const DType dt = dtype_of(parts);
    out.push_back({hf_name, dt, {in, out_cols}, stored(std::move(t), dt)});
  };
  add("transformer.wte.weight", {V0, C}, "embed.token.weight", V0 * C);  // real rows only
  add("transformer.wpe.weight", {c.max_seq, C}, "embed.position.weight");
  for (int64_t i = 0; i < c.n_layers; ++i) {
    const std::string s = "transformer.h." + std::to_string(i) + ".", d = "blocks." + std::to_string(i) + ".";
    add(s + "ln_1.weight", {C}, d + "norm1.weight");
    add(s + "ln_1.bias", {C}, d + "norm1.bias");
    conv1d(s + "attn.c_attn.weight", {d + "attn.q.weight", d + "attn.k.weight", d + "attn.v.weight"}, C);
    add(s + "attn.c_attn.bias", {3 * C}, d + "attn.q.bias", 3 * C,  // q, k, v biases adjacent
        {d + "attn.q.bias", d + "attn.k.bias", d + "attn.v.bias"});
    conv1d(s + "attn.c_proj.weight", {d + "attn.out.weight"}, C);
    add(s + "attn.c_proj.bias", {C}, d + "attn.out.bias");
    add(s + "ln_2.weight", {C}, d + "norm2.weight");
    add(s + "ln_2.bias", {C}, d + "norm2.bias");
    conv1d(s + "mlp.c_fc.weight", {d + "ffn.up.weight"}, C);
    add(s + "mlp.c_fc.bias", {F}, d + "ffn.up.bias");
    conv1d(s + "mlp.c_proj.weight", {d + "ffn.down.weight"}, F);
    add(s + "mlp.c_proj.bias", {C}, d + "ffn.down.bias");
  }
  add("transformer.ln_f.weight", {C}, "final_norm.weight");
  add("transformer.ln_f.bias", {C}, "final_norm.bias");
  fs::create_directories(out_dir);
  write_safetensors((fs::path(out_dir) / "model.safetensors").string(), out, {{"format", "pt"}});
  // <|endoftext|>'s id from the checkpoint's tokenizer (GPT-2: the last id, 50256).
  int64_t eos = V0 - 1;
  const fs::path vocab_path = fs::path(ckpt_dir) / "tokenizer" / "vocab.json";
  if (fs::exists(vocab_path)) {
    auto v = nlohmann::json::parse(read_text(vocab_path.string()));
    if (v.contains("<|endoftext|>")) eos = v["<|endoftext|>"].get<int64_t>();
  }
  // The model's dtype as transformers names it: the token embedding's.
  const DType wte_dtype = r.weight_dtype("embed.token.weight");
  const char* torch_dtype = wte_dtype == DType::f16    ? "float16"
                            : wte_dtype == DType::bf16 ? "bfloat16"
                                                       : "float32";
  const char* act = c.activation == model::Activation::gelu       ? "gelu_new"
                    : c.activation == model::Activation::gelu_erf ? "gelu"
                                                                  : "quick_gelu";
  nlohmann::json hc = {{"model_type", "gpt2"},
                       {"architectures", {"GPT2LMHeadModel"}},
                       {"vocab_size", V0},
                       {"n_positions", c.max_seq},
                       {"n_ctx", c.max_seq},
                       {"n_embd", C},
                       {"n_layer", c.n_layers},
                       {"n_head", c.n_heads},
                       {"n_inner", F},
                       {"activation_function", act},
                       {"layer_norm_epsilon", double(c.norm_eps)},
                       {"resid_pdrop", 0.0},
                       {"embd_pdrop", 0.0},
                       {"attn_pdrop", 0.0},
                       {"initializer_range", 0.02},
                       {"scale_attn_weights", true},
                       {"tie_word_embeddings", true},
                       {"bos_token_id", eos},
                       {"eos_token_id", eos},
                       {"torch_dtype", torch_dtype}};
  std::ofstream(fs::path(out_dir) / "config.json") << hc.dump(2) << "\n";
  const fs::path tok = fs::path(ckpt_dir) / "tokenizer";
  for (const char* f : {"vocab.json", "merges.txt", "added_tokens.json"})
    if (fs::exists(tok / f))
      fs::copy_file(tok / f, fs::path(out_dir) / f, fs::copy_options::overwrite_existing);
}

}  // namespace

void export_hf_gpt2(const std::string& ckpt_dir, const std::string& out_dir) {
  try {
    export_hf_gpt2_impl(ckpt_dir, out_dir);
  } catch (const nlohmann::json::exception& e) {
    LOOM_FAIL("'{}': unexpected JSON content: {}", ckpt_dir, e.what());
  }
}

}  // namespace loom::interop
