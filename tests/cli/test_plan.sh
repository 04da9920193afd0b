#!/usr/bin/env bash
# loom plan / loom calibrate end to end (issue 13): the frontier table, JSON fields, --explain,
# --emit-config, the SVG plot, and clear errors for bad input (unknown cluster key, impossible
# memory limit, a device count with no layout, a malformed plan string).
# Usage: test_plan.sh LOOM_BINARY SOURCE_DIR
set -uo pipefail
loom=$1; src=$2
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
fail=0
check() { if eval "$2"; then echo "ok   $1"; else echo "FAIL $1"; fail=1; fi; }
model=$src/configs/models/codegeex-small.toml
a100=$src/configs/clusters/a100-80gb-ib.toml

out=$("$loom" plan --model "$model" --cluster "$a100" --devices 8 --global-batch 16 --seq 256 \
      --memory-limit 80 --svg "$tmp/f.svg" 2>&1); rc=$?
check "plan exits 0" "[ $rc = 0 ]"
check "plan prints the frontier" "grep -q '^frontier (' <<< \"\$out\""
check "plan names the chosen plan" "grep -q '^chosen (fastest under 80.000 GiB): dp=' <<< \"\$out\""
check "plan explains rivals" "grep -q 'why it won' <<< \"\$out\""
check "plan prints the smallest-memory plan" "grep -q '^smallest memory:' <<< \"\$out\""
check "svg written" "grep -q '<polyline' '$tmp/f.svg'"

"$loom" plan --model "$model" --cluster "$a100" --devices 8 --batch 16 --seq 256 --json \
    > "$tmp/p.json" 2>&1; rc=$?
check "json exits 0" "[ $rc = 0 ]"
check "json has frontier, chosen, terms" "python3 -c \"
import json; j = json.load(open('$tmp/p.json'))
f = j['frontier']; c = j['chosen']
assert f and all('plan' in p and 'step_time_s' in p and 'peak_bytes' in p and 'terms' in p for p in f)
assert c['plan'] == f[0]['plan'] and j['search']['timed'] > 0
\""
plan=$(python3 -c "import json; print(json.load(open('$tmp/p.json'))['chosen']['plan'])")
step=$(python3 -c "import json; print(json.load(open('$tmp/p.json'))['chosen']['step_time_s'])")
"$loom" plan --model "$model" --cluster "$a100" --devices 8 --batch 16 --seq 256 \
    --explain "$plan" --json > "$tmp/e.json" 2>&1; rc=$?
check "explain of the chosen plan gives the same time" "[ $rc = 0 ] && python3 -c \"
import json; e = json.load(open('$tmp/e.json')); assert abs(e['step_time_s'] - $step) < 1e-12 * $step\""
out=$("$loom" plan --model "$model" --cluster "$a100" --devices 8 --batch 16 --seq 256 --emit-config 2>&1)
check "emit-config prints a [parallel] table" "grep -q '^\[parallel\]' <<< \"\$out\""
out=$("$loom" plan --model "$model" --cluster "$a100" --devices 8 --batch 16 --seq 256 --time-target 1 2>&1)
check "time target reports the fewest devices" "grep -q 'fewest devices meeting' <<< \"\$out\""

# Context parallelism: a 32K-token model on 8 devices searches cp; the cp plans on the frontier
# cost the same under --explain and emit a [parallel] table with cp.
long=$src/configs/models/tiny-32k.toml
"$loom" plan --model "$long" --cluster "$a100" --devices 8 --batch 8 --seq 32768 --cp 1,2,4,8 \
    --json > "$tmp/cp.json" 2>&1; rc=$?
check "cp: frontier holds cp plans with a cp term" "[ $rc = 0 ] && python3 -c \"
import json; j = json.load(open('$tmp/cp.json'))
cps = [p for p in j['frontier'] if ',cp=' in p['plan']]
assert cps and all('cp' in p['terms'] for p in j['frontier']), j['frontier']
\""
cplan=$(python3 -c "import json; print([p for p in json.load(open('$tmp/cp.json'))['frontier'] if ',cp=' in p['plan']][0]['plan'])" 2>/dev/null)
cstep=$(python3 -c "import json; print([p for p in json.load(open('$tmp/cp.json'))['frontier'] if ',cp=' in p['plan']][0]['step_time_s'])" 2>/dev/null)
"$loom" plan --model "$long" --cluster "$a100" --devices 8 --batch 8 --seq 32768 \
    --explain "$cplan" --json > "$tmp/ce.json" 2>&1; rc=$?
check "cp: explain of a cp plan gives the same time" "[ $rc = 0 ] && python3 -c \"
import json; e = json.load(open('$tmp/ce.json')); assert abs(e['step_time_s'] - $cstep) < 1e-12 * $cstep\""
out=$("$loom" plan --model "$long" --cluster "$a100" --devices 8 --batch 8 --seq 32768 --cp 4 \
      --emit-config 2>&1)
check "cp: emit-config carries cp" "grep -q '^cp = 4' <<< \"\$out\""
out=$("$loom" plan --model "$long" --cluster "$a100" --devices 8 --batch 8 --seq 32768 \
      --explain "dp=1,tp=1,pp=1,cp=8,cp_scheme=ulysses,micro_batches=1" 2>&1); rc=$?
check "cp: ulysses over more ranks than kv heads is refused" "[ $rc = 1 ] && grep -q 'ulysses scheme must divide the kv heads' <<< \"\$out\""

# Expert parallelism: a sparse (MoE) model searches ep (--ep like --cp); every frontier plan
# of --ep 2 carries ep=2 and an ep (all-to-all) term, --explain accepts ep= and gives the same
# time, --emit-config carries it, and an ep that does not divide dp is refused with the values
# that work.
moe=$src/configs/models/tiny-moe.toml
"$loom" plan --model "$moe" --cluster "$a100" --devices 8 --batch 16 --seq 64 --ep 2 --json \
    > "$tmp/ep.json" 2>&1; rc=$?
check "ep: --ep 2 frontier plans all carry ep=2 and an ep term" "[ $rc = 0 ] && python3 -c \"
import json; f = json.load(open('$tmp/ep.json'))['frontier']
assert f and all(',ep=2,' in p['plan'] and p['terms']['ep'] > 0 for p in f), f
\""
eplan=$(python3 -c "import json; print(json.load(open('$tmp/ep.json'))['frontier'][0]['plan'])" 2>/dev/null)
estep=$(python3 -c "import json; print(json.load(open('$tmp/ep.json'))['frontier'][0]['step_time_s'])" 2>/dev/null)
"$loom" plan --model "$moe" --cluster "$a100" --devices 8 --batch 16 --seq 64 \
    --explain "$eplan" --json > "$tmp/ee.json" 2>&1; rc=$?
check "ep: explain of an ep plan gives the same time" "[ $rc = 0 ] && python3 -c \"
import json; e = json.load(open('$tmp/ee.json')); assert abs(e['step_time_s'] - $estep) < 1e-12 * $estep and e['terms']['ep'] > 0\""
"$loom" plan --model "$moe" --cluster "$a100" --devices 8 --batch 16 --seq 64 --json \
    > "$tmp/ea.json" 2>&1; rc=$?
check "ep: the default (auto) search holds ep plans" "[ $rc = 0 ] && python3 -c \"
import json; j = json.load(open('$tmp/ea.json'))
assert j['search']['timed'] > 0 and any(',ep=' in p['plan'] for p in j['frontier']), j['frontier']
\""
out=$("$loom" plan --model "$moe" --cluster "$a100" --devices 8 --batch 16 --seq 64 --ep 4 --emit-config 2>&1)
check "ep: emit-config carries ep" "grep -q '^ep = 4' <<< \"\$out\""
out=$("$loom" plan --model "$moe" --cluster "$a100" --devices 8 --batch 16 --seq 64 \
      --explain "dp=8,tp=1,pp=1,ep=3,micro_batches=1" 2>&1); rc=$?
check "ep: an ep not dividing dp is refused with the valid sizes" "[ $rc = 1 ] && grep -q 'ep = 3 must divide dp = 8' <<< \"\$out\""
out=$("$loom" plan --model "$moe" --cluster "$a100" --devices 8 --batch 16 --seq 64 \
      --explain "dp=4,tp=2,pp=1,ep=4,micro_batches=2,recompute=full" 2>&1); rc=$?
check "ep: explain of ep x tp prints the ep term" "[ $rc = 0 ] && grep -q '^    ep ' <<< \"\$out\""

# Bad input.
out=$("$loom" plan --model "$model" --cluster "$a100" --devices 8 --batch 16 --seq 256 --memory-limit 0.0001 2>&1); rc=$?
check "impossible memory limit names the smallest need" "[ $rc = 1 ] && grep -q 'smallest memory any plan needs is' <<< \"\$out\""
out=$("$loom" plan --model "$model" --cluster "$a100" --devices 7 --batch 16 --seq 256 2>&1); rc=$?
check "device count without a layout names constraints and nearby counts" "[ $rc = 1 ] && grep -q 'device counts with a valid layout nearby' <<< \"\$out\""
sed 's/^memory_GiB = 80 .*/memory_gb = 80/' "$a100" > "$tmp/bad.toml"
out=$("$loom" plan --model "$model" --cluster "$tmp/bad.toml" --devices 8 --batch 16 2>&1); rc=$?
check "unknown cluster key is named" "[ $rc = 1 ] && grep -q \"unknown key 'device.memory_gb'\" <<< \"\$out\""
sed 's/^latency_us = 1 .*/latency_us = \"fast\"/' "$a100" > "$tmp/bad2.toml"
out=$("$loom" plan --model "$model" --cluster "$tmp/bad2.toml" --devices 8 --batch 16 2>&1); rc=$?
check "malformed value names key and unit" "[ $rc = 1 ] && grep -q 'links.intra.latency_us.*microseconds' <<< \"\$out\""
out=$("$loom" plan --model "$model" --cluster "$a100" --batch 16 --explain "dp=2,warp=9" 2>&1); rc=$?
check "bad plan string names the key" "[ $rc = 1 ] && grep -q \"unknown key 'warp'\" <<< \"\$out\""

# Calibrate (quick) writes a file plan can read; a different CPU model warns.
"$loom" calibrate --quick --out "$tmp/local.toml" > /dev/null 2>&1; rc=$?
check "calibrate writes a cluster file" "[ $rc = 0 ] && grep -q '^cpu_model' '$tmp/local.toml'"
check "calibrate measures loom's own kernels" "grep -q '^matmul_layout_f32 = \\[' '$tmp/local.toml' && grep -q '^attention_bwd = \\[\\[' '$tmp/local.toml' && grep -q '^\\[kernels.ns_per_element\\]' '$tmp/local.toml' && grep -q '^optimizer = ' '$tmp/local.toml'"
check "calibrate prices its step probe (step_unit)" "grep -Eq '^step_unit = [0-9]' '$tmp/local.toml'"
out=$("$loom" plan --model "$model" --cluster "$tmp/local.toml" --devices 2 --batch 8 --seq 128 2>&1); rc=$?
check "plan reads the calibrated file" "[ $rc = 0 ]"
sed 's/^cpu_model = .*/cpu_model = "Some Other CPU"/' "$tmp/local.toml" > "$tmp/other.toml"
out=$("$loom" plan --model "$model" --cluster "$tmp/other.toml" --devices 2 --batch 8 --seq 128 2>&1)
check "a different CPU warns and says how to recalibrate" "grep -q 'Recalibrate with: loom calibrate' <<< \"\$out\""
# loom train --auto on 2 ranks under a memory limit: trains, logs the chosen plan, and rank 0's
# measured pool peak stays under the limit (every rank of a dp plan holds the same bytes).
sed "s|^model = .*|model = \"$src/configs/models/tiny.toml\"|" "$src/configs/train/tiny.toml" > "$tmp/tiny.toml"
out=$("$src/scripts/mpirun-local" 2 "$loom" train --config "$tmp/tiny.toml" --auto \
      --cluster "$tmp/local.toml" --memory-limit 0.004 --steps 2 --out "$tmp/auto" \
      --set train.eval_every=0 --set log.every=1 2>&1); rc=$?
check "train --auto trains" "[ $rc = 0 ] && grep -q '^auto plan: dp=' <<< \"\$out\""
check "train --auto stays under the limit" "python3 -c \"
import json
rows = [json.loads(l) for l in open('$tmp/auto/metrics.jsonl') if 'peak_bytes' in l]
assert rows and all(sum(r['peak_bytes'].values()) <= int(0.004 * 2**30) for r in rows)
\""
# Without the cluster file, --auto calibrates first over the ranks it has (quick windows here),
# writes the file, and trains on the plan it picks from it.
out=$(LOOM_CALIBRATE_QUICK=1 LOOM_COMM_TIMEOUT=120 "$src/scripts/mpirun-local" 2 "$loom" train \
      --config "$tmp/tiny.toml" --auto --cluster "$tmp/new/local.toml" --steps 1 --out "$tmp/auto2" 2>&1); rc=$?
check "train --auto without a cluster file calibrates first, then trains" "[ $rc = 0 ] && grep -q 'measuring this machine first over 2 rank' <<< \"\$out\" && grep -q '^cpu_model' '$tmp/new/local.toml' && grep -q '^auto plan: dp=' <<< \"\$out\" && [ -f '$tmp/auto2/ckpt/latest' ]"
check "the 2-rank calibration measured the step probe at 2 ranks and wrote its unit" "grep -Eq '^step_concurrency = \\[\\[1, [0-9.]+\\], \\[2, 0*[.0-9]*[1-9]' '$tmp/new/local.toml' && grep -Eq '^step_unit = [0-9]' '$tmp/new/local.toml'"
exit $fail
