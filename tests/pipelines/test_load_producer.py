"""The producer of ``dynllm bench load`` against the real local broker: paced phases, every
record acknowledged and readable, one ``ready`` before the first send."""

from __future__ import annotations

import json

import pytest

from pipelines.load_bench import produce_schedule
from streaming.kafka_io import TopicReader, create_topics

pytestmark = pytest.mark.kafka


def test_produce_schedule_sends_each_phase_at_its_rate(kafka_broker):
    create_topics(kafka_broker, ["purchases"], partitions=2)
    values = (json.dumps({"event_id": f"e{i}"}).encode() for i in range(10**9))
    phases = [(2_000.0, 0.5), (20_000.0, 0.5), (1_000.0, 0.3)]  # steady, 10x burst, tail
    reports: list = []
    acked = produce_schedule(kafka_broker, values, phases, report=reports.append)

    planned = sum(rate * seconds for rate, seconds in phases)  # 11,300
    assert 0.9 * planned <= acked <= planned
    assert reports[0] == "ready" and reports[-1] == acked
    counts = [r for r in reports[1:] if isinstance(r, int)]
    assert counts == sorted(counts)  # acknowledged so far: never goes back
    with TopicReader(kafka_broker, "purchases") as reader:
        read = [r.value for batch in reader.batches(limit=acked, idle_timeout_s=5) for r in batch]
    ids = [json.loads(v)["event_id"] for v in read]
    assert len(ids) == len(set(ids)) == acked  # pre-encoded but unsent values are skipped
    assert max(int(i[1:]) for i in ids) < planned + len(phases)
