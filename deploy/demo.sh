#!/usr/bin/env bash
# `make demo`: the whole system on embedded defaults, on loopback, then a clean shutdown.
#
#   1. prepare a Complete Journey slice (weeks 1-8, 50k purchase lines)
#   2. a Kafka round trip through the local Tansu broker
#   3. LLM profiles (packaged Qwen2.5-0.5B, graph-aware prompts) for four households
#   4. train TGN + DynLLM fusion for one epoch (cached in runs/demo)
#   5. broker, live Beam pipeline, profile worker and HTTP server
#   6. stream test purchases live; the worker regenerates profiles from them (prompts from its
#      purchase graph, which follows the purchases topic) and the fusion stage applies them
#   7. one household's profile, facet weights and recommendations before its live regeneration
#      reaches the served embedding, 8. and after its next purchase; then every /metrics
set -euo pipefail
BIN=${BIN:-.venv/bin}
DATA=data/demo RUN=runs/demo PORT=19092 HTTP=18080
LIVE1=${LIVE1:-3000}  # test purchases streamed before the wait; the rest of the split after it
MIN_PROFILES=${MIN_PROFILES:-10} WAIT_S=${WAIT_S:-600}  # live profiles to wait for, at most
GRACE_S=${GRACE_S:-120}  # ... then this long for a household with an earlier profile
STATE=$(mktemp -d -t dynllm-demo.XXXX)
pids=() broker=
cleanup() {
  local rc=$?
  # the broker last: the pipeline and the worker flush to it while they stop
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  [ -z "$broker" ] || { kill -TERM "$broker" 2>/dev/null; wait "$broker" 2>/dev/null; } || true
  if [ $rc -ne 0 ]; then  # the demo failed: show what the background processes said
    for log in "$STATE"/*.log; do
      [ -f "$log" ] && { echo "--- last lines of $(basename "$log")"; tail -n 12 "$log"; }
    done
  fi
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

# households profiled ahead (the "before" profiles): those with history (> 20 lines before the
# test split) whose profile request comes earliest in the first LIVE1 live purchases, so the
# worker regenerates them first, and that buy again later in the split, so the fusion stage
# applies the new profile. The pipeline counts every event its model has seen (train + val,
# then live) and asks at 5, 30, 55, ... (pipelines.profiles_io.ProfileTrigger).
USERS=$($BIN/python - "$DATA" $LIVE1 <<'EOF'
import collections, logging, sys
import numpy as np
logging.disable(logging.WARNING)  # Beam's import-time notices
from pipelines.profiles_io import ProfileTrigger
from streaming.dataset import Dataset
data, live = Dataset.load(sys.argv[1]), int(sys.argv[2])
count = collections.Counter(data.split("train").column("user_id").to_pylist()
                            + data.split("val").column("user_id").to_pylist())
first, trigger = {}, ProfileTrigger()
test = data.split("test").column("user_id").to_pylist()
later = set(test[live:])
for user in test[:live]:
    count[user] += 1
    if user not in first and count[user] > 20 and user in later and trigger.fires(
            np.array([count[user] - 1]), np.array([count[user]]))[0]:
        first[user] = len(first)
print(",".join(sorted(first, key=first.get)[:4]))
EOF
)

step "3. LLM profiles for households $USERS (llama.cpp, 2 processes x 1 thread)"
$BIN/dynllm profiles build --data $DATA --users "$USERS" --until-split val --threads 1

step "4. train TGN + DynLLM fusion (1 epoch; cached in $RUN)"
# trained again when the cached model predates the profile store (the fusion stage starts from
# the profiles the model saw) or the current code cannot load it (its state changed since)
[ $RUN/model.pt -nt $DATA/profiles.sqlite ] || rm -f $RUN/model.pt
$BIN/python -c 'import sys; from pipelines.state import load_run_model; load_run_model(sys.argv[1])' \
    $RUN 2>/dev/null || rm -f $RUN/model.pt
[ -f $RUN/model.pt ] || $BIN/dynllm train --data $DATA --model dynllm \
    --profiles $DATA/profiles.sqlite --out $RUN --epochs 1 --max-val-events 5000 --history-steps 100 -q

step "5. broker :$PORT, live pipeline, profile worker (llama.cpp, 1 process x 1 thread), server"
# the worker continues the build's profile store; its purchase graph starts from the train and
# validation history and grows from the purchases topic (the test split, streamed below)
$BIN/python -c 'import sqlite3, sys; sqlite3.connect(sys.argv[1]).backup(sqlite3.connect(sys.argv[2]))' \
    $DATA/profiles.sqlite "$STATE/profiles.sqlite"
$BIN/dynllm broker --port $PORT >/dev/null & broker=$!
for _ in $(seq 30); do (exec 3<>/dev/tcp/127.0.0.1/$PORT) 2>/dev/null && break; sleep 0.5; done
$BIN/dynllm run --bootstrap-servers 127.0.0.1:$PORT --run $RUN --state-dir "$STATE" \
    --metrics-port 9100 --checkpoint-seconds 3 2>"$STATE/pipeline.log" & pids+=($!)
$BIN/dynllm worker --bootstrap-servers 127.0.0.1:$PORT --data $DATA --seed-until val \
    --store "$STATE/profiles.sqlite" --processes 1 --threads 1 --batch-size 2 \
    --metrics-port 9101 2>"$STATE/worker.log" & pids+=($!)
wait_http http://127.0.0.1:9100/metrics
wait_http http://127.0.0.1:9101/metrics  # up once the worker has loaded its models

step "6. stream the first $LIVE1 test purchases live; the worker profiles from them"
$BIN/dynllm produce --bootstrap-servers 127.0.0.1:$PORT --data $DATA --split test \
    --limit $LIVE1 --rate 2000
$BIN/dynllm serve --run $RUN --state-dir "$STATE" --port $HTTP 2>"$STATE/server.log" & pids+=($!)
sample() { { curl -s "$1" || true; } | awk -v n="$2" '$1 == n {print $2 + 0}'; }
start=$SECONDS FOLLOW= reached=
while [ $((SECONDS - start)) -lt $WAIT_S ]; do
  sleep 10
  made=$(sample http://127.0.0.1:9101/metrics dynllm_profiles_generated_total)
  applied=$(sample http://127.0.0.1:9100/metrics dynllm_profile_updates_applied_total)
  queued=$(sample http://127.0.0.1:9101/metrics dynllm_profile_queue_length)
  echo "  $((SECONDS - start)) s: ${made:-0} profiles generated from live purchases," \
       "${applied:-0} applied by the fusion stage, ${queued:-0} requests queued"
  if [ "${made:-0}" -ge $MIN_PROFILES ] && [ "${applied:-0}" -ge $MIN_PROFILES ]; then
    # a household regenerated (it had a profile before); after GRACE_S more, a first profile
    reached=${reached:-$SECONDS}
    FOLLOW=$($BIN/python deploy/demo_loop.py pick $DATA "$STATE/profiles.sqlite" $LIVE1 \
        $([ $((SECONDS - reached)) -ge $GRACE_S ] && echo any))
    [ -n "$FOLLOW" ] && break
  fi
done
[ -n "$FOLLOW" ] || { echo "no live regeneration to follow after $WAIT_S s (worker log:" \
  "$STATE/worker.log)"; exit 1; }
wait_http http://127.0.0.1:$HTTP/healthz

step "7. household $FOLLOW before the live regeneration reaches it (top 5)"
$BIN/python deploy/demo_loop.py show http://127.0.0.1:$HTTP $DATA "$STATE/profiles.sqlite" \
    $FOLLOW "$STATE/before.json" before
before=$($BIN/python -c 'import json, sys; print(json.load(open(sys.argv[1]))["version"])' \
    "$STATE/before.json")

step "8. stream the rest of the test split: household $FOLLOW buys again, fusion applies its new profile"
$BIN/dynllm produce --bootstrap-servers 127.0.0.1:$PORT --data $DATA --split test \
    --skip $LIVE1 --rate 2000
for _ in $(seq 60); do  # the server re-reads the pipeline's store after its next checkpoint
  now=$(curl -s "http://127.0.0.1:$HTTP/recommend?user=$FOLLOW&k=1" | $BIN/python -c \
      'import json, sys; print(json.load(sys.stdin).get("version", 0))')
  [ "$now" -gt "$before" ] && break
  sleep 1
done
$BIN/python deploy/demo_loop.py show http://127.0.0.1:$HTTP $DATA "$STATE/profiles.sqlite" \
    $FOLLOW "$STATE/after.json"
echo "  facet weights of household $FOLLOW, before -> after the live regeneration:"
$BIN/python deploy/demo_loop.py compare "$STATE/before.json" "$STATE/after.json"
echo "  (a 1-epoch demo model that saw a dozen profiled households in training: the weights" \
     "move little)"

step "metrics (Prometheus text; scrape them with: dynllm monitor)"
echo "  pipeline  http://127.0.0.1:9100/metrics"
metric http://127.0.0.1:9100/metrics dynllm_events_consumed_total dynllm_events_valid_total \
    dynllm_embeddings_emitted_total dynllm_profile_requests_sent_total \
    dynllm_profile_updates_applied_total
echo "  worker    http://127.0.0.1:9101/metrics"
metric http://127.0.0.1:9101/metrics dynllm_profile_requests_queued_total \
    dynllm_profiles_generated_total dynllm_profile_queue_length dynllm_profile_graph_events_total
echo "    profiles in the worker's store written from live purchases, now:" \
    "$($BIN/python deploy/demo_loop.py live $DATA "$STATE/profiles.sqlite")"
echo "  server    http://127.0.0.1:$HTTP/metrics"
metric http://127.0.0.1:$HTTP/metrics dynllm_http_requests_total dynllm_embedding_store_users
echo
echo "explain a household's profile: $BIN/dynllm explain --run $RUN --user $FOLLOW"
step "shutting down (SIGTERM: the pipeline drains and checkpoints)"
