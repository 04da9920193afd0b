#!/usr/bin/env bash
# bench/attention/run.sh: loom flash attention (f32, and native bf16 on AMX tiles or AVX512-BF16
# where the CPU has them; one core's instruction peaks first) vs PyTorch matmul+softmax attention, forward +
# backward, batch 1, 12 heads of 64, causal, at T = 1024, 4096, 8192 (override: T_LIST="..."),
# both in this one invocation. Prints JSON lines: one per implementation and T, then one
# comparison line per T (time ratio, memory growth ratio) and one line with loom's memory growth
# per token (it must stay flat: linear memory in T).
#
# Usage: bench/attention/run.sh            (LOOM_BUILD_DIR defaults to build/; it must hold
#                                           bench/attention/bench_attention, e.g. scripts/build)
# Threads: LOOM_BENCH_THREADS (default 2) for both sides. ITERS (default 2) timed rounds after a
# warm-up, best kept. TORCH_MAX_S (default 1800): the peer skips a T it estimates to take longer
# (Debian's python3-torch uses the generic BLAS; with the netlib reference BLAS its matmul runs
# at a few GFLOP/s, so time ratios largely measure that BLAS; memory ratios do not).
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
build="${LOOM_BUILD_DIR:-$root/build}"
bin="$build/bench/attention/bench_attention"
threads="${LOOM_BENCH_THREADS:-2}"
iters="${ITERS:-2}"
if [[ ! -x "$bin" ]]; then
  echo "missing $bin: build it with cmake --build $build --target bench_attention" >&2
  exit 1
fi
sdpa_py="${LOOM_TORCH_PYTHON:-}"
if [[ -z "$sdpa_py" && -x "$root/../torch-venv/bin/python" ]]; then sdpa_py="$root/../torch-venv/bin/python"; fi
tmp="$(mktemp)"
trap 'rm -f "$tmp"' EXIT
# One core's peak rates for f32 FMA, AVX512-BF16 and AMX-BF16 (null where not available).
"$build/bench/attention/bench_peaks" | tee -a "$tmp"
for T in ${T_LIST:-1024 4096 8192}; do
  # One process per run so that peak RSS belongs to that T alone. f32, then the native bf16
  # kernel (AMX tiles or AVX512-BF16; a "skipped" line where the CPU or OS has neither).
  OMP_NUM_THREADS=$threads "$bin" --T "$T" --heads 12 --hd 64 --iters "$iters" | tee -a "$tmp"
  OMP_NUM_THREADS=$threads "$bin" --T "$T" --heads 12 --hd 64 --iters "$iters" --dtype bf16 \
    | tee -a "$tmp"
  # Debian's torch imports only under /usr/bin/python3, and the OpenBLAS tuning variables set
  # for loom's environment break its CPU detection.
  # Long runs of the BLAS-bound peer skip the warm-up round and run once.
  if (( T >= 4096 )); then twarm=0; titers=1; else twarm=1; titers=$iters; fi
  env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE OMP_NUM_THREADS=$threads \
    /usr/bin/python3 "$root/bench/attention/torch_attention.py" --T "$T" --heads 12 --hd 64 \
    --iters "$titers" --warmup "$twarm" --threads "$threads" \
    --max-seconds "${TORCH_MAX_S:-1800}" | tee -a "$tmp" \
    || echo "{\"bench\":\"attention\",\"impl\":\"torch_matmul_softmax\",\"T\":$T,\"skipped\":\"torch run failed (exit $?)\"}" | tee -a "$tmp"
  # The stronger peer: a current PyTorch's fused SDPA (flash kernel on CPU), f32 and bf16, when a
  # python with it exists (LOOM_TORCH_PYTHON, else ../torch-venv beside the repository).
  if [[ -n "$sdpa_py" ]]; then
    for dt in f32 bf16; do
      env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE -u OMP_WAIT_POLICY OMP_NUM_THREADS=$threads \
        "$sdpa_py" "$root/bench/attention/torch_attention.py" --impl sdpa --dtype "$dt" --T "$T" \
        --heads 12 --hd 64 --iters "$iters" --warmup 1 --threads "$threads" | tee -a "$tmp" \
        || echo "{\"bench\":\"attention\",\"impl\":\"torch_sdpa\",\"dtype\":\"$dt\",\"T\":$T,\"skipped\":\"sdpa run failed\"}" | tee -a "$tmp"
    done
  fi
done
/usr/bin/python3 - "$tmp" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip().startswith("{")]
rows = [r for r in rows if "T" in r]  # the peaks line has no T
by = {}
for r in rows:
    by.setdefault(r["T"], {})[r["impl"] + ("" if r.get("dtype", "f32") == "f32" else "_" + r["dtype"])] = r
for T in sorted(by):
    l = by[T].get("loom_flash")
    for r in rows:
        if r["T"] == T and r["impl"] == "torch_sdpa" and l and "fwd_bwd_s" in r:
            print(json.dumps({"bench": "attention", "compare": "loom_f32_vs_torch_sdpa_" + r["dtype"],
                              "T": T, "speedup_fwd_bwd": round(r["fwd_bwd_s"] / l["fwd_bwd_s"], 3)}))
    a = by[T].get("loom_flash_bf16_native_bf16")
    if a and "fwd_bwd_s" in a:
        if l:
            print(json.dumps({"bench": "attention", "compare": "loom_bf16_native_vs_loom_f32", "T": T,
                              "speedup_fwd_bwd": round(l["fwd_bwd_s"] / a["fwd_bwd_s"], 3)}))
        for r in rows:
            if r["T"] == T and r["impl"] == "torch_sdpa" and "fwd_bwd_s" in r:
                print(json.dumps({"bench": "attention", "compare": "loom_bf16_native_vs_torch_sdpa_" + r["dtype"],
                                  "T": T, "speedup_fwd_bwd": round(r["fwd_bwd_s"] / a["fwd_bwd_s"], 3)}))
    t = by[T].get("torch_matmul_softmax")
    out = {"bench": "attention", "compare": "loom_vs_torch", "T": T}
    if l and t and "fwd_bwd_s" in t:
        out["speedup_fwd_bwd"] = round(t["fwd_bwd_s"] / l["fwd_bwd_s"], 3)
        out["speedup_fwd"] = round(t["fwd_s"] / l["fwd_s"], 3)
        out["extra_rss_loom_bytes"] = l["extra_rss_bytes"]
        out["extra_rss_torch_bytes"] = t["extra_rss_bytes"]
    else:
        out["note"] = "torch result missing: " + str((t or {}).get("skipped", "not run"))
    print(json.dumps(out))
# Linear memory: loom's tensors + workspace per token should not grow with T.
per_tok = {T: (by[T]["loom_flash"]["tensor_bytes"] + by[T]["loom_flash"]["extra_rss_bytes"]) / T
           for T in sorted(by) if "loom_flash" in by[T]}
print(json.dumps({"bench": "attention", "check": "loom_bytes_per_token", "values": per_tok,
                  "linear": max(per_tok.values()) <= 1.25 * min(per_tok.values())}))
PY
