#!/usr/bin/env bash
# A rank killed (SIGKILL) inside an operation never hangs the job. Runs test_dead_peer (np 3, the
# last rank dies) twice under Open MPI's mpiexec:
#   1. with --enable-recovery, so mpiexec lets the survivors run: each survivor must exit non-zero
#      within MOE_COMM_TIMEOUT_S + a margin, its stderr naming itself, the dead rank, the group and
#      the operation (Open MPI 4.1's mpiexec itself exits 0 in this mode, whatever the ranks return,
#      so the ranks' statuses are read from the files they write just before exiting);
#   2. with mpiexec's defaults: mpiexec ends the whole job as soon as it sees the dead process, exits
#      non-zero and names the dead rank and its signal (the survivors are terminated before they can
#      report; docs/reliability.md).
#
#   dead_peer_check.sh MPIEXEC TEST_DEAD_PEER OP GROUP WORKDIR
# Needs MOE_COMM_TIMEOUT_S in the environment (CTest sets it).
set -uo pipefail
mpiexec=$1 exe=$2 op=$3 group=$4 dir=$5
np=3 dead=2
api=$op   # the Communicator method the message names
[ "$op" = send_recv ] && api=batch_send_recv
: "${MOE_COMM_TIMEOUT_S:?dead_peer_check.sh: set MOE_COMM_TIMEOUT_S (seconds)}"
rm -rf "$dir" && mkdir -p "$dir"
fail() { echo "dead_peer_check ($op): $*" >&2; exit 1; }
# The bound: the timeout, the silent-peer probe (at most 1 s) and process start/exit.
bound=$(awk -v t="$MOE_COMM_TIMEOUT_S" 'BEGIN { print t + 5 }')

run() {  # MODE-DIR extra-mpiexec-flags...
  local sub=$1
  shift
  mkdir -p "$dir/$sub"
  local t0 t1
  t0=$(date +%s.%N)
  # timeout: a hang must fail this test, never the CTest deadline.
  timeout 120 "$mpiexec" -n $np --oversubscribe --allow-run-as-root --bind-to none "$@" \
    "$exe" "$op" "$dir/$sub" > "$dir/$sub/out.log" 2>&1
  echo $? > "$dir/$sub/mpiexec.rc"
  t1=$(date +%s.%N)
  awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f\n", b - a }' > "$dir/$sub/seconds"
}

# 1. Survivors report.
run recovery --enable-recovery
log=$dir/recovery/out.log
secs=$(cat "$dir/recovery/seconds")
awk -v s="$secs" -v b="$bound" 'BEGIN { exit !(s < b) }' ||
  fail "with --enable-recovery the job took $secs s (bound: MOE_COMM_TIMEOUT_S=$MOE_COMM_TIMEOUT_S + 5 s); log:
$(cat "$log")"
for ((r = 0; r < np; ++r)); do
  [ $r -eq $dead ] && continue
  [ -f "$dir/recovery/rc.$r" ] || fail "rank $r never reported (no rc file); log:
$(cat "$log")"
  rc=$(cat "$dir/recovery/rc.$r")
  [ "$rc" = 1 ] || fail "rank $r exited with $rc (expected 1: a communication error); log:
$(cat "$log")"
  want="[r$r] moecore communication error: $api on group '$group' (rank $r of $np) timed out after"
  grep -qF "$want" "$log" || fail "rank $r's message lacks: $want; log:
$(cat "$log")"
  grep -F "[r$r] moecore communication error: $api" "$log" | grep -qE "silent [^:]*: rank $dead \(world rank $dead\)" ||
    fail "rank $r's message does not name the dead rank $dead as silent; log:
$(cat "$log")"
done
echo "dead_peer_check ($op): --enable-recovery: survivors exited 1 after $secs s (timeout $MOE_COMM_TIMEOUT_S s):"
grep -F "moecore communication error" "$log"

# 2. mpiexec's defaults: the job ends at once and mpiexec names the dead rank.
run default
log=$dir/default/out.log
secs=$(cat "$dir/default/seconds") rc=$(cat "$dir/default/mpiexec.rc")
[ "$rc" != 0 ] || fail "with mpiexec's defaults the job exited 0; log:
$(cat "$log")"
awk -v s="$secs" -v b="$bound" 'BEGIN { exit !(s < b) }' || fail "with mpiexec's defaults the job took $secs s; log:
$(cat "$log")"
grep -qE "process rank $dead .*exited on signal 9" "$log" || fail "mpiexec did not name the dead rank $dead; log:
$(cat "$log")"
echo "dead_peer_check ($op): mpiexec defaults: job ended after $secs s with status $rc: $(grep -E "exited on signal 9" "$log")"
