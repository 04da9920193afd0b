"""Matrix products for the PyTorch peers, with a route around a reference BLAS.

Why this file exists: Debian's python3-torch 1.13 sends f32 GEMM (nn.Linear, matmul, bmm) to
whatever libblas.so.3 the system alternative points at. On this machine that is the netlib
*reference* BLAS (/usr/lib/x86_64-linux-gnu/blas/libblas.so.3, no OpenBLAS installed), which runs
at ~1.4 GFLOP/s: a GPT-2 124M step would take ~10 minutes, a strawman, not a peer. bf16 GEMM does
not have this problem (torch calls oneDNN for bf16 matmul). The fastest f32 path torch 1.13 offers
here is oneDNN through convolution, so impl="onednn" expresses every f32 product as a 1x1
convolution in channels_last layout (same mathematics, f32 accumulate, autograd through oneDNN's
convolution backward):

  linear   x (N,K) viewed as an image (1, K, N, 1) channels_last (memory == x, no copy),
           weight (M,K,1,1) -> (1, M, N, 1) channels_last, viewed back as (N, M).
  QK^T     per group g = (b, h): grouped 1x1 conv, queries as the image (1, G*HD, T, 1)
           (memory [t, g, d]), keys as the weight (G*T, HD, 1, 1) -> scores, memory [t, g, s].
  PV       probabilities as the image (1, G*T, T, 1) (memory [t, g, s], no copy), values
           transposed as the weight (G*HD, T, 1, 1) -> output, memory [t, g, d].

impl="torch" is what a user writes (F.linear, matmul/baddbmm); it is the right peer wherever torch
has an optimised BLAS. impl="auto" picks "onednn" when the loaded BLAS is the reference one.
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

_CL = torch.channels_last


def blas_library() -> str:
    """Resolved path of the BLAS library this process loaded (via torch), or 'unknown'."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.split()[-1]
                base = os.path.basename(path)
                if "blas" in base or "mkl_rt" in base or "blis" in base:
                    return os.path.realpath(path)
    except OSError:
        pass
    return "unknown"


def is_reference_blas(path: str) -> bool:
    return not any(s in path for s in ("openblas", "mkl", "blis", "atlas")) and "blas" in path


def resolve_impl(impl: str, dtype: str = "f32") -> str:
    """auto -> onednn only for f32 on a reference BLAS (bf16 products already go to oneDNN)."""
    if impl != "auto":
        return impl
    return "onednn" if dtype == "f32" and is_reference_blas(blas_library()) else "torch"


def _mm_onednn(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """a (N,K) @ b_t^T where b_t is (M,K) -> (N,M), as a 1x1 convolution: a is the image
    (1, K, N, 1) in channels_last (its memory is exactly a), b_t the weight (M, K, 1, 1)."""
    N, K = a.shape
    M = b_t.shape[0]
    img = a.reshape(1, N, 1, K).permute(0, 3, 1, 2)                        # (1,K,N,1) cl
    y = F.conv2d(img, b_t.reshape(M, K, 1, 1))                              # (1,M,N,1) cl
    return y.permute(0, 2, 3, 1).reshape(N, M)


class _OnednnLinear(torch.autograd.Function):
    """y = x w^T + b with all three products as oneDNN 1x1 convolutions.

    Why not let autograd differentiate the convolution: oneDNN's backward-weights for a 1x1 conv
    whose "spatial" axis holds the N rows (minibatch 1) runs at under half the forward speed
    (measured 24 vs 57 GFLOP/s on the (1024,768)x(768,50304) head), while the weight gradient as
    another forward conv, g^T (M,N) @ x (N,K), runs at forward speed."""

    @staticmethod
    def forward(ctx, x, w, b):
        ctx.save_for_backward(x, w)
        ctx.has_bias = b is not None
        N, K = x.shape
        M = w.shape[0]
        img = x.reshape(1, N, 1, K).permute(0, 3, 1, 2)                     # (1,K,N,1) cl
        y = F.conv2d(img, w.view(M, K, 1, 1), b)                            # (1,M,N,1) cl
        return y.permute(0, 2, 3, 1).reshape(N, M)                          # (N,M)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        g = g.contiguous()                                                  # (N,M)
        gx = _mm_onednn(g, w.t().contiguous())                              # (N,M)@(M,K)
        gw = _mm_onednn(g.t().contiguous(), x.t().contiguous())             # (M,N)@(N,K)
        gb = g.sum(0) if ctx.has_bias else None
        return gx, gw, gb


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, impl: str) -> torch.Tensor:
    """x (..., K), w (M, K), b (M,) or None -> (..., M)."""
    if impl == "torch" or torch.is_autocast_cpu_enabled() or x.dtype != torch.float32:
        return F.linear(x, w, b)  # bf16 / autocast: torch already calls oneDNN
    *lead, K = x.shape
    y = _OnednnLinear.apply(x.reshape(-1, K), w, b)                         # (N,M)
    return y.reshape(*lead, w.shape[0])


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, NH: int, impl: str,
                     variant: str = "baddbmm", additive_mask: torch.Tensor | None = None,
                     bool_mask: torch.Tensor | None = None) -> torch.Tensor:
    """q, k, v (B,T,C) with C = NH*HD -> softmax(q k^T / sqrt(HD), causal) v, (B,T,C).

    Masks may be passed in precomputed ((T,T) additive 0/-inf for baddbmm, (T,T) bool `future`
    for the others) so that a training step does not rebuild them.
    """
    B, T, C = q.shape
    HD = C // NH
    G = B * NH
    scale = 1.0 / math.sqrt(HD)
    if bool_mask is None:
        bool_mask = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)   # (T,T) s > t
    if impl == "onednn":
        qi = (q * scale).transpose(0, 1).contiguous()                          # (T,B,C) [t,g,d]
        qi = qi.view(1, T, 1, G * HD).permute(0, 3, 1, 2)                      # (1,G*HD,T,1) cl
        kw = k.view(B, T, NH, HD).transpose(1, 2).reshape(G * T, HD, 1, 1)     # [g,s,d]
        s = F.conv2d(qi, kw, groups=G)                                         # (1,G*T,T,1) cl
        s = s.permute(0, 2, 3, 1).reshape(T, G, T)                             # [t,g,s]
        s = s.masked_fill_(bool_mask.view(T, 1, T), float("-inf"))  # in place: conv backward needs no output
        p = torch.softmax(s, dim=-1)                                           # (T,G,T)
        pi = p.view(1, T, 1, G * T).permute(0, 3, 1, 2)                        # (1,G*T,T,1) cl
        vw = v.view(B, T, NH, HD).permute(0, 2, 3, 1).reshape(G * HD, T, 1, 1)  # [g,d,s]
        o = F.conv2d(pi, vw, groups=G)                                         # (1,G*HD,T,1) cl
        return o.permute(0, 2, 3, 1).reshape(T, B, C).transpose(0, 1)          # (B,T,C)
    qh = q.view(B, T, NH, HD).transpose(1, 2).reshape(G, T, HD)               # (G,T,HD)
    kh = k.view(B, T, NH, HD).transpose(1, 2).reshape(G, T, HD)
    vh = v.view(B, T, NH, HD).transpose(1, 2).reshape(G, T, HD)
    if variant == "baddbmm":
        if additive_mask is None:
            additive_mask = torch.zeros(T, T, dtype=q.dtype).masked_fill(bool_mask, float("-inf"))
        s = torch.baddbmm(additive_mask.to(q.dtype).expand(G, T, T), qh, kh.transpose(1, 2),
                          beta=1.0, alpha=scale)                               # (G,T,T)
    else:
        s = torch.bmm(qh, kh.transpose(1, 2)) * scale                         # (G,T,T)
        s = s.masked_fill(bool_mask, float("-inf"))
    o = torch.bmm(torch.softmax(s, dim=-1), vh)                                # (G,T,HD)
    return o.view(B, NH, T, HD).transpose(1, 2).reshape(B, T, C)
