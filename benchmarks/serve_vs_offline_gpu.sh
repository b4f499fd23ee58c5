#!/usr/bin/env bash
# On the device: the same workload through `kvflight bench serve` against `kvflight serve` and against the
# in-process engine (backend engine); prints both reports.
#   benchmarks/serve_vs_offline_gpu.sh MODEL [ENGINE FLAGS...]   e.g.  smollm2-135m --load-format dummy
set -u
DATASET=${DATASET:-.gpuassets/ds_256_64.jsonl}
PORT=${PORT:-8011}
kvflight() { python3 -m kvflight.server.cli "$@"; }
python3 -m kvflight.server.cli serve "$@" --port $PORT --no-enable-kv-cache-reuse > /tmp/serve.log 2>&1 &
SERVER=$!
python3 - "$PORT" <<'PY'
import sys, time, urllib.request
for _ in range(300):
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/health", timeout=2); break
    except Exception:
        time.sleep(1)
PY
echo "== kvflight serve (HTTP, openai-completions) =="
kvflight bench serve --backend openai-completions --base-url http://127.0.0.1:$PORT --dataset $DATASET \
  --request-rate inf --disable-progress --warm-up 4
kill -TERM $SERVER; wait $SERVER; echo "server exit $?"; tail -3 /tmp/serve.log
echo "== in-process engine =="
MODEL=$1; shift
kvflight bench serve --backend engine --model "$MODEL" "$@" --no-enable-kv-cache-reuse --dataset $DATASET --request-rate inf \
  --disable-progress --warm-up 4
