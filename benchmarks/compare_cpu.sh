#!/usr/bin/env bash
# compare_cpu.sh — libmoecore's MoE layer and MoE GPT model against the PyTorch peers on the CPU, in
# one run.
#
#   benchmarks/compare_cpu.sh [--threads 2] [--repeats 5] [--iters 3] [--warmup 1]
#                             [--configs "mixtral-cpu deepseek-cpu small gpt-mixtral-cpu gpt-deepseek-cpu"]
#                             [--build-dir DIR] [--peer-omp-wait passive|default] [--max-load 1.0]
#                             [--nice 0] [--precisions "fp32 bf16"] [--engines "auto"]
#
# Builds moe_layer_bench and moe_gpt_bench in Release (CPU only) into --build-dir (default
# build-bench), then for each repeat and each config runs ours and the peer one after the other,
# with the same Megatron-named flags and thread count, so both see the same machine conditions:
# the layer configs (mixtral-cpu, deepseek-cpu, small) run moe_layer_bench against
# benchmarks/peers/torch_moe_layer.py, the model configs (gpt-*: the whole MoE GPT model, embedding
# to loss) moe_gpt_bench against benchmarks/peers/torch_moe_gpt.py, peers on /usr/bin/python3. Each run times --iters forward+backward steps after
# --warmup steps (median step); the table takes the median over the repeats. Our binary also
# measures the dense-SGEMM reference (OpenBLAS on its own threads, at the shape M = T·k, N = F1 + F,
# K = H) in every run. The per-run outputs are kept in the build dir (compare_cpu/).
#
# --precisions: each config in fp32 and/or bf16 (ours with --bf16: parameters, activations and GEMMs
# in bf16 with f32 accumulation; the peer with --bf16: its forward under
# torch.autocast("cpu", dtype=torch.bfloat16), the mixed precision a PyTorch user gets on the CPU).
# --engines: our CPU GEMM engine: auto (what the library picks on this CPU, as a user runs it) and/or
# forced ones (onednn, openblas, eigen: MOE_CPU_GEMM); the peer runs once per config and precision.
# Each of our runs also measures the machine's best dense GEMM rate in its precision at the layer's
# reference shape (fp32: the faster of OpenBLAS's SGEMM and oneDNN's f32 matmul, bf16: oneDNN's bf16
# matmul, each on its own threads): benchmarks/bench_common.h, best_gemm_gflops.
#
# The machine may be shared: after the build the script waits (up to 5 minutes) for the 1-minute
# load average to fall below --max-load, and prints the load before each repeat and at the end.
# --nice N runs both sides (ours and the peer alike) at priority N for the measured runs; a negative
# N (root only) keeps other work on a busy shared machine from taking the measured cores — there,
# each OpenMP parallel region of either side waits for a worker the scheduler has not run yet.
# Where the kernel groups processes by session (sched_autogroup, the Linux default), plain
# `nice` only orders processes within one session, so the script sets its session's autogroup
# nice (/proc/self/autogroup) for the runs and restores it on exit; elsewhere it uses `nice -n N`.
#
# The peer runs with OMP_WAIT_POLICY=PASSIVE by default: Debian's torch runs its elementwise ops on
# OpenMP threads that spin after each op while OpenBLAS's own pthreads need the same cores for the
# GEMMs, which makes the peer up to 3.5x slower (docs/performance.md); passive is its best setting.
# --peer-omp-wait default runs it as installed. Our side runs with the environment as it is (its
# OpenMP pool is the only one it has).
#
# Columns: tokens/s of each side and their ratio; our GFLOP/s (the layer's GEMM FLOPs per second,
# counted as in benchmarks/bench_common.h; for gpt-* the model's FLOPs as Megatron-LM's
# num_floating_point_operations counts them, bench::model_flops); the SGEMM reference (for gpt-*
# the same SGEMM at the shape of the model's MoE layers) and our efficiency (= ours ÷ SGEMM); the
# peer's efficiency likewise; peak memory: the growth of the resident set's high-water mark
# over the run (VmHWM after a reset, both sides, same method) and our allocator's peak above what was
# held before the first step.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
THREADS=2
REPEATS=5
ITERS=3
WARMUP=1
CONFIGS="mixtral-cpu deepseek-cpu small gpt-mixtral-cpu gpt-deepseek-cpu"
PEER_WAIT=passive
MAX_LOAD=1.0
NICE=0
BUILD="$ROOT/build-bench"
PRECISIONS="fp32 bf16"
ENGINES="auto"
PYTHON=${PYTHON:-/usr/bin/python3}
while [[ $# -gt 0 ]]; do
  case "$1" in
    --threads) THREADS=$2; shift 2 ;;
    --repeats) REPEATS=$2; shift 2 ;;
    --iters) ITERS=$2; shift 2 ;;
    --warmup) WARMUP=$2; shift 2 ;;
    --configs) CONFIGS=$2; shift 2 ;;
    --build-dir) BUILD=$(realpath -m "$2"); shift 2 ;;
    --peer-omp-wait) PEER_WAIT=$2; shift 2 ;;
    --max-load) MAX_LOAD=$2; shift 2 ;;
    --nice) NICE=$2; shift 2 ;;
    --precisions) PRECISIONS=$2; shift 2 ;;
    --engines) ENGINES=$2; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/{/^set -euo/d;p}' "$0"; exit 0 ;;
    *) echo "compare_cpu.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done

flags_of() {  # the config's flags, Megatron's names, given to both sides
  local common="--swiglu --moe-aux-loss-coeff 1e-2"
  case "$1" in
    mixtral-cpu) echo "--hidden-size 1024 --moe-ffn-hidden-size 2816 --num-moe-experts 8 --moe-router-topk 2 --num-tokens 2048 $common" ;;
    deepseek-cpu) echo "--hidden-size 1024 --moe-ffn-hidden-size 512 --num-moe-experts 64 --moe-router-topk 6 --moe-router-score-function sigmoid --moe-router-enable-expert-bias --moe-router-num-groups 8 --moe-router-group-topk 3 --moe-shared-expert-intermediate-size 1024 --num-tokens 2048 $common" ;;
    small) echo "--hidden-size 256 --moe-ffn-hidden-size 512 --num-moe-experts 16 --moe-router-topk 2 --num-tokens 4096 $common" ;;
    # The model configs (moe_gpt_bench's presets spelled out; every key that differs between them given).
    gpt-mixtral-cpu) echo "--num-layers 2 --moe-layer-freq 1 --hidden-size 1024 --num-attention-heads 8 --group-query-attention --num-query-groups 2 --kv-channels 128 --qk-layernorm false --ffn-hidden-size 2816 --moe-ffn-hidden-size 2816 --num-moe-experts 8 --moe-router-topk 2 --moe-router-score-function softmax --vocab-size 16384 --seq-length 1024 --micro-batch-size 1 --normalization RMSNorm --position-embedding-type rope --rotary-base 1000000 --untie-embeddings-and-output-weights --disable-bias-linear $common" ;;
    gpt-deepseek-cpu) echo "--num-layers 3 --moe-layer-freq 0,1,1 --hidden-size 1024 --num-attention-heads 16 --num-query-groups 16 --kv-channels 64 --qk-layernorm --ffn-hidden-size 2816 --moe-ffn-hidden-size 512 --num-moe-experts 64 --moe-router-topk 6 --moe-router-score-function sigmoid --moe-router-enable-expert-bias --moe-router-num-groups 8 --moe-router-group-topk 3 --moe-shared-expert-intermediate-size 1024 --vocab-size 16384 --seq-length 512 --micro-batch-size 2 --normalization RMSNorm --position-embedding-type rope --rotary-base 10000 --untie-embeddings-and-output-weights --disable-bias-linear $common" ;;
    *) echo "compare_cpu.sh: unknown config $1" >&2; exit 2 ;;
  esac
}

echo "== building moe_layer_bench and moe_gpt_bench (Release, CPU) in $BUILD"
mkdir -p "$BUILD"
# A new build dir gets a benchmark-only configuration; an existing one keeps its options (so a
# developer's build dir with tests stays one), but is built in Release.
FRESH=()
[[ -f "$BUILD/CMakeCache.txt" ]] || FRESH=(-DMOE_CUDA=OFF -DMOE_BUILD_TESTS=OFF -DMOE_BUILD_EXAMPLES=OFF)
cmake -S "$ROOT" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DMOE_BUILD_BENCHMARKS=ON "${FRESH[@]}" \
  > "$BUILD/compare_configure.log" 2>&1 ||
  { cat "$BUILD/compare_configure.log"; exit 1; }
cmake --build "$BUILD" -j "$(nproc)" --target moe_layer_bench moe_gpt_bench > "$BUILD/compare_build.log" 2>&1 ||
  { tail -40 "$BUILD/compare_build.log"; exit 1; }
bench_of() { [[ $1 == gpt-* ]] && echo "$BUILD/benchmarks/moe_gpt_bench" || echo "$BUILD/benchmarks/moe_layer_bench"; }
peer_of() { [[ $1 == gpt-* ]] && echo "$ROOT/benchmarks/peers/torch_moe_gpt.py" || echo "$ROOT/benchmarks/peers/torch_moe_layer.py"; }
OUT="$BUILD/compare_cpu"
rm -rf "$OUT" && mkdir -p "$OUT"

export OMP_NUM_THREADS=$THREADS OPENBLAS_NUM_THREADS=$THREADS MOE_LOG_LEVEL=warn
PEER_ENV=()
case "$PEER_WAIT" in
  passive) PEER_ENV=(OMP_WAIT_POLICY=PASSIVE) ;;
  default) ;;
  *) echo "compare_cpu.sh: --peer-omp-wait must be passive or default, got $PEER_WAIT" >&2; exit 2 ;;
esac
PEER_OK=1
"$PYTHON" -c "import torch" 2>/dev/null || { PEER_OK=0; echo "== no torch for $PYTHON: the peer columns stay empty"; }

load1() { cut -d' ' -f1 /proc/loadavg; }
NICE_CMD=(nice -n 0)
NICE_HOW="none"
if [[ $NICE != 0 ]]; then
  if [[ $(cat /proc/sys/kernel/sched_autogroup_enabled 2>/dev/null) == 1 && -w /proc/self/autogroup ]]; then
    AUTOGROUP_OLD=$(awk '{print $NF}' /proc/self/autogroup)
    trap 'echo "$AUTOGROUP_OLD" > /proc/self/autogroup 2>/dev/null || true' EXIT
    echo "$NICE" > /proc/self/autogroup || { echo "compare_cpu.sh: cannot set the autogroup nice to $NICE" >&2; exit 1; }
    NICE_HOW="autogroup nice $NICE ($(cat /proc/self/autogroup))"
  else
    NICE_CMD=(nice -n "$NICE")
    NICE_HOW="nice -n $NICE"
  fi
fi
for ((i = 0; i < 60; i++)); do
  awk -v l="$(load1)" -v m="$MAX_LOAD" 'BEGIN { exit !(l < m) }' && break
  [[ $i == 0 ]] && echo "== waiting for the 1-minute load ($(load1)) to fall below $MAX_LOAD"
  sleep 5
done

{
  echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo "machine: $(lscpu | sed -n 's/^Model name: *//p' | head -1), $(getconf _NPROCESSORS_ONLN) cores, $(free -g | awk '/Mem:/{print $2}') GiB; $(uname -r)"
  echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "threads $THREADS, repeats $REPEATS, $ITERS steps after $WARMUP warm-up per run; priority: $NICE_HOW (both sides)"
  if [[ $PEER_OK == 1 ]]; then
    "$PYTHON" -c "import torch; print('peer: torch', torch.__version__)"
    echo "peer BLAS: libblas.so.3 -> $(readlink -f /usr/lib/x86_64-linux-gnu/libblas.so.3 2>/dev/null || echo '?'); peer env: ${PEER_ENV[*]:-(as is)}"
  fi
} | tee "$OUT/header.txt"

for prec in $PRECISIONS; do
  [[ $prec == fp32 || $prec == bf16 ]] || { echo "compare_cpu.sh: --precisions takes fp32 and bf16, got $prec" >&2; exit 2; }
done
for eng in $ENGINES; do
  case "$eng" in auto|onednn|openblas|eigen) ;; *) echo "compare_cpu.sh: --engines takes auto, onednn, openblas, eigen; got $eng" >&2; exit 2 ;; esac
done
# Our GEMM engine and kernels on this machine, as the library reports them (build_info).
"$(bench_of "${CONFIGS%% *}")" --smoke --threads "$THREADS" 2>/dev/null | grep -m1 'gemm:' | sed 's/^[a-z_]*  /ours: /' | tee -a "$OUT/header.txt"

for ((r = 1; r <= REPEATS; r++)); do
  echo "  [$r/$REPEATS] load $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/header.txt"
  for cfg in $CONFIGS; do
    for prec in $PRECISIONS; do
      f="$(flags_of "$cfg")"
      [[ $prec == bf16 ]] && f="$f --bf16"
      for eng in $ENGINES; do
        ENG_ENV=()
        [[ $eng != auto ]] && ENG_ENV=(MOE_CPU_GEMM="$eng")
        # shellcheck disable=SC2086
        "${NICE_CMD[@]}" env "${ENG_ENV[@]}" "$(bench_of "$cfg")" $f --iters "$ITERS" --warmup "$WARMUP" --threads "$THREADS" --sgemm-reps 3 \
          > "$OUT/ours.$cfg.$prec.$eng.$r.txt"
        echo "  [$r/$REPEATS] $cfg $prec ours ($eng): $(tail -1 "$OUT/ours.$cfg.$prec.$eng.$r.txt")"
      done
      if [[ $PEER_OK == 1 ]]; then
        # shellcheck disable=SC2086
        "${NICE_CMD[@]}" env "${PEER_ENV[@]}" "$PYTHON" "$(peer_of "$cfg")" $f --iters "$ITERS" --warmup "$WARMUP" --threads "$THREADS" \
          > "$OUT/peer.$cfg.$prec.$r.txt"
        echo "  [$r/$REPEATS] $cfg $prec peer: $(tail -1 "$OUT/peer.$cfg.$prec.$r.txt")"
      fi
    done
  done
done
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/header.txt"

"$PYTHON" - "$OUT" "$CONFIGS" "$REPEATS" "$PRECISIONS" "$ENGINES" <<'EOF'
import os, statistics, sys
out, configs, repeats = sys.argv[1], sys.argv[2].split(), int(sys.argv[3])
precisions, engines = sys.argv[4].split(), sys.argv[5].split()

def parse(path):
    vals = {}
    if not os.path.exists(path):
        return None
    for line in open(path).read().splitlines()[-2:]:
        for kv in line.split():
            k, _, v = kv.partition("=")
            vals[k] = float(v)
    return vals

def med(runs, key):
    xs = [r[key] for r in runs if r and key in r and r[key] >= 0]
    return statistics.median(xs) if xs else float("nan")

nan = float("nan")
f = lambda fmt, x: fmt % x if x == x else "-"
rows, tps = [], {}
for cfg in configs:
    for prec in precisions:
        peer = [parse(f"{out}/peer.{cfg}.{prec}.{r}.txt") for r in range(1, repeats + 1)]
        p_tps, p_gf = med(peer, "tokens_per_s"), med(peer, "gflops")
        tps[(cfg, prec, "peer")] = p_tps
        for eng in engines:
            ours = [parse(f"{out}/ours.{cfg}.{prec}.{eng}.{r}.txt") for r in range(1, repeats + 1)]
            o_tps, o_gf, sg = med(ours, "tokens_per_s"), med(ours, "gflops"), med(ours, "sgemm_gflops")
            tps[(cfg, prec, eng)] = o_tps
            rows.append([cfg, prec, eng, f("%.0f", o_tps), f("%.0f", p_tps), f("%.2f", o_tps / p_tps),
                         f("%.1f", o_gf), f("%.1f", sg), f("%.3f", o_gf / sg), f("%.3f", p_gf / sg),
                         f("%.0f", med(ours, "rss_peak_bytes") / 2**20), f("%.0f", med(ours, "peak_bytes") / 2**20),
                         f("%.0f", med(peer, "peak_bytes") / 2**20)])

def table(head, rows):
    w = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    line = lambda cells: "| " + " | ".join(c.rjust(w[i]) if i > 2 else c.ljust(w[i]) for i, c in enumerate(cells)) + " |"
    print()
    print(line(head))
    print("|" + "|".join("-" * (x + 2) for x in w) + "|")
    for r in rows:
        print(line(r))

table(["config", "precision", "engine", "ours tok/s", "peer tok/s", "ours/peer", "ours GFLOP/s", "best GEMM GFLOP/s",
       "ours eff", "peer eff", "ours RSS MiB", "ours alloc MiB", "peer RSS MiB"], rows)
if "fp32" in precisions and "bf16" in precisions:
    speed = []
    for cfg in configs:
        for eng in engines + ["peer"]:
            a, b = tps.get((cfg, "bf16", eng), nan), tps.get((cfg, "fp32", eng), nan)
            speed.append([cfg, eng, "", f("%.0f", b), f("%.0f", a), f("%.2f", a / b)])
    table(["config", "side", "", "fp32 tok/s", "bf16 tok/s", "bf16/fp32"], speed)
EOF
