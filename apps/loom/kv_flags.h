// apps/loom/kv_flags.h: the KV-cache flags of the commands that run infer::Engine or
// infer::Decoder (`loom generate`, `serve`, `eval humaneval-x`, `eval loss`, `bench decode`), so
// each spells, documents and applies them the same way; and --batch-invariant, which the decoding
// ones (all but `eval loss`) share.
//
//   --kv-dtype auto|f32|bf16  K and V storage (infer::kv_dtype_from_flag: auto follows --dtype)
//   --kv-memory SIZE          the KV pool in bytes ("512M", "2G"; infer::parse_byte_size)
//   --kv-blocks N             the KV pool in blocks of 16 tokens
// Without --kv-memory / --kv-blocks the pool holds --max-batch sequences of the full context.
#pragma once

#include <CLI/CLI.hpp>

#include <cstdint>
#include <string>

#include "infer/engine.h"

namespace loom::cli {

struct KvFlags {
  std::string dtype = "auto";
  std::string memory;  // "" = not given
  int64_t blocks = 0;  // 0 = not given
};

inline void add_kv_dtype_flag(CLI::App* sub, KvFlags& f) {
  sub->add_option("--kv-dtype", f.dtype,
                  "KV cache storage: f32, bf16 (half the memory per token; f32 accumulation), or "
                  "auto (bf16 with --dtype bf16, else f32)")
      ->capture_default_str();
}

inline void add_kv_flags(CLI::App* sub, KvFlags& f) {
  add_kv_dtype_flag(sub, f);
  auto* mem = sub->add_option("--kv-memory", f.memory,
                              "KV pool size in bytes, K/M/G suffixes (e.g. 512M, 2G); default: "
                              "--max-batch sequences of the full context");
  auto* blk = sub->add_option("--kv-blocks", f.blocks,
                              "KV pool size in blocks of 16 tokens (instead of --kv-memory)");
  mem->excludes(blk);
}

// --batch-invariant: infer::WeightFormats::batch_invariant (ModelWeights::set_batch_invariant).
inline void add_batch_invariant_flag(CLI::App* sub, bool& on) {
  sub->add_flag("--batch-invariant", on,
                "bf16 weights: a sequence gets the same logits bit for bit alone or in a batch "
                "(f32 and int8 always do); costs ~4% of batch-1 decode speed on AMX CPUs");
}

// Sets eo.kv_dtype (auto: from `head`, the format --dtype gives the head) and the pool size.
inline void apply_kv_flags(const KvFlags& f, infer::WeightFormat head, infer::EngineOptions& eo) {
  eo.kv_dtype = infer::kv_dtype_from_flag(f.dtype, head);
  eo.kv_budget_bytes = f.memory.empty() ? 0 : infer::parse_byte_size(f.memory, "--kv-memory");
  LOOM_CHECK(f.blocks >= 0, "--kv-blocks {} must be >= 1", f.blocks);
  eo.kv_blocks = f.blocks;
}

}  // namespace loom::cli
