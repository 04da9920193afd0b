#!/usr/bin/python3
"""PyTorch peer for bench_attention: attention written as matmul + softmax (materialises the
(B, NH, T, T) scores), forward + backward, one JSON line in bench_attention's format.

Glossary: B batch, T sequence, NH heads, HD head dim.
Usage: /usr/bin/python3 torch_attention.py --T 4096 [--B 1] [--heads 12] [--hd 64] [--iters 3]
Run it in a fresh process per T: peak RSS (ru_maxrss) only grows.
"""
import argparse
import json
import math
import resource
import sys
import time


def peak_rss_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def mem_available_bytes():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, default=1024)
    ap.add_argument("--B", type=int, default=1)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--hd", type=int, default=64)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--noncausal", action="store_true")
    ap.add_argument("--impl", choices=["matmul", "sdpa"], default="matmul",
                    help="matmul: matmul + softmax (materialises scores); sdpa: "
                         "torch.nn.functional.scaled_dot_product_attention (PyTorch's fused "
                         "CPU flash kernel, linear memory; needs a current PyTorch)")
    ap.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--max-seconds", type=float, default=1800.0,
                    help="skip (with a JSON reason) when the estimated run time is longer")
    a = ap.parse_args()
    causal = not a.noncausal
    impl = "torch_matmul_softmax" if a.impl == "matmul" else "torch_sdpa"
    head = {"bench": "attention", "impl": impl, "dtype": a.dtype, "B": a.B, "T": a.T,
            "heads": a.heads, "hd": a.hd, "causal": causal, "threads": a.threads}
    # Autograd keeps ~4 (B, NH, T, T) f32 tensors alive at the peak (scores, masked scores,
    # probabilities, their gradient); refuse rather than invite the OOM killer on a shared box.
    need = 4 * 4 * a.B * a.heads * a.T * a.T if a.impl == "matmul" else 0
    avail = mem_available_bytes()
    if need > 0.8 * avail:
        head["skipped"] = (f"needs ~{need / 2**30:.1f} GiB for (B,NH,T,T) scores, "
                           f"{avail / 2**30:.1f} GiB available")
        print(json.dumps(head), flush=True)
        return 0
    import torch
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    shape = (a.B, a.heads, a.T, a.hd)
    dt = torch.float32 if a.dtype == "f32" else torch.bfloat16
    q = torch.randn(shape, dtype=dt, requires_grad=True)
    k = torch.randn(shape, dtype=dt, requires_grad=True)
    v = torch.randn(shape, dtype=dt, requires_grad=True)
    dout = torch.randn(shape, dtype=dt)
    # Estimate the run time from one (T, HD) x (HD, T) product: the peer is BLAS-bound, and
    # Debian's torch may sit on the reference BLAS (a few GFLOP/s).
    t0 = time.perf_counter()
    torch.matmul(q[0, 0].detach(), k[0, 0].detach().t())
    probe = time.perf_counter() - t0
    fwd_flop = 4.0 * a.B * a.T * a.T * a.heads * a.hd * (0.5 if causal else 1.0)
    # Calibrated on this machine: a round takes ~6x the causal fwd+bwd FLOPs at the probe's rate
    # (the peer computes the masked half too, and softmax/masking are unfused passes).
    estimate = probe / (2.0 * a.T * a.T * a.hd) * 3.5 * fwd_flop * 6.0 * (a.warmup + a.iters)
    if a.impl == "matmul" and estimate > a.max_seconds:
        head["skipped"] = (f"estimated {estimate:.0f} s (matmul probe "
                           f"{2.0 * a.T * a.T * a.hd / probe / 1e9:.1f} GFLOP/s) > --max-seconds "
                           f"{a.max_seconds:.0f}")
        print(json.dumps(head), flush=True)
        return 0
    mask = torch.ones(a.T, a.T, dtype=torch.bool).triu(1) if causal else None
    scale = 1.0 / math.sqrt(a.hd)
    rss_before = peak_rss_bytes()

    def forward():
        if a.impl == "sdpa":
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
        s = torch.matmul(q, k.transpose(-1, -2)) * scale
        if mask is not None:
            s = s.masked_fill(mask, float("-inf"))
        return torch.matmul(torch.softmax(s, dim=-1), v)

    best_f = best_b = best_t = float("inf")
    for it in range(a.warmup + a.iters):
        q.grad = k.grad = v.grad = None
        t0 = time.perf_counter()
        out = forward()
        tf = time.perf_counter() - t0
        t1 = time.perf_counter()
        out.backward(dout)
        tb = time.perf_counter() - t1
        del out
        if it < a.warmup:
            continue
        best_f, best_b, best_t = min(best_f, tf), min(best_b, tb), min(best_t, tf + tb)
    head.update({"fwd_s": round(best_f, 6), "bwd_s": round(best_b, 6),
                 "fwd_bwd_s": round(best_t, 6),
                 "fwd_gflops": round(fwd_flop / best_f / 1e9, 1),
                 "fwd_bwd_gflops": round(3.5 * fwd_flop / best_t / 1e9, 1),
                 "tokens_per_s": round(a.B * a.T / best_t, 1),
                 "extra_rss_bytes": peak_rss_bytes() - rss_before,
                 "peak_rss_bytes": peak_rss_bytes(), "torch": torch.__version__,
                 "torch_blas": "generic" if "BLAS_INFO=generic" in torch.__config__.show()
                 else "optimised"})
    print(json.dumps(head), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
