#!/usr/bin/env bash
# Parallel layouts of gpt2-124m at sequence 256 on this machine: for 4 and 8 MPI ranks, each
# layout trains a few steps (synthetic tokens, global batch = the number of ranks) and the
# script prints, per layout, the step time, tokens/s, bytes this rank (rank 0) sent per group
# and op, and its peak memory per category, from the run's metrics.jsonl. It also runs dp with
# the gradient reduction forced after the backward (one bucket: no overlap), and reports how
# much of the dp reduction the bucketed overlap hides: 1 - exposed_wait(overlap) /
# exposed_wait(no overlap), exposed_wait being the time blocked on the reduction after backward.
#   bench/parallel/run.sh [LOOM_BIN]      env: LOOM_BENCH_STEPS (default 5), LOOM_BENCH_RANKS
#                                         ("4 8"), LOOM_BENCH_OUT (runs/bench-parallel),
#                                         LOOM_BENCH_ONLY (regex of layout names to run)
# On 2 cores, 4 and 8 ranks oversubscribe the machine (1 thread per rank): the numbers show the
# layouts' relative costs and traffic, not a cluster's speed.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
loom=${1:-$root/build/bin/loom}
steps=${LOOM_BENCH_STEPS:-5}
out=${LOOM_BENCH_OUT:-$root/runs/bench-parallel}
mkdir -p "$out"
cfg="$root/configs/train/gpt2-124m.toml"

run() {  # run NAME NP ARGS...
  local name=$1 np=$2
  shift 2
  [[ "$name" =~ ${LOOM_BENCH_ONLY:-.} ]] || return 0
  local dir="$out/$name"
  rm -rf "$dir"
  if OMP_NUM_THREADS=1 "$root/scripts/mpirun-local" "$np" "$loom" train --config "$cfg" --out "$dir" \
      --steps "$steps" --set train.threads=1 --set checkpoint.every=0 --set train.batch="$np" "$@" \
      >"$dir.log" 2>&1; then
    echo "$name $np ok"
    rm -rf "$dir/ckpt"  # the final checkpoint (1.5 GB for gpt2-124m) is not part of the benchmark
  else
    echo "$name $np FAILED (see $dir.log)"
  fi
}

for np in ${LOOM_BENCH_RANKS:-4 8}; do
  if [ "$np" = 4 ]; then
    run np4_dp4 4 --dp 4
    run np4_dp4_nooverlap 4 --dp 4 --bucket-mb 100000
    run np4_dp4_zero1 4 --dp 4 --zero 1
    run np4_dp4_zero2 4 --dp 4 --zero 2
    run np4_dp4_zero3 4 --dp 4 --zero 3
    run np4_dp2_tp2 4 --dp 2 --tp 2
    run np4_tp4 4 --tp 4
    run np4_dp2_pp2 4 --dp 2 --pp 2 --micro-batches 2
    run np4_dp2_pp2_nooverlap 4 --dp 2 --pp 2 --micro-batches 2 --bucket-mb 100000
    run np4_dp2_pp2_zero3 4 --dp 2 --pp 2 --micro-batches 2 --zero 3
    run np4_pp4 4 --pp 4 --micro-batches 4 --schedule 1f1b
  else
    run np8_dp8_zero1 8 --dp 8 --zero 1
    run np8_dp8_nooverlap_zero1 8 --dp 8 --zero 1 --bucket-mb 100000
    run np8_dp8_zero3 8 --dp 8 --zero 3
    run np8_dp4_tp2 8 --dp 4 --tp 2
    run np8_dp2_tp4 8 --dp 2 --tp 4
    run np8_dp4_pp2 8 --dp 4 --pp 2 --micro-batches 2
    run np8_dp2_pp4 8 --dp 2 --pp 4 --micro-batches 4
  fi
done

/usr/bin/python3 - "$out" <<'PY'
import json, os, statistics, sys
out = sys.argv[1]
rows = {}
for name in sorted(os.listdir(out)):
    path = os.path.join(out, name, "metrics.jsonl")
    if not os.path.isfile(path):
        continue
    ms = [json.loads(l) for l in open(path)]
    if not ms:
        continue
    later = ms[1:] or ms  # the first step includes one-time setup (primitive caches, buffers)
    step_s = statistics.median(m["step_s"] for m in later)
    last = later[-1]
    groups = {g: sum(op["bytes"] for op in ops.values()) for g, ops in last.get("comm_bytes", {}).items()}
    peak = {k: v / 2**20 for k, v in last.get("peak_bytes", {}).items()}
    wait = statistics.median(m.get("dp_wait_s", 0.0) for m in later)
    rows[name] = dict(step_s=step_s, tok_s=statistics.median(m["tokens_per_s"] for m in later),
                      groups=groups, peak=peak, wait=wait)
    print(json.dumps({"layout": name, "step_s": round(step_s, 3), "tokens_per_s": round(rows[name]["tok_s"], 1),
                      "dp_wait_s": round(wait, 3),
                      "bytes_per_group_rank0": groups,
                      "peak_MiB_rank0": {k: round(v, 1) for k, v in peak.items() if v > 0}}))
print()
print("%-26s %8s %8s %10s %12s %12s %9s %9s %9s %9s" % ("layout", "step_s", "tok/s", "dp_wait_s",
      "dp_MB", "tp/pp_MB", "weights", "grads", "optim", "activ"))
for name, r in rows.items():
    g = r["groups"]
    other = sum(v for k, v in g.items() if k != "dp")
    p = r["peak"]
    print("%-26s %8.2f %8.1f %10.3f %12.1f %12.1f %9.1f %9.1f %9.1f %9.1f" % (
        name, r["step_s"], r["tok_s"], r["wait"], g.get("dp", 0) / 1e6, other / 1e6,
        p.get("weights", 0), p.get("grads", 0), p.get("optimizer", 0), p.get("activations", 0)))
for a, b in (("np4_dp4", "np4_dp4_nooverlap"), ("np8_dp8_zero1", "np8_dp8_nooverlap_zero1"),
             ("np4_dp2_pp2", "np4_dp2_pp2_nooverlap")):
    if a in rows and b in rows and rows[b]["wait"] > 0:
        hidden = 1 - rows[a]["wait"] / rows[b]["wait"]
        print(json.dumps({"overlap": a, "exposed_wait_s": round(rows[a]["wait"], 3),
                          "exposed_wait_no_overlap_s": round(rows[b]["wait"], 3),
                          "hidden_fraction": round(hidden, 3),
                          "step_s": round(rows[a]["step_s"], 3),
                          "step_s_no_overlap": round(rows[b]["step_s"], 3)}))
PY
