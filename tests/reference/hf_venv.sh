#!/bin/sh
# tests/reference/hf_venv.sh VENV: makes VENV a Python venv over Debian's python3 (so it sees
# python3-torch 1.13) with Hugging Face `transformers` 4.40.2 (the last line of releases that
# runs on torch 1.13; it brings `tokenizers` 0.19) from PyPI, for use as a test oracle.
# Exit 0: VENV/bin/python imports transformers. Exit 77 and a SKIP line on stdout: it could not
# be made here (no network, no PyPI); the caller skips visibly. Serialised with flock, reused; a
# failure is remembered in VENV.failed (delete it to retry) so each test does not wait on pip.
set -u
VENV="$1"
mkdir -p "$(dirname "$VENV")"
exec 9>"$VENV.lock"
flock 9
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c 'import transformers, tokenizers' 2>/dev/null; then
  exit 0
fi
if [ -f "$VENV.failed" ]; then
  cat "$VENV.failed"
  exit 77
fi
skip() {
  echo "$1" | tee "$VENV.failed"
  exit 77
}
rm -rf "$VENV"
if ! /usr/bin/python3 -m venv --system-site-packages "$VENV" >"$VENV.log" 2>&1; then
  skip "SKIP: cannot create a venv (python3-venv missing?): see $VENV.log"
fi
if ! timeout 600 "$VENV/bin/pip" install --retries 1 --timeout 20 "transformers==4.40.2" >>"$VENV.log" 2>&1; then
  rm -rf "$VENV"
  skip "SKIP: pip could not install transformers==4.40.2 from PyPI (offline?): see $VENV.log"
fi
"$VENV/bin/python" -c 'import torch, transformers, tokenizers' >>"$VENV.log" 2>&1 || {
  skip "SKIP: transformers installed but does not import with this torch: see $VENV.log"
}
exit 0
