#!/usr/bin/env bash
# MoE (rre) checkpoints through the CLI (issue 14, items 2 and 5): `--domain` for generate and
# eval loss, `loom extract` of one domain, and the extracted checkpoint used like any other
# (generate, eval loss, eval humaneval-x). Bad input is named.
# Usage: test_moe_extract.sh LOOM_BINARY SOURCE_DIR
set -uo pipefail
LOOM=$1
SRC=$2
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"  # fails, pass, fail, expect_error
export OMP_NUM_THREADS=1
TOK="$SRC/tests/data/tokenizer"
"$LOOM" init --model "$SRC/configs/models/tiny-moe.toml" --out "$WORK/full" >/dev/null 2>&1 \
  || { echo "FAIL init"; exit 1; }

# Extraction: one JSON line; the sub-model is smaller on disk.
out=$("$LOOM" extract --checkpoint "$WORK/full" --domain python --out "$WORK/py" 2>&1) \
  && pass "extract python" || fail "extract: $out"
python3 - "$out" <<'PY' && pass "extract report: fewer parameters and bytes" || fail "extract report: $out"
import json, sys
j = json.loads(sys.argv[1])
assert j["domain"] == "python" and j["params_extracted"] < j["params_full"], j
assert j["disk_bytes_extracted"] < j["disk_bytes_full"], j
PY
grep -q 'domains = \["python"\]' "$WORK/py/config.toml" && grep -q "experts = 2" "$WORK/py/config.toml" \
  && pass "extracted config: 1 domain, 2 experts" || fail "extracted config: $(cat "$WORK/py/config.toml")"

# Greedy generation: the full model with --domain python equals the extracted model.
gen() { "$LOOM" generate --checkpoint "$1" --tokenizer "$TOK" --prompt 'def add(a, b):' --max-tokens 12 \
  --temperature 0 "${@:2}" 2>&1; }
a=$(gen "$WORK/full" --domain python); b=$(gen "$WORK/py"); c=$(gen "$WORK/full" --domain java)
[ -n "$a" ] && [ "$a" = "$b" ] && pass "generate: full --domain python = extracted" || fail "generate: '$a' vs '$b'"
[ "$a" != "$c" ] && pass "generate: --domain java routes differently" || fail "generate: java = python '$c'"

# A prompts file: a line's "domain" overrides --domain.
printf '%s\n' '{"prompt": "def add(a, b):", "max_tokens": 12, "temperature": 0}' \
  '{"prompt": "def add(a, b):", "max_tokens": 12, "temperature": 0, "domain": "java"}' >"$WORK/prompts.jsonl"
"$LOOM" generate --checkpoint "$WORK/full" --tokenizer "$TOK" --prompts-file "$WORK/prompts.jsonl" \
  --domain python >"$WORK/pf.jsonl" 2>&1
python3 - "$WORK/pf.jsonl" "$a" "$c" <<'PY' && pass "prompts file: per-line domain" || fail "prompts file: $(cat "$WORK/pf.jsonl")"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
assert rows[0]["prompt"] + rows[0]["completion"] == sys.argv[2], rows[0]
assert rows[1]["prompt"] + rows[1]["completion"] == sys.argv[3], rows[1]
PY

# loom serve: --domain is the default of requests, a request's "domain" overrides it, an unknown
# one is a 400 listing the domains. Greedy texts equal loom generate's for the same domain.
if command -v curl >/dev/null; then
  "$LOOM" serve --checkpoint "$WORK/full" --tokenizer "$TOK" --port 0 --domain python >"$WORK/serve.log" 2>&1 &
  SP=$!
  PORT=""
  for _ in $(seq 100); do
    PORT=$(grep -oE 'http://127\.0\.0\.1:[0-9]+' "$WORK/serve.log" | head -1 | grep -oE '[0-9]+$' || true)
    [ -n "$PORT" ] && break
    sleep 0.1
  done
  post() { curl -s --noproxy '*' "http://127.0.0.1:$PORT/v1/completions" -H 'Content-Type: application/json' -d "$1"; }
  text() { python3 -c 'import json,sys; print(json.load(sys.stdin)["choices"][0]["text"])'; }
  sd=$(post '{"prompt":"def add(a, b):","max_tokens":12,"temperature":0}' | text)
  sj=$(post '{"prompt":"def add(a, b):","max_tokens":12,"temperature":0,"domain":"java"}' | text)
  sb=$(post '{"prompt":"x","max_tokens":1,"domain":"cobol"}')
  kill "$SP"; wait "$SP" 2>/dev/null
  [ "def add(a, b):$sd" = "$a" ] && pass "serve: default --domain python = generate" || fail "serve default: '$sd' vs '$a'"
  [ "def add(a, b):$sj" = "$c" ] && pass "serve: request domain java = generate --domain java" || fail "serve java: '$sj' vs '$c'"
  grep -q "its domains are: python, cpp, java, other" <<<"$sb" && pass "serve: unknown domain is a 400 naming the domains" || fail "serve bad domain: $sb"
else
  echo "SKIP serve checks: curl not installed"
fi

# eval loss: the same loss on both.
python3 -c "
import struct, random
random.seed(3); open('$WORK/toks.u32', 'wb').write(struct.pack('<400I', *[random.randrange(508) for _ in range(400)]))"
la=$("$LOOM" eval loss --checkpoint "$WORK/full" --tokens "$WORK/toks.u32" --seq 64 --domain python 2>&1)
lb=$("$LOOM" eval loss --checkpoint "$WORK/py" --tokens "$WORK/toks.u32" --seq 64 --domain python 2>&1)
lc=$("$LOOM" eval loss --checkpoint "$WORK/full" --tokens "$WORK/toks.u32" --seq 64 2>&1)
[ -n "$la" ] && [ "$la" = "$lb" ] && pass "eval loss --domain python: full = extracted ($la)" || fail "eval loss: '$la' vs '$lb'"
[ "$la" != "$lc" ] && pass "eval loss: no --domain is \"other\", a different loss" || fail "eval loss other: $lc"

# eval humaneval-x on the extracted checkpoint (its one domain takes every language); the full
# model records the language -> domain map it inferred.
if "$LOOM" eval humaneval-x --checkpoint "$WORK/py" --tokenizer "$TOK" --problems \
    "$SRC/tests/data/humaneval/humaneval_python.jsonl" -n 1 -k 1 --max-tokens 8 --out "$WORK/he" \
    --no-progress >"$WORK/he.txt" 2>&1; then
  grep -qE "^python +6 +6 " "$WORK/he.txt" && pass "humaneval-x on the extracted model" || fail "humaneval-x: $(cat "$WORK/he.txt")"
elif grep -q "cannot isolate generated programs here" "$WORK/he.txt"; then
  echo "SKIP humaneval-x on the extracted model: the sandbox cannot isolate programs on this machine"
else
  fail "humaneval-x extracted: $(tail -3 "$WORK/he.txt")"
fi
"$LOOM" eval humaneval-x --checkpoint "$WORK/full" --tokenizer "$TOK" --problems \
  "$SRC/tests/data/humaneval/humaneval_python.jsonl" -n 1 -k 1 --max-tokens 4 --out "$WORK/he2" \
  --no-progress >"$WORK/he2.txt" 2>&1
grep -q '"language_domains"' "$WORK/he2/generate.json" && grep -q '"js":"other"' <(tr -d ' \n' <"$WORK/he2/generate.json") \
  && pass "humaneval-x infers domains from the language" || fail "humaneval-x domains: $(cat "$WORK/he2/generate.json" 2>&1)"

# Bad input, named.
expect_err() {  # DESCRIPTION PATTERN COMMAND...
  local what=$1 pat=$2; shift 2
  local e; e=$("$@" 2>&1) && { fail "$what: accepted"; return; }
  grep -q -- "$pat" <<<"$e" && pass "$what" || fail "$what: $e"
}
expect_err "generate: unknown domain lists the domains" "its domains are: python, cpp, java, other" \
  "$LOOM" generate --checkpoint "$WORK/full" --tokenizer "$TOK" --prompt x --max-tokens 1 --domain cobol
expect_err "eval loss: the extracted model knows only python" "its domains are: python" \
  "$LOOM" eval loss --checkpoint "$WORK/py" --tokens "$WORK/toks.u32" --domain cpp
expect_err "extract: unknown domain" "unknown domain 'cobol'" \
  "$LOOM" extract --checkpoint "$WORK/full" --domain cobol --out "$WORK/x"
sed -e 's/router = "rre"/router = "topk"/' -e '/^domains/d' -e '/^experts_per_domain/d' -e '/^rre_table/d' \
  -e 's/^expert_d_ff = 128/expert_d_ff = 128\nexperts = 8\ntop_k = 2/' \
  "$SRC/configs/models/tiny-moe.toml" >"$WORK/topk.toml"
"$LOOM" init --model "$WORK/topk.toml" --out "$WORK/topk" >/dev/null 2>&1 || fail "init topk"
expect_err "extract: topk needs rre (why)" "extraction needs rre" \
  "$LOOM" extract --checkpoint "$WORK/topk" --domain python --out "$WORK/y"
expect_err "generate: topk refused (why)" "capacity limit" \
  "$LOOM" generate --checkpoint "$WORK/topk" --tokenizer "$TOK" --prompt x --max-tokens 1
"$LOOM" init --model "$SRC/configs/models/tiny.toml" --out "$WORK/dense" >/dev/null 2>&1 || fail "init dense"
expect_err "eval loss: --domain on a dense model" "dense" \
  "$LOOM" eval loss --checkpoint "$WORK/dense" --tokens "$WORK/toks.u32" --domain python

# A routing table that does not match the config (8 domains claimed, the table holds 4 rows):
# named by the checkpoint reader with both shapes.
cp -r "$WORK/full" "$WORK/badtable"
sed -i -e 's/^domains = .*/domains = ["python", "cpp", "java", "go", "rust", "c", "shell", "other"]/' \
  -e 's/^experts_per_domain = 2/experts_per_domain = 1/' "$WORK/badtable/config.toml"
python3 - "$WORK/badtable" <<'PY'
import hashlib, json, sys
d = sys.argv[1]; j = json.load(open(d + "/checksums.json")); b = open(d + "/config.toml", "rb").read()
j["config.toml"] = {"bytes": len(b), "sha256": hashlib.sha256(b).hexdigest()}
json.dump(j, open(d + "/checksums.json", "w"), indent=2)
PY
expect_err "a table that does not match the model is named" "rre_table' has shape (4, 512) but the model expects (8, 512)" \
  "$LOOM" generate --checkpoint "$WORK/badtable" --tokenizer "$TOK" --prompt x --max-tokens 1

[ "$fails" -eq 0 ] && echo "all passed" || { echo "$fails failed"; exit 1; }
