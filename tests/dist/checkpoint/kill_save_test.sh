#!/usr/bin/env bash
# kill_save_test.sh MPIRUN_LOCAL HELPER: a 2-rank ShardedWriter save is SIGKILLed at every
# protocol step of rank 0 and of rank 1 (LOOM_CKPT_KILL_AT=R:K; Open MPI then ends the job).
# After each kill the directory must load (in a fresh process) as the previous checkpoint or the
# new one, bit for bit, and once the switch has happened never go back. A final clean save must
# leave no temporary behind.
set -uo pipefail
mpirun_local=$1 helper=$2
work=$(mktemp -d)
dir=$work/ckpt
trap 'rm -rf "$work"' EXIT
export LOOM_COMM_TIMEOUT=20
fail() { echo "FAIL: $*"; exit 1; }
"$mpirun_local" 2 "$helper" save "$dir" 1 >/dev/null 2>&1 || fail "first save"
for r in 0 1; do
  n=$(LOOM_CKPT_TRACE=1 "$mpirun_local" 2 "$helper" save "$dir" 2 2>&1 | grep -c "(rank $r)")
  [ "$n" -ge 5 ] || fail "rank $r counted only $n protocol steps"
  prev=$("$helper" check "$dir") || fail "check after the clean save"
  switched=0
  for k in $(seq 1 "$n"); do
    next=$((1000 * (r + 1) + k))
    LOOM_CKPT_KILL_AT=$r:$k timeout -k 5 60 "$mpirun_local" 2 "$helper" save "$dir" "$next" \
      >"$work/log" 2>&1 && fail "rank $r step $k: the save was not killed"
    got=$("$helper" check "$dir") || fail "rank $r step $k: no loadable checkpoint: $(cat "$work/log")"
    if [ "$got" != "$prev" ] && [ "$got" != "$next" ]; then
      fail "rank $r step $k: loaded version $got, expected $prev or $next"
    fi
    if [ "$switched" = 1 ] && [ "$got" != "$next" ]; then
      fail "rank $r step $k: went back to the old checkpoint after the switch"
    fi
    [ "$got" = "$next" ] && switched=1
    prev=$got
  done
  echo "rank $r: killed at each of $n steps; every time the old or the new checkpoint loaded"
  # Rank 1 never commits, so a kill of rank 1 never shows the new one.
  [ "$r" = 1 ] && [ "$switched" = 1 ] && fail "a kill of rank 1 left a new checkpoint"
  [ "$r" = 0 ] && [ "$switched" = 0 ] && fail "no kill of rank 0 came after the switch"
done
"$mpirun_local" 2 "$helper" save "$dir" 7 >/dev/null 2>&1 || fail "last save"
[ "$("$helper" check "$dir")" = 7 ] || fail "last save does not load"
left=$(ls -A "$dir" | grep -v -E '^(latest|step-[0-9]+(\.[0-9]+)?)$')
[ -z "$left" ] || fail "left behind: $left"
echo "PASS"
