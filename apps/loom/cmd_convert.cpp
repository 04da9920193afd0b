// `loom convert`: checkpoints from and to the formats users already have.
//   loom convert --from codegeex --in FILE.pt|SHARD_DIR [--tokenizer DIR] [--n-heads N] --out DIR
//   loom convert --from hf-gpt2  --in DIR [--tokenizer DIR] --out DIR
//   loom convert --to hf-gpt2    --in CKPT --out DIR
// Imports keep each tensor's source dtype (F32, F16, BF16; F64 becomes F32) unless --dtype
// f32|bf16|f16 is given; the export writes each tensor in the checkpoint's stored dtype.
// Prints one JSON line describing the result; warnings (skipped metadata, padding) on stderr.
#include <cstdio>
#include <nlohmann/json.hpp>

#include "interop/convert.h"
#include "cli.h"
#include "core/error.h"

namespace {

void add_convert(CLI::App& root, loom::cli::Context& ctx) {
  struct Opts {
    std::string from, to, in, out, tokenizer, name, dtype;
    int64_t n_heads = 0, vocab_multiple = 128;
  };
  auto o = std::make_shared<Opts>();
  CLI::App* sub = root.add_subcommand(
      "convert", "import a CodeGeeX or Hugging Face GPT-2 checkpoint, or export to Hugging Face");
  sub->add_option("--from", o->from, "source format: codegeex | hf-gpt2");
  sub->add_option("--to", o->to, "target format for a loom checkpoint: hf-gpt2");
  sub->add_option("--in", o->in, "input: codegeex .pt file or directory of mp_rank_XX_model_states.pt shards; hf-gpt2 "
                  "directory; --to: loom checkpoint")->required();
  sub->add_option("--out", o->out, "output directory")->required();
  sub->add_option("--tokenizer", o->tokenizer,
                  "tokenizer directory (vocab.json, merges.txt[, added_tokens.json])");
  sub->add_option("--name", o->name, "model name written to config.toml");
  sub->add_option("--n-heads", o->n_heads,
                  "codegeex: attention heads when the file has no Megatron args "
                  "(default: d_model / 128)");
  sub->add_option("--pad-vocab-to-multiple", o->vocab_multiple,
                  "pad the vocabulary rows to a multiple of this (Megatron's default 128)");
  sub->add_option("--dtype", o->dtype,
                  "storage dtype of the imported checkpoint: f32, bf16 or f16 (default: keep "
                  "the source's; narrowing rounds to nearest even)");
  sub->callback([o, &ctx] {
    LOOM_CHECK(o->from.empty() != o->to.empty(),
               "loom convert: give exactly one of --from (codegeex | hf-gpt2) or --to hf-gpt2");
    LOOM_CHECK(o->dtype.empty() || o->dtype == "f32" || o->dtype == "bf16" || o->dtype == "f16",
               "loom convert: --dtype '{}' is unknown; choose f32, bf16 or f16 (or omit it to "
               "keep the source's dtype; int8: `loom quantize`)", o->dtype);
    LOOM_CHECK(o->dtype.empty() || o->to.empty(),
               "loom convert --to {}: --dtype applies to imports; the export writes each tensor "
               "in the dtype the checkpoint stores", o->to);
    LOOM_CHECK(o->vocab_multiple >= 1, "--pad-vocab-to-multiple must be >= 1, got {}",
               o->vocab_multiple);
    if (!o->to.empty()) {
      LOOM_CHECK(o->to == "hf-gpt2", "loom convert: --to '{}' is unknown; supported: hf-gpt2",
                 o->to);
      loom::interop::export_hf_gpt2(o->in, o->out);
      std::printf("%s\n", nlohmann::json{{"exported", o->out}, {"format", "hf-gpt2"}}.dump().c_str());
      ctx.exit_code = 0;
      return;
    }
    loom::interop::ConvertOptions opt;
    opt.tokenizer_dir = o->tokenizer;
    opt.name = o->name;
    opt.n_heads = o->n_heads;
    opt.vocab_multiple = o->vocab_multiple;
    opt.dtype = o->dtype;
    loom::interop::ConvertResult r;
    if (o->from == "codegeex") r = loom::interop::convert_codegeex(o->in, o->out, opt);
    else if (o->from == "hf-gpt2") r = loom::interop::convert_hf_gpt2(o->in, o->out, opt);
    else LOOM_FAIL("loom convert: --from '{}' is unknown; supported: codegeex, hf-gpt2", o->from);
    for (const auto& w : r.warnings) std::fprintf(stderr, "warning: %s\n", w.c_str());
    nlohmann::json j = {{"checkpoint", o->out},    {"from", o->from},
                        {"model", r.cfg.name},     {"params", r.cfg.num_params()},
                        {"vocab", r.cfg.vocab},    {"vocab_used", r.vocab_used},
                        {"tensors", r.tensors},    {"dtype", r.dtype},
                        {"warnings", r.warnings.size()}};
    std::printf("%s\n", j.dump().c_str());
    ctx.exit_code = 0;
  });
}

}  // namespace

LOOM_REGISTER_COMMAND(convert, add_convert);
