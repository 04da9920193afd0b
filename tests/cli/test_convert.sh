#!/usr/bin/env bash
# `loom convert` end to end: import a Hugging Face GPT-2 and a CodeGeeX checkpoint built by
# tests/reference/interop_fixtures.py, generate from the import, export back, and the errors bad
# input must give. Usage: test_convert.sh LOOM_BINARY SOURCE_DIR
set -uo pipefail
LOOM=$1
SRC=$2
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
fails=0
pass() { echo "ok   $1"; }
fail() { echo "FAIL $1"; fails=$((fails + 1)); }
expect_error() {
  local name=$1 needle=$2; shift 2
  local out
  if out=$("$@" 2>&1 >/dev/null); then fail "$name: exited 0"; return; fi
  if grep -qF -- "$needle" <<<"$out"; then pass "$name"; else fail "$name: no '$needle' in: $out"; fi
}

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
expect_error "dtype other than f32" "--dtype bf16 is not available" \
  "$LOOM" convert --from hf-gpt2 --in "$WORK/hf/hf_st" --out "$WORK/x4" --dtype bf16
expect_error "missing input" "cannot open" \
  "$LOOM" convert --from codegeex --in "$WORK/none.pt" --out "$WORK/x5"
[ ! -e "$WORK/x1" ] && [ ! -e "$WORK/x2" ] && [ ! -e "$WORK/x3" ] && pass "failed conversions leave nothing" \
  || fail "a failed conversion left output"

echo "$fails failure(s)"
[ "$fails" -eq 0 ]
