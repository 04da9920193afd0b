#!/usr/bin/env bash
# `loom eval humaneval-x --checkpoint` (issue 15): n samples per problem from a model over loom's
# problem set in all five languages, run in the sandbox, pass@k per language. A resumed run (from
# a log cut mid-line, and after a SIGKILL) gives the same samples and results as an uninterrupted
# one; the pass@k printed equals the harness run on the written samples.
# Usage: test_humaneval_generate.sh LOOM_BINARY SOURCE_DIR
set -uo pipefail
LOOM=$1
SRC=$2
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"  # fails, pass, fail, expect_error
P=("$SRC"/tests/data/humaneval/humaneval_{python,cpp,java,js,go}.jsonl)
"$LOOM" init --model "$SRC/configs/models/codegeex-small.toml" --out "$WORK/ckpt" >/dev/null 2>&1 \
  || { echo "FAIL init"; exit 1; }
run() {  # run OUT [extra args]
  local out=$1; shift
  OMP_NUM_THREADS=2 "$LOOM" eval humaneval-x --checkpoint "$WORK/ckpt" --tokenizer "$SRC/tests/data/tokenizer" \
    --problems "${P[@]}" -n 4 -k 1,2 --temperature 0.8 --max-tokens 24 --seed 7 --out "$out" --no-progress "$@"
}
if ! run "$WORK/full" >"$WORK/full.txt" 2>"$WORK/full.err"; then
  # A machine whose kernel will not give the sandbox its namespaces (a chroot, some containers)
  # cannot run generated programs at all: everything below needs them run.
  if grep -q "cannot isolate generated programs here" "$WORK/full.err"; then
    echo "SKIP: the sandbox cannot isolate programs on this machine: $(grep -o 'sandbox set-up failed[^)]*)' "$WORK/full.err" | head -1)"
    exit 77  # ctest: skipped (SKIP_RETURN_CODE)
  fi
  echo "FAIL full run: $(tail -5 "$WORK/full.err")"
  exit 1
fi
for l in python cpp java js go; do
  grep -qE "^$l +6 +24 " "$WORK/full.txt" && pass "$l: 6 problems x 4 samples ran" || fail "$l row: $(cat "$WORK/full.txt")"
done
[ "$(wc -l <"$WORK/full/samples.jsonl")" -eq 120 ] && pass "samples.jsonl has 120 samples" || fail "samples count"

# The pass@k table of the run equals the harness run on the samples it wrote.
"$LOOM" eval humaneval-x --problems "${P[@]}" --samples "$WORK/full/samples.jsonl" -k 1,2 --no-progress \
  >"$WORK/harness.txt" 2>/dev/null
diff <(grep -E '^(python|cpp|java|js|go|all) ' "$WORK/full.txt" | awk '{print $1,$2,$3,$4,$5,$6,$7}') \
     <(grep -E '^(python|cpp|java|js|go|all) ' "$WORK/harness.txt" | awk '{print $1,$2,$3,$4,$5,$6,$7}') >/dev/null \
  && pass "pass@k equals the harness on the written samples" || fail "pass@k differs: $(cat "$WORK/full.txt" "$WORK/harness.txt")"

# Resume from a log cut after 37 samples plus half a line (a kill while appending).
mkdir -p "$WORK/cut"
cp "$WORK/full/generate.json" "$WORK/cut/"
head -n 37 "$WORK/full/generations.jsonl" >"$WORK/cut/generations.jsonl"
sed -n 38p "$WORK/full/generations.jsonl" | head -c 30 >>"$WORK/cut/generations.jsonl"
run "$WORK/cut" --resume >"$WORK/cut.txt" 2>"$WORK/cut.err"
grep -q "37 from the earlier run, 83 generated" "$WORK/cut.err" && pass "resume reuses 37, cuts the torn line" \
  || fail "resume counts: $(cat "$WORK/cut.err" | tail -3)"
cmp -s "$WORK/full/samples.jsonl" "$WORK/cut/samples.jsonl" && pass "resumed samples equal the uninterrupted run's" \
  || fail "resumed samples differ"
cmp -s <(grep -E '^(python|cpp|java|js|go|all) ' "$WORK/full.txt" | awk '{$NF=""; print}') \
       <(grep -E '^(python|cpp|java|js|go|all) ' "$WORK/cut.txt" | awk '{$NF=""; print}') \
  && pass "resumed pass@k table equals the uninterrupted one" || fail "tables: $(cat "$WORK/full.txt" "$WORK/cut.txt")"

# A real SIGKILL mid-run, then --resume.
run "$WORK/killed" >/dev/null 2>&1 &
pid=$!
sleep 1.5
kill -9 $pid 2>/dev/null
wait $pid 2>/dev/null
run "$WORK/killed" --resume >/dev/null 2>"$WORK/killed.err"
cmp -s "$WORK/full/samples.jsonl" "$WORK/killed/samples.jsonl" \
  && pass "after SIGKILL, --resume gives the same samples ($(grep -oE '[0-9]+ from the earlier run' "$WORK/killed.err"))" \
  || fail "after SIGKILL: $(tail -3 "$WORK/killed.err")"

# Refusals: an existing run without --resume, and --resume with other settings.
out=$(run "$WORK/full" 2>&1) && fail "rerun without --resume exited 0" \
  || { grep -q "pass --resume" <<<"$out" && pass "rerun without --resume is refused" || fail "no --resume hint: $out"; }
out=$(OMP_NUM_THREADS=2 "$LOOM" eval humaneval-x --checkpoint "$WORK/ckpt" --tokenizer "$SRC/tests/data/tokenizer" \
  --problems "${P[@]}" -n 4 --temperature 0.2 --max-tokens 24 --seed 7 --out "$WORK/full" --resume 2>&1) \
  && fail "resume with another temperature exited 0" \
  || { grep -q "temperature" <<<"$out" && pass "resume with other settings names the key" || fail "settings: $out"; }
out=$("$LOOM" eval humaneval-x --checkpoint "$WORK/ckpt" --problems "${P[@]}" 2>&1) \
  && fail "--checkpoint without --out exited 0" \
  || { grep -q "needs --out" <<<"$out" && pass "--checkpoint without --out is refused" || fail "no --out: $out"; }

[ $fails -eq 0 ] || { echo "$fails failed"; exit 1; }
echo "all passed"
