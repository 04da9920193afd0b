#!/usr/bin/env bash
# The kill test of issue 17: `loom train` on 2 MPI ranks is SIGKILLed at every protocol step
# (each mkdir, create, write, fsync and rename; checkpoint/commit.h) of one checkpoint save, on
# rank 0 and on rank 1, and every time `--resume RUN_DIR` continues bit-exactly.
#
#   reference  an uninterrupted 6-step run, checkpoint.every=2: the loss of every step
#   base       2 steps: RUN/ckpt/step-00000002, copied into a fresh RUN for each kill
#   kill R:K   --resume RUN --steps 6 with LOOM_CKPT_KILL_AT=R:K. The step count restarts at 1 in
#              every save of a process, so the first save of this process (the one at step 4) is
#              the one killed, just before its step K; the job must die (not finish, not hang).
#   resume     --resume RUN --steps 6, no fault. It must resume from step 4 when the kill came
#              after the switch (rank 0's rename of latest.tmp -> latest), else from step 2 (never
#              from the half-written step 4), train to step 6 with metrics.jsonl holding steps
#              1..6 once each, every loss equal to the reference's bit for bit (the JSON numbers
#              compared as text), and leave no staging, trash or temporary file behind.
# One PASS/FAIL line per kill; exits non-zero on any failure.
# Usage: test_kill_save.sh LOOM_BINARY SOURCE_DIR
# KILL_TEST_ONLY="0:21 1:3" runs only those kills (to reproduce one failure); the test then
# fails on purpose, since not every step was covered.
set -uo pipefail
LOOM=$(realpath "$1")
SRC=$(realpath "$2")
MPIRUN=$SRC/scripts/mpirun-local
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
cd "$WORK" || exit 1
# A rank left waiting on a dead peer errors out after this many seconds (conventions 7); Open MPI
# normally ends it at once. JOB_TIMEOUT backs both up: a job still running then is a hang.
export LOOM_COMM_TIMEOUT=20
JOB_TIMEOUT=60
unset LOOM_CKPT_KILL_AT LOOM_CKPT_FAIL_AT LOOM_CKPT_TRACE
TRAIN=(train --config "$SRC/configs/train/tiny.toml" --set train.eval_every=0 --set train.seq=32
       --set checkpoint.every=2)
fails=0 passes=0
fatal() { echo "FAIL $*"; exit 1; }

# job LOG ARGS...: one 2-rank `loom train` under the hang backstop; sets rc and took (seconds).
job() {
  local log=$1; shift
  local t0=$SECONDS
  timeout -k 5 "$JOB_TIMEOUT" "$MPIRUN" 2 "$LOOM" "${TRAIN[@]}" "$@" >"$log" 2>&1
  rc=$?
  took=$((SECONDS - t0))
}

# why LOG: loom's own error lines of a job, else its last lines (Open MPI's notes come last).
why() { { grep -m2 '^error:' "$1" || grep -v '^ckpt step' "$1" | tail -3; } | tr '\n' ' '; }

# losses METRICS: "step loss" per line, the loss exactly as metrics.jsonl spells it.
losses() {
  /usr/bin/python3 -c '
import json, sys
for line in open(sys.argv[1]):
    j = json.loads(line, parse_float=str)
    print(j["step"], j["loss"])' "$1"
}

# 1. The reference.
job "$WORK/ref.log" --out "$WORK/ref" --steps 6
[ "$rc" = 0 ] || fatal "reference run (rc $rc): $(why "$WORK/ref.log")"
losses "$WORK/ref/metrics.jsonl" >"$WORK/ref.losses" || fatal "reference metrics unreadable"
[ "$(cut -d' ' -f1 "$WORK/ref.losses" | tr '\n' ' ')" = "1 2 3 4 5 6 " ] \
  || fatal "reference metrics steps: $(cat "$WORK/ref.losses")"

# 2. The base run (step-2 checkpoint), and one traced resume of it without a fault: it must
#    match the reference too, and its trace gives each rank's steps per save and the switch.
job "$WORK/base.log" --out "$WORK/base" --steps 2
[ "$rc" = 0 ] || fatal "base run (rc $rc): $(why "$WORK/base.log")"
[ "$(cat "$WORK/base/ckpt/latest")" = step-00000002 ] || fatal "base run: latest is not step-00000002"
cp -a "$WORK/base" "$WORK/traced"
LOOM_CKPT_TRACE=1 job "$WORK/trace.log" --out "$WORK/traced" --resume "$WORK/traced" --steps 6
[ "$rc" = 0 ] || fatal "traced resume (rc $rc): $(why "$WORK/trace.log")"
losses "$WORK/traced/metrics.jsonl" >"$WORK/traced.losses" || fatal "traced metrics unreadable"
cmp -s "$WORK/ref.losses" "$WORK/traced.losses" \
  || fatal "2 steps + resume to 6 differs from the reference: $(diff "$WORK/ref.losses" "$WORK/traced.losses")"
# Steps of one save: the highest step number a rank printed (both saves count the same).
steps_of() { grep -oE "^ckpt step [0-9]+ \(rank $1\)" "$WORK/trace.log" | awk '{print $3}' | sort -n | tail -1; }
n0=$(steps_of 0) n1=$(steps_of 1)
switch=$(grep -E '^ckpt step [0-9]+ \(rank 0\): rename .*/latest\.tmp -> .*/latest$' "$WORK/trace.log" \
  | head -1 | awk '{print $3}')
[ -n "$n0" ] && [ -n "$n1" ] && [ -n "$switch" ] || fatal "trace: no protocol steps or no switch found"
[ "$n0" -ge 20 ] && [ "$n1" -ge 5 ] && [ "$switch" -lt "$n0" ] \
  || fatal "trace: rank 0 $n0 steps, rank 1 $n1, switch at $switch"
echo "one save: rank 0 has $n0 protocol steps (the switch is step $switch), rank 1 has $n1"

# 3. Every kill.
check_kill() {
  local r=$1 k=$2 run=$WORK/run-$1-$2
  local what expect latest got
  what=$(grep -E "^ckpt step $k \(rank $r\): " "$WORK/trace.log" | head -1 | sed -E 's/^[^:]*: //')
  what=${what//$WORK\/traced/RUN}
  expect=2
  [ "$r" = 0 ] && [ "$k" -gt "$switch" ] && expect=4
  local name="rank $r step $k/$([ "$r" = 0 ] && echo "$n0" || echo "$n1") ($what)"
  bad() { echo "FAIL $name: $*"; fails=$((fails + 1)); }
  cp -a "$WORK/base" "$run"
  LOOM_CKPT_TRACE=1 LOOM_CKPT_KILL_AT=$r:$k job "$run.kill.log" --out "$run" --resume "$run" --steps 6
  if [ "$took" -ge "$JOB_TIMEOUT" ]; then bad "the killed job hung (ended by timeout after ${took}s)"; return; fi
  if [ "$rc" = 0 ]; then bad "the job was not killed (exit 0)"; return; fi
  local kill_rc=$rc
  # The kill came just before step K: rank R's last traced step of its first save is K.
  got=$(grep -oE "^ckpt step [0-9]+ \(rank $r\)" "$run.kill.log" | awk '{print $3}' | tail -1)
  if [ "$got" != "$k" ]; then bad "rank $r stopped after step '${got}', not $k (rc $rc): $(why "$run.kill.log")"; return; fi
  latest=$(tail -1 "$run/ckpt/latest" 2>/dev/null)
  if [ "$latest" != "step-0000000$expect" ]; then bad "after the kill latest names '$latest', expected step-0000000$expect"; return; fi
  job "$run.resume.log" --out "$run" --resume "$run" --steps 6
  if [ "$rc" != 0 ]; then bad "resume failed (rc $rc, ${took}s): $(why "$run.resume.log")"; return; fi
  got=$(grep -oE "resumed from .* at step [0-9]+" "$run.resume.log" | awk '{print $NF}')
  if [ "$got" != "$expect" ]; then bad "resumed from step '${got}', expected $expect"; return; fi
  if ! losses "$run/metrics.jsonl" >"$run.losses"; then bad "metrics.jsonl unreadable"; return; fi
  if ! cmp -s "$WORK/ref.losses" "$run.losses"; then
    bad "losses differ from the reference (step loss, < reference > resumed): $(diff "$WORK/ref.losses" "$run.losses" | tr '\n' ' ')"; return
  fi
  # What is left: RUN holds the lock, metrics, plot and ckpt/; ckpt/ holds `latest` and exactly
  # the committed step directories it lists (the newest step 6), each complete.
  local extra listed present
  extra="$(ls -A "$run" | grep -vxE '\.loom\.lock|metrics\.jsonl|loss\.svg|ckpt')"
  extra+=" $(ls -A "$run/ckpt" | grep -vxE 'latest|step-[0-9]{8}(\.[0-9]+)?' | sed 's|^|ckpt/|')"
  extra=$(echo $extra)
  if [ -n "$extra" ]; then bad "left behind: $(echo $extra)"; return; fi
  listed=$(sort "$run/ckpt/latest" | tr '\n' ' ')
  present=$(ls "$run/ckpt" | grep -xE 'step-[0-9]{8}(\.[0-9]+)?' | sort | tr '\n' ' ')
  if [ "$listed" != "$present" ] || [ "$(tail -1 "$run/ckpt/latest")" != step-00000006 ]; then
    bad "ckpt/latest lists '$listed', the directory holds '$present'"; return
  fi
  for d in $present; do
    [ -f "$run/ckpt/$d/checksums.json" ] || { bad "$d has no checksums.json"; return; }
  done
  echo "PASS $name: killed (rc $kill_rc), resumed from step $expect, steps $((expect + 1))-6 bit-exact"
  passes=$((passes + 1))
  rm -rf "$run" "$run".*
}

t_start=$SECONDS
only=" ${KILL_TEST_ONLY:-} "
for r in 0 1; do
  n=$n0; [ "$r" = 1 ] && n=$n1
  for k in $(seq 1 "$n"); do
    [ -z "${KILL_TEST_ONLY:-}" ] || [[ "$only" == *" $r:$k "* ]] || continue
    check_kill "$r" "$k"
  done
done
total=$((n0 + n1))
echo "kills: $total ($n0 on rank 0, $n1 on rank 1); passed $passes, failed $fails; $((SECONDS - t_start))s"
[ "$fails" = 0 ] && [ "$passes" = "$total" ] || exit 1
echo "PASS"
