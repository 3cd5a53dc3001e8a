"""Real round trips through the local Tansu broker: produce, read with assign(), validate."""

from __future__ import annotations

import pytest

from streaming.broker import Broker, accepts_connections
from streaming.dataset import Dataset
from streaming.errors import UsageError
from streaming.kafka_bench import check_round_trip
from streaming.kafka_io import TopicReader, create_topics, json_producer
from streaming.producer import produce_events
from streaming.schema import PurchaseEvent, table_to_events
from streaming.validation import DeadLetter, RecentIds, ValidationRules, validate_event

pytestmark = pytest.mark.kafka

N_EVENTS = 3000


def test_broker_starts_and_stops_cleanly():
    broker = Broker().start()
    assert broker.running and accepts_connections(broker.host, broker.port)
    with pytest.raises(UsageError, match="already in use"):
        Broker(port=broker.port).start()
    broker.stop()
    assert not broker.running and not accepts_connections(broker.host, broker.port)
    broker.stop()  # idempotent


def test_real_events_round_trip_in_order(kafka_broker, cj_small):
    dataset = Dataset.load(cj_small)
    events = dataset.events.slice(0, N_EVENTS)
    create_topics(kafka_broker, ["purchases"], partitions=3)
    producer = json_producer(kafka_broker)
    report = produce_events(producer, "purchases", events, progress=False)
    producer.send("purchases", key="junk", value=b'{"event_id": "x", "price": -1}')
    producer.close()
    assert (report.sent, report.delivered, report.failed) == (N_EVENTS, N_EVENTS, 0)

    with TopicReader(kafka_broker, "purchases", max_batch=500) as reader:
        batches = list(reader.batches(limit=N_EVENTS + 1, idle_timeout_s=10))
        assert reader.count == N_EVENTS + 1 and sum(reader.positions.values()) == N_EVENTS + 1
    assert max(len(b) for b in batches) <= 500
    records = [r for batch in batches for r in batch]
    rules = ValidationRules(catalog=set(dataset.items.column("item_id").to_pylist()))
    recent = RecentIds()
    results = [validate_event(r.value, rules, recent) for r in records]
    accepted = [(r, e) for r, e in zip(records, results, strict=True)
                if isinstance(e, PurchaseEvent)]
    dead = [e for e in results if isinstance(e, DeadLetter)]
    assert len(accepted) + len(dead) == len(records)  # nothing lost
    assert [d.reason for d in dead] == ["missing_field"]
    checks = check_round_trip(table_to_events(events), [r for r, _ in accepted],
                              [e for _, e in accepted])
    assert checks["partitions_used"] == 3


def test_reader_resumes_from_saved_positions(kafka_broker):
    create_topics(kafka_broker, ["t"], partitions=2)
    producer = json_producer(kafka_broker)
    for i in range(100):
        producer.send("t", key=f"u{i % 7}", value={"i": i})
    producer.close()
    with TopicReader(kafka_broker, "t") as reader:
        first = [r for b in reader.batches(limit=40, idle_timeout_s=10) for r in b]
        saved = dict(reader.positions)
    assert len(first) == 40 and sum(saved.values()) == 40
    with TopicReader(kafka_broker, "t", offsets=saved) as reader:
        rest = [r for b in reader.batches(limit=60, idle_timeout_s=10) for r in b]
        assert list(reader.batches(idle_timeout_s=1.0)) == []
    seen = sorted((r.partition, r.offset) for r in first + rest)
    assert len(set(seen)) == 100  # no overlap, nothing skipped
    with TopicReader(kafka_broker, "t", partitions=[1]) as reader:
        only = [r for b in reader.batches(idle_timeout_s=1.0) for r in b]
    assert only and {r.partition for r in only} == {1}
    assert len(only) == sum(1 for p, _ in seen if p == 1)


def test_reader_on_a_missing_topic_fails_clearly(kafka_broker):
    with pytest.raises(RuntimeError, match="no partitions"):
        TopicReader(kafka_broker, "nope", metadata_timeout_s=0.5)
