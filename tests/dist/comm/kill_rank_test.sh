#!/usr/bin/env bash
# kill_rank_test.sh MPIRUN_LOCAL HELPER: run HELPER on 4 ranks; one rank SIGKILLs itself during
# an all_reduce. Pass when the job exits non-zero within LOOM_COMM_TIMEOUT + 30 s and its output
# names the failure (Open MPI's "exited on signal 9", or loom's TimeoutError text).
# With a third argument "timeout" it requires the TimeoutError path: the caller then runs with
# OMPI_MCA_orte_abort_on_non_zero_status=0 so Open MPI does not tear the job down itself, and the
# survivors must notice the dead rank through loom's wait deadline alone.
set -uo pipefail
mpirun_local=$1 helper=$2 expect=${3:-any}
export LOOM_COMM_TIMEOUT=${LOOM_COMM_TIMEOUT:-20}
limit=$((LOOM_COMM_TIMEOUT + 30))
log=$(mktemp)
start=$(date +%s)
timeout -k 5 "$limit" "$mpirun_local" 4 "$helper" >"$log" 2>&1
rc=$?
elapsed=$(( $(date +%s) - start ))
cat "$log"
echo "kill_rank_test: exit code $rc after ${elapsed}s (limit ${limit}s)"
if [ "$rc" -eq 0 ]; then echo "FAIL: the job exited 0 although a rank died"; exit 1; fi
# timeout(1) exits 124 when its watchdog fired (mpirun itself reports a SIGKILLed rank as 137).
if [ "$rc" -eq 124 ] || [ "$elapsed" -ge "$limit" ]; then
  echo "FAIL: the job hung until the ${limit}s watchdog"; exit 1
fi
if [ "$expect" = timeout ]; then
  if grep -q "timed out after" "$log" && grep -q "seq" "$log"; then
    echo "PASS: survivors timed out with loom's TimeoutError (naming group, op, seq) and aborted"
  else
    echo "FAIL: expected loom's TimeoutError from the surviving ranks"; exit 1
  fi
elif grep -q "exited on signal 9" "$log"; then
  echo "PASS: Open MPI's runtime noticed the dead rank and ended the job"
elif grep -q "timed out after" "$log"; then
  echo "PASS: survivors timed out with loom's TimeoutError and aborted the job"
else
  echo "FAIL: no message names the failure"; exit 1
fi
