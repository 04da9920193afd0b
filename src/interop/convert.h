// checkpoint/interop.h: importers and exporters for checkpoint formats users already have.
//
//   CodeGeeX (THUDM/CodeGeeX, Megatron-style torch.save, checkpoint/torch_file.h)  -> loom
//   Hugging Face GPT-2 (config.json + model.safetensors or pytorch_model.bin,
//                       sharded via *.index.json)                                 -> loom
//   loom (GPT-2-expressible models)                                               -> Hugging Face GPT-2
//
// The loom side is an ordinary checkpoint directory written by save_checkpoint_streamed (weights
// in the source's dtype or ConvertOptions::dtype, config.toml, tokenizer/ when a tokenizer is
// given or found). trainer_state.json records where
// it came from: {"step": 0, "interop": {"from": ..., "source": ..., "vocab_used": V0}} where
// V0 is the number of real vocabulary rows (the rest is Megatron-style padding, zero rows, which
// generation never samples and the export drops).
//
// Mappings (verified against THUDM/CodeGeeX codegeex/torch/codegeex_model.py and
// huggingface/transformers models/gpt2/modeling_gpt2.py; see docs/interop.md):
//   CodeGeeX: separate query/key/value Linear (out,in) -> attn.q/k/v; attention.dense ->
//     attn.out; mlp.dense_h_to_4h / dense_4h_to_h -> ffn.up / ffn.down; input_layernorm /
//     post_attention_layernorm -> norm1 / norm2; final_layernorm (applied before the top query
//     layer) -> final_norm; topQueryLayer.* -> query_layer.*; top_query_embeddings ->
//     query_layer.position; the head is tied to word_embeddings; fast_gelu; LayerNorm eps 1e-5;
//     scores / sqrt(head dim).
//   GPT-2: Conv1D weights are (in, out): transposed; c_attn's output columns are q | k | v;
//     attn.bias / attn.masked_bias buffers skipped; lm_head must equal wte (tied).
//     activation_function gelu_new / gelu_fast / gelu_pytorch_tanh -> gelu (tanh), gelu ->
//     gelu_erf, quick_gelu -> fast_gelu.
// Errors (loom::Error) name the file, tensor, key or feature and what was expected.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "core/tensor.h"
#include "model/config.h"

namespace loom::interop {


struct ConvertOptions {
  std::string tokenizer_dir;   // CodeGeeX: vocab.json + merges.txt [+ added_tokens.json]
  std::string name;            // model name in config.toml (default: see each importer)
  int64_t n_heads = 0;         // CodeGeeX: heads when the file has no Megatron args (0: auto)
  int64_t vocab_multiple = 128;  // pad vocab rows to a multiple of this (Megatron's default)
  // Storage dtype of the loom checkpoint: "" keeps each tensor's source dtype (F16 and BF16 as
  // they are, F32 and F64 as F32); "f32", "bf16" or "f16" stores every tensor so (rounded to
  // nearest even when narrower than the source).
  std::string dtype;
};

struct ConvertResult {
  model::ModelConfig cfg;
  int64_t vocab_used = 0;             // real vocabulary rows
  std::vector<std::string> warnings;  // skipped metadata, guesses
  int64_t tensors = 0;                // source tensors read
  std::string dtype;                  // stored dtype: "f32", "bf16", "f16" or "mixed"
};

// "f32" | "bf16" | "f16" -> the dtype (throws naming the accepted names), and back.
DType storage_dtype_from_name(const std::string& name);
const char* storage_dtype_name(DType t);

// The loom config for CodeGeeX tensors of the given (flattened, `module.` stripped) names and
// shapes. n_heads: from Megatron args or the caller (0: d_model / 128, CodeGeeX's head dim, with
// a warning appended). The published 13B shapes give a config equal to
// configs/models/codegeex-13b.toml (name "codegeex-13b" unless `name` is given).
model::ModelConfig codegeex_config(const std::map<std::string, Shape>& shapes, int64_t n_heads,
                                   const std::string& name, std::vector<std::string>& warnings);

// `in_pt`: a CodeGeeX .pt file, or a directory of its tensor-parallel shards
// mp_rank_00_model_states.pt ... (CodeGeeX's convert_ckpt_parallel.py layout), merged on read.
ConvertResult convert_codegeex(const std::string& in_pt, const std::string& out_dir,
                               const ConvertOptions& opt);
ConvertResult convert_hf_gpt2(const std::string& in_dir, const std::string& out_dir,
                              const ConvertOptions& opt);
// Writes config.json, model.safetensors (each tensor in the loom checkpoint's stored dtype: F32,
// F16 or BF16; `transformer.` names, no lm_head: tied; an int8 checkpoint is refused) and the
// tokenizer files (vocab.json, merges.txt) when the checkpoint has them. Throws naming the
// feature that GPT-2 cannot express (query layer, GQA, untied head).
void export_hf_gpt2(const std::string& ckpt_dir, const std::string& out_dir);

}  // namespace loom::interop
