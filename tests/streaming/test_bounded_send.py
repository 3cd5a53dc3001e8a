"""The bounded sender against the real Tansu broker: the producer's buffer stays bounded and every
record still arrives once."""

from __future__ import annotations

import pytest

from streaming.bounded_send import BoundedSender
from streaming.kafka_io import TopicReader, create_topics, json_producer

pytestmark = pytest.mark.kafka

RECORDS = 6000
BOUND = 200


def _buffered(producer) -> int:
    """Records kafka-python's accumulator holds not yet acknowledged (its private state)."""
    return sum(batch.record_count for batch in producer._accumulator._incomplete.all())


def test_sender_bounds_unacknowledged_records_and_delivers_all(kafka_broker):
    create_topics(kafka_broker, ["out"], partitions=4)
    producer = json_producer(kafka_broker, linger_ms=5)
    sender = BoundedSender(producer, max_pending=BOUND)
    value = {"embedding": [0.123456] * 64}  # about the size of a user-embeddings record
    most = 0
    for i in range(RECORDS):
        sender.send("out", key=f"u{i % 500}", value={**value, "i": i})
        most = max(most, _buffered(producer))
    # an unbounded send loop buffers thousands here (the sender thread lags the caller)
    assert most <= BOUND
    assert sender.waits > 0  # the bound was reached and waited on
    sender.flush()
    assert len(sender) == 0 and sender.failed == 0
    producer.close()

    with TopicReader(kafka_broker, "out", max_batch=2000) as reader:
        records = [r for batch in reader.batches(limit=RECORDS, idle_timeout_s=10)
                   for r in batch]
    seen = sorted(int(r.value.split(b'"i":')[1].rstrip(b"}")) for r in records)
    assert seen == list(range(RECORDS))  # each once, none lost to the waiting


def test_bound_must_be_positive():
    with pytest.raises(ValueError, match="max_pending"):
        BoundedSender(object(), max_pending=0)
