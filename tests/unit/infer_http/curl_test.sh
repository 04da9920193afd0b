#!/usr/bin/env bash
# tests/unit/infer_http/curl_test.sh: the server through curl, as a user would try it.
#   curl_test.sh --url http://127.0.0.1:8080 [--api-key K]     # a running `loom serve`
#   curl_test.sh --fake-server PATH/infer_http_fake_server      # the scripted service
# Exit 0 pass, 1 fail, 77 SKIP (no curl).
set -u
command -v curl >/dev/null || { echo "SKIP: curl is not installed"; exit 77; }
url="" key="" fake="" pid=""
while [ $# -gt 0 ]; do
  case "$1" in
    --url) url="$2"; shift 2 ;;
    --api-key) key="$2"; shift 2 ;;
    --fake-server) fake="$2"; shift 2 ;;
    *) echo "unknown option $1"; exit 2 ;;
  esac
done
if [ -n "$fake" ]; then
  out=$(mktemp)
  "$fake" > "$out" & pid=$!
  for _ in $(seq 100); do grep -q '^PORT' "$out" && break; sleep 0.05; done
  url="http://127.0.0.1:$(awk '/^PORT/{print $2}' "$out")"
  rm -f "$out"
fi
[ -n "$url" ] || { echo "give --url or --fake-server"; exit 2; }
auth=(); [ -n "$key" ] && auth=(-H "Authorization: Bearer $key")
fails=0
check() {  # check NAME COND-COMMAND...
  local name="$1"; shift
  if "$@"; then echo "ok    $name"; else echo "FAIL  $name"; fails=$((fails + 1)); fi
}
body='{"prompt": "def add(a, b):", "max_tokens": 8, "temperature": 0}'
r=$(curl -s "${auth[@]}" -H 'Content-Type: application/json' -d "$body" "$url/v1/completions")
check "non-streaming: text_completion with usage ($r)" \
  bash -c '[[ "$0" == *"\"object\":\"text_completion\""* && "$0" == *"\"usage\""* ]]' "$r"
s=$(curl -sN "${auth[@]}" -H 'Content-Type: application/json' \
  -d '{"prompt": "def add(a, b):", "max_tokens": 8, "stream": true}' "$url/v1/completions")
check "streaming: data: events ending in [DONE]" \
  bash -c '[[ "$0" == "data: {"* && "$0" == *"data: [DONE]" ]]' "$s"  # $() drops the final \n\n
code=$(curl -s -o /dev/null -w '%{http_code}' "${auth[@]}" -d '{bad json' "$url/v1/completions")
check "malformed JSON is 400 (got $code)" [ "$code" = 400 ]
code=$(curl -s -o /dev/null -w '%{http_code}' "$url/health")
check "health is 200 (got $code)" [ "$code" = 200 ]
if [ -n "$pid" ]; then
  kill -TERM "$pid"; wait "$pid"; rc=$?
  check "server exits 0 on SIGTERM (got $rc)" [ "$rc" = 0 ]
fi
[ "$fails" = 0 ] && echo "PASS" || echo "FAIL: $fails checks"
[ "$fails" = 0 ]
