#!/usr/bin/env bash
# Training-step speed of loom against PyTorch 1.13 on the identical gpt2-124m model, batch 4 x 256,
# in ONE invocation (absolute times on shared machines drift; ratios are what we report).
# PyTorch runs at its best: OPENBLAS_CORETYPE/OPENBLAS_L2_SIZE unset, and for each dtype the
# faster of OMP_WAIT_POLICY default and PASSIVE (bench/peer/run_torch_best.sh).
#   bench/train/run.sh [LOOM_BIN]     (default build/bin/loom)
# Prints JSON lines: loom f32, loom bf16, the torch runs, then {"compare": ...} with the ratios.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
loom=${1:-$root/build/bin/loom}
steps=${LOOM_BENCH_STEPS:-5}
out=$(mktemp)
trap 'rm -f "$out"' EXIT
for dtype in f32 bf16; do
  "$loom" bench train-step --model "$root/configs/models/gpt2-124m.toml" --batch 4 --seq 256 \
    --dtype "$dtype" --steps "$steps" --warmup 2 | tee -a "$out"
done
# Both of torch's f32 routes: its own BLAS (OpenBLAS when installed) and the oneDNN route, for
# each interpreter in LOOM_TORCH_PYTHONS (default Debian's; add a venv with a current PyTorch
# from PyPI, the stronger peer: LOOM_TORCH_PYTHONS="/usr/bin/python3 /path/venv/bin/python").
# LOOM_TORCH_IMPLS (default "torch auto") picks the routes.
for py in ${LOOM_TORCH_PYTHONS:-/usr/bin/python3}; do
  for impl in ${LOOM_TORCH_IMPLS:-torch auto}; do
    LOOM_TORCH_PYTHON="$py" "$root/bench/peer/run_torch_best.sh" --steps "$steps" --warmup 2 \
      --impl "$impl" | tee -a "$out"
  done
done
/usr/bin/python3 - "$out" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip().startswith("{")]
loom = {r["dtype"]: r for r in rows if r.get("impl") == "loom"}
torch = {}
for r in rows:
    if r.get("peer") == "torch":
        d = r["dtype"]
        if d not in torch or r["tokens_per_s"] > torch[d]["tokens_per_s"]:
            torch[d] = r
targets = {"f32": 1.25, "bf16": 1.5}
for d in ("f32", "bf16"):
    if d in loom and d in torch:
        ratio = loom[d]["tokens_per_s"] / torch[d]["tokens_per_s"]
        print(json.dumps({"compare": d, "loom_tokens_per_s": round(loom[d]["tokens_per_s"], 1),
                          "torch_best_tokens_per_s": round(torch[d]["tokens_per_s"], 1),
                          "ratio": round(ratio, 3), "target": targets[d],
                          "meets_target": ratio >= targets[d],
                          "loom_gflops": round(loom[d]["gflops"], 1),
                          "loom_peak_fraction": round(loom[d]["peak_fraction"], 3),
                          "matmul_peak_gflops": round(loom[d]["matmul_peak_gflops"], 1)}))
PY
