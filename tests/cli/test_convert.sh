#!/usr/bin/env bash
# `loom convert` end to end: import a Hugging Face GPT-2 and a CodeGeeX checkpoint built by
# tests/reference/interop_fixtures.py, generate from the import, export back, and the errors bad
# input must give. Usage: test_convert.sh LOOM_BINARY SOURCE_DIR
set -uo pipefail
LOOM=$1
SRC=$2
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"  # fails, pass, fail, expect_error

if ! /usr/bin/python3 -c 'import torch' 2>/dev/null; then
  echo "SKIP: /usr/bin/python3 cannot import torch (install Debian's python3-torch): the fixtures are torch.save files"
  exit 0
fi
FX="$SRC/tests/reference/interop_fixtures.py"
/usr/bin/python3 "$FX" hf "$WORK/hf" 2>/dev/null && /usr/bin/python3 "$FX" codegeex "$WORK/cg" \
  && /usr/bin/python3 "$FX" hostile "$WORK/bad" || { echo "FAIL fixtures"; exit 1; }

"$LOOM" convert --from hf-gpt2 --in "$WORK/hf/hf_bin" --out "$WORK/gpt2" >"$WORK/c1.json" 2>"$WORK/c1.err" \
  && grep -q '"vocab_used":291' "$WORK/c1.json" && grep -q '"vocab":384' "$WORK/c1.json" \
  && grep -q "padded to 384" "$WORK/c1.err" && pass "convert hf-gpt2 (pytorch_model.bin, tokenizer.json)" \
  || fail "convert hf-gpt2: $(cat "$WORK/c1.json" "$WORK/c1.err")"
"$LOOM" generate --checkpoint "$WORK/gpt2" --prompt "the" --max-tokens 8 --temperature 0 >"$WORK/g.out" 2>&1 \
  && pass "generate from the converted GPT-2" || fail "generate: $(tail -3 "$WORK/g.out")"
"$LOOM" convert --to hf-gpt2 --in "$WORK/gpt2" --out "$WORK/export" >/dev/null 2>&1 \
  && /usr/bin/python3 - "$WORK/export/config.json" <<'PY' && pass "export hf-gpt2" || fail "export hf-gpt2"
import json, sys
c = json.load(open(sys.argv[1]))
assert c["vocab_size"] == 291 and c["activation_function"] == "gelu" and c["model_type"] == "gpt2", c
PY
"$LOOM" convert --from codegeex --in "$WORK/cg/codegeex_args.pt" --out "$WORK/cgx" >"$WORK/c2.json" 2>"$WORK/c2.err" \
  && grep -q "skipped non-tensor entry args (argparse.Namespace object)" "$WORK/c2.err" \
  && pass "convert codegeex with Megatron args (warning names it)" || fail "convert codegeex: $(cat "$WORK/c2.err")"
expect_error "export refuses the query layer" "top query layer" \
  "$LOOM" convert --to hf-gpt2 --in "$WORK/cgx" --out "$WORK/x1"
expect_error "legacy torch file" "legacy (pre-1.6" \
  "$LOOM" convert --from codegeex --in "$WORK/cg/codegeex_legacy.pt" --out "$WORK/x2"
expect_error "os.system payload refused" "'posix.system'" \
  "$LOOM" convert --from codegeex --in "$WORK/bad/reduce_os_system.pt" --out "$WORK/x3"
[ ! -e "$WORK/bad/PWNED" ] && pass "payload never ran" || fail "payload ran"
expect_error "no direction" "exactly one of --from" "$LOOM" convert --in x --out y
expect_error "unknown source" "--from 'onnx' is unknown" "$LOOM" convert --from onnx --in x --out y
expect_error "unknown --dtype" "--dtype 'int8' is unknown; choose f32, bf16 or f16" \
  "$LOOM" convert --from hf-gpt2 --in "$WORK/hf/hf_st" --out "$WORK/x4" --dtype int8
"$LOOM" convert --from hf-gpt2 --in "$WORK/hf/hf_st" --out "$WORK/gpt2_bf16" --dtype bf16 >"$WORK/c3.json" 2>/dev/null \
  && grep -q '"dtype":"bf16"' "$WORK/c3.json" \
  && "$LOOM" generate --checkpoint "$WORK/gpt2_bf16" --prompt "the" --max-tokens 4 --temperature 0 >/dev/null 2>&1 \
  && pass "convert --dtype bf16, generate from it" || fail "convert --dtype bf16: $(cat "$WORK/c3.json")"
"$LOOM" convert --from codegeex --in "$WORK/cg/codegeex_args.pt" --out "$WORK/cg16" >"$WORK/c4.json" 2>/dev/null \
  && grep -q '"dtype":"f16"' "$WORK/c4.json" && pass "codegeex fp16 source keeps f16" \
  || fail "codegeex keeps f16: $(cat "$WORK/c4.json")"
expect_error "export --dtype" "--dtype applies to imports" \
  "$LOOM" convert --to hf-gpt2 --in "$WORK/gpt2" --out "$WORK/x6" --dtype f16
expect_error "missing input" "cannot open" \
  "$LOOM" convert --from codegeex --in "$WORK/none.pt" --out "$WORK/x5"
[ ! -e "$WORK/x1" ] && [ ! -e "$WORK/x2" ] && [ ! -e "$WORK/x3" ] && pass "failed conversions leave nothing" \
  || fail "a failed conversion left output"

# Memory: the source is streamed tensor by tensor, never loaded whole. A GPT-2-shaped fp16
# safetensors (~160 MB; the loom checkpoint is f32, ~320 MB) must convert with peak RSS at most
# the f32 model + its largest tensor + 48 MiB (loading the whole source would add 160 MB).
# (The issue's goal, largest tensor + 256 MiB, needs a streaming checkpoint writer: see
# docs/interop.md.)
/usr/bin/python3 - "$LOOM" "$WORK" <<'PY' && pass "convert peak RSS bounded by model + largest tensor" || fail "convert peak RSS"
import json, os, resource, subprocess, sys
import numpy as np
loom, work = sys.argv[1], sys.argv[2]
V, C, L, S = 8192, 512, 24, 1024
d = os.path.join(work, "mem_src")
os.makedirs(d)
rng = np.random.default_rng(0)
shapes = {"wte.weight": (V, C), "wpe.weight": (S, C), "ln_f.weight": (C,), "ln_f.bias": (C,)}
for i in range(L):
    p = "h.%d." % i
    shapes.update({p + "ln_1.weight": (C,), p + "ln_1.bias": (C,), p + "attn.c_attn.weight": (C, 3 * C),
                   p + "attn.c_attn.bias": (3 * C,), p + "attn.c_proj.weight": (C, C), p + "attn.c_proj.bias": (C,),
                   p + "ln_2.weight": (C,), p + "ln_2.bias": (C,), p + "mlp.c_fc.weight": (C, 4 * C),
                   p + "mlp.c_fc.bias": (4 * C,), p + "mlp.c_proj.weight": (4 * C, C), p + "mlp.c_proj.bias": (C,)})
header, off = {}, 0
for k in sorted(shapes):
    n = int(np.prod(shapes[k])) * 2
    header[k] = {"dtype": "F16", "shape": list(shapes[k]), "data_offsets": [off, off + n]}
    off += n
h = json.dumps(header).encode()
h += b" " * ((8 - len(h) % 8) % 8)
with open(os.path.join(d, "model.safetensors"), "wb") as f:
    f.write(len(h).to_bytes(8, "little"))
    f.write(h)
    for k in sorted(shapes):
        f.write((rng.standard_normal(shapes[k], dtype=np.float32) * 0.02).astype(np.float16).tobytes())
json.dump({"model_type": "gpt2", "vocab_size": V, "n_positions": S, "n_embd": C, "n_layer": L,
           "n_head": 8, "activation_function": "gelu_new"}, open(os.path.join(d, "config.json"), "w"))
r = subprocess.run([loom, "convert", "--from", "hf-gpt2", "--in", d, "--out", os.path.join(work, "mem_out")],
                   capture_output=True, text=True)
assert r.returncode == 0, r.stderr
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
model = json.loads(r.stdout)["params"] * 4
largest = max(int(np.prod(s)) for s in shapes.values()) * 4
src = os.path.getsize(os.path.join(d, "model.safetensors"))
bound = model + largest + 48 * 2**20
print("convert peak RSS %.1f MiB: f32 model %.1f MiB, largest tensor %.1f MiB, source %.1f MiB, bound %.1f MiB"
      % (peak / 2**20, model / 2**20, largest / 2**20, src / 2**20, bound / 2**20))
assert peak <= bound, (peak, bound)
PY

echo "$fails failure(s)"
[ "$fails" -eq 0 ]
