# tests/cli/common.sh: what the CLI test scripts share. Source it after setting -u/-o pipefail:
#   . "$(dirname "${BASH_SOURCE[0]}")/common.sh"
# It defines
#   fails=0                         the failure count; end a script with [ "$fails" -eq 0 ]
#   pass NAME / fail NAME           one check's line ("ok   NAME" / "FAIL NAME", counted)
#   expect_error NAME NEEDLE CMD... CMD must exit non-zero and print NEEDLE on stderr
#   server_url LOG                  waits (up to 15 s) for `loom serve`'s loopback URL in LOG and
#                                   prints it (empty if it never appears)
fails=0
pass() { echo "ok   $1"; }
fail() { echo "FAIL $1"; fails=$((fails + 1)); }
expect_error() {
  local name=$1 needle=$2; shift 2
  local out
  if out=$("$@" 2>&1 >/dev/null); then fail "$name: exited 0"; return; fi
  if grep -qF -- "$needle" <<<"$out"; then pass "$name"; else fail "$name: no '$needle' in: $out"; fi
}
server_url() {
  local u=""
  for _ in $(seq 300); do
    u=$(grep -oE 'http://127\.0\.0\.1:[0-9]+' "$1" | head -1 || true)
    [ -n "$u" ] && break
    sleep 0.05
  done
  echo "$u"
}
