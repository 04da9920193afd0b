#!/usr/bin/python3
"""Independent PyTorch reference of the loom decoder-only model (GPT-2 shape, optional
PanGu-alpha / CodeGeeX top query layer), used by loom's C++ end-to-end parity tests.

Run with Debian's python (the pyenv python on PATH has no torch):
  /usr/bin/python3 tests/reference/loom_torch.py --config M.toml --weights W.safetensors \
      --batch batch.i32 --B 2 --T 16 --out OUT.safetensors [--steps 10] [--lr 1e-3] \
      [--beta1 0.9] [--beta2 0.95] [--eps 1e-8] [--weight-decay 0.1] [--clip 1.0] \
      [--dtype float32|float64] [--threads N] [--domains domains.i32]

Sparse (MoE) blocks, the model TOML's [moe] table (loom's src/model/config.h MoeConfig):
  rre:  token of domain d -> expert d*G + rre_table[d, token] (a frozen tensor: no gradient, no
        AdamW update); --domains gives the (B,T) int32 domains (default: all "other").
  topk: p = softmax(x Wg^T); out = sum over the top_k experts of p_e * FFN_e(x); the Switch aux
        loss coef * E * sum_e f_e P_e (f_e the fraction of the B*T*k choices, P_e the mean of
        p) is added to the loss that is differentiated (the reported loss stays the
        cross-entropy). Errors if the capacity ceil(k*B*T*cf/E) would drop a token (the
        reference has no dropping). Output `min_margin` (1,) F64: the smallest gap between the
        k-th and (k+1)-th router scores (gate logits) over rows and steps.

Glossary: B batch, T sequence, C d_model, NH heads, NKV kv heads, HD head dim = C/NH,
KV = NKV*HD, F d_ff, V vocab, L layers, G = NH/NKV query heads per kv head.

Output safetensors (see README.md):
  logits (B,T,V) F32       forward of the given weights on the batch
  loss (1,) F64            mean cross-entropy over all B*T positions
  grad.<name> F32          d loss / d parameter for every parameter, BEFORE any clipping
  losses (steps,) F64      loss before the update of AdamW step s = 1..steps on the same batch
                           (losses[0] == loss)
  param.<name> F32         parameters after `steps` AdamW steps

The model is written from the definition in the brief (docs of loom), with plain torch ops, so that
every piece can be read against that definition; it is not tuned for speed.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import tomllib
from collections import OrderedDict
from dataclasses import dataclass, fields
from typing import Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import safetensors_io  # noqa: E402


class ReferenceError(ValueError):
    """A user error (bad config, weights or batch); the message names the values and the fix."""


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelConfig:
    vocab: int
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_ff: int
    max_seq: int
    activation: str
    norm_eps: float
    query_layer: bool
    tied_head: bool
    moe: Optional["MoeConfig"] = None  # [moe] table; not a flat key

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    def validate(self) -> None:
        for k in ("vocab", "n_layers", "d_model", "n_heads", "n_kv_heads", "d_ff", "max_seq"):
            if getattr(self, k) <= 0:
                raise ReferenceError(f"config: {k}={getattr(self, k)} must be > 0")
        if self.d_model % self.n_heads:
            raise ReferenceError(
                f"config: n_heads={self.n_heads} must divide d_model={self.d_model}")
        if self.n_heads % self.n_kv_heads:
            raise ReferenceError(
                f"config: n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads} (GQA groups)")
        if self.activation not in ("gelu", "fast_gelu", "gelu_erf"):
            raise ReferenceError(
                f"config: activation='{self.activation}'; allowed: 'gelu' (tanh approx), 'gelu_erf', 'fast_gelu'")
        if not self.norm_eps > 0:
            raise ReferenceError(f"config: norm_eps={self.norm_eps} must be > 0")
        if not self.tied_head:
            raise ReferenceError("config: tied_head=false is not supported; loom always ties the head")


@dataclass(frozen=True)
class MoeConfig:
    sparse_layers: Tuple[int, ...]
    experts: int
    expert_d_ff: int
    router: str
    domains: Tuple[str, ...] = ()
    experts_per_domain: int = 0
    top_k: int = 1
    capacity_factor: float = 1.25
    aux_loss_coef: float = 0.01

    def other_domain(self) -> int:
        return self.domains.index("other")


def moe_from_dict(d: Mapping[str, object], n_layers: int, d_ff: int, where: str) -> MoeConfig:
    router = d.get("router", "rre")
    if router not in ("rre", "topk"):
        raise ReferenceError(f"{where}: moe.router={router!r}; allowed: 'rre', 'topk'")
    common = {"sparse_layers", "sparse_every", "sparse_top", "experts", "expert_d_ff", "router"}
    extra = {"domains", "experts_per_domain", "rre_table"} if router == "rre" else {
        "top_k", "capacity_factor", "aux_loss_coef"}
    unknown = sorted(set(d) - common - extra)
    if unknown:
        raise ReferenceError(f"{where}: unknown moe key(s) {unknown} for router {router}")
    if "sparse_layers" in d:
        layers = tuple(int(x) for x in d["sparse_layers"])
    elif "sparse_every" in d:
        k = int(d["sparse_every"])
        layers = tuple(range(k - 1, n_layers, k))
    else:
        layers = tuple(range(n_layers - int(d["sparse_top"]), n_layers))
    domains = tuple(d.get("domains", ()))
    G = int(d.get("experts_per_domain", 0))
    E = int(d.get("experts", G * len(domains)))
    if router == "rre" and (G < 1 or E != G * len(domains) or "other" not in domains):
        raise ReferenceError(f"{where}: rre needs experts = experts_per_domain * domains and an 'other' domain")
    return MoeConfig(layers, E, int(d.get("expert_d_ff", 0)) or d_ff, router, domains, G,
                     int(d.get("top_k", 1)), float(d.get("capacity_factor", 1.25)),
                     float(d.get("aux_loss_coef", 0.01)))


_CONFIG_TYPES = {f.name: f.type for f in fields(ModelConfig) if f.name != "moe"}
# Same key rules as loom's model_config_from_toml (src/model/config.cpp): these may be omitted
# (n_kv_heads = 0 also means "= n_heads"); "name" is allowed and ignored here.
_CONFIG_DEFAULTS = {"n_kv_heads": 0, "activation": "gelu", "norm_eps": 1e-5, "query_layer": False,
                    "tied_head": True}
_IGNORED_KEYS = {"name": str}


def config_from_dict(d: Mapping[str, object], where: str = "config") -> ModelConfig:
    """Strict: unknown keys, missing required keys and wrong types are errors naming the key."""
    known = set(_CONFIG_TYPES) | set(_IGNORED_KEYS)
    unknown = sorted(set(d) - known)
    if unknown:
        raise ReferenceError(f"{where}: unknown key(s) {unknown}; allowed keys: {sorted(known)}")
    for k, t in _IGNORED_KEYS.items():
        if k in d and not isinstance(d[k], t):
            raise ReferenceError(f"{where}: key '{k}'={d[k]!r} must be a {t.__name__}")
    missing = sorted(set(_CONFIG_TYPES) - set(d) - set(_CONFIG_DEFAULTS))
    if missing:
        raise ReferenceError(f"{where}: missing required key(s) {missing}")
    vals = {}
    for k, t in _CONFIG_TYPES.items():
        v = d.get(k, _CONFIG_DEFAULTS.get(k))
        if t in ("int", int):
            ok = isinstance(v, int) and not isinstance(v, bool)
        elif t in ("float", float):
            ok = isinstance(v, (int, float)) and not isinstance(v, bool)
            v = float(v)
        elif t in ("bool", bool):
            ok = isinstance(v, bool)
        else:
            ok = isinstance(v, str)
        if not ok:
            raise ReferenceError(f"{where}: key '{k}'={v!r} must be of type {t}")
        vals[k] = v
    if vals["n_kv_heads"] == 0:
        vals["n_kv_heads"] = vals["n_heads"]
    cfg = ModelConfig(**vals)
    cfg.validate()
    return cfg


def load_config(path: str) -> ModelConfig:
    """Reads the model TOML. The keys may sit at the top level or in one [model] table."""
    with open(path, "rb") as f:
        d = tomllib.load(f)
    moe = d.get("moe")
    if set(d) - {"moe"} == {"model"} and isinstance(d["model"], dict):
        d = d["model"]
    d = {k: v for k, v in d.items() if k != "moe"}
    cfg = config_from_dict(d, where=path)
    if isinstance(moe, dict):
        cfg = dataclasses.replace(cfg, moe=moe_from_dict(moe, cfg.n_layers, cfg.d_ff, path))
    return cfg


# ----------------------------------------------------------------------------------------------
# Parameters
# ----------------------------------------------------------------------------------------------
def is_sparse(cfg: ModelConfig, layer: int) -> bool:
    return cfg.moe is not None and layer in cfg.moe.sparse_layers


def _block_shapes(prefix: str, cfg: ModelConfig, sparse: bool = False) -> List[Tuple[str, Tuple[int, ...]]]:
    C, KV, Fd = cfg.d_model, cfg.kv_dim, cfg.d_ff
    if sparse:
        m = cfg.moe
        Fe = m.expert_d_ff
        out = _block_shapes(prefix, cfg)[:12]  # norms and attention
        if m.router == "topk":
            out.append((f"{prefix}.moe.gate.weight", (m.experts, C)))
        for e in range(m.experts):
            q = f"{prefix}.moe.experts.{e}"
            out += [(f"{q}.up.weight", (Fe, C)), (f"{q}.up.bias", (Fe,)),
                    (f"{q}.down.weight", (C, Fe)), (f"{q}.down.bias", (C,))]
        if m.router == "rre":
            out.append((f"{prefix}.moe.rre_table", (len(m.domains), cfg.vocab)))
        return out
    return [
        (f"{prefix}.norm1.weight", (C,)), (f"{prefix}.norm1.bias", (C,)),
        (f"{prefix}.attn.q.weight", (C, C)), (f"{prefix}.attn.q.bias", (C,)),
        (f"{prefix}.attn.k.weight", (KV, C)), (f"{prefix}.attn.k.bias", (KV,)),
        (f"{prefix}.attn.v.weight", (KV, C)), (f"{prefix}.attn.v.bias", (KV,)),
        (f"{prefix}.attn.out.weight", (C, C)), (f"{prefix}.attn.out.bias", (C,)),
        (f"{prefix}.norm2.weight", (C,)), (f"{prefix}.norm2.bias", (C,)),
        (f"{prefix}.ffn.up.weight", (Fd, C)), (f"{prefix}.ffn.up.bias", (Fd,)),
        (f"{prefix}.ffn.down.weight", (C, Fd)), (f"{prefix}.ffn.down.bias", (C,)),
    ]


def param_shapes(cfg: ModelConfig) -> "OrderedDict[str, Tuple[int, ...]]":
    """Every parameter name -> shape, in a fixed order (the order AdamW sees them)."""
    C = cfg.d_model
    out: List[Tuple[str, Tuple[int, ...]]] = [
        ("embed.token.weight", (cfg.vocab, C)),
        ("embed.position.weight", (cfg.max_seq, C)),
    ]
    for i in range(cfg.n_layers):
        out += _block_shapes(f"blocks.{i}", cfg, is_sparse(cfg, i))
    out += [("final_norm.weight", (C,)), ("final_norm.bias", (C,))]
    if cfg.query_layer:
        out.append(("query_layer.position.weight", (cfg.max_seq, C)))
        out += _block_shapes("query_layer", cfg)
    return OrderedDict(out)


def random_params(cfg: ModelConfig, seed: int, std: float = 0.2) -> Dict[str, np.ndarray]:
    """Random f32 weights for tests: norms near 1 (weight) / 0 (bias) but perturbed so their
    gradients are exercised, everything else N(0, std)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in param_shapes(cfg).items():
        x = rng.standard_normal(shape) * std
        if "norm" in name and name.endswith(".weight"):
            x = 1.0 + x
        if name.endswith(".rre_table"):
            x = rng.integers(0, cfg.moe.experts_per_domain, size=shape)
        out[name] = x.astype(np.float32)
    return out


def check_weights(cfg: ModelConfig, weights: Mapping[str, np.ndarray], where: str) -> None:
    shapes = param_shapes(cfg)
    missing = [n for n in shapes if n not in weights]
    extra = sorted(n for n in weights if n not in shapes)
    if missing:
        raise ReferenceError(f"{where}: missing parameter(s) {missing[:8]}{' ...' if len(missing) > 8 else ''}"
                             f" ({len(missing)} of {len(shapes)})")
    if extra:
        raise ReferenceError(f"{where}: unexpected tensor(s) {extra[:8]} for this config "
                             f"(query_layer={cfg.query_layer}, n_layers={cfg.n_layers})")
    for n, s in shapes.items():
        if tuple(weights[n].shape) != s:
            raise ReferenceError(f"{where}: '{n}' has shape {tuple(weights[n].shape)}, expected {s}")
        if not np.all(np.isfinite(weights[n])):
            raise ReferenceError(f"{where}: '{n}' contains NaN or Inf")


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------
def activation(x: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "gelu":  # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
        return F.gelu(x, approximate="tanh")
    if kind == "gelu_erf":  # 0.5 x (1 + erf(x / sqrt 2))
        return F.gelu(x)
    return x * torch.sigmoid(1.702 * x)  # fast_gelu


def layer_norm(x: torch.Tensor, p: Mapping[str, torch.Tensor], prefix: str, eps: float) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), p[prefix + ".weight"], p[prefix + ".bias"], eps)


def causal_attention(q_in: torch.Tensor, kv_in: torch.Tensor, p: Mapping[str, torch.Tensor],
                     prefix: str, cfg: ModelConfig) -> torch.Tensor:
    """q_in (B,T,C) feeds the queries, kv_in (B,T,C) keys and values; returns (B,T,C) after the
    output projection. Query head j attends with kv head j // G."""
    B, T, C = kv_in.shape
    NH, NKV, HD = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    q = F.linear(q_in, p[prefix + ".q.weight"], p[prefix + ".q.bias"])      # (B,T,C)
    k = F.linear(kv_in, p[prefix + ".k.weight"], p[prefix + ".k.bias"])     # (B,T,KV)
    v = F.linear(kv_in, p[prefix + ".v.weight"], p[prefix + ".v.bias"])     # (B,T,KV)
    q = q.view(B, T, NH, HD).transpose(1, 2)                                # (B,NH,T,HD)
    k = k.view(B, T, NKV, HD).transpose(1, 2)                               # (B,NKV,T,HD)
    v = v.view(B, T, NKV, HD).transpose(1, 2)                               # (B,NKV,T,HD)
    G = NH // NKV
    if G > 1:  # kv head h serves query heads h*G .. h*G+G-1
        k = k.repeat_interleave(G, dim=1)                                   # (B,NH,T,HD)
        v = v.repeat_interleave(G, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(HD)           # (B,NH,T,T)
    future = torch.ones(T, T, dtype=torch.bool, device=scores.device).triu(1)
    scores = scores.masked_fill(future, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    att = torch.matmul(probs, v)                                            # (B,NH,T,HD)
    att = att.transpose(1, 2).reshape(B, T, C)                              # (B,T,C)
    return F.linear(att, p[prefix + ".out.weight"], p[prefix + ".out.bias"])


def ffn(x: torch.Tensor, p: Mapping[str, torch.Tensor], prefix: str, cfg: ModelConfig) -> torch.Tensor:
    u = F.linear(x, p[prefix + ".up.weight"], p[prefix + ".up.bias"])       # (B,T,F)
    return F.linear(activation(u, cfg.activation), p[prefix + ".down.weight"], p[prefix + ".down.bias"])


def is_frozen(name: str) -> bool:
    """Tensors stored with the parameters but not learned (rre routing tables)."""
    return name.endswith(".rre_table")


def moe_ffn(x: torch.Tensor, p: Mapping[str, torch.Tensor], prefix: str, cfg: ModelConfig,
            tokens: torch.Tensor, domains: Optional[torch.Tensor], stats: Dict[str, float]
            ) -> Tuple[torch.Tensor, torch.Tensor]:
    """x (B,T,C) -> (MoE output (B,T,C), aux loss scalar)."""
    m = cfg.moe
    B, T, C = x.shape
    N, E = B * T, m.experts
    xf = x.reshape(N, C)

    def expert(rows: torch.Tensor, e: int) -> torch.Tensor:
        q = f"{prefix}.experts.{e}"
        return ffn(rows, p, q, cfg)

    out = torch.zeros_like(xf)
    aux = torch.zeros((), dtype=x.dtype)
    if m.router == "rre":
        d = (domains.reshape(N) if domains is not None
             else torch.full((N,), m.other_domain(), dtype=torch.int64))
        t = tokens.reshape(N)
        table = p[prefix + ".rre_table"].detach().to(torch.int64)            # (D,V)
        e_of = d * m.experts_per_domain + table[d, t]                         # (N)
        for e in range(E):
            idx = (e_of == e).nonzero().squeeze(1)
            if idx.numel():
                out = out.index_add(0, idx, expert(xf[idx], e))
    else:
        scores = F.linear(xf, p[prefix + ".gate.weight"])                    # (N,E) logits
        probs = torch.softmax(scores, dim=-1)                                 # (N,E)
        top_p, top_i = probs.topk(m.top_k, dim=-1)                          # (N,k)
        srt = scores.detach().sort(dim=-1, descending=True).values
        gaps = srt[:, m.top_k - 1] - srt[:, m.top_k]  # k-th vs (k+1)-th: what decides the set
        stats["min_margin"] = min(stats.get("min_margin", math.inf), float(gaps.min()))
        cap = math.ceil(m.top_k * N * m.capacity_factor / E)
        counts = torch.bincount(top_i.reshape(-1), minlength=E)
        if int(counts.max()) > cap:
            raise ReferenceError(f"topk: an expert gets {int(counts.max())} tokens over capacity {cap}; "
                                 "the reference does not drop tokens: raise capacity_factor")
        for j in range(m.top_k):
            for e in range(E):
                idx = (top_i[:, j] == e).nonzero().squeeze(1)
                if idx.numel():
                    out = out.index_add(0, idx, top_p[idx, j:j + 1] * expert(xf[idx], e))
        frac = counts.to(x.dtype) / float(N * m.top_k)
        aux = m.aux_loss_coef * E * (frac * probs.mean(dim=0)).sum()
    return out.reshape(B, T, C), aux


def forward(p: Mapping[str, torch.Tensor], tokens: torch.Tensor, cfg: ModelConfig,
            domains: Optional[torch.Tensor] = None, aux_out: Optional[List[torch.Tensor]] = None,
            stats: Optional[Dict[str, float]] = None) -> torch.Tensor:
    """tokens (B,T) int64 -> logits (B,T,V) in the parameters' dtype. MoE: domains (B,T) int64
    (rre), the aux losses appended to aux_out, gate statistics into stats."""
    B, T = tokens.shape
    stats = {} if stats is None else stats
    eps = cfg.norm_eps
    pos = torch.arange(T, device=tokens.device)
    h = p["embed.token.weight"][tokens] + p["embed.position.weight"][pos]  # (B,T,C)
    for i in range(cfg.n_layers):
        b = f"blocks.{i}"
        a = layer_norm(h, p, b + ".norm1", eps)
        h = h + causal_attention(a, a, p, b + ".attn", cfg)
        if is_sparse(cfg, i):
            y, aux = moe_ffn(layer_norm(h, p, b + ".norm2", eps), p, b + ".moe", cfg, tokens,
                             domains, stats)
            h = h + y
            if aux_out is not None:
                aux_out.append(aux)
        else:
            h = h + ffn(layer_norm(h, p, b + ".norm2", eps), p, b + ".ffn", cfg)
    out = layer_norm(h, p, "final_norm", eps)                               # hN (B,T,C)
    if cfg.query_layer:
        # Top query layer: queries come from a separate position embedding (row t for the input
        # at t), keys/values from the normed hidden states; the residual adds to hN; no norm after.
        qp = p["query_layer.position.weight"][pos].unsqueeze(0).expand(B, T, -1)  # (B,T,C)
        a = layer_norm(out, p, "query_layer.norm1", eps)
        x = out + causal_attention(qp, a, p, "query_layer.attn", cfg)
        out = x + ffn(layer_norm(x, p, "query_layer.norm2", eps), p, "query_layer.ffn", cfg)
    return torch.matmul(out, p["embed.token.weight"].t())                   # (B,T,V), tied head


def compute_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    V = logits.shape[-1]
    return F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1), reduction="mean")


# ----------------------------------------------------------------------------------------------
# Reference run: forward, backward, AdamW trajectory
# ----------------------------------------------------------------------------------------------
@dataclass
class OptimConfig:
    steps: int = 10
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip: float = 1.0


def read_batch(path: str, B: int, T: int, vocab: int) -> Tuple[np.ndarray, np.ndarray]:
    """Raw little-endian int32 (B, T+1) -> inputs (B,T), targets (B,T)."""
    raw = np.fromfile(path, dtype="<i4")
    if raw.size != B * (T + 1):
        raise ReferenceError(f"{path}: {raw.size} int32 values, expected B*(T+1) = {B}*{T + 1} = {B * (T + 1)}")
    raw = raw.reshape(B, T + 1)
    bad = (raw < 0) | (raw >= vocab)
    if bad.any():
        b, t = np.argwhere(bad)[0]
        raise ReferenceError(f"{path}: token {raw[b, t]} at [{b},{t}] outside [0, vocab={vocab})")
    return raw[:, :T].copy(), raw[:, 1:].copy()


def run_reference(cfg: ModelConfig, weights: Mapping[str, np.ndarray], inputs: np.ndarray,
                  targets: np.ndarray, opt: OptimConfig, dtype: torch.dtype = torch.float32,
                  domains: Optional[np.ndarray] = None) -> Dict[str, np.ndarray]:
    """Returns the output dictionary described in the module docstring."""
    check_weights(cfg, weights, "weights")
    B, T = inputs.shape
    if T > cfg.max_seq:
        raise ReferenceError(f"T={T} exceeds max_seq={cfg.max_seq}")
    all_names = list(param_shapes(cfg))
    names = [n for n in all_names if not is_frozen(n)]  # what AdamW and clipping see
    params = OrderedDict((n, torch.tensor(np.asarray(weights[n]), dtype=dtype).requires_grad_(not is_frozen(n)))
                         for n in all_names)
    x = torch.from_numpy(np.asarray(inputs, dtype=np.int64))
    y = torch.from_numpy(np.asarray(targets, dtype=np.int64))
    dom = None if domains is None else torch.from_numpy(np.asarray(domains, dtype=np.int64))
    stats: Dict[str, float] = {}

    # Weight decay only on matrices (ndim >= 2: embeddings and linear weights).
    decay = [params[n] for n in names if params[n].ndim >= 2]
    no_decay = [params[n] for n in names if params[n].ndim < 2]
    optim = torch.optim.AdamW(
        [{"params": decay, "weight_decay": opt.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=opt.lr, betas=(opt.beta1, opt.beta2), eps=opt.eps)

    result: Dict[str, np.ndarray] = {}
    losses: List[float] = []
    for s in range(max(opt.steps, 1)):
        optim.zero_grad(set_to_none=True)
        aux: List[torch.Tensor] = []
        logits = forward(params, x, cfg, dom, aux, stats)
        loss = compute_loss(logits, y)
        (loss + sum(aux)).backward() if aux else loss.backward()
        if s == 0:
            result["logits"] = logits.detach().to(torch.float32).numpy()
            result["loss"] = np.array([loss.item()], dtype=np.float64)
            for n in names:
                result["grad." + n] = params[n].grad.detach().to(torch.float32).numpy().copy()
        if s >= opt.steps:  # steps == 0: forward/backward only
            break
        losses.append(loss.item())
        if opt.clip > 0:
            torch.nn.utils.clip_grad_norm_([params[n] for n in names], max_norm=opt.clip)
        optim.step()
    result["losses"] = np.array(losses, dtype=np.float64)
    for n in all_names:
        result["param." + n] = params[n].detach().to(torch.float32).numpy().copy()
    if "min_margin" in stats:
        result["min_margin"] = np.array([stats["min_margin"]], dtype=np.float64)
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--weights", required=True)
    ap.add_argument("--batch", required=True)
    ap.add_argument("--B", type=int, required=True)
    ap.add_argument("--T", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--beta1", type=float, default=0.9)
    ap.add_argument("--beta2", type=float, default=0.95)
    ap.add_argument("--eps", type=float, default=1e-8)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    ap.add_argument("--domains", default=None,
                    help="raw int32 (B,T): each input token's MoE domain (rre models)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch intra-op threads (0 = torch default); fix it for bit-reproducible runs")
    a = ap.parse_args(argv)
    try:
        if a.B <= 0 or a.T <= 0 or a.steps < 0:
            raise ReferenceError(f"--B={a.B} and --T={a.T} must be > 0, --steps={a.steps} >= 0")
        if a.threads > 0:
            torch.set_num_threads(a.threads)
        cfg = load_config(a.config)
        weights = safetensors_io.load_file(a.weights)
        inputs, targets = read_batch(a.batch, a.B, a.T, cfg.vocab)
        opt = OptimConfig(a.steps, a.lr, a.beta1, a.beta2, a.eps, a.weight_decay, a.clip)
        dtype = torch.float64 if a.dtype == "float64" else torch.float32
        check_weights(cfg, weights, a.weights)
        domains = None
        if a.domains:
            domains = np.fromfile(a.domains, dtype="<i4")
            if domains.size != a.B * a.T:
                raise ReferenceError(f"{a.domains}: {domains.size} int32 values, expected B*T = {a.B * a.T}")
            domains = domains.reshape(a.B, a.T)
        result = run_reference(cfg, weights, inputs, targets, opt, dtype, domains)
        safetensors_io.save_file(result, a.out, metadata={
            "generator": "tests/reference/loom_torch.py", "torch_version": torch.__version__,
            "dtype": a.dtype, "steps": str(a.steps), "B": str(a.B), "T": str(a.T)})
    except (ReferenceError, safetensors_io.SafetensorsError, tomllib.TOMLDecodeError, OSError) as e:
        print(f"loom_torch.py: error: {e}", file=sys.stderr)
        return 2
    print(f"loom_torch.py: loss {result['loss'][0]:.6f}"
          + (f", after {a.steps} steps {result['losses'][-1]:.6f}" if a.steps else "")
          + f" -> {a.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
