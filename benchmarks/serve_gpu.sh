#!/usr/bin/env bash
# On the device (issue: server on the GPU): random 1024/128 prompts on the Llama-3.1-8B shape (dummy weights).
# MODEL (default: the llama-3.1-8b preset) may be a directory with an 8B config.json whose vocab matches a tokenizer
# saved beside it, so that every generated id detokenizes to text (the preset has no tokenizer of its own).
#   1. kvflight serve, 16 req/s Poisson for NUM requests: TTFT / TPOT percentiles (vLLM 0.26.0 here: TTFT p99
#      111 ms, TPOT p99 15.3 ms);
#   2. the same server at saturation (rate inf), then the in-process engine on the same requests: throughput ratio.
#   benchmarks/serve_gpu.sh [NUM_AT_16] [NUM_SATURATED]
# RESULT=FILE keeps the 16 req/s run's per-request records; with KVFLIGHT_REQUEST_TRACE=TRACE set for the server,
# `python benchmarks/ttft_split.py TRACE FILE` splits each request's TTFT into client and server stages.
set -u
N16=${1:-640}
NSAT=${2:-500}
PORT=${PORT:-8011}
MODEL=${MODEL:-llama-3.1-8b}
VOCAB=${VOCAB:-128256}
FLAGS="--load-format dummy --max-seq-len 4096 ${EXTRA:-}"  # EXTRA: more engine flags
DATA="--vocab-size $VOCAB --input-mean 1024 --input-stdev 0 --output-mean 128 --output-stdev 0 --ignore-eos"
# dummy weights may settle on a special token: keep special tokens in the text so such a request still streams
# (skipped, its 128 tokens would arrive as empty deltas and the client would count it as an "empty output" failure)
SHOW_SPECIAL='{"skip_special_tokens": false}'
cli() { python3 -m kvflight.server.cli "$@"; }
python3 -m kvflight.server.cli serve $MODEL $FLAGS --port $PORT > /tmp/serve.log 2>&1 &  # not via cli(): $! must be python
SERVER=$!
python3 - "$PORT" "$SERVER" <<'PY' || { echo "the server did not start:"; tail -5 /tmp/serve.log; exit 1; }
import os, sys, time, urllib.request
for _ in range(600):
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/health", timeout=2); break
    except Exception:
        if not os.path.exists(f"/proc/{sys.argv[2]}"):
            sys.exit(1)  # the server exited
        time.sleep(0.5)
PY
echo "== kvflight serve, 16 req/s, $N16 x 1024/128 =="
cli bench serve --backend openai-completions --base-url http://127.0.0.1:$PORT $DATA --num-requests $N16 \
  --request-rate 16 --disable-progress --warm-up 8 --seed 1 --extra-body "$SHOW_SPECIAL" \
  ${RESULT:+--result-json $RESULT --save-detailed}
[ "$NSAT" = 0 ] && { kill -TERM $SERVER; wait $SERVER; exit 0; }
echo "== kvflight serve, saturated, $NSAT x 1024/128 =="
cli bench serve --backend openai-completions --base-url http://127.0.0.1:$PORT $DATA --num-requests $NSAT \
  --request-rate inf --disable-progress --warm-up 8 --seed 2 --extra-body "$SHOW_SPECIAL"
kill -TERM $SERVER; wait $SERVER; echo "server exit $?"
echo "== in-process engine, saturated, $NSAT x 1024/128 =="
cli bench serve --backend engine --model $MODEL $FLAGS $DATA --num-requests $NSAT --request-rate inf \
  --disable-progress --warm-up 8 --seed 2
