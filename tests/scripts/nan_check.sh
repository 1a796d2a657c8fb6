#!/usr/bin/env bash
# The trainer stops at a non-finite loss or gradient (docs/reliability.md). A learning rate of 1e300
# turns the f32 parameters into Inf at the first step, so iteration 2's loss is NaN:
#   1. by default (Megatron's --check-for-nan-in-loss-and-grad): exit non-zero with Megatron's words,
#      "Rank 0: found NaN in local forward loss calculation", at iteration 2;
#   2. with MOE_SANITIZE=1: exit non-zero at the op where the Inf was born (the optimizer's update);
#   3. with --no-check-for-nan-in-loss-and-grad: the run goes on, skipping the steps, and the log
#      line counts them as nan iterations.
#
#   nan_check.sh TRAIN_MOE_GPT WORKDIR <trainer flags...>
set -uo pipefail
exe=$1 dir=$2
shift 2
rm -rf "$dir" && mkdir -p "$dir"
fail() { echo "nan_check: $*" >&2; exit 1; }
flags=("$@" --lr 1e300 --train-iters 3 --log-interval 1)

"$exe" "${flags[@]}" > "$dir/check.log" 2>&1 && fail "the run with a NaN loss exited 0; log:
$(tail -5 "$dir/check.log")"
want="moecore non-finite value: Rank 0: found NaN in local forward loss calculation at iteration 2"
grep -qF "$want" "$dir/check.log" || fail "missing '$want'; log:
$(tail -5 "$dir/check.log")"
echo "nan_check: default: $(grep -F "$want" "$dir/check.log")"

MOE_SANITIZE=1 "$exe" "${flags[@]}" > "$dir/sanitize.log" 2>&1 && fail "the MOE_SANITIZE run exited 0"
want="moecore non-finite value: MOE_SANITIZE: the output 'param'"
grep -F "$want" "$dir/sanitize.log" | grep -F "of op adam" | grep -qF "every input finite: the NaN/Inf was born in this op" ||
  fail "MOE_SANITIZE did not stop at the optimizer's update; log:
$(tail -5 "$dir/sanitize.log")"
echo "nan_check: MOE_SANITIZE=1: $(grep -F "$want" "$dir/sanitize.log")"

"$exe" "${flags[@]}" --no-check-for-nan-in-loss-and-grad > "$dir/nocheck.log" 2>&1 ||
  fail "the run with --no-check-for-nan-in-loss-and-grad failed; log:
$(tail -5 "$dir/nocheck.log")"
grep -qE "iteration +3/ +3 \|.*number of nan iterations: +2 \|" "$dir/nocheck.log" ||
  fail "--no-check-for-nan-in-loss-and-grad: iteration 3 does not count 2 nan iterations; log:
$(tail -3 "$dir/nocheck.log")"
echo "nan_check: --no-check-for-nan-in-loss-and-grad: the run finished, 2 nan iterations skipped"
