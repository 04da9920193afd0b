#!/usr/bin/env bash
# Runs the PyTorch GPT-2 124M training peer for f32 and bf16, each with OMP_WAIT_POLICY at its
# default (unset) and PASSIVE, with OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE unset, and prints every
# run's JSON line followed by the best run per dtype (highest tokens_per_s) marked "best": true.
#
#   bench/peer/run_torch_best.sh [extra args for torch_gpt2_train.py, e.g. --steps 5 --warmup 2]
#
# libgomp reads OMP_WAIT_POLICY once at start-up, which is why each setting is its own process.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# Debian's python with python3-torch (the pyenv python on PATH has no torch); LOOM_TORCH_PYTHON
# picks another interpreter, e.g. a venv with a current PyTorch from PyPI.
py=${LOOM_TORCH_PYTHON:-/usr/bin/python3}
all="$(mktemp)"
trap 'rm -f "$all"' EXIT

for dtype in f32 bf16; do
  for policy in default PASSIVE; do
    if [[ "$policy" == default ]]; then
      line="$(env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE -u OMP_WAIT_POLICY \
              "$py" "$here/torch_gpt2_train.py" --dtype "$dtype" "$@")"
    else
      line="$(env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE OMP_WAIT_POLICY=PASSIVE \
              "$py" "$here/torch_gpt2_train.py" --dtype "$dtype" "$@")"
    fi
    echo "$line"
    echo "$line" >> "$all"
  done
done

"$py" - "$all" <<'PY'
import json, sys
runs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
for dtype in ("f32", "bf16"):
    mine = [r for r in runs if r["dtype"] == dtype]
    if mine:
        best = dict(max(mine, key=lambda r: r["tokens_per_s"]), best=True)
        print(json.dumps(best))
PY
