#!/usr/bin/env bash
# The trainer computes the same thing in any layout: a few iterations in one process and the same
# iterations under mpirun with the given layout flags must print the same lm loss and grad norm at
# every iteration and the same validation loss (to the printed digits).
#
#   examples/layout_check.sh TRAIN_MOE_GPT MPIEXEC NP "LAYOUT FLAGS" <trainer flags...>
set -euo pipefail
exe=$1 mpiexec=$2 np=$3 layout=$4
shift 4
summary() { grep -oE "iteration +[0-9]+/ +[0-9]+ .*lm loss: [0-9.E+-]+|grad norm: [0-9.]+|lm loss value: [0-9.E+-]+" \
              | sed -E 's/ \| consumed.*(lm loss: )/ \1/'; }
one=$("$exe" "$@" | summary)
# shellcheck disable=SC2086
many=$("$mpiexec" -n "$np" --oversubscribe --allow-run-as-root --bind-to none "$exe" "$@" $layout | summary)
if [ -z "$one" ] || [ "$one" != "$many" ]; then
  echo "layout_check: one process and '$layout' on $np ranks differ:" >&2
  diff <(echo "$one") <(echo "$many") >&2 || true
  exit 1
fi
echo "layout_check: '$layout' on $np ranks prints what one process prints:"
echo "$one"
