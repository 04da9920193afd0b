#!/usr/bin/env bash
# `loom quantize` end to end: a checkpoint's linears stored as int8 rows give, in `loom generate`
# and `loom serve`, exactly what the f32 checkpoint gives with --int8 (greedy text, logprobs);
# `loom eval loss` reads it (dequantized); `loom train --resume` refuses it, naming the f32 source;
# bad input errors. Usage: test_quantize.sh LOOM_BINARY SOURCE_DIR
set -uo pipefail
LOOM=$1
SRC=$2
WORK=$(mktemp -d)
pids=()
trap 'for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null; done; rm -rf "$WORK"' EXIT
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"  # fails, pass, fail, expect_error
TOK="$SRC/tests/data/tokenizer"

"$LOOM" init --model "$SRC/configs/models/tiny.toml" --out "$WORK/f32" --seed 5 >/dev/null \
  || { echo "FAIL init"; exit 1; }
"$LOOM" quantize --checkpoint "$WORK/f32" --out "$WORK/int8" >"$WORK/q.json" 2>"$WORK/q.err" \
  && /usr/bin/python3 - "$WORK/q.json" "$WORK/f32/model.safetensors" <<'PY' && pass "quantize: linears ~4x smaller" \
  || fail "quantize: $(cat "$WORK/q.json" "$WORK/q.err")"
import json, os, sys
j = json.load(open(sys.argv[1]))
r = j["linear_bytes_in"] / j["linear_bytes_out"]
print("linears %d -> %d bytes (%.2fx); model.safetensors %d -> %d bytes" % (
    j["linear_bytes_in"], j["linear_bytes_out"], r, os.path.getsize(sys.argv[2]), j["file_bytes"]))
assert j["quantized"] > 0 and 3.5 < r < 4.0, j
PY
"$LOOM" quantize --checkpoint "$WORK/f32" --out "$WORK/bf16" --dtype bf16 >/dev/null \
  && pass "quantize --dtype bf16" || fail "quantize --dtype bf16"

# generate: greedy text of the int8 checkpoint = the f32 checkpoint with --int8 (and bf16 alike).
gen() { "$LOOM" generate --checkpoint "$1" --tokenizer "$TOK" --prompt 'def add(a, b):' \
          --max-tokens 24 --temperature 0 "${@:2}" 2>/dev/null; }
a=$(gen "$WORK/f32" --int8) b=$(gen "$WORK/int8") c=$(gen "$WORK/int8" --int8)
[[ -n "$a" && "$a" == "$b" && "$a" == "$c" ]] && pass "generate: int8 checkpoint = f32 --int8" \
  || fail "generate int8: '$a' / '$b' / '$c'"
a=$(gen "$WORK/f32" --dtype bf16) b=$(gen "$WORK/bf16" --dtype bf16)
[[ -n "$a" && "$a" == "$b" ]] && pass "generate: bf16 checkpoint = f32 --dtype bf16" \
  || fail "generate bf16: '$a' / '$b'"

# serve: the same request with logprobs on both servers gives identical JSON choices.
serve() {  # serve DIR NAME [flags]: starts a server, sets $url
  OMP_NUM_THREADS=1 "$LOOM" serve --checkpoint "$1" --tokenizer "$TOK" --port 0 "${@:3}" \
    >"$WORK/$2.log" 2>&1 &
  pids+=($!)
  url=$(server_url "$WORK/$2.log")
}
req='{"prompt": "int main() {", "max_tokens": 16, "temperature": 0, "logprobs": 3}'
serve "$WORK/f32" s1 --int8; u1=$url
serve "$WORK/int8" s2; u2=$url
if [[ -n "$u1" && -n "$u2" ]]; then
  r1=$(curl -s "$u1/v1/completions" -H 'Content-Type: application/json' -d "$req")
  r2=$(curl -s "$u2/v1/completions" -H 'Content-Type: application/json' -d "$req")
  /usr/bin/python3 - "$r1" "$r2" <<'PY' && pass "serve: int8 checkpoint = f32 --int8 (text, logprobs)" \
    || fail "serve: '$r1' vs '$r2'"
import json, sys
a, b = (json.loads(x)["choices"][0] for x in sys.argv[1:3])
assert a["text"] and a["logprobs"]["token_logprobs"], a
assert a["text"] == b["text"] and a["logprobs"] == b["logprobs"], (a, b)
PY
else
  fail "serve did not start: $(cat "$WORK/s1.log" "$WORK/s2.log" | tail -4)"
fi
for p in "${pids[@]}"; do kill "$p" 2>/dev/null; wait "$p" 2>/dev/null; done
pids=()

# eval loss reads the int8 weights dequantized (scale * q): close to the f32 loss, not equal.
/usr/bin/python3 -c "import struct,sys; sys.stdout.buffer.write(struct.pack('<200I', *[(i * 37) % 500 for i in range(200)]))" >"$WORK/t.u32"
"$LOOM" eval loss --checkpoint "$WORK/f32" --tokens "$WORK/t.u32" >"$WORK/l32.json" 2>/dev/null
"$LOOM" eval loss --checkpoint "$WORK/int8" --tokens "$WORK/t.u32" >"$WORK/l8.json" 2>/dev/null
/usr/bin/python3 - "$WORK/l32.json" "$WORK/l8.json" <<'PY' && pass "eval loss reads the int8 checkpoint" \
  || fail "eval loss int8: $(cat "$WORK/l32.json" "$WORK/l8.json")"
import json, sys
a, b = (json.load(open(p))["loss"] for p in sys.argv[1:3])
print("eval loss f32 %.6f, int8 checkpoint %.6f" % (a, b))
assert a != b and abs(a - b) < 0.01 * a, (a, b)
PY

# train --resume from the int8 checkpoint: refused, naming the f32 source.
printf 'model = "%s"\n[train]\nbatch = 2\nseq = 16\nsteps = 1\neval_every = 0\n' \
  "$SRC/configs/models/tiny.toml" >"$WORK/t.toml"
expect_error "train --resume int8: refused, names the source" "train from the f32 checkpoint it was quantized from ('$WORK/f32')" \
  "$LOOM" train --config "$WORK/t.toml" --out "$WORK/run" --resume "$WORK/int8"
"$LOOM" train --config "$WORK/t.toml" --out "$WORK/run_bf16" --resume "$WORK/bf16" >/dev/null 2>&1 \
  && pass "train --resume from a bf16 checkpoint (widened exactly)" || fail "train --resume bf16"
expect_error "quantize twice" "is already int8-quantized" \
  "$LOOM" quantize --checkpoint "$WORK/int8" --out "$WORK/x1"
expect_error "quantize --dtype f16" "--dtype 'f16' is unknown; choose int8 or bf16" \
  "$LOOM" quantize --checkpoint "$WORK/f32" --out "$WORK/x2" --dtype f16
expect_error "export of an int8 checkpoint" "Hugging Face GPT-2 has no int8 layout" \
  "$LOOM" convert --to hf-gpt2 --in "$WORK/int8" --out "$WORK/x3"
[ ! -e "$WORK/x1" ] && [ ! -e "$WORK/x2" ] && pass "failed quantize leaves nothing" || fail "failed quantize left output"

# MoE (rre, configs/models/tiny-moe.toml): the experts' linears are quantized too; generate and
# `eval loss --int8` (the inference weights) on the int8 checkpoint equal the f32 one with --int8
# exactly (same text, same loss to the last digit), in two domains; eval loss's training forward
# reads the experts dequantized. A topk model is refused, naming the router.
"$LOOM" init --model "$SRC/configs/models/tiny-moe.toml" --out "$WORK/moe" --seed 3 >/dev/null 2>&1 \
  || fail "init tiny-moe"
"$LOOM" quantize --checkpoint "$WORK/moe" --out "$WORK/moe8" >"$WORK/mq.json" 2>"$WORK/mq.err" \
  && /usr/bin/python3 - "$WORK/mq.json" <<'PY' && pass "quantize MoE: experts quantized, ~4x" \
  || fail "quantize MoE: $(cat "$WORK/mq.json" "$WORK/mq.err")"
import json, sys
j = json.load(open(sys.argv[1]))
# 2 blocks (block 1 sparse: q, k, v, out + 8 experts x up, down) + the query layer's 6.
assert j["quantized"] == 6 + 4 + 16 + 6, j
assert 3.5 < j["linear_bytes_in"] / j["linear_bytes_out"] < 4.0, j
PY
for dom in python java; do
  a=$(gen "$WORK/moe" --int8 --domain $dom) b=$(gen "$WORK/moe8" --domain $dom)
  [[ -n "$a" && "$a" == "$b" ]] && pass "generate MoE --domain $dom: int8 checkpoint = f32 --int8" \
    || fail "generate MoE $dom: '$a' / '$b'"
done
/usr/bin/python3 -c "import struct,sys; sys.stdout.buffer.write(struct.pack('<300I', *[(i * 53) % 500 for i in range(300)]))" >"$WORK/m.u32"
mloss() { "$LOOM" eval loss --checkpoint "$1" --tokens "$WORK/m.u32" --seq 64 --domain python "${@:2}" 2>/dev/null; }
/usr/bin/python3 - "$(mloss "$WORK/moe")" "$(mloss "$WORK/moe" --int8)" "$(mloss "$WORK/moe8" --int8)" \
  "$(mloss "$WORK/moe8")" <<'PY' && pass "eval loss MoE: int8 checkpoint = f32 --int8 exactly" \
  || fail "eval loss MoE"
import json, sys
f32, a, b, deq = (json.loads(x)["loss"] for x in sys.argv[1:5])
print("MoE eval loss: f32 %.9f, f32 --int8 %.9f, int8 checkpoint --int8 %.9f, dequantized %.9f"
      % (f32, a, b, deq))
assert a == b and a != f32 and abs(a - f32) < 0.01 * f32 and abs(deq - a) < 1e-4 * a
PY
sed -e 's/^router = "rre"/router = "topk"\nexperts = 4\ntop_k = 2/' -e '/^experts_per_domain/d' \
  -e '/^domains/d' -e '/^rre_table/d' "$SRC/configs/models/tiny-moe.toml" >"$WORK/topk.toml"
"$LOOM" init --model "$WORK/topk.toml" --out "$WORK/topk" >/dev/null 2>&1 || fail "init topk"
expect_error "quantize topk MoE: refused, naming the router" "sparse blocks with the topk router" \
  "$LOOM" quantize --checkpoint "$WORK/topk" --out "$WORK/topk8"
[ ! -e "$WORK/topk8" ] && pass "refused topk quantize leaves nothing" || fail "topk quantize left output"

echo "$fails failure(s)"
[ "$fails" -eq 0 ]
