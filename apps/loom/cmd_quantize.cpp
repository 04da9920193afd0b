// `loom quantize --checkpoint DIR --out DIR2 [--dtype int8|bf16]`: writes a checkpoint whose
// linear weights (attn q/k/v/out, ffn up/down of every block and the query layer) are int8 per
// output row with f32 scales (default) or bf16, everything else as stored
// (infer::quantize_checkpoint; the int8 rule is the one `--int8` applies at load time, so
// `loom generate` / `serve` / `eval humaneval-x` on DIR2 give the logits of DIR with --int8).
// Prints one JSON line: the output, the linears' and all weights' bytes before and after, and the
// size of model.safetensors.
#include <cstdio>
#include <nlohmann/json.hpp>

#include "cli.h"
#include "core/error.h"
#include "infer/weights.h"

namespace {

void add_quantize(CLI::App& root, loom::cli::Context& ctx) {
  struct Opts {
    std::string checkpoint, out, dtype = "int8";
  };
  auto o = std::make_shared<Opts>();
  CLI::App* sub = root.add_subcommand(
      "quantize", "store a checkpoint's linear weights as int8 rows (or bf16) for inference");
  sub->add_option("--checkpoint", o->checkpoint, "checkpoint (or run) directory to read")
      ->required();
  sub->add_option("--out", o->out, "directory of the quantized checkpoint")->required();
  sub->add_option("--dtype", o->dtype,
                  "linear weight storage: int8 (per output row, f32 scales) or bf16");
  sub->callback([o, &ctx] {
    using namespace loom;
    LOOM_CHECK(o->dtype == "int8" || o->dtype == "bf16",
               "loom quantize: --dtype '{}' is unknown; choose int8 or bf16", o->dtype);
    const infer::QuantizeResult r = infer::quantize_checkpoint(
        o->checkpoint, o->out, infer::weight_format_from_name(o->dtype));
    nlohmann::json j = {{"checkpoint", o->out},
                        {"linears", o->dtype},
                        {"tensors", r.tensors},
                        {"quantized", r.quantized},
                        {"linear_bytes_in", r.linear_bytes_in},
                        {"linear_bytes_out", r.linear_bytes_out},
                        {"weight_bytes_in", r.weight_bytes_in},
                        {"weight_bytes_out", r.weight_bytes_out},
                        {"file_bytes", r.file_bytes_out}};
    std::printf("%s\n", j.dump().c_str());
    ctx.exit_code = 0;
  });
}

}  // namespace

LOOM_REGISTER_COMMAND(quantize, add_quantize);
