#!/usr/bin/env python3
"""Markdown tables from bench_kernels_weight_matmul JSON lines (one or more runs concatenated).

Usage: bench_kernels_weight_matmul --M 1,8 > runs.jsonl  (repeat, appending)
       python3 bench/kernels/weight_matmul_table.py runs.jsonl

Prints one row per (run, format, M) of the whole-model line (GPT-2 124M decode step: 48 layer
linears + LM head), then the per-shape fraction of the probe (best call / probe) as min..max over
the runs. A new run starts at each "read_bandwidth" line.
"""
import collections
import json
import sys


def main(path):
    runs = []
    for line in open(path):
        line = line.strip()
        if not line.startswith("{"):
            continue
        d = json.loads(line)
        if d["bench"] == "read_bandwidth":
            runs.append([])
        elif runs:
            runs[-1].append(d)

    print("| run | format | M | step ms (median / best) | weight GB/s (median / best) | probe GB/s "
          "| best / probe | tokens/s (median / best) | cpu share |")
    print("|---|---|---|---|---|---|---|---|---|")
    for i, run in enumerate(runs, 1):
        for d in run:
            if d["bench"] != "weight_matmul_model":
                continue
            print(f"| {i} | {d['format']} | {d['M']} | {d['seconds_per_step'] * 1e3:.1f} / "
                  f"{d['best_seconds_per_step'] * 1e3:.1f} | {d['weight_gbs']:.1f} / "
                  f"{d['best_gbs']:.1f} | {d['probe_gbs']:.1f} | {d['frac_probe']:.2f} | "
                  f"{d['tokens_per_s']:.1f} / {d['best_tokens_per_s']:.1f} | {d['cpu_share']:.2f} |")

    fracs = collections.defaultdict(list)
    cases = []
    for run in runs:
        for d in run:
            if d["bench"] != "weight_matmul":
                continue
            key = (d["format"], d["M"], d["case"])
            if key not in fracs:
                cases.append(key)
            fracs[key].append(d["frac_probe"])
    if cases:
        print()
        print("| format | M | case | best / probe (min..max over runs) |")
        print("|---|---|---|---|")
        for key in cases:
            v = fracs[key]
            print(f"| {key[0]} | {key[1]} | {key[2]} | {min(v):.2f}..{max(v):.2f} |")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
