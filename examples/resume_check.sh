#!/usr/bin/env bash
# The trainer resumes exactly: N iterations straight, and the same N saved at N/2 then resumed with
# --load, must print the same lm loss at iteration N (bit for bit: the same layout, the same data
# order from the consumed-samples counter, the same optimizer state).
#
#   examples/resume_check.sh TRAIN_MOE_GPT WORKDIR ITERS <trainer flags...>
set -euo pipefail
exe=$1 dir=$2 iters=$3
shift 3
rm -rf "$dir" && mkdir -p "$dir"
last_loss() { grep -o "iteration *$iters/ *$iters |.*lm loss: [0-9.E+-]*" "$1" | sed 's/.*lm loss: //'; }
"$exe" "$@" --train-iters "$iters" --log-interval $((iters / 2)) > "$dir/straight.log"
"$exe" "$@" --train-iters "$iters" --log-interval $((iters / 2)) --save "$dir/ckpt" --save-interval $((iters / 2)) > "$dir/first.log"
echo $((iters / 2)) > "$dir/ckpt/latest_checkpointed_iteration.txt"   # resume from the middle
"$exe" "$@" --train-iters "$iters" --log-interval $((iters / 2)) --load "$dir/ckpt" > "$dir/resumed.log"
a=$(last_loss "$dir/straight.log") b=$(last_loss "$dir/resumed.log")
grep -q "successfully loaded checkpoint" "$dir/resumed.log" || { echo "resume_check: the resumed run did not load" >&2; exit 1; }
if [ -z "$a" ] || [ "$a" != "$b" ]; then
  echo "resume_check: lm loss at iteration $iters: straight '$a', resumed '$b'" >&2
  exit 1
fi
echo "resume_check: lm loss at iteration $iters is $a both straight and resumed from iteration $((iters / 2))"
