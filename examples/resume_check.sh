#!/usr/bin/env bash
# The trainer resumes exactly: N iterations straight in one process, and the same N saved at N/2
# then resumed with --load, must print the same lm loss and grad norm at iteration N. The saving and
# the resuming run may use other layouts (any layout loads any checkpoint), through the environment:
#   SAVE_NP / SAVE_LAYOUT, LOAD_NP / LOAD_LAYOUT   ranks and layout flags (default: one process)
#   MPIEXEC                                        the launcher for NP > 1
#
#   examples/resume_check.sh TRAIN_MOE_GPT WORKDIR ITERS <trainer flags...>
set -euo pipefail
exe=$1 dir=$2 iters=$3
shift 3
rm -rf "$dir" && mkdir -p "$dir"
at_end() { grep -oE "iteration +$iters/ +$iters \|.*lm loss: [0-9.E+-]+|iteration +$iters/.*grad norm: [0-9.]+" "$1" \
             | sed -E 's/.*(lm loss: [0-9.E+-]+).*(grad norm: [0-9.]+).*/\1 \2/'; }
launch() {  # NP LAYOUT args...
  local np=$1 layout=$2
  shift 2
  if [ "$np" -gt 1 ]; then
    # shellcheck disable=SC2086
    "${MPIEXEC:-mpiexec}" -n "$np" --oversubscribe --allow-run-as-root --bind-to none "$exe" "$@" $layout
  else
    # shellcheck disable=SC2086
    "$exe" "$@" $layout
  fi
}
common=(--train-iters "$iters" --log-interval $((iters / 2)))
launch 1 "" "$@" "${common[@]}" > "$dir/straight.log"
launch "${SAVE_NP:-1}" "${SAVE_LAYOUT:-}" "$@" "${common[@]}" --save "$dir/ckpt" --save-interval $((iters / 2)) > "$dir/first.log"
echo $((iters / 2)) > "$dir/ckpt/latest_checkpointed_iteration.txt"   # resume from the middle
launch "${LOAD_NP:-1}" "${LOAD_LAYOUT:-}" "$@" "${common[@]}" --load "$dir/ckpt" > "$dir/resumed.log"
a=$(at_end "$dir/straight.log") b=$(at_end "$dir/resumed.log")
grep -q "successfully loaded checkpoint" "$dir/resumed.log" || { echo "resume_check: the resumed run did not load" >&2; exit 1; }
if [ -z "$a" ] || [ "$a" != "$b" ]; then
  echo "resume_check: at iteration $iters: straight '$a', resumed '$b'" >&2
  exit 1
fi
echo "resume_check: at iteration $iters '$a' both straight (one process) and saved with" \
     "'${SAVE_LAYOUT:-one process}', resumed with '${LOAD_LAYOUT:-one process}' from iteration $((iters / 2))"
