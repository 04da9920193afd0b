#!/usr/bin/python3
"""PyTorch peer for loom's attention benchmark: causal attention written as matmul + softmax
(materialises the (T, T) scores), forward + backward, f32, B=1, 12 heads of 64.

  /usr/bin/python3 bench/peer/torch_attention.py [--T 1024 4096 8192] [--reps 3]
      [--impl auto|torch|onednn] [--threads 2] [--mem-fraction 0.6]

Each T runs in a fresh subprocess so that ru_maxrss (the high-water mark of resident memory, which
only grows) measures that T alone: peak_mem_mb = maxrss after the run - maxrss after setup (inputs
allocated, torch initialised, one tiny warm-up at T=64 so code paths are loaded).
fwd_bwd_ms is the median over --reps timed runs of forward + backward w.r.t. q, k and v after one
untimed warm-up run at that T.

The naive method needs ~5 (T,T) f32 arrays per head at the backward peak (scores/probs, dP, dS,
the masked gradient): 12 * 8192^2 * 4 B = 3.2 GB each at T=8192. A T whose estimate exceeds
--mem-fraction of MemAvailable is not run; it prints a JSON line with "skipped" and the reason
(this machine is shared; an OOM kill would hit other people's jobs).

--impl: see torch_ops.py (f32 GEMM of torch here goes to the reference BLAS; auto picks oneDNN
through convolution in that case). Prints one JSON line per T with keys
{"impl", "T", "fwd_bwd_ms", "peak_mem_mb"} plus details.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
NH, HD, B = 12, 64, 1
ARRAYS_AT_PEAK = 5  # (T,T) per-head f32 arrays alive together in the backward, see docstring


def mem_available_mb() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    return float("inf")


def child(T: int, reps: int, impl: str, threads: int) -> dict:
    import torch
    sys.path.insert(0, HERE)
    import torch_ops

    torch.set_num_threads(threads)
    impl = torch_ops.resolve_impl(impl, "f32")
    C = NH * HD
    g = torch.Generator().manual_seed(T)
    q, k, v = (torch.randn(B, T, C, generator=g).requires_grad_(True) for _ in range(3))
    do = torch.randn(B, T, C, generator=g)

    def run(qq, kk, vv, dd):
        out = torch_ops.causal_attention(qq, kk, vv, NH, impl, "matmul")
        return torch.autograd.grad(out, (qq, kk, vv), dd)

    small = [t[:, :64].detach().clone().requires_grad_(True) for t in (q, k, v)]
    run(*small, do[:, :64])
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    run(q, k, v, do)  # warm-up at this T (also sets the memory high-water mark)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        grads = run(q, k, v, do)
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    ms = statistics.median(times) * 1e3
    flops = 4 * B * NH * T * T * HD * 3  # QK^T and PV, fwd (2 GEMMs) + bwd (4 GEMMs), no causal halving
    finite = all(bool(torch.isfinite(gr).all()) for gr in grads)
    return {"impl": f"torch-{impl}-matmul-softmax", "T": T, "fwd_bwd_ms": round(ms, 2),
            "peak_mem_mb": round((peak - base) / 1024, 1), "B": B, "heads": NH, "head_dim": HD,
            "dtype": "f32", "reps": reps, "fwd_bwd_ms_min": round(min(times) * 1e3, 2),
            "gflops": round(flops / (ms / 1e3) / 1e9, 2), "grads_finite": finite,
            "threads": torch.get_num_threads(), "torch_version": torch.__version__,
            "blas_library": torch_ops.blas_library(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default")}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, nargs="+", default=[1024, 4096, 8192])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--impl", choices=["auto", "torch", "onednn"], default="auto")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--mem-fraction", type=float, default=0.6)
    ap.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.reps, a.impl, a.threads)), flush=True)
        return 0
    rc = 0
    label = f"torch-{a.impl}-matmul-softmax"  # the child reports the resolved route
    for T in a.T:
        need_mb = ARRAYS_AT_PEAK * B * NH * T * T * 4 / 2**20
        avail = mem_available_mb()
        if need_mb > a.mem_fraction * avail:
            print(json.dumps({"impl": label, "T": T, "fwd_bwd_ms": None,
                              "peak_mem_mb": None, "skipped": f"estimated peak {need_mb:.0f} MB > "
                              f"{a.mem_fraction} x MemAvailable {avail:.0f} MB"}), flush=True)
            continue
        p = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", str(T), "--reps",
                            str(a.reps), "--impl", a.impl, "--threads", str(a.threads)],
                           capture_output=True, text=True)
        if p.returncode != 0:
            rc = 1
            print(json.dumps({"impl": label, "T": T, "fwd_bwd_ms": None,
                              "peak_mem_mb": None, "error": f"exit {p.returncode}: {p.stderr[-400:]}"}),
                  flush=True)
        else:
            sys.stdout.write(p.stdout)
            sys.stdout.flush()
    return rc


if __name__ == "__main__":
    sys.exit(main())
