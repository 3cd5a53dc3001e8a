"""The live pipeline and the server's changelog reader over real mutual TLS (``tls_kafka``: the
broker is reachable only through a TLS terminator that wants a client certificate), so every
Kafka client of a ``dynllm run`` (topic-id check, partitions, the reader, dead letters, profile
requests and updates, embeddings) and of ``dynllm serve`` must carry the settings."""

from __future__ import annotations

import json
import threading
import time

import pyarrow.parquet as pq
import pytest
import torch

from pipelines.pipeline import PipelineConfig, run_pipeline
from pipelines.server import Recommender
from pipelines.sources import StopFlag
from streaming.kafka_io import TopicReader, create_topics, json_producer
from streaming.producer import event_messages

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


def _read(tls_kafka, topic: str) -> list[dict]:
    with TopicReader(tls_kafka.bootstrap_servers, topic, settings=tls_kafka.settings) as reader:
        return [json.loads(r.value) for b in reader.batches(idle_timeout_s=2.0) for r in b]


def test_live_pipeline_and_server_over_mutual_tls(tls_kafka, run_dir, cj_small, tmp_path):
    torch.set_num_threads(1)
    bootstrap, settings = tls_kafka.bootstrap_servers, tls_kafka.settings
    events = pq.read_table(cj_small / "events.parquet").slice(0, 400)
    create_topics(bootstrap, ["purchases"], partitions=2, settings=settings)
    producer = json_producer(bootstrap, settings)
    producer.send("purchases", value=b"junk")
    for _key, value, _ts in event_messages(events):
        producer.send("purchases", value=value)
    producer.flush()
    producer.close()
    stop = StopFlag()
    config = PipelineConfig(run_dir=str(run_dir), state_dir=str(tmp_path),
                            bootstrap_servers=bootstrap, kafka_settings=settings, max_batch=200,
                            checkpoint_events=10**9, checkpoint_seconds=3600.0)
    pipeline = threading.Thread(target=run_pipeline, args=(config, stop), daemon=True)
    pipeline.start()
    recommender = Recommender(run_dir, tmp_path, bootstrap_servers=bootstrap,
                              kafka_settings=settings).start()
    try:
        deadline = time.monotonic() + 120
        while recommender.changelog["events_applied"] < events.num_rows:
            assert time.monotonic() < deadline, recommender.changelog
            assert pipeline.is_alive(), "the pipeline stopped (a client without the settings?)"
            time.sleep(0.1)
    finally:
        stop.set()
        pipeline.join(60)
        recommender.close()
    assert not pipeline.is_alive()
    assert [d["reason"] for d in _read(tls_kafka, "purchases.dlq")] == ["bad_json"]
    embeddings = _read(tls_kafka, "user-embeddings")
    assert sum(len(m["events"]) for m in embeddings) == events.num_rows
    assert _read(tls_kafka, "profile-requests")  # users past 5 purchases were asked for
