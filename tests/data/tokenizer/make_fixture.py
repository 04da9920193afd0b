#!/usr/bin/env python3
"""Writes a tiny GPT-2/CodeGeeX-format tokenizer (vocab.json, merges.txt, added_tokens.json).

Same file formats and id conventions as CodeGeeX's tokenizer folder, scaled down: the 256 byte
tokens in GPT-2's byte alphabet, a few dozen merges built from common code words, then
<|endoftext|>, then <|extratoken_1..143|> as added tokens (extratoken_10..18 = runs of 2..10
spaces). Run from this directory: python3 make_fixture.py
"""
import json


def bytes_to_unicode():
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


b2u = bytes_to_unicode()
vocab = {}
for b in sorted(b2u, key=lambda b: list(b2u).index(b)):
    vocab[b2u[b]] = len(vocab)

words = ["def", " def", "return", " return", "self", " self", " =", " ==", "in", " in", "if",
         " if", "for", " for", "import", " import", "class", " class", "\n", "\n\n", " the",
         "print", "():", "int", " int", " {", " }", ");", "(self", "__", "__init__", " None",
         "func", " main", "std", "::", "let", " let", "fn", "#include", " <"]
merges = []
for w in words:
    u = "".join(b2u[b] for b in w.encode("utf-8"))
    cur = u[0]
    for ch in u[1:]:
        nxt = cur + ch
        if nxt not in vocab:
            merges.append((cur, ch))
            vocab[nxt] = len(vocab)
        cur = nxt

vocab["<|endoftext|>"] = len(vocab)
added = {f"<|extratoken_{i}|>": len(vocab) + i - 1 for i in range(1, 144)}

with open("vocab.json", "w", encoding="utf-8") as f:
    json.dump(vocab, f, ensure_ascii=False)
with open("merges.txt", "w", encoding="utf-8") as f:
    f.write("#version: 0.2\n")
    for a, b in merges:
        f.write(f"{a} {b}\n")
with open("added_tokens.json", "w", encoding="utf-8") as f:
    json.dump(added, f)
print(len(vocab), "vocab,", len(merges), "merges,", len(added), "added")

# Reference encodings (GPT-2's regex pre-tokenizer via the `regex` module + rank-ordered BPE +
# CodeGeeX's whitespace replacement), for the C++ parity test. Needs `pip install regex`.
try:
    import regex as re
except ImportError:
    re = None
if re is not None:
    pat = re.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
    ranks = {m: i for i, m in enumerate(merges)}

    def bpe(word):
        syms = list(word)
        while len(syms) > 1:
            pairs = [(ranks.get((syms[i], syms[i + 1]), 1 << 30), i) for i in range(len(syms) - 1)]
            best = min(pairs)[0]
            if best == 1 << 30:
                break
            a, b = merges[best]
            out, i = [], 0
            while i < len(syms):
                if i + 1 < len(syms) and syms[i] == a and syms[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(syms[i])
                    i += 1
            syms = out
        return [vocab[s] for s in syms]

    def encode(text):
        for i in range(10, 1, -1):  # CodeGeeX encode_whitespaces
            text = text.replace(" " * i, f"<|extratoken_{10 + i - 2}|>")
        ids = []
        for part in re.split(r"(<\|extratoken_\d+\|>)", text):
            if part.startswith("<|extratoken_"):
                ids.append(added[part])
                continue
            for tok in pat.findall(part):
                ids += bpe("".join(b2u[b] for b in tok.encode("utf-8")))
        return ids

    cases = ["def f(self):\n    return self.x == 1\n",
             "import os\n\nclass A:\n        def __init__(self, n):\n            pass\n",
             "int main() {\n  std::cout << 42;  // it's ok\n}\n",
             "x  =   y" + " " * 12 + "z" + " " * 11 + "w\t\tq \n\n  \n",
             "let s = \"héllo wörld 123\";   fn main() { }",
             "they're we'll I'd 'x' a's"]
    with open("expected_ids.json", "w", encoding="utf-8") as f:
        json.dump([{"text": c, "ids": encode(c)} for c in cases], f, ensure_ascii=False, indent=0)
    print("wrote expected_ids.json")
