#!/usr/bin/env bash
# `make demo`: the whole system on embedded defaults, on loopback, then a clean shutdown.
#
#   1. prepare a Complete Journey slice (weeks 1-8, 50k purchase lines)
#   2. a Kafka round trip through the local Tansu broker
#   3. LLM profiles (packaged Qwen2.5-0.5B, graph-aware prompts) for four households
#   4. train TGN + DynLLM fusion for one epoch (cached in runs/demo)
#   5. broker, live Beam pipeline, profile worker and HTTP server; stream the test split in
#   6. live recommendations with facet weights, and where every /metrics is served
set -euo pipefail
BIN=${BIN:-.venv/bin}
DATA=data/demo RUN=runs/demo PORT=19092 HTTP=18080
STATE=$(mktemp -d -t dynllm-demo.XXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$STATE"
}
trap cleanup EXIT
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
wait_http() { for _ in $(seq 120); do curl -sf "$1" >/dev/null && return 0; sleep 1; done; return 1; }
metric() {  # metric URL NAME...: the samples of the named series
  local url=$1; shift
  curl -s "$url" | grep -E "^($(IFS='|'; echo "$*"))(\{| )" | sed 's/^/    /' || true
}

step "1. data: Complete Journey weeks 1-8 -> $DATA"
[ -f $DATA/meta.json ] || $BIN/dynllm data prepare --dataset completejourney --out $DATA \
    --weeks 1-8 --min-user-events 5 --min-item-events 10 --max-events 50000

step "2. Kafka round trip through the local broker"
$BIN/dynllm bench kafka --data $DATA --events 5000 --repeats 1

# the households to follow: the four with the longest history among those the live stream
# (the first 5,000 purchase lines of the test split) will touch
USERS=$($BIN/python - "$DATA" <<'EOF'
import collections, sys
from streaming.dataset import Dataset
data = Dataset.load(sys.argv[1])
live = set(data.split("test").column("user_id").to_pylist()[:5000])
past = collections.Counter(data.split("train").column("user_id").to_pylist()
                           + data.split("val").column("user_id").to_pylist())
print(",".join([u for u, _ in past.most_common() if u in live][:4]))
EOF
)

step "3. LLM profiles for households $USERS (llama.cpp, 2 processes x 1 thread)"
$BIN/dynllm profiles build --data $DATA --users "$USERS" --until-split val --threads 1

step "4. train TGN + DynLLM fusion (1 epoch; cached in $RUN)"
[ -f $RUN/model.pt ] || $BIN/dynllm train --data $DATA --model dynllm \
    --profiles $DATA/profiles.sqlite --out $RUN --epochs 1 --max-val-events 5000 --history-steps 100 -q

step "5. broker :$PORT, pipeline, profile worker, server; stream the test split live"
$BIN/dynllm broker --port $PORT >/dev/null & pids+=($!)
for _ in $(seq 30); do (exec 3<>/dev/tcp/127.0.0.1/$PORT) 2>/dev/null && break; sleep 0.5; done
$BIN/dynllm run --bootstrap-servers 127.0.0.1:$PORT --run $RUN --state-dir "$STATE" \
    --metrics-port 9100 --checkpoint-seconds 3 2>"$STATE/pipeline.log" & pids+=($!)
$BIN/dynllm worker --bootstrap-servers 127.0.0.1:$PORT --data $DATA \
    --store "$STATE/profiles.sqlite" --metrics-port 9101 2>"$STATE/worker.log" & pids+=($!)
wait_http http://127.0.0.1:9100/metrics
$BIN/dynllm produce --bootstrap-servers 127.0.0.1:$PORT --data $DATA --split test \
    --limit 5000 --rate 2000
$BIN/dynllm serve --run $RUN --state-dir "$STATE" --port $HTTP 2>"$STATE/server.log" & pids+=($!)
sleep 5  # one more pipeline checkpoint
wait_http http://127.0.0.1:$HTTP/healthz

step "6. live recommendations (top 5, with the user's facet weights)"
echo "(a 1-epoch demo model has seen few profiles in training: expect near-uniform weights)"
for user in ${USERS//,/ }; do
  echo "-- household $user"
  curl -s "http://127.0.0.1:$HTTP/recommend?user=$user&k=5" | $BIN/python -c '
import json, sys
r = json.load(sys.stdin)
if "error" in r:
    sys.exit(print("   ", r["error"]))
w = r["facet_weights"]
print("    facet weights:", ", ".join(f"{k} {v:.2f}" for k, v in w.items()) if w else "none yet")
for i in r["items"]:
    print("    %7.3f  %s  (%s)" % (i["score"], i["title"], i["brand"]))'
done

step "metrics (Prometheus text; scrape them with: dynllm monitor)"
echo "  pipeline  http://127.0.0.1:9100/metrics"
metric http://127.0.0.1:9100/metrics dynllm_events_consumed_total dynllm_events_valid_total \
    dynllm_embeddings_emitted_total dynllm_profile_requests_sent_total
echo "  worker    http://127.0.0.1:9101/metrics"
metric http://127.0.0.1:9101/metrics dynllm_profile_requests_queued_total \
    dynllm_profiles_generated_total dynllm_profile_queue_length
echo "  server    http://127.0.0.1:$HTTP/metrics"
metric http://127.0.0.1:$HTTP/metrics dynllm_http_requests_total dynllm_embedding_store_users
echo
echo "explain a household's profile: $BIN/dynllm explain --run $RUN --user ${USERS%%,*}"
step "shutting down (SIGTERM: the pipeline drains and checkpoints)"
