#!/usr/bin/env bash
# The README's first command: install the dependencies, build, prepare the default corpus (Debian's
# fortunes as a Megatron indexed dataset, scripts/prepare_corpus.sh) and pretrain a small MoE GPT on it
# with a Megatron command line (examples/train_moe_gpt): Megatron's log lines, validation loss and
# perplexity, samples from the trained model, and plots (out/plots/loss.png, expert_load.png) from
# the metrics file (out/metrics.jsonl). The run fails unless the final validation loss is below the
# corpus's byte-unigram entropy (what a model that ignores context reaches).
#
#   scripts/run_main.sh                       # one process
#   NP=4 scripts/run_main.sh                  # 4 ranks under mpirun, experts folded over them (EP 4)
#   scripts/run_main.sh --train-iters 100     # extra Megatron flags replace the defaults below
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${BUILD_DIR:-build}
NP=${NP:-1}
scripts/setup.sh --with-plots
TARGETS="train_moe_gpt preprocess_data" scripts/build.sh > /dev/null
corpus=$(scripts/prepare_corpus.sh data/fortunes "$BUILD_DIR/tools/preprocess_data")
echo "$corpus"
entropy=$(echo "$corpus" | sed -n 's/.*= \([0-9.]*\) nats per token.*/\1/p')

# A Megatron pretrain_gpt.py command line, shrunk to a 2-core machine: 4 layers, 8 experts top-2
# (swiglu), grouped-query attention with RoPE and RMSNorm, byte-level vocabulary.
defaults=(
  --num-layers 4 --hidden-size 128 --num-attention-heads 4 --group-query-attention --num-query-groups 2
  --seq-length 128 --max-position-embeddings 128 --ffn-hidden-size 256
  --num-experts 8 --moe-router-topk 2 --moe-ffn-hidden-size 256 --moe-router-load-balancing-type aux_loss
  --moe-aux-loss-coeff 1e-2 --moe-token-dispatcher-type alltoall
  --swiglu --normalization RMSNorm --position-embedding-type rope --disable-bias-linear
  --attention-dropout 0 --hidden-dropout 0
  --micro-batch-size 4 --global-batch-size 16 --train-iters 400
  --lr 3e-3 --min-lr 3e-4 --lr-decay-style cosine --lr-warmup-iters 40 --weight-decay 0.01 --clip-grad 1.0
  --data-path data/fortunes_text_document --split 98,2,0
  --eval-interval 100 --eval-iters 4 --log-interval 50
  --metrics-file out/metrics.jsonl --plots-dir out/plots
  --sample-prompts $'Q: What is the meaning of life?\nA:' "There is no such thing as"
  --temperature 0.7 --top-k 10
)
if [ "$NP" -gt 1 ]; then defaults+=(--expert-model-parallel-size "$NP"); fi
[ -n "$entropy" ] && defaults+=(--expect-val-loss-below "$entropy")

# Keep the defaults a user flag does not name again (a flag's values run until the next --flag).
args=()
i=0
while [ $i -lt ${#defaults[@]} ]; do
  flag=${defaults[$i]}
  j=$((i + 1))
  while [ $j -lt ${#defaults[@]} ] && [[ ${defaults[$j]} != --* ]]; do j=$((j + 1)); done
  given=0
  for a in "$@"; do [ "$a" = "$flag" ] && given=1; done
  [ $given -eq 0 ] && args+=("${defaults[@]:$i:$((j - i))}")
  i=$j
done

if [ "$NP" -gt 1 ]; then
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
  exec mpirun -np "$NP" --oversubscribe --bind-to none "$BUILD_DIR/examples/train_moe_gpt" "${args[@]}" "$@"
fi
exec "$BUILD_DIR/examples/train_moe_gpt" "${args[@]}" "$@"
