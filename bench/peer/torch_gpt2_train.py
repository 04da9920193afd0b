#!/usr/bin/python3
"""PyTorch peer for loom's training-speed comparison: GPT-2 124M on CPU.

  /usr/bin/python3 bench/peer/torch_gpt2_train.py --dtype f32|bf16 [--steps 5] [--warmup 2]
      [--batch 4] [--seq 256] [--attn baddbmm|matmul|mha] [--impl auto|torch|onednn]
      [--threads 2] [--foreach 0|1]

--impl: torch 1.13 here sends f32 GEMM to the netlib reference BLAS (~1.4 GFLOP/s); auto (the
default) then routes f32 matmuls through oneDNN convolutions, see torch_ops.py. bf16 always uses
torch's own path (autocast -> oneDNN bf16 GEMM). The JSON reports "impl" and "blas_library".

Model (same definition as loom's, tests/reference/loom_torch.py): 12 layers, d_model 768, 12 heads
(no GQA), d_ff 3072, vocab 50304, max_seq 1024, pre-LN, GELU (tanh approximation), no query
layer, head tied to the token embedding. q, k, v are one fused (3C, C) linear: the same function as
three separate (C, C) linears, one GEMM instead of three (what a careful torch user writes).
Training: AdamW (lr 6e-4, betas 0.9/0.95, eps 1e-8, weight decay 0.1 on matrices only), gradient
clipping at 1.0, random tokens (speed does not depend on values). bf16 = torch.autocast("cpu",
bfloat16) around forward and loss, f32 master weights and optimizer.

Attention variants (torch 1.13 has no scaled_dot_product_attention; with impl=onednn the f32
attention is always the oneDNN-convolution form of matmul + masked softmax). Measured fwd+bwd of
the attention alone, B=4 T=256, bf16, busy machine: matmul 120 ms, baddbmm 139 ms (equal within
noise), mha 386 ms including its projections; f32: onednn 228 ms, baddbmm on the reference BLAS
1238 ms, mha 6788 ms. Attention is ~5% of a step, so the default (baddbmm) barely matters.
  baddbmm  scores = baddbmm(additive causal mask, q, k^T, alpha=1/sqrt(HD)); softmax; bmm with v
  matmul   scores = (q @ k^T) / sqrt(HD); masked_fill(future, -inf); softmax; @ v
  mha      nn.MultiheadAttention(batch_first) with a boolean causal mask (its own in-proj/out-proj)

FLOPs convention (printed in the JSON): flops/token = 6*N + 12*L*T*C, where N counts every matmul
weight once: per layer q,k,v,out (4*C*C) and up/down (2*C*F), plus the tied head V*C; embeddings
lookups, biases, norms are not matmuls. 12*L*T*C is QK^T and PV, forward+backward, with the
causal half not subtracted (the usual convention).

Prints one JSON line. OMP_WAIT_POLICY is read by libgomp at start-up, so set it in the environment
of this process (run_torch_best.sh does).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_ops  # noqa: E402


class Block(nn.Module):
    def __init__(self, C: int, NH: int, Fd: int, max_seq: int, attn: str, impl: str):
        super().__init__()
        self.C, self.NH, self.HD, self.attn, self.impl = C, NH, C // NH, attn, impl
        self.norm1 = nn.LayerNorm(C, eps=1e-5)
        self.norm2 = nn.LayerNorm(C, eps=1e-5)
        if attn == "mha":
            self.mha = nn.MultiheadAttention(C, NH, batch_first=True)
        else:
            self.qkv = nn.Linear(C, 3 * C)
            self.out = nn.Linear(C, C)
        self.up = nn.Linear(C, Fd)
        self.down = nn.Linear(Fd, C)
        future = torch.ones(max_seq, max_seq, dtype=torch.bool).triu(1)
        self.register_buffer("future", future, persistent=False)
        self.register_buffer("additive", torch.zeros(max_seq, max_seq).masked_fill(future, float("-inf")),
                             persistent=False)

    def lin(self, x: torch.Tensor, m: nn.Linear) -> torch.Tensor:
        return torch_ops.linear(x, m.weight, m.bias, self.impl)

    def attention(self, a: torch.Tensor) -> torch.Tensor:
        T = a.shape[1]
        if self.attn == "mha":
            return self.mha(a, a, a, attn_mask=self.future[:T, :T], need_weights=False)[0]
        q, k, v = self.lin(a, self.qkv).split(self.C, dim=2)                   # 3 x (B,T,C)
        att = torch_ops.causal_attention(q, k, v, self.NH, self.impl, self.attn,
                                         additive_mask=self.additive[:T, :T],
                                         bool_mask=self.future[:T, :T])       # (B,T,C)
        return self.lin(att, self.out)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.attention(self.norm1(h))
        return h + self.lin(F.gelu(self.lin(self.norm2(h), self.up), approximate="tanh"), self.down)


class GPT(nn.Module):
    def __init__(self, V: int, L: int, C: int, NH: int, Fd: int, max_seq: int, attn: str, impl: str):
        super().__init__()
        self.impl = impl
        self.token = nn.Embedding(V, C)
        self.position = nn.Embedding(max_seq, C)
        self.blocks = nn.ModuleList(Block(C, NH, Fd, max_seq, attn, impl) for _ in range(L))
        self.final_norm = nn.LayerNorm(C, eps=1e-5)
        for p in self.parameters():  # GPT-2 style init; values do not affect speed
            if p.ndim >= 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = x.shape[1]
        h = self.token(x) + self.position(torch.arange(T))
        for b in self.blocks:
            h = b(h)
        return torch_ops.linear(self.final_norm(h), self.token.weight, None, self.impl)  # (B,T,V) tied


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
    ap.add_argument("--steps", type=int, default=5, help="timed steps")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--attn", choices=["baddbmm", "matmul", "mha"], default="baddbmm")
    ap.add_argument("--impl", choices=["auto", "torch", "onednn"], default="auto",
                    help="matmul route (see torch_ops.py); auto = onednn for f32 on a reference BLAS")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--foreach", type=int, default=1, help="AdamW foreach implementation (1) or loop (0)")
    ap.add_argument("--layers", type=int, default=12, help="override for quick smoke runs only")
    a = ap.parse_args()

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    V, L, C, NH, Fd, max_seq = 50304, a.layers, 768, 12, 3072, 1024
    B, T = a.batch, a.seq
    impl = torch_ops.resolve_impl(a.impl, a.dtype)
    if a.attn == "mha" and impl == "onednn":
        ap.error("--attn mha uses torch's own projections; combine it with --impl torch")
    model = GPT(V, L, C, NH, Fd, max_seq, a.attn, impl)
    n_params = sum(p.numel() for p in model.parameters())
    n_matmul = L * (4 * C * C + 2 * C * Fd) + V * C
    flops_per_token = 6 * n_matmul + 12 * L * T * C

    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=6e-4, betas=(0.9, 0.95), eps=1e-8, foreach=bool(a.foreach))
    g = torch.Generator().manual_seed(1)
    data = torch.randint(0, V, (B, T + 1), generator=g)
    x, y = data[:, :T], data[:, 1:]

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=(a.dtype == "bf16")):
            logits = model(x)
            loss = F.cross_entropy(logits.reshape(-1, V).float(), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss.item()

    times, losses = [], []
    for i in range(a.warmup + a.steps):
        t0 = time.perf_counter()
        losses.append(step())
        dt = time.perf_counter() - t0
        if i >= a.warmup:
            times.append(dt)
    step_s = statistics.median(times)
    tokens_per_s = B * T / step_s
    print(json.dumps({
        "peer": "torch", "torch_version": torch.__version__, "dtype": a.dtype,
        "tokens_per_s": round(tokens_per_s, 2), "step_ms": round(step_s * 1e3, 2),
        "step_ms_mean": round(statistics.mean(times) * 1e3, 2),
        "step_ms_min": round(min(times) * 1e3, 2),
        "gflops": round(flops_per_token * tokens_per_s / 1e9, 2),
        "flops_per_token": flops_per_token, "flops_formula": "6*N + 12*L*T*C",
        "n_matmul_params": n_matmul, "n_params": n_params,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
        "threads": torch.get_num_threads(), "attn": a.attn, "impl": impl,
        "blas_library": torch_ops.blas_library(), "adamw_foreach": bool(a.foreach),
        "model": {"L": L, "C": C, "NH": NH, "F": Fd, "V": V, "max_seq": max_seq},
        "batch": B, "seq": T, "steps": a.steps, "warmup": a.warmup,
        "loss_first": round(losses[0], 4), "loss_last": round(losses[-1], 4),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
