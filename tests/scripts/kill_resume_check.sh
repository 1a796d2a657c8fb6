#!/usr/bin/env bash
# A trainer killed at random points resumes to the same parameters, bit for bit. Runs train_moe_gpt
# once straight to ITERS (saving every iteration), then ROUNDS times: start with --save/--load into a
# fresh directory, kill it (SIGKILL after a random delay: mid-step or mid-save; or, once per round, a
# crash right after a random checkpoint phase through MOE_CKPT_FAIL_AT), restart with --load, and so
# on until a run reaches ITERS; the final checkpoint's shard (every parameter and optimizer state)
# must equal the straight run's byte for byte. The kill points come from bash's RANDOM seeded with
# SEED (the delays are fixed; where they land depends on the machine's speed).
#
#   kill_resume_check.sh TRAIN_MOE_GPT WORKDIR ITERS ROUNDS SEED <trainer flags...>
set -uo pipefail
exe=$1 dir=$2 iters=$3 rounds=$4 seed=$5
shift 5
rm -rf "$dir" && mkdir -p "$dir"
fail() { echo "kill_resume_check: $*" >&2; exit 1; }
RANDOM=$seed
common=(--train-iters "$iters" --save-interval 1 --log-interval 1)
final() { printf '%s/iter_%07d/shard_r00000.safetensors' "$1" "$iters"; }

t0=$(date +%s%N)
"$exe" "$@" "${common[@]}" --save "$dir/straight" > "$dir/straight.log" 2>&1 ||
  fail "the straight run failed: $(tail -5 "$dir/straight.log")"
# The straight run's length sets the range of kill delays.
span_ms=$(( ($(date +%s%N) - t0) / 1000000 ))
[ -f "$(final "$dir/straight")" ] || fail "the straight run wrote no $(final "$dir/straight")"
phases=(start shards index publish tracker done)

total_kills=0 total_loads=0 total_mid=0
for ((round = 1; round <= rounds; ++round)); do
  ck=$dir/round$round
  log=$dir/round$round.log
  : > "$log"
  crash_phase=${phases[RANDOM % ${#phases[@]}]} crash_run=$((RANDOM % 3))
  kills=0 loads=0 mid_save=0
  for ((run = 0; ; ++run)); do
    [ $run -lt 40 ] || fail "round $round: still not at iteration $iters after 40 restarts; log: $log"
    echo "=== round $round run $run" >> "$log"
    if [ $run -eq $crash_run ]; then
      # A crash right after one phase of a save (std::_Exit, no clean-up).
      MOE_CKPT_FAIL_AT=$crash_phase "$exe" "$@" "${common[@]}" --save "$ck" --load "$ck" >> "$log" 2>&1
      rc=$?
      echo "=== crashed after save phase '$crash_phase': status $rc" >> "$log"
      [ $rc -ne 0 ] && kills=$((kills + 1))
      continue
    fi
    "$exe" "$@" "${common[@]}" --save "$ck" --load "$ck" >> "$log" 2>&1 &
    pid=$!
    if [ $run -lt $((crash_run + 6)) ]; then
      # SIGKILL after a delay in [10%, 110%) of a straight run: mid-step, mid-save or (late) never.
      delay_ms=$(( span_ms / 10 + RANDOM % span_ms ))
      sleep "$(awk -v m=$delay_ms 'BEGIN { printf "%.3f", m / 1000 }')"
      if kill -KILL $pid 2> /dev/null; then
        kills=$((kills + 1))
        { wait $pid; } 2> /dev/null  # no "Killed" job notice
        rc=$? pid=
        # A save cut short leaves its temporary directory (removed by the next save).
        if compgen -G "$ck/iter_*.tmp-*" > /dev/null; then
          mid_save=$((mid_save + 1))
          echo "=== SIGKILL after $delay_ms ms, mid-save" >> "$log"
        else
          echo "=== SIGKILL after $delay_ms ms" >> "$log"
        fi
      fi
    fi
    if [ -n "$pid" ]; then
      wait $pid
      rc=$?
    fi
    if [ $rc -eq 0 ]; then
      break
    elif [ $rc -ne 137 ]; then
      fail "round $round run $run exited with $rc (not killed); log: $log
$(tail -5 "$log")"
    fi
  done
  loads=$(grep -c "successfully loaded checkpoint" "$log")
  [ -f "$(final "$ck")" ] || fail "round $round: no $(final "$ck")"
  cmp -s "$(final "$dir/straight")" "$(final "$ck")" ||
    fail "round $round: the final parameters differ from the straight run's ($kills kills, $loads resumes,"\
         "save crash after '$crash_phase'); log: $log"
  echo "kill_resume_check: round $round: $kills kills ($mid_save SIGKILLs mid-save, a crash after save phase" \
       "'$crash_phase'), $loads resumes," \
       "iteration $iters bitwise equal to the straight run"
  total_kills=$((total_kills + kills)) total_loads=$((total_loads + loads)) total_mid=$((total_mid + mid_save))
done
[ $total_kills -gt 0 ] && [ $total_loads -gt 0 ] ||
  fail "$total_kills kills and $total_loads resumes: the kill delays never interrupted a run that had saved"
echo "kill_resume_check: $rounds rounds, $total_kills kills ($total_mid SIGKILLs mid-save), $total_loads resumes: every resumed run equals the straight run bit for bit"
