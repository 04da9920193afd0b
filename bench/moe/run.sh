#!/usr/bin/env bash
# Quality benchmark of PanGu-Σ-style sparse experts (issue 14, "Quality"); not a ctest.
#   bench/moe/run.sh [LOOM_BIN]        env: LOOM_BENCH_MOE_DIR (default runs/bench-moe),
#                                            LOOM_BENCH_MOE_STEPS (default 600)
# 1. Builds the demo corpus (scripts/demo's sources: the Python standard library, C++ and Linux
#    headers, loom's own sources, the JDK's java.util / java.io) with a 512-token vocabulary.
# 2. Trains bench/moe/dense.toml and bench/moe/moe.toml (rre, both blocks sparse, the same
#    active parameters per token) for the same steps on the same batches (train.toml), and plots
#    both validation curves in one SVG (loom plot).
# 3. Extracts every language domain's sub-model of the MoE model (loom extract) and reports the
#    per-language validation loss (the validation shards' documents of that language, as a raw
#    token file) of the dense model, the full MoE model (--domain L) and the extracted sub-model.
# Prints a JSON line per measurement and a summary table; writes $DIR/summary.json, $DIR/loss.svg.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
LOOM=${1:-$root/build/bin/loom}
DIR=${LOOM_BENCH_MOE_DIR:-$root/runs/bench-moe}
STEPS=${LOOM_BENCH_MOE_STEPS:-600}
mkdir -p "$DIR"
cd "$root"

# 1. corpus
PYLIB=$(ls -d /usr/lib/python3.[0-9]* 2>/dev/null | sort -V | tail -1)
SOURCES=()
for d in "$PYLIB" /usr/include/c++ /usr/include/linux src apps tests/data; do
  [ -d "$d" ] && SOURCES+=(--source "$d")
done
JSRC=$(ls /usr/lib/jvm/openjdk-17/lib/src.zip /usr/lib/jvm/java-17-openjdk-*/lib/src.zip 2>/dev/null | head -1 || true)
if [ -n "$JSRC" ] && [ ! -f "$DIR/java-src/.done" ]; then
  /usr/bin/python3 - "$JSRC" "$DIR/java-src" <<'PY'
import sys, zipfile
zf = zipfile.ZipFile(sys.argv[1])
for name in zf.namelist():
    if name.startswith(("java.base/java/util/", "java.base/java/io/")) and name.endswith(".java"):
        zf.extract(name, sys.argv[2])
open(sys.argv[2] + "/.done", "w").close()
PY
fi
[ -f "$DIR/java-src/.done" ] && SOURCES+=(--source "$DIR/java-src")
if [ ! -f "$DIR/data/meta.json" ]; then
  echo "== building the corpus (vocab 512) from: ${SOURCES[*]}"
  "$LOOM" data build "${SOURCES[@]}" --out "$DIR/data" --vocab 512 >"$DIR/data-build.log" 2>&1
fi

# 2. train both (same data order and seed), one SVG
for m in dense moe; do
  if [ ! -f "$DIR/$m/metrics.jsonl" ] || ! grep -q "\"step\":$STEPS[,}]" "$DIR/$m/metrics.jsonl"; then
    echo "== training $m for $STEPS steps"
    sed -e "s|^model = .*|model = \"$here/$m.toml\"|" -e "s|^path = .*|path = \"$DIR/data\"|" \
      -e "s|^steps = .*|steps = $STEPS|" -e "s|^decay_steps = .*|decay_steps = $STEPS|" \
      "$here/train.toml" >"$DIR/train-$m.toml"
    "$LOOM" train --config "$DIR/train-$m.toml" --out "$DIR/$m" --overwrite \
      >"$DIR/$m.log" 2>&1
  fi
done
"$LOOM" plot --run "dense=$DIR/dense/metrics.jsonl" --run "moe (rre)=$DIR/moe/metrics.jsonl" \
  --out "$DIR/loss.svg"

# 3. per-language validation tokens, extraction, losses
/usr/bin/python3 - "$DIR/data" "$DIR/val" <<'PY'
# Validation documents of each language (data/shard.h format) as raw uint32 token files.
import json, os, struct, sys
data, out = sys.argv[1], sys.argv[2]
os.makedirs(out, exist_ok=True)
meta = json.load(open(os.path.join(data, "meta.json")))
# language id -> the domain-style name ("C++" -> "cpp", others lower-cased)
names = {i: ("cpp" if n == "C++" else n.lower()) for n, i in meta["language_ids"].items()}
toks = {}
for sh in meta["shards"]["val"]:
    b = open(os.path.join(data, sh["file"]), "rb").read()
    bpt, n, d = struct.unpack_from("<I", b, 12)[0], *struct.unpack_from("<QQ", b, 16)
    idx = 64 + ((n * bpt + 7) // 8) * 8
    fmt = "<%d%s" % (n, "H" if bpt == 2 else "I")
    ids = struct.unpack_from(fmt, b, 64)
    for i in range(d):
        beg, end, lang = struct.unpack_from("<QQi", b, idx + 24 * i)
        key = names.get(lang, "unknown")
        toks.setdefault(key, []).extend(ids[beg:end])
for k, v in sorted(toks.items()):
    open(os.path.join(out, k + ".u32"), "wb").write(struct.pack("<%dI" % len(v), *v))
    print(json.dumps({"val_tokens": k, "tokens": len(v)}))
PY
loss() { "$LOOM" eval loss --checkpoint "$1" --tokens "$2" --seq 128 "${@:3}" | /usr/bin/python3 -c 'import json,sys; print(json.load(sys.stdin)["loss"])'; }
rows=()
for lang in python c cpp java; do
  f="$DIR/val/$lang.u32"
  [ -s "$f" ] || continue
  rm -rf "$DIR/moe-$lang"
  ext=$("$LOOM" extract --checkpoint "$DIR/moe/ckpt" --domain "$lang" --out "$DIR/moe-$lang")
  ld=$(loss "$DIR/dense/ckpt" "$f"); lm=$(loss "$DIR/moe/ckpt" "$f" --domain "$lang")
  le=$(loss "$DIR/moe-$lang" "$f")
  row=$(/usr/bin/python3 -c "import json,sys; e=json.loads(sys.argv[5]); print(json.dumps({'language': sys.argv[1], 'tokens': $(( $(stat -c %s "$f") / 4 )), 'dense': float(sys.argv[2]), 'moe_full': float(sys.argv[3]), 'moe_extracted': float(sys.argv[4]), 'disk_bytes_full': e['disk_bytes_full'], 'disk_bytes_extracted': e['disk_bytes_extracted'], 'params_extracted': e['params_extracted']}))" "$lang" "$ld" "$lm" "$le" "$ext")
  echo "$row"
  rows+=("$row")
done
printf '%s\n' "${rows[@]}" >"$DIR/per_language.jsonl"
/usr/bin/python3 - "$DIR" <<'PY'
import json, sys
d = sys.argv[1]
def last_val(m):
    v = [json.loads(l) for l in open(f"{d}/{m}/metrics.jsonl") if "val_loss" in l]
    return v[-1]["step"], v[-1]["val_loss"]
s = {m: last_val(m) for m in ("dense", "moe")}
rows = [json.loads(l) for l in open(f"{d}/per_language.jsonl")]
out = {"steps": s["dense"][0], "val_loss_dense": s["dense"][1], "val_loss_moe": s["moe"][1],
       "moe_lower": s["moe"][1] < s["dense"][1], "per_language": rows}
json.dump(out, open(f"{d}/summary.json", "w"), indent=1)
print(json.dumps({k: v for k, v in out.items() if k != "per_language"}))
print("%-8s %9s %9s %9s %9s" % ("language", "tokens", "dense", "moe", "extracted"))
for r in rows:
    print("%-8s %9d %9.4f %9.4f %9.4f" % (r["language"], r["tokens"], r["dense"], r["moe_full"], r["moe_extracted"]))
PY
echo "plot: $DIR/loss.svg"
