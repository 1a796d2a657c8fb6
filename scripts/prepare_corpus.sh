#!/usr/bin/env bash
# Prepares the default training corpus: the English fortune cookies of Debian's `fortunes` package
# (/usr/share/games/fortunes, %-separated; scripts/setup.sh installs it), tokenized with the byte
# tokenizer into a Megatron indexed dataset:
#
#   scripts/prepare_corpus.sh [PREFIX] [PREPROCESS_DATA]
#     PREFIX           output prefix (default data/fortunes); writes PREFIX_text_document.{bin,idx},
#                      the trainer's --data-path PREFIX_text_document
#     PREPROCESS_DATA  the built tool (default: build/tools/preprocess_data, else build-*/tools/...)
#
# Idempotent: when the dataset exists and is newer than every fortune file it is not rebuilt.
# Prints the token count and the byte-unigram entropy H = −Σ p log p of the tokens (bits and nats;
# eod included as a symbol): a model that learned only the token frequencies reaches a loss of H
# nats per token, so a validation loss below it means the model uses context.
set -euo pipefail

PREFIX="${1:-data/fortunes}"
TOOL="${2:-}"
FORTUNES_DIR="${FORTUNES_DIR:-/usr/share/games/fortunes}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

if [ ! -d "$FORTUNES_DIR" ]; then
  echo "prepare_corpus: $FORTUNES_DIR not found: install Debian's fortunes package (scripts/setup.sh)" >&2
  exit 1
fi
if [ -z "$TOOL" ]; then
  for cand in "$ROOT/build/tools/preprocess_data" "$ROOT"/build-*/tools/preprocess_data; do
    if [ -x "$cand" ]; then TOOL="$cand"; break; fi
  done
fi
if [ -z "$TOOL" ] || [ ! -x "$TOOL" ]; then
  echo "prepare_corpus: preprocess_data not found (build it: cmake --build build --target preprocess_data," \
       "or pass its path as the second argument)" >&2
  exit 1
fi

# The fortune text files: skip the strfile indexes (.dat) and the .u8 symlinks to the same files.
inputs=()
while IFS= read -r f; do inputs+=("$f"); done < <(
  find "$FORTUNES_DIR" -maxdepth 1 \( -type f -o -type l \) ! -name '*.dat' ! -name '*.u8' | LC_ALL=C sort)
if [ ${#inputs[@]} -eq 0 ]; then
  echo "prepare_corpus: no fortune files in $FORTUNES_DIR" >&2
  exit 1
fi

OUT="${PREFIX}_text_document"
mkdir -p "$(dirname "$PREFIX")"
stale=0
if [ ! -f "$OUT.bin" ] || [ ! -f "$OUT.idx" ]; then
  stale=1
else
  for f in "${inputs[@]}"; do
    if [ "$f" -nt "$OUT.idx" ]; then stale=1; break; fi
  done
fi
if [ "$stale" -eq 1 ]; then
  args=()
  for f in "${inputs[@]}"; do args+=(--input "$f"); done
  # --shuffle-seed: the fortune files are written in a seeded random document order, so every part of
  # a --split holds fortunes of every file (the files are alphabetical: without it the last 2% would
  # be Zippy the Pinhead alone).
  "$TOOL" "${args[@]}" --format fortune --append-eod --shuffle-seed 1234 --output-prefix "$PREFIX"
else
  echo "prepare_corpus: $OUT.{bin,idx} is up to date (${#inputs[@]} fortune files)"
fi

# Token count and unigram entropy, read straight from the files (coreutils od + awk, no Python):
# the dtype code is byte 17 of the .idx, len(document_indices) the u64 at byte 26.
code=$(od -An -tu1 -j17 -N1 "$OUT.idx" | tr -d ' ')
ndocs=$(( $(od -An -tu8 -j26 -N8 "$OUT.idx" | tr -d ' ') - 1 ))
case "$code" in
  1) t=u1 ;; 2) t=d1 ;; 3) t=d2 ;; 4) t=d4 ;; 5) t=d8 ;; 8) t=u2 ;;
  *) echo "prepare_corpus: $OUT.idx: token dtype code $code is not an integer type" >&2; exit 1 ;;
esac
w=${t#?}
od -An -v -t"$t" -w"$w" "$OUT.bin" | LC_ALL=C awk -v prefix="$OUT" -v docs="$ndocs" '
  { c[$1]++; n++ }
  END {
    if (n == 0) { print "prepare_corpus: " prefix ": no tokens" > "/dev/stderr"; exit 1 }
    h = 0; k = 0
    for (t in c) { p = c[t] / n; h -= p * log(p); k++ }
    printf "prepare_corpus: %s: %d documents, %d tokens, %d distinct ids\n", prefix, docs, n, k
    printf "prepare_corpus: byte-unigram entropy %.4f bits = %.4f nats per token\n", h / log(2), h
  }'
