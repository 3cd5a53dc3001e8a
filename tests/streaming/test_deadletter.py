"""Dead-letter sinks keep the raw record, reason, detail and time; counts add up."""

from __future__ import annotations

import json

import pytest

from streaming.deadletter import (
    JsonlDeadLetterSink,
    KafkaDeadLetterSink,
    decode_raw,
    encode_raw,
    read_dead_letters,
)
from streaming.kafka_io import TopicReader
from streaming.validation import DeadLetter, validate_event

RAWS = [
    b"\xff\xfe not utf-8",  # kept as base64
    '{"event_id": "e1", "ts": "\ud800"}',  # a lone surrogate: base64 of surrogatepass bytes
    b'{"event_id": "e1"',  # bad JSON, kept as text
    {"event_id": "e1", "user_id": "u1", "item_id": "i1", "ts": 1.0, "quantity": 1,
     "price": -2},  # a dict given directly: kept as JSON
    [1, 2],  # not an object
]


def dead_letters() -> list[DeadLetter]:
    letters = [validate_event(raw) for raw in RAWS]
    assert all(isinstance(letter, DeadLetter) for letter in letters)
    return letters


def test_encode_raw_round_trips_every_kind():
    for raw in RAWS:
        text, kind = encode_raw(raw)
        json.dumps(text)  # always JSON-safe
        if isinstance(raw, str) and kind == "base64":
            assert decode_raw(text, kind).decode("utf-8", "surrogatepass") == raw
        elif isinstance(raw, bytes) and kind == "utf-8":  # UTF-8 bytes come back as text
            assert decode_raw(text, kind) == raw.decode()
        else:
            assert decode_raw(text, kind) == raw
    circular: list = []
    circular.append(circular)
    assert encode_raw(circular)[1] == "repr"


def test_jsonl_sink_keeps_everything_and_counts(tmp_path):
    letters = dead_letters()
    path = tmp_path / "dlq" / "purchases.dlq.jsonl"
    with JsonlDeadLetterSink(path) as sink:
        for letter in letters:
            sink.write(letter)
    assert sum(sink.counts.values()) == len(RAWS)
    assert sink.counts == {"bad_encoding": 1, "missing_field": 1, "bad_json": 1, "bad_price": 1,
                           "not_an_object": 1}
    records = list(read_dead_letters(path))
    assert [r["reason"] for r in records] == [str(letter.reason) for letter in letters]
    assert [r["detail"] for r in records] == [letter.detail for letter in letters]
    assert records[0]["raw"] == RAWS[0] and records[2]["raw"] == RAWS[2].decode()
    assert records[3]["raw"] == RAWS[3] and records[4]["raw"] == RAWS[4]
    assert all(r["received_at"] > 1.7e9 for r in records)
    # replaying the file gives the same verdicts
    assert [validate_event(r["raw"]).reason for r in records[2:]] == [
        letter.reason for letter in letters[2:]]


@pytest.mark.kafka
def test_kafka_sink_writes_the_dlq_topic(kafka_broker):
    letters = dead_letters()
    with KafkaDeadLetterSink(kafka_broker) as sink:
        for letter in letters:
            sink.write(letter)
    with TopicReader(kafka_broker, "purchases.dlq") as reader:
        records = [r for batch in reader.batches(limit=len(RAWS), idle_timeout_s=10)
                   for r in batch]
    assert len(records) == len(RAWS) == sum(sink.counts.values())
    payloads = [json.loads(r.value) for r in records]
    assert [r.key.decode() for r in records] == [p["reason"] for p in payloads]
    assert [p["reason"] for p in payloads] == [str(letter.reason) for letter in letters]
    assert decode_raw(payloads[0]["raw"], payloads[0]["raw_encoding"]) == RAWS[0]
