"""Hugging Face `transformers` / `tokenizers` as the oracle for loom's interop tests.

Run with the venv python that tests/reference/hf_venv.sh makes (Debian's torch 1.13 plus
transformers 4.40.2 from PyPI). Nothing is downloaded here: models are random, built locally.

  hf_oracle.py model OUT        GPT2LMHeadModel, random small config, every parameter perturbed
                                (biases and norms too), saved with save_pretrained:
                                  OUT/tf_st   safetensors, activation gelu_new
                                  OUT/tf_bin  pytorch_model.bin (safe_serialization=False), gelu
                                  OUT/tf_st_f16  tf_st's model .half(), save_pretrained
                                plus vocab.json/merges.txt, and OUT/tf_ref.safetensors: float64
                                logits of 40 tokens and 64 greedy tokens of each
  hf_oracle.py logits DIR TOKENS.i32 T OUT   GPT2LMHeadModel.from_pretrained(DIR) logits, f64
  hf_oracle.py tokenize TOKDIR TEXTS.json OUT.json   ids of each text by CodeGeeX's tokenizer
                                recipe (codegeex/tokenizer/tokenizer.py: runs of 10..2 spaces
                                replaced by <|extratoken_{8+n}|> longest first, when the folder
                                has those tokens, then GPT2TokenizerFast from the folder)
"""
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import interop_fixtures as fx  # noqa: E402

from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast  # noqa: E402

torch.set_num_threads(1)


def model_fixtures(out):
    os.makedirs(out, exist_ok=True)
    vocab, merges = fx.make_tokenizer(14)
    while len(vocab) < fx.GPT["V"]:
        vocab["<|dummy_%d|>" % len(vocab)] = len(vocab)
    prompt = [5, 77, 200, 13, 257, 42, 99, 270]
    ref = {"prompt": np.array(prompt, dtype=np.int32)}
    for tag, act, safe, seed in (("st", "gelu_new", True, 11), ("bin", "gelu", False, 12)):
        torch.manual_seed(seed)
        cfg = GPT2Config(vocab_size=fx.GPT["V"], n_positions=fx.GPT["S"], n_embd=fx.GPT["C"],
                         n_layer=fx.GPT["L"], n_head=fx.GPT["NH"], activation_function=act,
                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                         bos_token_id=fx.GPT["V"] - 1, eos_token_id=fx.GPT["V"] - 1)
        m = GPT2LMHeadModel(cfg).eval()
        with torch.no_grad():
            for name, p in m.named_parameters():
                p.add_(torch.randn_like(p) * (0.2 if p.dim() > 1 else 0.1))
        d = os.path.join(out, "tf_" + tag)
        m.save_pretrained(d, safe_serialization=safe)
        fx.write_tokenizer_files(d, vocab, merges)
        if tag == "st":  # the same model saved in half precision by transformers itself
            import copy
            d16 = os.path.join(out, "tf_st_f16")
            copy.deepcopy(m).half().save_pretrained(d16, safe_serialization=True)
            fx.write_tokenizer_files(d16, vocab, merges)
        md = m.double()

        def logits(toks):
            with torch.no_grad():
                return md(torch.tensor([toks])).logits[0]

        toks = prompt + fx.greedy(logits, prompt, fx.GREEDY_STEPS, fx.GPT["V"])
        ref[tag + "_greedy"] = np.array(toks[len(prompt):], dtype=np.int32)
        ref[tag + "_tokens"] = np.array(toks[:40], dtype=np.int32)
        ref[tag + "_logits"] = logits(toks[:40]).numpy().astype(np.float32)
        print("%s: saved %s" % (tag, sorted(os.listdir(d))), file=sys.stderr)
    fx.save_safetensors(ref, os.path.join(out, "tf_ref.safetensors"))


def logits_of(d, tokens_path, T, out):
    m = GPT2LMHeadModel.from_pretrained(d).double().eval()
    toks = np.fromfile(tokens_path, dtype=np.int32)[:T].tolist()
    with torch.no_grad():
        lg = m(torch.tensor([toks])).logits[0].numpy()
    fx.save_safetensors({"logits": lg.astype(np.float32)}, out)


def tokenize(tokdir, texts_path, out):
    tok = GPT2TokenizerFast.from_pretrained(tokdir)
    vocab = tok.get_vocab()
    ws = all("<|extratoken_%d|>" % (8 + n) in vocab for n in range(2, 11))
    res = []
    for text in json.load(open(texts_path, encoding="utf-8")):
        t = text
        if ws:
            for n in range(10, 1, -1):
                t = t.replace(" " * n, "<|extratoken_%d|>" % (8 + n))
        res.append(tok(t).input_ids)
    json.dump({"whitespace_tokens": ws, "ids": res}, open(out, "w"))


def main():
    mode = sys.argv[1]
    if mode == "model":
        model_fixtures(sys.argv[2])
    elif mode == "logits":
        logits_of(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])
    elif mode == "tokenize":
        tokenize(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        raise SystemExit("unknown mode " + mode)


if __name__ == "__main__":
    main()
