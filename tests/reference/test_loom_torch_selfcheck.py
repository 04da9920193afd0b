#!/usr/bin/python3
"""Self-check of the PyTorch reference (loom_torch.py) before C++ tests trust it.

  /usr/bin/python3 tests/reference/test_loom_torch_selfcheck.py [-v]

What is checked, on tiny configs (with and without the query layer, gelu and fast_gelu, GQA with
n_kv_heads < n_heads, plus MQA and plain MHA):
  1. The script's logits/loss (run as a subprocess on weights written to safetensors) equal a
     naive float64 numpy implementation written with explicit loops over batch, position and head
     (independent of torch: catches a wrong model definition, which gradcheck cannot).
  2. torch.autograd.gradcheck in float64 of the loss w.r.t. every parameter (autograd vs central
     finite differences), and the script's written grad.* equal those autograd gradients.
  3. The script's 10-step AdamW trajectory (losses, param.*) equals a numpy AdamW with clipping and
     the decay-only-on-matrices rule, fed with float64 torch gradients.
  4. Sensitivity: a deliberately wrong GQA head mapping in the naive model is detected.
  5. Bad input: unknown config key, short batch, missing weight, corrupted safetensors give exit
     code 2 and a message naming the problem. Same input twice gives bit-identical output.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
import tempfile
import unittest

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import loom_torch as LT  # noqa: E402
import safetensors_io as ST  # noqa: E402

SCRIPT = os.path.join(HERE, "loom_torch.py")
PY = "/usr/bin/python3"


def tiny_config(query_layer: bool, act: str, n_kv_heads: int = 2, n_layers: int = 2) -> LT.ModelConfig:
    return LT.config_from_dict(dict(vocab=11, n_layers=n_layers, d_model=8, n_heads=4,
                                    n_kv_heads=n_kv_heads, d_ff=12, max_seq=7, activation=act,
                                    norm_eps=1e-5, query_layer=query_layer, tied_head=True))


def config_toml(cfg: LT.ModelConfig) -> str:
    lines = []
    for k, v in cfg.__dict__.items():
        if v is None:  # moe: a dense model has no [moe] table
            continue
        if isinstance(v, bool):
            lines.append(f"{k} = {'true' if v else 'false'}")
        elif isinstance(v, str):
            lines.append(f'{k} = "{v}"')
        else:
            lines.append(f"{k} = {v!r}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Naive float64 numpy model, loops written straight from the definition.
# ---------------------------------------------------------------------------------------------
def np_layer_norm(x, w, b, eps):
    mu = x.mean()
    var = ((x - mu) ** 2).mean()  # biased variance, as LayerNorm
    return (x - mu) / math.sqrt(var + eps) * w + b


def np_act(x, kind):
    if kind == "gelu":
        return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))
    return x / (1.0 + np.exp(-1.702 * x))


def np_attention(qin, kvin, P, pre, cfg, kv_head_of=None):
    """qin, kvin: (T,C) for one sequence; returns (T,C)."""
    T = qin.shape[0]
    NH, HD = cfg.n_heads, cfg.head_dim
    G = NH // cfg.n_kv_heads
    kv_head_of = kv_head_of or (lambda j: j // G)
    q = qin @ P[pre + ".q.weight"].T + P[pre + ".q.bias"]
    k = kvin @ P[pre + ".k.weight"].T + P[pre + ".k.bias"]
    v = kvin @ P[pre + ".v.weight"].T + P[pre + ".v.bias"]
    att = np.zeros((T, cfg.d_model))
    for t in range(T):
        for j in range(NH):
            kh = kv_head_of(j)
            qj = q[t, j * HD:(j + 1) * HD]
            s = np.array([qj @ k[u, kh * HD:(kh + 1) * HD] / math.sqrt(HD) for u in range(t + 1)])
            w = np.exp(s - s.max())
            w /= w.sum()
            att[t, j * HD:(j + 1) * HD] = sum(w[u] * v[u, kh * HD:(kh + 1) * HD] for u in range(t + 1))
    return att @ P[pre + ".out.weight"].T + P[pre + ".out.bias"]


def np_ffn(x, P, pre, cfg):
    return np_act(x @ P[pre + ".up.weight"].T + P[pre + ".up.bias"], cfg.activation) \
        @ P[pre + ".down.weight"].T + P[pre + ".down.bias"]


def np_forward(P, tokens, cfg, kv_head_of=None):
    """P: name -> float64 array; tokens (B,T) -> logits (B,T,V)."""
    P = {k: np.asarray(v, dtype=np.float64) for k, v in P.items()}
    B, T = tokens.shape
    eps = cfg.norm_eps
    out_all = np.zeros((B, T, cfg.vocab))
    ln = lambda X, pre: np.stack([np_layer_norm(x, P[pre + ".weight"], P[pre + ".bias"], eps) for x in X])
    for b in range(B):
        h = np.stack([P["embed.token.weight"][tokens[b, t]] + P["embed.position.weight"][t] for t in range(T)])
        for i in range(cfg.n_layers):
            pre = f"blocks.{i}"
            a = ln(h, pre + ".norm1")
            h = h + np_attention(a, a, P, pre + ".attn", cfg, kv_head_of)
            h = h + np_ffn(ln(h, pre + ".norm2"), P, pre + ".ffn", cfg)
        hn = ln(h, "final_norm")
        out = hn
        if cfg.query_layer:
            qp = np.stack([P["query_layer.position.weight"][t] for t in range(T)])
            a = ln(hn, "query_layer.norm1")
            x = hn + np_attention(qp, a, P, "query_layer.attn", cfg, kv_head_of)
            out = x + np_ffn(ln(x, "query_layer.norm2"), P, "query_layer.ffn", cfg)
        out_all[b] = out @ P["embed.token.weight"].T
    return out_all


def np_loss(logits, targets):
    V = logits.shape[-1]
    z = logits.reshape(-1, V)
    m = z.max(axis=1, keepdims=True)
    lse = (m[:, 0] + np.log(np.exp(z - m).sum(axis=1)))
    return float(np.mean(lse - z[np.arange(z.shape[0]), targets.reshape(-1)]))


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------
class Case:
    """Writes config, weights and batch for one tiny model into a temp dir."""

    def __init__(self, tmp, cfg, B=2, T=5, seed=0):
        self.cfg, self.B, self.T, self.tmp = cfg, B, T, tmp
        self.weights = LT.random_params(cfg, seed=seed)
        rng = np.random.default_rng(seed + 100)
        self.batch = rng.integers(0, cfg.vocab, size=(B, T + 1)).astype("<i4")
        self.inputs, self.targets = self.batch[:, :T], self.batch[:, 1:]
        self.config_path = os.path.join(tmp, "model.toml")
        self.weights_path = os.path.join(tmp, "weights.safetensors")
        self.batch_path = os.path.join(tmp, "batch.i32")
        with open(self.config_path, "w") as f:
            f.write(config_toml(cfg))
        ST.save_file(self.weights, self.weights_path)
        self.batch.tofile(self.batch_path)

    def run(self, out_name="out.safetensors", extra=(), config=None, weights=None, batch=None,
            T=None, check=True):
        out = os.path.join(self.tmp, out_name)
        cmd = [PY, SCRIPT, "--config", config or self.config_path, "--weights", weights or self.weights_path,
               "--batch", batch or self.batch_path, "--B", str(self.B), "--T", str(T or self.T),
               "--out", out, "--threads", "1", *extra]
        p = subprocess.run(cmd, capture_output=True, text=True)
        if check:
            assert p.returncode == 0, f"{cmd} failed ({p.returncode}):\n{p.stderr}"
            return ST.load_file(out), p
        return None, p


def torch_params(weights, names):
    return [torch.tensor(weights[n], dtype=torch.float64, requires_grad=True) for n in names]


def torch_loss_and_grads(cfg, params_np, inputs, targets):
    names = list(LT.param_shapes(cfg))
    ps = torch_params(params_np, names)
    loss = LT.compute_loss(LT.forward(dict(zip(names, ps)), torch.from_numpy(inputs.astype(np.int64)), cfg),
                           torch.from_numpy(targets.astype(np.int64)))
    grads = torch.autograd.grad(loss, ps)
    return loss.item(), {n: g.numpy() for n, g in zip(names, grads)}


def np_adamw_trajectory(cfg, weights, inputs, targets, steps, lr, b1, b2, eps, wd, clip, decay_all=False):
    """AdamW written out from the update rule (decoupled decay; decay only for ndim >= 2)."""
    P = {k: np.asarray(v, dtype=np.float64).copy() for k, v in weights.items()}
    m = {k: np.zeros_like(v) for k, v in P.items()}
    v2 = {k: np.zeros_like(v) for k, v in P.items()}
    losses = []
    for t in range(1, steps + 1):
        loss, g = torch_loss_and_grads(cfg, P, inputs, targets)
        losses.append(loss)
        if clip > 0:
            norm = math.sqrt(sum(float((x ** 2).sum()) for x in g.values()))
            coef = min(1.0, clip / (norm + 1e-6))
            g = {k: x * coef for k, x in g.items()}
        for k in P:
            if P[k].ndim >= 2 or decay_all:
                P[k] *= 1.0 - lr * wd
            m[k] = b1 * m[k] + (1 - b1) * g[k]
            v2[k] = b2 * v2[k] + (1 - b2) * g[k] ** 2
            mhat = m[k] / (1 - b1 ** t)
            vhat = v2[k] / (1 - b2 ** t)
            P[k] -= lr * mhat / (np.sqrt(vhat) + eps)
    return np.array(losses), P


def max_rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


CONFIGS = [  # (query_layer, activation, n_kv_heads) with n_heads = 4
    (False, "gelu", 2), (True, "gelu", 2), (False, "fast_gelu", 2), (True, "fast_gelu", 2),
    (True, "gelu", 1),        # MQA
    (False, "fast_gelu", 4),  # plain MHA
]


class ModelParity(unittest.TestCase):
    def setUp(self):
        self._tmp = tempfile.TemporaryDirectory()
        self.tmp = self._tmp.name

    def tearDown(self):
        self._tmp.cleanup()

    def test_forward_matches_naive_numpy(self):
        for ql, act, nkv in CONFIGS:
            with self.subTest(query_layer=ql, activation=act, n_kv_heads=nkv):
                c = Case(self.tmp, tiny_config(ql, act, nkv))
                out, _ = c.run(extra=["--dtype", "float64", "--steps", "0"])
                ref = np_forward(c.weights, c.inputs, c.cfg)
                # float64 on both sides; the only loss is the F32 storage of logits (2^-24 relative).
                self.assertLess(max_rel(out["logits"], ref), 1e-6)
                self.assertAlmostEqual(float(out["loss"][0]), np_loss(ref, c.targets), delta=1e-10)
                self.assertEqual(out["losses"].shape, (0,))
                # float32 run: same forward within f32 rounding through ~20 layers of ops.
                out32, _ = c.run("out32.safetensors", extra=["--steps", "0"])
                self.assertLess(max_rel(out32["logits"], ref), 1e-4)
                self.assertAlmostEqual(float(out32["loss"][0]), float(out["loss"][0]), delta=1e-5)

    def test_wrong_gqa_mapping_is_detected(self):
        # The naive comparison must be able to fail: mapping query head j to kv head j % NKV
        # (interleaved instead of grouped) changes the logits well beyond the 1e-6 tolerance.
        c = Case(self.tmp, tiny_config(True, "gelu", 2))
        out, _ = c.run(extra=["--dtype", "float64", "--steps", "0"])
        wrong = np_forward(c.weights, c.inputs, c.cfg, kv_head_of=lambda j: j % c.cfg.n_kv_heads)
        self.assertGreater(max_rel(out["logits"], wrong), 1e-3)

    def test_gradcheck_and_written_grads(self):
        for ql, act, nkv in CONFIGS:
            with self.subTest(query_layer=ql, activation=act, n_kv_heads=nkv):
                cfg = tiny_config(ql, act, nkv, n_layers=1 if nkv != 2 else 2)
                c = Case(self.tmp, cfg, B=2, T=4, seed=3)
                names = list(LT.param_shapes(cfg))
                ps = torch_params(c.weights, names)
                x = torch.from_numpy(c.inputs.astype(np.int64))
                y = torch.from_numpy(c.targets.astype(np.int64))

                def loss_fn(*params):
                    return LT.compute_loss(LT.forward(dict(zip(names, params)), x, cfg), y)

                # gradcheck: autograd vs central differences (eps 1e-6) in float64; default
                # tolerances atol 1e-5, rtol 1e-3 are far above the O(eps^2) truncation error.
                self.assertTrue(torch.autograd.gradcheck(loss_fn, tuple(ps), eps=1e-6, atol=1e-5, rtol=1e-3))
                grads = torch.autograd.grad(loss_fn(*ps), ps)
                out, _ = c.run(extra=["--dtype", "float64", "--steps", "0"])
                for n, g in zip(names, grads):
                    # written as F32: relative rounding 2^-24 of the largest element, plus
                    # absolute slack for elements that are ~0.
                    np.testing.assert_allclose(out["grad." + n], g.numpy(), rtol=1e-6,
                                               atol=1e-7 * max(1.0, float(g.abs().max())), err_msg=n)
                # position rows beyond T never see the batch: their gradient is exactly zero.
                self.assertTrue(np.all(out["grad.embed.position.weight"][c.T:] == 0))

    def test_adamw_trajectory(self):
        for ql, act, nkv, clip in [(True, "gelu", 2, 0.5), (False, "fast_gelu", 2, 0.0)]:
            with self.subTest(query_layer=ql, activation=act, clip=clip):
                c = Case(self.tmp, tiny_config(ql, act, nkv), seed=7)
                hp = dict(lr=3e-3, b1=0.9, b2=0.95, eps=1e-8, wd=0.1, clip=clip)
                out, _ = c.run(extra=["--dtype", "float64", "--steps", "10", "--lr", str(hp["lr"]),
                                      "--beta1", "0.9", "--beta2", "0.95", "--eps", "1e-8",
                                      "--weight-decay", "0.1", "--clip", str(clip)])
                losses, P = np_adamw_trajectory(c.cfg, c.weights, c.inputs, c.targets, 10, **hp)
                self.assertEqual(out["losses"].shape, (10,))
                self.assertEqual(out["losses"][0], out["loss"][0])
                # both float64 with the same gradients; differences are summation order only.
                np.testing.assert_allclose(out["losses"], losses, rtol=1e-9)
                self.assertLess(out["losses"][-1], out["losses"][0])  # it learns the batch
                for n, v in P.items():
                    # params stored as F32 (2^-24 relative); absolute floor for ~0 entries.
                    np.testing.assert_allclose(out["param." + n], v, rtol=1e-6, atol=1e-7, err_msg=n)
                # the decay rule matters: a run with decay on everything must differ.
                _, Pbad = np_adamw_trajectory(c.cfg, c.weights, c.inputs, c.targets, 10, **hp, decay_all=True)
                self.assertFalse(np.allclose(out["param.final_norm.weight"], Pbad["final_norm.weight"],
                                             rtol=0, atol=1e-7))


class BadInput(unittest.TestCase):
    def setUp(self):
        self._tmp = tempfile.TemporaryDirectory()
        self.tmp = self._tmp.name
        self.case = Case(self.tmp, tiny_config(True, "gelu", 2))

    def tearDown(self):
        self._tmp.cleanup()

    def expect_error(self, needle, **kw):
        _, p = self.case.run(check=False, **kw)
        self.assertEqual(p.returncode, 2, p.stderr)
        self.assertIn(needle, p.stderr)

    def test_unknown_config_key(self):
        path = os.path.join(self.tmp, "bad.toml")
        with open(path, "w") as f:
            f.write(config_toml(self.case.cfg) + "rope_theta = 10000.0\n")
        self.expect_error("rope_theta", config=path)

    def test_loom_written_toml_is_accepted(self):
        # The exact text ModelConfig::to_toml (src/model/config.cpp) writes: a "name" key and
        # norm_eps formatted by fmt as 1e-05; optional keys default like loom's loader.
        cfg = LT.load_config(self._write("name = \"tiny\"\nvocab = 11\nn_layers = 2\nd_model = 8\n"
                                         "n_heads = 4\nn_kv_heads = 2\nd_ff = 12\nmax_seq = 7\n"
                                         "activation = \"fast_gelu\"\nnorm_eps = 1e-05\n"
                                         "query_layer = true\ntied_head = true\n"))
        self.assertEqual((cfg.n_kv_heads, cfg.activation, cfg.norm_eps, cfg.query_layer), (2, "fast_gelu", 1e-5, True))
        cfg = LT.load_config(self._write("[model]\nvocab = 11\nn_layers = 1\nd_model = 8\nn_heads = 4\n"
                                         "n_kv_heads = 0\nd_ff = 12\nmax_seq = 7\n"))
        self.assertEqual((cfg.n_kv_heads, cfg.activation, cfg.norm_eps, cfg.query_layer, cfg.tied_head),
                         (4, "gelu", 1e-5, False, True))
        with self.assertRaisesRegex(LT.ReferenceError, "missing required key.*d_ff"):
            LT.load_config(self._write("vocab = 11\nn_layers = 1\nd_model = 8\nn_heads = 4\nmax_seq = 7\n"))
        with self.assertRaisesRegex(LT.ReferenceError, "'name'"):
            LT.load_config(self._write("name = 3\nvocab = 11\nn_layers = 1\nd_model = 8\nn_heads = 4\n"
                                       "d_ff = 12\nmax_seq = 7\n"))

    def _write(self, text):
        path = os.path.join(self.tmp, "cfg.toml")
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_gqa_heads_must_divide(self):
        path = os.path.join(self.tmp, "bad.toml")
        with open(path, "w") as f:
            f.write(config_toml(self.case.cfg).replace("n_kv_heads = 2", "n_kv_heads = 3"))
        self.expect_error("n_kv_heads=3", config=path)

    def test_short_batch(self):
        path = os.path.join(self.tmp, "short.i32")
        self.case.batch.reshape(-1)[:-1].tofile(path)
        self.expect_error("expected B*(T+1)", batch=path)

    def test_token_out_of_range(self):
        path = os.path.join(self.tmp, "oor.i32")
        b = self.case.batch.copy()
        b[1, 2] = self.case.cfg.vocab
        b.tofile(path)
        self.expect_error("outside [0, vocab=11)", batch=path)

    def test_T_beyond_max_seq(self):
        path = os.path.join(self.tmp, "long.i32")
        np.zeros((self.case.B, 9), dtype="<i4").tofile(path)
        self.expect_error("max_seq=7", batch=path, T=8)

    def test_missing_weight(self):
        w = dict(self.case.weights)
        del w["query_layer.attn.k.bias"]
        path = os.path.join(self.tmp, "missing.safetensors")
        ST.save_file(w, path)
        self.expect_error("query_layer.attn.k.bias", weights=path)

    def test_wrong_shape(self):
        w = dict(self.case.weights)
        w["blocks.1.ffn.up.weight"] = w["blocks.1.ffn.up.weight"].T.copy()
        path = os.path.join(self.tmp, "shape.safetensors")
        ST.save_file(w, path)
        self.expect_error("blocks.1.ffn.up.weight", weights=path)

    def test_truncated_and_corrupted_safetensors(self):
        with open(self.case.weights_path, "rb") as f:
            raw = f.read()
        trunc = os.path.join(self.tmp, "trunc.safetensors")
        with open(trunc, "wb") as f:
            f.write(raw[:-5])
        self.expect_error("data_offsets", weights=trunc)
        corrupt = os.path.join(self.tmp, "corrupt.safetensors")
        with open(corrupt, "wb") as f:
            f.write((10 ** 12).to_bytes(8, "little") + raw[8:])
        self.expect_error("header length", weights=corrupt)

    def test_deterministic_output(self):
        a, _ = self.case.run("a.safetensors", extra=["--steps", "3"])
        b, _ = self.case.run("b.safetensors", extra=["--steps", "3"])
        for k in a:
            self.assertTrue(np.array_equal(a[k], b[k]), k)


class SafetensorsIO(unittest.TestCase):
    def test_roundtrip_and_alignment(self):
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "x.safetensors")
            t = {"f32": np.arange(6, dtype=np.float32).reshape(2, 3), "f64": np.array([math.pi]),
                 "i32": np.array([-1, 2**31 - 1], dtype=np.int32), "empty": np.zeros((0, 4), np.float32)}
            ST.save_file(t, path, metadata={"k": "v"})
            with open(path, "rb") as f:
                raw = f.read()
            self.assertEqual((8 + int.from_bytes(raw[:8], "little")) % 8, 0)
            back, meta = ST.load_file(path, with_metadata=True)
            self.assertEqual(meta, {"k": "v"})
            for k, v in t.items():
                self.assertEqual(back[k].dtype, v.dtype)
                self.assertTrue(np.array_equal(back[k], v), k)

    def test_rejects_overlap_and_unknown_dtype(self):
        import json
        import struct
        with tempfile.TemporaryDirectory() as tmp:
            def write(header, data):
                h = json.dumps(header).encode()
                p = os.path.join(tmp, "h.safetensors")
                with open(p, "wb") as f:
                    f.write(struct.pack("<Q", len(h)) + h + data)
                return p
            p = write({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                       "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(12))
            with self.assertRaisesRegex(ST.SafetensorsError, "overlap"):
                ST.load_file(p)
            p = write({"a": {"dtype": "BF16", "shape": [2], "data_offsets": [0, 4]}}, bytes(4))
            with self.assertRaisesRegex(ST.SafetensorsError, "BF16"):
                ST.load_file(p)


if __name__ == "__main__":
    torch.set_num_threads(1)
    unittest.main()
