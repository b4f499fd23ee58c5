#!/usr/bin/env bash
# On the device (issue: autotuner): `kvflight tune` on a random 1024/128 workload, Llama-3.1-8B shape (dummy
# weights), SLO ttft=500 ms, tpot=20 ms: the table of trials, best vs defaults, the Pareto plot and the best YAML
# land in $OUT (or /tmp).   benchmarks/tune_gpu.sh [NUM_REQUESTS] [BUDGET_MINUTES]
set -eu
N=${1:-256}
BUDGET=${2:-8}
DEST=${OUT:-/tmp}
cli() { python3 -m kvflight.server.cli "$@"; }
cli bench dataset fixed --vocab-size 128256 --input-len 1024 --output-len 128 --num-requests "$N" \
  --output /tmp/tune_1024_128.jsonl
cli tune llama-3.1-8b --load-format dummy --max-seq-len 4096 --no-enable-kv-cache-reuse \
  --dataset /tmp/tune_1024_128.jsonl --slo ttft=500,tpot=20 --budget-minutes "$BUDGET" \
  --output-config "$DEST/tune_best.yaml" --plot "$DEST/tune_pareto.png"
