#!/usr/bin/env python3
"""PyTorch peer of `loom bench decode`: greedy KV-cached decoding of a GPT-2-shaped model.

A hand-written cache (preallocated (B, NH, S, HD) K and V per layer, past_key_values style):
one prefill forward over B prompts of P tokens, then N decode steps of one token per sequence,
greedy argmax. Random weights (std 0.02), the shape of the loom model config given (gelu,
pre-LN, tied head; the query layer and GQA are not modelled: gpt2-124m has neither).
Prints one JSON line: {"peer": "torch", "dtype", "batch", "prompt_tokens", "new_tokens",
"threads", "prefill_s", "decode_tokens_per_s", "decode_step_ms", "weight_bytes",
"weight_bytes_read_per_s", "torch_version", "thp_mem_alloc"} (thp_mem_alloc: the
THP_MEM_ALLOC_ENABLE the process ran with, "1" putting PyTorch's large CPU buffers on huge
pages; bench/infer/run.sh sets it).

  torch_decode.py --model configs/models/gpt2-124m.toml --batch 8 --prompt-tokens 128
                  --new-tokens 128 --dtype f32|bf16
"""
import argparse
import json
import math
import os
import time

try:
    import tomllib
except ImportError:  # python < 3.11
    tomllib = None

import torch
import torch.nn.functional as F


def load_config(path):
    if tomllib:
        with open(path, "rb") as f:
            return tomllib.load(f)
    cfg = {}
    for line in open(path):
        line = line.split("#", 1)[0].strip()
        if "=" in line:
            k, v = (x.strip() for x in line.split("=", 1))
            cfg[k] = v.strip('"') if v.startswith('"') else (v == "true" if v in ("true", "false") else float(v) if "." in v or "e" in v else int(v))
    return cfg


class Model:
    def __init__(self, cfg, dtype):
        g = torch.Generator().manual_seed(1)
        C, L, Fd, V, S = cfg["d_model"], cfg["n_layers"], cfg["d_ff"], cfg["vocab"], cfg["max_seq"]
        self.C, self.L, self.NH, self.S = C, L, cfg["n_heads"], S
        self.HD = C // self.NH
        self.eps = cfg.get("norm_eps", 1e-5)

        def w(*shape):
            return (torch.randn(*shape, generator=g) * 0.02).to(dtype)

        self.wte, self.wpe = w(V, C), w(S, C)
        self.blocks = []
        for _ in range(L):
            self.blocks.append(dict(
                ln1=(torch.ones(C, dtype=dtype), torch.zeros(C, dtype=dtype)),
                qkv=w(3 * C, C), b_qkv=torch.zeros(3 * C, dtype=dtype),
                out=w(C, C), b_out=torch.zeros(C, dtype=dtype),
                ln2=(torch.ones(C, dtype=dtype), torch.zeros(C, dtype=dtype)),
                up=w(Fd, C), b_up=torch.zeros(Fd, dtype=dtype),
                down=w(C, Fd), b_down=torch.zeros(C, dtype=dtype)))
        self.lnf = (torch.ones(C, dtype=dtype), torch.zeros(C, dtype=dtype))
        self.weight_bytes = sum(t.numel() * t.element_size() for b in self.blocks
                                for t in (b["qkv"], b["out"], b["up"], b["down"])) + \
            self.wte.numel() * self.wte.element_size()

    def new_cache(self, B, dtype):
        return [(torch.zeros(B, self.NH, self.S, self.HD, dtype=dtype),
                 torch.zeros(B, self.NH, self.S, self.HD, dtype=dtype)) for _ in range(self.L)]

    @torch.inference_mode()
    def forward(self, tokens, pos, cache):
        """tokens (B, T) at positions [pos, pos+T); appends K/V; returns last logits (B, V)."""
        B, T = tokens.shape
        x = self.wte[tokens] + self.wpe[pos:pos + T]
        for blk, (kc, vc) in zip(self.blocks, cache):
            h = F.layer_norm(x, (self.C,), *blk["ln1"], self.eps)
            q, k, v = F.linear(h, blk["qkv"], blk["b_qkv"]).split(self.C, dim=-1)
            q, k, v = (t.view(B, T, self.NH, self.HD).transpose(1, 2) for t in (q, k, v))
            kc[:, :, pos:pos + T] = k
            vc[:, :, pos:pos + T] = v
            keys, vals = kc[:, :, :pos + T], vc[:, :, :pos + T]
            a = F.scaled_dot_product_attention(q, keys, vals, is_causal=False,
                                               attn_mask=None if T == 1 else
                                               torch.ones(T, pos + T, dtype=torch.bool).tril(pos))
            a = a.transpose(1, 2).reshape(B, T, self.C)
            x = x + F.linear(a, blk["out"], blk["b_out"])
            h = F.layer_norm(x, (self.C,), *blk["ln2"], self.eps)
            x = x + F.linear(F.gelu(F.linear(h, blk["up"], blk["b_up"]), approximate="tanh"),
                             blk["down"], blk["b_down"])
        x = F.layer_norm(x[:, -1], (self.C,), *self.lnf, self.eps)
        return F.linear(x, self.wte)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
    a = ap.parse_args()
    cfg = load_config(a.model)
    assert not cfg.get("query_layer", False), "the torch peer models GPT-2 (no query layer)"
    dtype = torch.float32 if a.dtype == "f32" else torch.bfloat16
    m = Model(cfg, dtype)
    B, P, N = a.batch, a.prompt_tokens, a.new_tokens
    assert P + N <= m.S
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, cfg["vocab"], (B, P), generator=g)
    cache = m.new_cache(B, dtype)
    t0 = time.perf_counter()
    nxt = m.forward(tokens, 0, cache).argmax(-1, keepdim=True)
    prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(N - 1):
        nxt = m.forward(nxt, P + i, cache).argmax(-1, keepdim=True)
    decode = time.perf_counter() - t0
    steps = max(1, N - 1)
    print(json.dumps({"peer": "torch", "dtype": a.dtype, "batch": B, "prompt_tokens": P,
                      "new_tokens": N, "threads": torch.get_num_threads(),
                      "prefill_s": prefill, "decode_s": decode,
                      "decode_step_ms": decode / steps * 1e3,
                      "decode_tokens_per_s": B * steps / decode,
                      "weight_bytes": m.weight_bytes,
                      "weight_bytes_read_per_s": m.weight_bytes * steps / decode,
                      "torch_version": torch.__version__,
                      "thp_mem_alloc": os.environ.get("THP_MEM_ALLOC_ENABLE", "")}))


if __name__ == "__main__":
    main()
