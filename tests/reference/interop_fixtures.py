#!/usr/bin/python3
"""Fixtures and PyTorch references for loom's interop tests (tests/reference/test_interop.cpp).

Run with Debian's /usr/bin/python3 (python3-torch 1.13). No network, no model hub: every
checkpoint is built here, at small sizes, in the original project's exact on-disk format.

  interop_fixtures.py codegeex OUT    CodeGeeX torch.save files in OUT/:
      codegeex_module.pt   {'module': state_dict_for_save_checkpoint()} as CodeGeeX's tools save
                           it (nested dicts: language_model -> embedding -> word_embeddings ->
                           weight ...; transformer -> flat 'layers.{i}.*', 'topQueryLayer.*',
                           'final_layernorm.*'), f32
      codegeex_args.pt     the same at the top level plus a Megatron `args` Namespace and
                           'iteration' (skip-with-warning path), fp16 weights (the release's dtype)
      codegeex_legacy.pt   the same dict saved in the legacy (pre-1.6) format (error path)
      tokenizer/           vocab.json + merges.txt + added_tokens.json (CodeGeeX-style)
      codegeex_ref.safetensors  logits (B,T,V) of both files' weights, prompt, greedy tokens
  interop_fixtures.py hf OUT          Hugging Face GPT-2 directories in OUT/:
      hf_st/   config.json (gelu_new), model.safetensors (original gpt2 names), vocab/merges
      hf_bin/  config.json (gelu, erf), pytorch_model.bin (GPT2LMHeadModel names: transformer.*,
               attn.bias / attn.masked_bias buffers, tied lm_head), tokenizer.json only
      hf_st_f16/, hf_st_bf16/  hf_st's weights rounded by torch to F16 / BF16
      hf_ref.safetensors   logits and greedy tokens of both
  interop_fixtures.py hf-logits DIR TOKENS.i32 T OUT   logits of an HF GPT-2 directory (an
      exported one) for the (1,T) tokens, from config.json + model.safetensors
  interop_fixtures.py hostile OUT     hostile / broken files (see write_hostile)

References are independent implementations written from each architecture's definition, in
float64: CodeGeeX (THUDM/CodeGeeX codegeex/torch/codegeex_model.py: separate q/k/v Linear,
pre-LN, fast_gelu x/(1+exp(-1.702|x|))*exp(0.851(x-|x|)), scores/sqrt(hd) - 10000*mask,
final_layernorm before the top query layer whose queries come from top_query_embeddings[pos],
head tied to word_embeddings) and GPT-2 (huggingface/transformers modeling_gpt2.py: Conv1D
y = x W + b with W (in,out), c_attn columns q|k|v, gelu_new / gelu). When `transformers` is
importable the HF fixtures are also checked against GPT2LMHeadModel; otherwise that check prints
SKIP (Debian has no transformers package).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import struct
import sys
from collections import OrderedDict

import numpy as np
import torch

torch.set_num_threads(1)

# Small shapes: every dimension odd-ish where the architecture allows, vocab not a multiple of 128
# (GPT-2 is padded), CodeGeeX's vocab already padded as in the release (rows > tokenizer).
CG = dict(V=300, C=32, NH=4, L=2, S=96, F=128)
GPT = dict(V=291, C=24, NH=3, L=2, S=96, F=96)
PROMPT_T = 8
GREEDY_STEPS = 64


# ------------------------------------------------------------------------------------------------
# safetensors writer (F32, F16, BF16, I32, F64). numpy has no bfloat16: BF16 tensors are passed
# as uint16 arrays of their bit patterns (bf16_bits) and read back as float32.
_ST = {np.dtype("<f4"): "F32", np.dtype("<f2"): "F16", np.dtype("<i4"): "I32",
       np.dtype("<f8"): "F64", np.dtype("<i8"): "I64", np.dtype("<u2"): "BF16"}


def bf16_bits(t):
    """A torch tensor rounded to bfloat16 by torch (nearest even), as uint16 bit patterns."""
    return t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def save_safetensors(tensors, path, header_override=None):
    header, blobs, off = {}, [], 0
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        b = a.tobytes()
        header[name] = {"dtype": _ST[a.dtype], "shape": list(a.shape),
                        "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    header["__metadata__"] = {"format": "pt"}
    if header_override:
        header_override(header)
    h = json.dumps(header).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


# ------------------------------------------------------------------------------------------------
# A small byte-level BPE tokenizer in GPT-2's file formats (byte alphabet, merges), plus
# CodeGeeX's whitespace extratokens.
def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def make_tokenizer(n_merges):
    b2u = bytes_to_unicode()
    vocab = {b2u[b]: i for i, b in enumerate(range(256))}
    merges = []
    pairs = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a"), ("r", "e"), ("o", "n"),
             ("Ġ", "s"), ("e", "r"), ("a", "t"), ("Ġ", "f"), ("e", "n"), ("Ġ", "d"), ("Ġ", "(")]
    for a, b in pairs[:n_merges]:
        merges.append(f"{a} {b}")
        vocab[a + b] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab, merges


def write_tokenizer_files(d, vocab, merges, added=None):
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "vocab.json"), "w") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(d, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "".join(m + "\n" for m in merges))
    if added:
        with open(os.path.join(d, "added_tokens.json"), "w") as f:
            json.dump(added, f)


# ------------------------------------------------------------------------------------------------
# Independent float64 references
def layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def attention(q, k, v, nh):
    T, C = q.shape[-2], q.shape[-1]
    hd = C // nh
    q = q.view(T, nh, hd).transpose(0, 1)
    k = k.view(-1, nh, hd).transpose(0, 1)
    v = v.view(-1, nh, hd).transpose(0, 1)
    s = q @ k.transpose(1, 2) / math.sqrt(hd)
    mask = torch.triu(torch.ones(T, T, dtype=s.dtype), diagonal=1)
    s = s - 10000.0 * mask  # CodeGeeX's additive mask; exp(-10000) underflows to 0 as -inf does
    p = torch.softmax(s, -1)
    return (p @ v).transpose(0, 1).reshape(T, C)


def codegeex_fast_gelu(x):
    return x / (1 + torch.exp(-1.702 * torch.abs(x))) * torch.exp(0.851 * (x - torch.abs(x)))


def codegeex_logits(sd, nh, tokens):
    """sd: flat names without 'module.' (language_model.embedding.word_embeddings.weight ...)."""
    g = lambda k: sd["language_model." + k].double()
    T = len(tokens)
    pos = torch.arange(T)
    tok = torch.tensor(tokens)
    h = g("embedding.word_embeddings.weight")[tok] + g("embedding.position_embeddings.weight")[pos]

    def layer(p, h, qsrc=None):
        x = layer_norm(h, g(p + "input_layernorm.weight"), g(p + "input_layernorm.bias"), 1e-5)
        lin = lambda n, y: y @ g(p + n + ".weight").T + g(p + n + ".bias")
        q = lin("attention.query", x if qsrc is None else qsrc)
        a = attention(q, lin("attention.key", x), lin("attention.value", x), nh)
        h = h + lin("attention.dense", a)
        x = layer_norm(h, g(p + "post_attention_layernorm.weight"),
                       g(p + "post_attention_layernorm.bias"), 1e-5)
        return h + lin("mlp.dense_4h_to_h", codegeex_fast_gelu(lin("mlp.dense_h_to_4h", x)))

    i = 0
    while "language_model.transformer.layers.%d.input_layernorm.weight" % i in sd:
        h = layer("transformer.layers.%d." % i, h)
        i += 1
    h = layer_norm(h, g("transformer.final_layernorm.weight"), g("transformer.final_layernorm.bias"),
                   1e-5)
    qsrc = g("topQueryEmbedding.top_query_embeddings.weight")[pos]
    h = layer("transformer.topQueryLayer.", h, qsrc)
    return h @ g("embedding.word_embeddings.weight").T


def gpt2_logits(sd, cfg, tokens):
    """sd: GPT-2 names without 'transformer.'; Conv1D weights (in, out)."""
    g = lambda k: sd[k].double()
    C, nh = cfg["n_embd"], cfg["n_head"]
    eps = cfg.get("layer_norm_epsilon", 1e-5)
    act = cfg.get("activation_function", "gelu_new")
    T = len(tokens)
    h = g("wte.weight")[torch.tensor(tokens)] + g("wpe.weight")[torch.arange(T)]
    for i in range(cfg["n_layer"]):
        p = "h.%d." % i
        conv = lambda n, y: y @ g(p + n + ".weight") + g(p + n + ".bias")
        x = layer_norm(h, g(p + "ln_1.weight"), g(p + "ln_1.bias"), eps)
        qkv = conv("attn.c_attn", x)
        h = h + conv("attn.c_proj", attention(qkv[:, :C], qkv[:, C:2 * C], qkv[:, 2 * C:], nh))
        x = layer_norm(h, g(p + "ln_2.weight"), g(p + "ln_2.bias"), eps)
        u = conv("mlp.c_fc", x)
        if act == "gelu_new":
            u = 0.5 * u * (1 + torch.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u ** 3)))
        elif act == "gelu":
            u = 0.5 * u * (1 + torch.erf(u / math.sqrt(2)))
        else:
            raise ValueError(act)
        h = h + conv("mlp.c_proj", u)
    h = layer_norm(h, g("ln_f.weight"), g("ln_f.bias"), eps)
    return h @ g("wte.weight").T


def greedy(logits_fn, prompt, steps, vocab_used):
    toks = list(prompt)
    for _ in range(steps):
        lg = logits_fn(toks)[-1, :vocab_used]
        toks.append(int(torch.argmax(lg)))
    return toks[len(prompt):]


# ------------------------------------------------------------------------------------------------
def codegeex_state_dict(seed, dtype):
    """Nested exactly like CodeGeeXModel.state_dict_for_save_checkpoint()."""
    gen = torch.Generator().manual_seed(seed)
    V, C, L, S, F = CG["V"], CG["C"], CG["L"], CG["S"], CG["F"]
    r = lambda *s, std=0.2: (torch.randn(*s, generator=gen, dtype=torch.float64) * std).to(dtype)

    def layer(p, out):
        out[p + "input_layernorm.weight"] = (1 + r(C, std=0.1))
        out[p + "input_layernorm.bias"] = r(C, std=0.1)
        for n in ("query", "key", "value", "dense"):
            out[p + "attention.%s.weight" % n] = r(C, C)
            out[p + "attention.%s.bias" % n] = r(C, std=0.1)
        out[p + "post_attention_layernorm.weight"] = (1 + r(C, std=0.1))
        out[p + "post_attention_layernorm.bias"] = r(C, std=0.1)
        out[p + "mlp.dense_h_to_4h.weight"] = r(F, C)
        out[p + "mlp.dense_h_to_4h.bias"] = r(F, std=0.1)
        out[p + "mlp.dense_4h_to_h.weight"] = r(C, F, std=0.1)
        out[p + "mlp.dense_4h_to_h.bias"] = r(C, std=0.1)

    transformer = OrderedDict()
    for i in range(L):
        layer("layers.%d." % i, transformer)
    layer("topQueryLayer.", transformer)
    transformer["final_layernorm.weight"] = 1 + r(C, std=0.1)
    transformer["final_layernorm.bias"] = r(C, std=0.1)
    word = OrderedDict(weight=r(V, C, std=0.5))
    return {"language_model": {
        "embedding": {"word_embeddings": word,
                      "position_embeddings": OrderedDict(weight=r(S, C, std=0.5))},
        "topQueryEmbedding": {"top_query_embeddings": OrderedDict(weight=r(S, C, std=0.5))},
        "transformer": transformer}}


def flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        name = prefix + k
        if isinstance(v, dict):
            out.update(flatten(v, name + "."))
        else:
            out[name] = v
    return out


def write_tp_shards(sd, d, tp):
    """Tensor-parallel shards as CodeGeeX's megatron/convert_ckpt_parallel.py lays them out:
    torch.chunk on dim 0 for the word and top-query tables, query/key/value weights and biases,
    dense_h_to_4h weight and bias; on dim 1 for attention.dense and dense_4h_to_h weights; the rest
    (layernorms, position table, attention.dense and dense_4h_to_h biases) whole in every shard.
    Files mp_rank_{r:02d}_model_states.pt holding {'module': nested dict}. tp = 3 gives unequal
    chunks (torch.chunk rounds up)."""
    os.makedirs(d, exist_ok=True)
    lm = sd["language_model"]

    def dim_of(name):
        if "layernorm" in name:
            return None
        if name.endswith(".weight"):
            if "attention." in name:
                return 1 if "attention.dense" in name else 0
            return 0 if "dense_h_to_4h" in name else 1
        return None if ("4h_to_h" in name or "attention.dense" in name) else 0

    def part(t, dim, r):
        return t if dim is None else torch.chunk(t, tp, dim=dim)[r].clone()

    for r in range(tp):
        shard = {"language_model": {
            "embedding": {
                "word_embeddings": {"weight": part(lm["embedding"]["word_embeddings"]["weight"], 0, r)},
                "position_embeddings": {"weight": lm["embedding"]["position_embeddings"]["weight"]}},
            "topQueryEmbedding": {"top_query_embeddings": {
                "weight": part(lm["topQueryEmbedding"]["top_query_embeddings"]["weight"], 0, r)}},
                  "transformer": OrderedDict((k, part(v, dim_of(k), r)) for k, v in lm["transformer"].items())}}
        torch.save({"module": shard}, os.path.join(d, "mp_rank_%02d_model_states.pt" % r))


def write_codegeex(out):
    os.makedirs(out, exist_ok=True)
    vocab, merges = make_tokenizer(14)
    n = len(vocab)  # 271 = 256 bytes + 14 merges + <|endoftext|>
    added = {"<|extratoken_%d|>" % k: n - 1 + k for k in range(1, 20)}  # ids up to 289 < V=300
    write_tokenizer_files(os.path.join(out, "tokenizer"), vocab, merges, added)
    vocab_used = n + 19
    prompt = [5, 77, 200, 13, 257, 42, 99, 270]
    ref = {"prompt": np.array(prompt, dtype=np.int32)}

    sd32 = codegeex_state_dict(1, torch.float32)
    torch.save({"module": sd32}, os.path.join(out, "codegeex_module.pt"))
    flat = flatten(sd32)
    all_tokens = prompt + greedy(lambda t: codegeex_logits(flat, CG["NH"], t), prompt,
                                 GREEDY_STEPS, vocab_used)
    ref["module_greedy"] = np.array(all_tokens[len(prompt):], dtype=np.int32)
    ref["module_tokens"] = np.array(all_tokens[:40], dtype=np.int32)
    ref["module_logits"] = codegeex_logits(flat, CG["NH"], all_tokens[:40]).numpy().astype(np.float32)

    sd16 = codegeex_state_dict(2, torch.float16)
    args = argparse.Namespace(num_layers=CG["L"], hidden_size=CG["C"],
                              num_attention_heads=CG["NH"], max_position_embeddings=CG["S"],
                              fp16=True, params_dtype=torch.half, tokenizer_type="GPT2BPETokenizer")
    obj = dict(sd16)
    obj["args"] = args
    obj["iteration"] = 12345
    obj["checkpoint_version"] = 3.0
    torch.save(obj, os.path.join(out, "codegeex_args.pt"))
    flat16 = flatten(sd16)
    ref["args_logits"] = codegeex_logits(flat16, CG["NH"], all_tokens[:40]).numpy().astype(np.float32)

    write_tp_shards(sd32, os.path.join(out, "tp3"), 3)
    torch.save({"module": sd32}, os.path.join(out, "codegeex_legacy.pt"),
               _use_new_zipfile_serialization=False)
    save_safetensors(ref, os.path.join(out, "codegeex_ref.safetensors"))


# ------------------------------------------------------------------------------------------------
def gpt2_state_dict(seed, cfg):
    gen = torch.Generator().manual_seed(seed)
    V, C, S, F = cfg["vocab_size"], cfg["n_embd"], cfg["n_positions"], cfg["n_inner"]
    r = lambda *s, std=0.2: (torch.randn(*s, generator=gen, dtype=torch.float64) * std).float()
    sd = OrderedDict()
    sd["wte.weight"] = r(V, C, std=0.5)
    sd["wpe.weight"] = r(S, C, std=0.5)
    for i in range(cfg["n_layer"]):
        p = "h.%d." % i
        sd[p + "ln_1.weight"] = 1 + r(C, std=0.1)
        sd[p + "ln_1.bias"] = r(C, std=0.1)
        sd[p + "attn.c_attn.weight"] = r(C, 3 * C)
        sd[p + "attn.c_attn.bias"] = r(3 * C, std=0.1)
        sd[p + "attn.c_proj.weight"] = r(C, C)
        sd[p + "attn.c_proj.bias"] = r(C, std=0.1)
        sd[p + "ln_2.weight"] = 1 + r(C, std=0.1)
        sd[p + "ln_2.bias"] = r(C, std=0.1)
        sd[p + "mlp.c_fc.weight"] = r(C, F)
        sd[p + "mlp.c_fc.bias"] = r(F, std=0.1)
        sd[p + "mlp.c_proj.weight"] = r(F, C, std=0.1)
        sd[p + "mlp.c_proj.bias"] = r(C, std=0.1)
    sd["ln_f.weight"] = 1 + r(C, std=0.1)
    sd["ln_f.bias"] = r(C, std=0.1)
    return sd


def gpt2_config(act):
    return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
            "vocab_size": GPT["V"], "n_positions": GPT["S"], "n_ctx": GPT["S"],
            "n_embd": GPT["C"], "n_layer": GPT["L"], "n_head": GPT["NH"], "n_inner": None,
            "activation_function": act, "layer_norm_epsilon": 1e-5, "resid_pdrop": 0.0,
            "embd_pdrop": 0.0, "attn_pdrop": 0.0, "scale_attn_weights": True,
            "bos_token_id": GPT["V"] - 1, "eos_token_id": GPT["V"] - 1}


def transformers_check(d, tokens, logits):
    try:
        import transformers  # noqa: F401
    except ImportError:
        print("SKIP: transformers is not installed (Debian has no package); the HF fixtures are "
              "checked against the independent GPT-2 reference only", file=sys.stderr)
        return
    from transformers import GPT2LMHeadModel
    m = GPT2LMHeadModel.from_pretrained(d).double().eval()
    with torch.no_grad():
        out = m(torch.tensor([tokens])).logits[0].numpy()
    err = np.abs(out - logits).max() / np.abs(logits).max()
    print("transformers GPT2LMHeadModel vs reference: max rel err %.3g" % err, file=sys.stderr)
    assert err < 1e-6, err


def write_hf(out):
    os.makedirs(out, exist_ok=True)
    vocab, merges = make_tokenizer(14)
    # vocab.json of V entries: pad with dummy tokens so ids match vocab_size (GPT-2 has 50257).
    while len(vocab) < GPT["V"]:
        vocab["<|dummy_%d|>" % len(vocab)] = len(vocab)
    prompt = [5, 77, 200, 13, 257, 42, 99, 270]
    ref = {"prompt": np.array(prompt, dtype=np.int32)}
    for tag, act, seed in (("st", "gelu_new", 3), ("bin", "gelu", 4)):
        d = os.path.join(out, "hf_" + tag)
        os.makedirs(d, exist_ok=True)
        cfg = gpt2_config(act)
        cfg_full = dict(cfg, n_inner=4 * GPT["C"])
        sd = gpt2_state_dict(seed, cfg_full)
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
        if tag == "st":
            save_safetensors({k: v.numpy() for k, v in sd.items()}, os.path.join(d, "model.safetensors"))
            write_tokenizer_files(d, vocab, merges)
        else:
            full = OrderedDict()
            for k, v in sd.items():
                full["transformer." + k] = v
            S = GPT["S"]
            for i in range(GPT["L"]):
                full["transformer.h.%d.attn.bias" % i] = torch.tril(torch.ones(S, S, dtype=torch.uint8)).view(1, 1, S, S)
                full["transformer.h.%d.attn.masked_bias" % i] = torch.tensor(-1e4)
            full["lm_head.weight"] = full["transformer.wte.weight"]  # tied: one shared storage
            torch.save(full, os.path.join(d, "pytorch_model.bin"))
            tj = {"version": "1.0", "added_tokens": [{"id": vocab["<|endoftext|>"], "content": "<|endoftext|>", "special": True}],
                  "model": {"type": "BPE", "vocab": vocab,
                            "merges": [m.split(" ") for m in merges]}}  # tokenizers >= 0.20 pairs
            with open(os.path.join(d, "tokenizer.json"), "w") as f:
                json.dump(tj, f, ensure_ascii=False)
        if tag == "st":
            write_sharded(out, cfg, sd, vocab, merges)
            # The same weights as half-precision checkpoints, rounded by torch (nearest even):
            # hf_st_f16 (F16, torch_dtype float16) and hf_st_bf16 (BF16, bfloat16).
            for sub, conv, tdt in (("f16", lambda t: t.half().numpy(), "float16"),
                                   ("bf16", bf16_bits, "bfloat16")):
                dh = os.path.join(out, "hf_st_" + sub)
                os.makedirs(dh, exist_ok=True)
                with open(os.path.join(dh, "config.json"), "w") as f:
                    json.dump(dict(cfg, torch_dtype=tdt), f, indent=2)
                save_safetensors({k: conv(v) for k, v in sd.items()},
                                 os.path.join(dh, "model.safetensors"))
                write_tokenizer_files(dh, vocab, merges)
        fn = lambda t: gpt2_logits(sd, cfg_full, t)
        toks = prompt + greedy(fn, prompt, GREEDY_STEPS, GPT["V"])
        ref[tag + "_greedy"] = np.array(toks[len(prompt):], dtype=np.int32)
        ref[tag + "_tokens"] = np.array(toks[:40], dtype=np.int32)
        lg = fn(toks[:40]).numpy()
        ref[tag + "_logits"] = lg.astype(np.float32)
        transformers_check(d, toks[:40], lg)
    save_safetensors(ref, os.path.join(out, "hf_ref.safetensors"))


def write_sharded(out, cfg, sd, vocab, merges):
    """hf_st's weights in two shards with an index, as save_pretrained(max_shard_size=...) writes
    them: safetensors (hf_st_sharded) and pytorch_model.bin (hf_bin_sharded)."""
    names = list(sd)
    halves = (names[: len(names) // 2], names[len(names) // 2:])
    for kind in ("st", "bin"):
        d = os.path.join(out, "hf_%s_sharded" % kind)
        os.makedirs(d, exist_ok=True)
        json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
        write_tokenizer_files(d, vocab, merges)
        weight_map = {}
        for i, part in enumerate(halves):
            if kind == "st":
                fname = "model-%05d-of-00002.safetensors" % (i + 1)
                save_safetensors({k: sd[k].numpy() for k in part}, os.path.join(d, fname))
            else:
                fname = "pytorch_model-%05d-of-00002.bin" % (i + 1)
                torch.save(OrderedDict((k, sd[k]) for k in part), os.path.join(d, fname))
            weight_map.update({k: fname for k in part})
        index = "model.safetensors.index.json" if kind == "st" else "pytorch_model.bin.index.json"
        json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map},
                  open(os.path.join(d, index), "w"))


def hf_logits(d, tokens_path, T, out):
    cfg = json.load(open(os.path.join(d, "config.json")))
    if cfg.get("n_inner") is None:
        cfg["n_inner"] = 4 * cfg["n_embd"]
    tensors = load_safetensors(os.path.join(d, "model.safetensors"))
    sd = {k[len("transformer."):] if k.startswith("transformer.") else k: torch.from_numpy(v)
          for k, v in tensors.items()}
    tokens = np.fromfile(tokens_path, dtype=np.int32)[:T].tolist()
    lg = gpt2_logits(sd, cfg, tokens).numpy()
    transformers_check(d, tokens, lg)
    save_safetensors({"logits": lg.astype(np.float32)}, out)


def load_safetensors(path):
    with open(path, "rb") as f:
        data = f.read()
    n = struct.unpack("<Q", data[:8])[0]
    h = json.loads(data[8:8 + n])
    inv = {v: k for k, v in _ST.items()}
    out = {}
    for k, v in h.items():
        if k == "__metadata__":
            continue
        b, e = v["data_offsets"]
        a = np.frombuffer(data[8 + n + b:8 + n + e], dtype=inv[v["dtype"]]).reshape(v["shape"]).copy()
        if v["dtype"] == "BF16":
            a = (a.astype(np.uint32) << 16).view(np.float32)
        out[k] = a
    return out


# ------------------------------------------------------------------------------------------------
class Evil:
    """Pickles as a call to os.system: torch.load would run it; loom must refuse it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, ("touch " + self.marker,))


class EvalCall:
    def __reduce__(self):
        return (eval, ("1+1",))


def write_hostile(out):
    os.makedirs(out, exist_ok=True)
    marker = os.path.join(out, "PWNED")
    t = torch.zeros(2)
    torch.save({"w": t, "x": Evil(marker)}, os.path.join(out, "reduce_os_system.pt"))
    torch.save({"w": t, "x": EvalCall()}, os.path.join(out, "reduce_eval.pt"))
    torch.save({"w": t}, os.path.join(out, "plain.pt"))
    # Tensors as state dicts really hold them: a Parameter, a transposed (strided) view, a slice at
    # a storage offset sharing its storage with another entry, fp16 and bf16.
    g = torch.Generator().manual_seed(9)
    base = torch.randn(6, 5, generator=g)
    views = OrderedDict(p=torch.nn.Parameter(torch.randn(4, 3, generator=g)), t=base.t(),
                        s=base.view(-1)[7:19].view(3, 4), whole=base,
                        h=torch.randn(5, 7, generator=g).half(),
                        b=torch.randn(3, 9, generator=g).bfloat16())
    torch.save(views, os.path.join(out, "views.pt"))
    save_safetensors({k: v.detach().float().contiguous().numpy() for k, v in views.items()},
                     os.path.join(out, "views_ref.safetensors"))
    # Fuzz seeds: a small torch zip and the raw data.pkl of a CodeGeeX-style file with args.
    sd = flatten(codegeex_state_dict(7, torch.float16))
    obj = {"module": {k: v for k, v in list(sd.items())[:6]},
           "args": argparse.Namespace(num_attention_heads=4, fp16=True, params_dtype=torch.half),
           "iteration": 3}
    torch.save(obj, os.path.join(out, "seed.pt"))
    import zipfile
    with zipfile.ZipFile(os.path.join(out, "seed.pt")) as z:
        name = [n for n in z.namelist() if n.endswith("data.pkl")][0]
        open(os.path.join(out, "seed_data.pkl"), "wb").write(z.read(name))
    data = open(os.path.join(out, "plain.pt"), "rb").read()
    open(os.path.join(out, "truncated.pt"), "wb").write(data[: len(data) // 2])
    # safetensors: header claims more data than the file holds; unknown dtype.
    save_safetensors({"a": np.zeros((4, 4), np.float32)}, os.path.join(out, "short.safetensors"))
    b = open(os.path.join(out, "short.safetensors"), "rb").read()
    open(os.path.join(out, "short.safetensors"), "wb").write(b[:-16])
    save_safetensors({"a": np.zeros((4, 4), np.float32)}, os.path.join(out, "dtype.safetensors"),
                     header_override=lambda h: h["a"].update(dtype="Q4_K"))
    # HF dirs: claimed-size, unknown dtype and shape mismatch (config says n_embd 32, tensors 24).
    for name, mut in (("hf_short", None), ("hf_dtype", None), ("hf_shape", None)):
        d = os.path.join(out, name)
        os.makedirs(d, exist_ok=True)
        cfg = gpt2_config("gelu_new")
        sd = gpt2_state_dict(5, dict(cfg, n_inner=4 * GPT["C"]))
        if name == "hf_shape":
            cfg["n_embd"] = 30
            cfg["n_head"] = 3
        json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
        p = os.path.join(d, "model.safetensors")
        over = (lambda h: h["wte.weight"].update(dtype="F8_E4M3")) if name == "hf_dtype" else None
        save_safetensors({k: v.numpy() for k, v in sd.items()}, p, header_override=over)
        if name == "hf_short":
            b = open(p, "rb").read()
            open(p, "wb").write(b[:-100])


def main():
    mode, out = sys.argv[1], sys.argv[2]
    if mode == "codegeex":
        write_codegeex(out)
    elif mode == "hf":
        write_hf(out)
    elif mode == "hf-logits":
        hf_logits(out, sys.argv[3], int(sys.argv[4]), sys.argv[5])
    elif mode == "hostile":
        write_hostile(out)
    else:
        raise SystemExit("unknown mode " + mode)


if __name__ == "__main__":
    main()
