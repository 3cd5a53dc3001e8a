#!/usr/bin/env bash
# `make demo`: the whole system on embedded defaults, on loopback, then a clean shutdown.
set -euo pipefail
BIN=${BIN:-.venv/bin}
DATA=data/demo RUN=runs/demo STATE=$(mktemp -d) PORT=19092
pids=()
cleanup() { for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
[ -f $DATA/meta.json ] || $BIN/dynllm data prepare --dataset completejourney --out $DATA \
    --weeks 1-8 --min-user-events 5 --min-item-events 10 --max-events 50000
echo "== Kafka round trip through the local broker"
$BIN/dynllm bench kafka --events 5000 --repeats 1
[ -f $RUN/model.pt ] || $BIN/dynllm train --data $DATA --model tgn --out $RUN --epochs 1 \
    --max-val-events 5000
$BIN/dynllm broker --port $PORT & pids+=($!); sleep 1
$BIN/dynllm run --bootstrap-servers 127.0.0.1:$PORT --run $RUN --state-dir $STATE \
    --metrics-port 9100 --checkpoint-seconds 5 & pids+=($!)
echo "metrics at http://127.0.0.1:9100/metrics (pipeline)"
$BIN/dynllm produce --bootstrap-servers 127.0.0.1:$PORT --data $DATA --limit 5000 --rate 2000
sleep 8
$BIN/dynllm serve --run $RUN --state-dir $STATE --port 18080 & pids+=($!)
echo "metrics at http://127.0.0.1:18080/metrics (server)"
for _ in $(seq 60); do curl -sf http://127.0.0.1:18080/healthz >/dev/null && break; sleep 1; done
for user in $($BIN/python -c "import pyarrow.parquet as pq; ids = pq.read_table('$DATA/events.parquet', columns=['user_id']).column(0).to_pylist()[:5000]; print(*list(dict.fromkeys(ids))[:2])"); do
  echo "== recommendations for household $user"
  curl -s "http://127.0.0.1:18080/recommend?user=$user&k=5"; echo
done
