#!/usr/bin/env bash
# KV-cached decode speed of loom against a PyTorch greedy loop with a hand-written KV cache, on
# the same model shape, in ONE invocation (absolute times on shared machines drift; ratios are
# what we report). Issue 15's setting: gpt2-124m, prompt 128, 128 new tokens, batch 1 and 8.
#   bench/infer/run.sh [LOOM_BIN]        (default build/bin/loom)
# Env: LOOM_BENCH_MODEL (configs/models/gpt2-124m.toml), LOOM_BENCH_PROMPT (128),
#      LOOM_BENCH_NEW (128), LOOM_BENCH_BATCHES ("1 8"), LOOM_TORCH_PYTHON (a python with torch;
#      default /work/torch-venv/bin/python if present, else /usr/bin/python3),
#      LOOM_BENCH_ROUNDS (1): rounds of the whole set, loom and PyTorch alternating within each;
#      the comparisons and the table take each figure's median over the rounds (the machines
#      are shared, and one run of each can land loom and the peer in different machine states).
# Prints every run's JSON line, then {"compare": ...} lines and a table.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
loom=${1:-$root/build/bin/loom}
model=${LOOM_BENCH_MODEL:-$root/configs/models/gpt2-124m.toml}
P=${LOOM_BENCH_PROMPT:-128}
N=${LOOM_BENCH_NEW:-128}
py=${LOOM_TORCH_PYTHON:-}
if [[ -z "$py" ]]; then
  if [[ -x /work/torch-venv/bin/python ]]; then py=/work/torch-venv/bin/python; else py=/usr/bin/python3; fi
fi
out=$(mktemp)
trap 'rm -f "$out"' EXIT
for round in $(seq "${LOOM_BENCH_ROUNDS:-1}"); do
for B in ${LOOM_BENCH_BATCHES:-1 8}; do
  for dtype in f32 bf16 int8; do
    "$loom" bench decode --model "$model" --batch "$B" --prompt-tokens "$P" --new-tokens "$N" \
      --dtype "$dtype" | tee -a "$out"
  done
  # int8 linears with the tied head left in bf16 (--int8 --head-dtype bf16 in generate / serve /
  # eval; plain --int8, as --dtype int8 here, quantizes the head too).
  "$loom" bench decode --model "$model" --batch "$B" --prompt-tokens "$P" --new-tokens "$N" \
    --dtype int8 --head-dtype bf16 | tee -a "$out"
  for dtype in f32 bf16; do
    # THP_MEM_ALLOC_ENABLE=1: PyTorch's CPU allocator advises its large buffers onto huge pages,
    # as loom does its weights and KV pool (off by default; measured here, session 24: +3-4% at
    # batch 8 and at batch 1 bf16, +1% at batch 1 f32), so the peer runs at its best.
    env -u OMP_WAIT_POLICY THP_MEM_ALLOC_ENABLE=1 "$py" "$here/torch_decode.py" --model "$model" --batch "$B" \
      --prompt-tokens "$P" --new-tokens "$N" --dtype "$dtype" | tee -a "$out"
  done
done
done
/usr/bin/python3 - "$out" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip().startswith("{")]
def key(r):  # "int8" quantizes the head too (as --int8 does); "int8/bf16-head" keeps it in bf16
    d = r["dtype"]
    return (r["batch"], d + "/bf16-head" if d == "int8" and r.get("head_dtype") == "bf16" else d)
def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else 0.5 * (xs[len(xs) // 2 - 1] + xs[len(xs) // 2])
def by_median(runs):  # one row per key: each numeric field the median over the rounds
    out = {}
    for k, rs in runs.items():
        r = dict(rs[0])
        for f in ("decode_tokens_per_s", "prefill_s", "weight_read_fraction_of_adjacent_probes",
                  "weight_read_fraction_of_probe"):
            if f in r:
                r[f] = median([x[f] for x in rs])
        r["rounds"] = len(rs)
        out[k] = r
    return out
loom_runs, torch_runs = {}, {}
for r in rows:
    if r.get("impl") == "loom":
        loom_runs.setdefault(key(r), []).append(r)
    elif r.get("peer") == "torch":
        torch_runs.setdefault((r["batch"], r["dtype"]), []).append(r)
loom, torch = by_median(loom_runs), by_median(torch_runs)
print(json.dumps({"rounds": max([r["rounds"] for r in loom.values()] or [0])}))
def tps(d, k):
    return d[k]["decode_tokens_per_s"] if k in d else float("nan")
checks = []
for B in sorted({k[0] for k in loom}):
    if B > 1:
        for d in ("f32", "bf16"):
            checks.append(("batch %d %s: loom / torch same dtype >= 2" % (B, d),
                           tps(loom, (B, d)) / tps(torch, (B, d)), 2.0))
    else:
        checks.append(("batch 1 bf16 loom / torch f32 >= 2", tps(loom, (1, "bf16")) / tps(torch, (1, "f32")), 2.0))
        checks.append(("batch 1 int8 / loom bf16 >= 1.6", tps(loom, (1, "int8")) / tps(loom, (1, "bf16")), 1.6))
        # Not a target: its bytes (162 against 247 MB for gpt2-124m) bound it at 1.52.
        checks.append(("batch 1 int8 with a bf16 head / loom bf16 (bytes bound it at 1.52)",
                       tps(loom, (1, "int8/bf16-head")) / tps(loom, (1, "bf16")), None))
        for d in ("f32", "bf16", "int8", "int8/bf16-head"):
            if (1, d) in loom:
                r = loom[(1, d)]
                # Each quarter of the decode against the probes taken right before and after it
                # (the median of four): the host's bandwidth changes state within a run, and the
                # whole run against the median probe (printed next) then compares different states.
                checks.append(("batch 1 %s weight read / adjacent probes >= 0.9" % d,
                               r["weight_read_fraction_of_adjacent_probes"], 0.9))
                checks.append(("batch 1 %s weight read (whole run) / median probe" % d,
                               r["weight_read_fraction_of_probe"], None))
for name, value, target in checks:
    if target is None:  # reported, not a target
        print(json.dumps({"compare": name, "value": round(value, 3)}))
    else:
        print(json.dumps({"compare": name, "value": round(value, 3), "target": target, "meets_target": value >= target}))
print("| batch | dtype | loom decode tok/s | torch decode tok/s | loom prefill s | torch prefill s |")
print("|---|---|---|---|---|---|")
for (B, d) in sorted(loom):
    t = torch.get((B, d))
    print("| %d | %s | %.1f | %s | %.3f | %s |" % (B, d, loom[(B, d)]["decode_tokens_per_s"],
          "%.1f" % t["decode_tokens_per_s"] if t else "-", loom[(B, d)]["prefill_s"],
          "%.3f" % t["prefill_s"] if t else "-"))
PY
