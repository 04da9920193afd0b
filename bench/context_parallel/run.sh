#!/usr/bin/env bash
# bench/context_parallel/run.sh: sweep `loom bench context-parallel` over sequence length T,
# cp size G and scheme, one mpirun per point, and write a CSV (and an SVG plot of forward +
# backward time against T, one line per scheme and G).
#
# Usage: bench/context_parallel/run.sh [out_dir]     (default out_dir: bench/context_parallel/out)
# Environment (defaults in brackets):
#   SEQS ["4096 8192 16384"]  global sequence lengths; a point that fails (e.g. out of memory) is
#                             recorded with its error and the sweep goes on
#   CPS ["2 4 8"]  SCHEMES ["burst ring allgather ulysses"]  OVERLAP ["on"] ("on off" for both)
#   HEADS [16] KV_HEADS [16] HEAD_DIM [64] DTYPE [f32] ITERS [1] WARMUP [1]
#   LOOM_BUILD_DIR [build]  (must hold bin/loom)
# Ranks share this machine's cores (scripts/mpirun-local gives each floor(cores/G) threads), so
# at G above the core count ranks are oversubscribed: times then show the schedule's overhead,
# not a multi-node speedup. Bytes and memory per rank do not depend on that.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
build="${LOOM_BUILD_DIR:-$root/build}"
bin="$build/bin/loom"
out="${1:-$root/bench/context_parallel/out}"
[[ -x "$bin" ]] || { echo "missing $bin: cmake --build $build --target loom_cli" >&2; exit 1; }
mkdir -p "$out"
jsonl="$out/context_parallel.jsonl"
: > "$jsonl"
for T in ${SEQS:-4096 8192 16384}; do
  for G in ${CPS:-2 4 8}; do
    for S in ${SCHEMES:-burst ring allgather ulysses}; do
      for ov in ${OVERLAP:-on}; do
        flag=""; [[ "$ov" == off ]] && flag="--no-overlap"
        args=(bench context-parallel --seq "$T" --cp "$G" --heads "${HEADS:-16}"
              --kv-heads "${KV_HEADS:-16}" --head-dim "${HEAD_DIM:-64}" --scheme "$S"
              --dtype "${DTYPE:-f32}" --iters "${ITERS:-1}" --warmup "${WARMUP:-1}" $flag)
        if line=$("$root/scripts/mpirun-local" "$G" "$bin" "${args[@]}" 2>"$out/last_err.txt" | tail -1) \
           && [[ "$line" == \{* ]]; then
          echo "$line" | tee -a "$jsonl"
        else
          err=$(grep -m1 -o 'error: .*' "$out/last_err.txt" | head -c 300 | tr '"' "'" || true)
          echo "{\"bench\":\"context-parallel\",\"seq\":$T,\"cp\":$G,\"scheme\":\"$S\",\"overlap\":$([[ $ov == on ]] && echo true || echo false),\"error\":\"${err:-failed}\"}" | tee -a "$jsonl"
        fi
      done
    done
  done
done
python3 - "$jsonl" "$out" <<'PY'
import csv, json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
cols = ["seq", "cp", "scheme", "backward", "overlap", "dtype", "heads", "kv_heads", "head_dim",
        "fwd_ms", "bwd_ms", "fwd_wait_ms", "bwd_wait_ms", "fwd_bytes_per_rank",
        "bwd_bytes_per_rank", "fwd_bytes_closed_form", "bwd_bytes_closed_form",
        "peak_attention_bytes_per_rank", "attention_workspace_bytes_per_rank", "max_rss_bytes", "error"]
with open(sys.argv[2] + "/context_parallel.csv", "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow(r)
# SVG: forward + backward seconds against T (log2 x), one polyline per (scheme, G).
pts = {}
for r in rows:
    if "error" in r: continue
    pts.setdefault((r["scheme"], r["cp"], r["overlap"]), []).append((r["seq"], (r["fwd_ms"] + r["bwd_ms"]) / 1e3))
W, H, m = 720, 420, 60
if pts:
    import math
    xs = [math.log2(t) for v in pts.values() for t, _ in v]; ys = [s for v in pts.values() for _, s in v]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y1 = max(ys) * 1.1
    X = lambda t: m + (math.log2(t) - x0) / (x1 - x0) * (W - 2 * m)
    Y = lambda s: H - m - s / y1 * (H - 2 * m)
    colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
              "#bcbd22", "#17becf", "#000000", "#aa00aa"]
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W + 200}" height="{H}" font-family="sans-serif" font-size="12">',
           f'<line x1="{m}" y1="{H-m}" x2="{W-m}" y2="{H-m}" stroke="black"/><line x1="{m}" y1="{m}" x2="{m}" y2="{H-m}" stroke="black"/>',
           f'<text x="{W/2}" y="{H-15}" text-anchor="middle">sequence length T (log scale)</text>',
           f'<text x="15" y="{H/2}" transform="rotate(-90 15 {H/2})" text-anchor="middle">forward + backward seconds</text>']
    for t in sorted({t for v in pts.values() for t, _ in v}):
        out.append(f'<text x="{X(t)}" y="{H-m+15}" text-anchor="middle">{t}</text>')
    for k in range(5):
        s = y1 * k / 4
        out.append(f'<text x="{m-5}" y="{Y(s)+4}" text-anchor="end">{s:.2f}</text>')
    for i, (key, v) in enumerate(sorted(pts.items(), key=lambda kv: (kv[0][0], kv[0][1], not kv[0][2]))):
        c = colors[i % len(colors)]; v.sort()
        out.append('<polyline fill="none" stroke="%s" stroke-width="2" points="%s"/>' % (c, " ".join(f"{X(t):.1f},{Y(s):.1f}" for t, s in v)))
        for t, s in v:
            out.append(f'<circle cx="{X(t):.1f}" cy="{Y(s):.1f}" r="3" fill="{c}"/>')
        label = f"{key[0]} cp={key[1]}" + ("" if key[2] else " no-overlap")
        out.append(f'<text x="{W-m+20}" y="{m+16*i}" fill="{c}">{label}</text>')
    out.append("</svg>")
    open(sys.argv[2] + "/context_parallel.svg", "w").write("\n".join(out))
print(f"wrote {sys.argv[2]}/context_parallel.csv" + (" and .svg" if pts else ""), file=sys.stderr)
PY
