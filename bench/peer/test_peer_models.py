#!/usr/bin/python3
"""Checks that the benchmark peers compute the loom model, so their speed numbers are comparable.

  /usr/bin/python3 bench/peer/test_peer_models.py [-v]

- torch_gpt2_train.GPT (every attention variant and matmul route) gives the same logits and
  parameter gradients as the parity reference tests/reference/loom_torch.py on a tiny config,
  with the fused qkv weight split into loom's q, k, v.
- torch_ops.causal_attention (both routes) matches a float64 reference in values and gradients.
"""
from __future__ import annotations

import os
import sys
import unittest

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "..", "tests", "reference"))
import loom_torch as LT  # noqa: E402
import torch_gpt2_train as PEER  # noqa: E402
import torch_ops  # noqa: E402

V, L, C, NH, FF, MAX_SEQ = 37, 2, 32, 4, 48, 16


def loom_params(model: "PEER.GPT", attn: str, grads: bool = False) -> dict:
    """loom name -> tensor (or its .grad) of the peer model; q, k, v are slices of the fused weight."""
    p = {"embed.token.weight": model.token.weight, "embed.position.weight": model.position.weight,
         "final_norm.weight": model.final_norm.weight, "final_norm.bias": model.final_norm.bias}
    for i, b in enumerate(model.blocks):
        pre = f"blocks.{i}"
        if attn == "mha":
            w, bias = b.mha.in_proj_weight, b.mha.in_proj_bias
            ow, ob = b.mha.out_proj.weight, b.mha.out_proj.bias
        else:
            w, bias, ow, ob = b.qkv.weight, b.qkv.bias, b.out.weight, b.out.bias
        for j, n in enumerate("qkv"):
            p[f"{pre}.attn.{n}.weight"] = w[j * C:(j + 1) * C]
            p[f"{pre}.attn.{n}.bias"] = bias[j * C:(j + 1) * C]
        p[f"{pre}.attn.out.weight"], p[f"{pre}.attn.out.bias"] = ow, ob
        for n in ("norm1", "norm2"):
            p[f"{pre}.{n}.weight"], p[f"{pre}.{n}.bias"] = getattr(b, n).weight, getattr(b, n).bias
        p[f"{pre}.ffn.up.weight"], p[f"{pre}.ffn.up.bias"] = b.up.weight, b.up.bias
        p[f"{pre}.ffn.down.weight"], p[f"{pre}.ffn.down.bias"] = b.down.weight, b.down.bias
    if grads:
        slices = {}
        for name, t in p.items():  # a slice of a parameter -> the same slice of its .grad
            base = t if t._base is None else t._base
            off = t.storage_offset() - base.storage_offset()
            slices[name] = base.grad.reshape(-1)[off:off + t.numel()].view(t.shape)
        return slices
    return p


class PeerMatchesReference(unittest.TestCase):
    def test_gpt_logits_and_grads(self):
        cfg = LT.config_from_dict(dict(vocab=V, n_layers=L, d_model=C, n_heads=NH, n_kv_heads=NH,
                                       d_ff=FF, max_seq=MAX_SEQ, activation="gelu", norm_eps=1e-5,
                                       query_layer=False, tied_head=True))
        x = torch.randint(0, V, (3, 13), generator=torch.Generator().manual_seed(0))
        for attn, impl in [("baddbmm", "torch"), ("matmul", "torch"), ("mha", "torch"),
                           ("baddbmm", "onednn"), ("matmul", "onednn")]:
            with self.subTest(attn=attn, impl=impl):
                torch.manual_seed(1)
                model = PEER.GPT(V, L, C, NH, FF, MAX_SEQ, attn, impl)
                for prm in model.parameters():  # larger than GPT-2 init so every term matters
                    prm.data.normal_(0.0, 0.3).add_(1.0 if prm.ndim == 1 else 0.0)
                logits = model(x)
                p = loom_params(model, attn)
                ref = LT.forward({k: t.detach().double().requires_grad_(True) for k, t in p.items()},
                                 x, cfg)
                # f32 peer vs f64 reference through 2 layers at O(1) activations: f32 rounding
                # (~1e-7 relative) grown by the depth; 1e-4 relative leaves margin, a wrong
                # formula is off by O(1).
                scale = ref.abs().max().item()
                self.assertLess((logits.double() - ref).abs().max().item() / scale, 1e-4)
                g = torch.randn_like(logits)
                model.zero_grad(set_to_none=True)
                logits.backward(g)
                grads = list(loom_params(model, attn, grads=True).values())
                ref_p = {k: t.detach().double().requires_grad_(True) for k, t in p.items()}
                ref_grads = torch.autograd.grad(LT.forward(ref_p, x, cfg), list(ref_p.values()), g.double())
                # Relative to the largest gradient overall: some are exactly zero in exact
                # arithmetic (k.bias: adding a constant per query row does not change softmax),
                # so their own scale would turn f32 noise into an infinite relative error.
                gscale = max(b.abs().max().item() for b in ref_grads)
                for name, a, b in zip(p, grads, ref_grads):
                    err = (a.double() - b).abs().max().item() / max(b.abs().max().item(), 1e-3 * gscale)
                    self.assertLess(err, 1e-3, f"{name}: relative error {err}")


class AttentionRoutes(unittest.TestCase):
    def test_values_and_grads(self):
        B, T, NHh, HD = 2, 37, 3, 16  # odd T on purpose
        Cc = NHh * HD
        gen = torch.Generator().manual_seed(5)
        q, k, v = (torch.randn(B, T, Cc, generator=gen, dtype=torch.float64) for _ in range(3))
        do = torch.randn(B, T, Cc, generator=gen, dtype=torch.float64)
        ref_in = [t.clone().requires_grad_(True) for t in (q, k, v)]
        ref = torch_ops.causal_attention(*ref_in, NHh, "torch", "matmul")
        ref_g = torch.autograd.grad(ref, ref_in, do)
        for impl, variant in [("torch", "matmul"), ("torch", "baddbmm"), ("onednn", "matmul")]:
            with self.subTest(impl=impl, variant=variant):
                ins = [t.float().requires_grad_(True) for t in (q, k, v)]
                out = torch_ops.causal_attention(*ins, NHh, impl, variant)
                grads = torch.autograd.grad(out, ins, do.float())
                # f32 vs f64 on O(1) inputs, HD=16 reductions: errors ~1e-6; 1e-4 is margin.
                self.assertLess((out.double() - ref).abs().max().item(), 1e-4)
                for a, b in zip(grads, ref_g):
                    self.assertLess((a.double() - b).abs().max().item(), 1e-4)


if __name__ == "__main__":
    torch.set_num_threads(2)
    unittest.main()
