"""The live pipeline against the real local broker, watched by a real Prometheus server."""

from __future__ import annotations

import json
import threading
import time

import pyarrow.parquet as pq
import pytest
import torch
from prometheus_client import REGISTRY

from pipelines.pipeline import PipelineConfig, run_pipeline
from pipelines.sources import StopFlag
from pipelines.state import checkpoint_path
from streaming import metrics
from streaming.kafka_io import TopicReader, create_topics, json_producer
from streaming.producer import produce_events

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

BAD = [b"junk", b'{"event_id": "x1"}',
       b'{"event_id":"x2","user_id":"u","item_id":"i","ts":1,"quantity":1,"price":-3}']


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels or None) or 0.0


def _dead_lettered() -> float:
    return sum(s.value for m in REGISTRY.collect() if m.name == "dynllm_events_dead_lettered"
               for s in m.samples if s.name.endswith("_total"))


class LivePipeline:
    """Run the live pipeline in a thread until :meth:`stop`."""

    def __init__(self, run_dir, state_dir, bootstrap_servers) -> None:
        self.stop_flag = StopFlag()
        config = PipelineConfig(run_dir=str(run_dir), state_dir=str(state_dir),
                                bootstrap_servers=bootstrap_servers, checkpoint_seconds=2.0)
        self.thread = threading.Thread(target=run_pipeline, args=(config, self.stop_flag),
                                       daemon=True)
        self.thread.start()

    def wait_consumed(self, total: float, timeout_s: float = 90.0) -> None:
        deadline = time.monotonic() + timeout_s
        while _sample("dynllm_events_consumed_total") < total:
            assert time.monotonic() < deadline, "pipeline did not consume everything in time"
            time.sleep(0.1)

    def stop(self) -> None:
        self.stop_flag.set()
        self.thread.join(60)
        assert not self.thread.is_alive(), "pipeline did not stop after the stop flag"


def _read_all(bootstrap: str, topic: str) -> list[bytes]:
    with TopicReader(bootstrap, topic) as reader:
        return [r.value for batch in reader.batches(idle_timeout_s=2.0) for r in batch]


def test_live_pipeline_metrics_dlq_outputs_and_restart(kafka_broker, prometheus, run_dir,
                                                      cj_small, tmp_path):
    torch.set_num_threads(1)
    events = pq.read_table(cj_small / "events.parquet")
    first, second = events.slice(0, 3000), events.slice(3000, 1000)
    create_topics(kafka_broker, ["purchases"], partitions=2)
    server = metrics.start_metrics_server(0)
    prom = prometheus({"pipeline": [f"127.0.0.1:{server.server_port}"]})
    consumed0, dlq0 = _sample("dynllm_events_consumed_total"), _dead_lettered()
    applied0 = _sample("dynllm_memory_update_batch_events_sum")
    pipeline = LivePipeline(run_dir, tmp_path, kafka_broker)
    prom.wait_for('up{job="pipeline"}', lambda v: v == 1, timeout_s=60)
    producer = json_producer(kafka_broker)
    for raw in BAD:
        producer.send("purchases", value=raw)
    produce_events(producer, "purchases", first, rate=800, progress=False)  # ~4 s of scrapes
    pipeline.wait_consumed(consumed0 + first.num_rows + len(BAD))
    prom.wait_for("sum(dynllm_events_dead_lettered_total)", lambda v: v == dlq0 + len(BAD))
    assert prom.value("sum(rate(dynllm_events_consumed_total[10s]))") > 0
    pipeline.stop()

    letters = [json.loads(v) for v in _read_all(kafka_broker, "purchases.dlq")]
    assert sorted(d["reason"] for d in letters) == ["bad_json", "bad_price", "missing_field"]
    embeddings = [json.loads(v) for v in _read_all(kafka_broker, "user-embeddings")]
    assert embeddings and set(embeddings[0]) == {"user_id", "ts", "version", "embedding",
                                                 "facet_weights", "events"}
    assert len(embeddings[0]["embedding"]) == 100
    # the changelog carries every applied event once, each in its user's message
    assert sum(len(m["events"]) for m in embeddings) == sum(
        m["version"] - max((p["version"] for p in embeddings[:i] if p["user_id"] == m["user_id"]),
                           default=m["version"] - len(m["events"]))
        for i, m in enumerate(embeddings))
    requests = [json.loads(v) for v in _read_all(kafka_broker, "profile-requests")]
    assert requests and all(r["events"] >= 5 for r in requests)

    # restart on the same state: the new events are applied, the old ones not again
    pipeline = LivePipeline(run_dir, tmp_path, kafka_broker)
    produce_events(producer, "purchases", second, progress=False)
    pipeline.wait_consumed(consumed0 + len(BAD) + first.num_rows + second.num_rows)
    deadline = time.monotonic() + 30  # the last micro-batches: sealed once the input is idle
    while _sample("dynllm_memory_update_batch_events_sum") - applied0 < 4000:
        assert time.monotonic() < deadline, "the last events were never sealed"
        time.sleep(0.1)
    pipeline.stop()
    producer.close()
    from tgn.model import TGNRecommender

    model = TGNRecommender.load(checkpoint_path(tmp_path, 0, 1))
    applied = int(model.neighbors.count[model.user_node].sum())
    assert applied == first.num_rows + second.num_rows
    assert sum(model.checkpoint_extra["positions"].values()) == 4000 + len(BAD)


def test_dynllm_run_stops_cleanly_on_sigterm(kafka_broker, run_dir, cj_small, tmp_path):
    import signal
    import subprocess
    import sys

    from streaming.broker import free_port

    events = pq.read_table(cj_small / "events.parquet").slice(0, 500)
    create_topics(kafka_broker, ["purchases"], partitions=2)
    producer = json_producer(kafka_broker)
    produce_events(producer, "purchases", events, progress=False)
    producer.close()
    markers = tmp_path / "markers"  # a shared folder on a cluster
    markers.mkdir()
    command = [sys.executable, "-c", "import sys; from pipelines.cli import main; sys.exit(main())",
               "run", "--bootstrap-servers", kafka_broker, "--run", str(run_dir),
               "--state-dir", str(tmp_path), "--metrics-port", str(free_port()),
               "--stop-dir", str(markers)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    store = tmp_path / "embeddings-shard-0-of-1.npz"
    deadline = time.monotonic() + 90
    while not _all_read(kafka_broker, tmp_path, events.num_rows):
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output[-2000:]
    assert "stopped cleanly" in output
    assert not list(markers.iterdir())  # nothing left behind in the markers folder
    from tgn.model import TGNRecommender

    model = TGNRecommender.load(checkpoint_path(tmp_path, 0, 1))
    assert int(model.neighbors.count[model.user_node].sum()) == events.num_rows
    assert store.exists()


def _all_read(bootstrap: str, state_dir, count: int) -> bool:
    """Whether the pipeline's embeddings topic shows every event applied (versions add up)."""
    latest: dict[str, int] = {}
    try:
        reader = TopicReader(bootstrap, "user-embeddings")
    except RuntimeError:  # the pipeline has not created its output topic yet
        return False
    with reader:
        for batch in reader.batches(idle_timeout_s=0.5):
            for record in batch:
                message = json.loads(record.value)
                latest[message["user_id"]] = max(latest.get(message["user_id"], 0),
                                                 message["version"])
    return sum(latest.values()) == count
