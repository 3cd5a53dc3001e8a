"""``dynllm bench kafka``: round trip of real purchase events through the local broker.

Each repeat produces the first N events of a real dataset (JSON, keyed by user) to a fresh topic,
reads them back with ``assign()``, and checks that nothing was lost, duplicated or reordered
within a partition and that every message validates back to the exact source event. Figures are
medians over repeats, each with a reference measured in the same run:

- produce: :func:`streaming.producer.produce_events` (Arrow → JSON → send, with delivery callbacks)
  against a bare ``send`` loop of the same pre-encoded bytes;
- consume: :class:`streaming.kafka_io.TopicReader` batches against a bare ``KafkaConsumer``
  iterator over the same topic;
- validate: :func:`streaming.validation.validate_event` (with catalog and de-duplication) against
  a bare ``json.loads`` of the same bytes.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow as pa

from streaming import kafka_io
from streaming.broker import Broker
from streaming.dataset import Dataset
from streaming.kafka_io import TopicReader, create_topics, json_producer
from streaming.producer import event_messages, produce_events
from streaming.schema import PurchaseEvent, table_to_events
from streaming.validation import RecentIds, ValidationRules, validate_event

DEFAULT_DATA = Path("data/cj26")


def load_events(data: Path | None, count: int) -> tuple[pa.Table, list[str], str]:
    """The first ``count`` events (by time) of ``data``, its item ids and a description.

    Without ``data``, uses ``data/cj26`` when present, else prepares a Complete Journey slice.
    """
    if data is None and DEFAULT_DATA.exists():
        data = DEFAULT_DATA
    if data is None:
        from streaming.completejourney import prepare

        data = Path(tempfile.mkdtemp(prefix="dynllm-bench-"))
        prepare(data, (1, 26), max_events=count)
    dataset = Dataset.load(data)
    events = dataset.events.slice(0, count)
    return events, dataset.items.column("item_id").to_pylist(), str(data)


def _bare_produce(bootstrap: str, topic: str, messages: list[tuple[str, bytes, float]]) -> float:
    producer = json_producer(bootstrap)
    start = time.perf_counter()
    for key, value, _ in messages:
        producer.send(topic, key=key, value=value)
    producer.flush()
    seconds = time.perf_counter() - start
    producer.close()
    return len(messages) / seconds


def _bare_consume(bootstrap: str, topic: str, count: int) -> float:
    from kafka import TopicPartition

    consumer = kafka_io.consumer(bootstrap, consumer_timeout_ms=5000)
    partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic)]
    consumer.assign(partitions)
    for tp in partitions:
        consumer.seek(tp, 0)
    start, seen = time.perf_counter(), 0
    for _ in consumer:
        seen += 1
        if seen == count:
            break
    seconds = time.perf_counter() - start
    consumer.close()
    return seen / seconds


def _read_back(bootstrap: str, topic: str, count: int) -> tuple[list, float, int]:
    """Records read until ``count`` arrived, the read rate, and how many more came after."""
    with TopicReader(bootstrap, topic) as reader:
        start = time.perf_counter()
        records = [r for batch in reader.batches(limit=count, idle_timeout_s=10.0) for r in batch]
        rate = len(records) / (time.perf_counter() - start)
        extra = sum(len(batch) for batch in reader.batches(idle_timeout_s=2.0))
    return records, rate, extra


def check_round_trip(source: list[PurchaseEvent], records: list, accepted: list) -> dict[str, Any]:
    """Counts, duplicates, per-partition order and exact equality; raises ``AssertionError``."""
    position = {e.event_id: i for i, e in enumerate(source)}
    ids = [e.event_id for e in accepted]
    assert len(records) == len(source), f"read {len(records)} of {len(source)} events"
    assert len(set(ids)) == len(ids), "duplicate event ids read back"
    assert len(accepted) == len(source), f"{len(source) - len(accepted)} events failed validation"
    assert sorted(accepted, key=lambda e: position[e.event_id]) == source, "events changed"
    last_index: dict[int, int] = {}
    partition_of_user: dict[str, int] = {}
    for record, event in zip(records, accepted, strict=True):
        index = position[event.event_id]
        assert index > last_index.get(record.partition, -1), "order broken within a partition"
        last_index[record.partition] = index
        assert partition_of_user.setdefault(event.user_id, record.partition) == record.partition
    return {"partitions_used": len(last_index), "users": len(partition_of_user)}


def _validate_rates(values: list[bytes], catalog: set[str]) -> tuple[list, float, float]:
    start = time.perf_counter()
    for value in values:
        json.loads(value)
    loads_rate = len(values) / (time.perf_counter() - start)
    rules, recent = ValidationRules(catalog=catalog), RecentIds()
    start = time.perf_counter()
    results = [validate_event(value, rules, recent) for value in values]
    return results, len(values) / (time.perf_counter() - start), loads_rate


def run(count: int = 100_000, repeats: int = 3, partitions: int = 4,
        data: Path | None = None) -> dict[str, Any]:
    """Run the benchmark; returns every figure (see the module docstring)."""
    events, item_ids, source_name = load_events(data, count)
    source = table_to_events(events)
    messages = list(event_messages(events))
    catalog = set(item_ids)
    runs: list[dict[str, Any]] = []
    with Broker() as broker:
        bootstrap = broker.bootstrap_servers
        for repeat in range(repeats):
            topic, bare_topic = f"bench-{repeat}", f"bench-bare-{repeat}"
            create_topics(bootstrap, [topic, bare_topic], partitions)
            producer = json_producer(bootstrap)
            report = produce_events(producer, topic, events, progress=False)
            producer.close()
            assert report.delivered == count and report.failed == 0, report
            records, consume_rate, extra = _read_back(bootstrap, topic, count)
            assert extra == 0, f"{extra} records beyond the {count} produced"
            results, validate_rate, loads_rate = _validate_rates([r.value for r in records],
                                                                 catalog)
            accepted = [r for r in results if isinstance(r, PurchaseEvent)]
            checks = check_round_trip(source, records, accepted)
            runs.append({
                "produce_per_s": report.rate,
                "bare_produce_per_s": _bare_produce(bootstrap, bare_topic, messages),
                "consume_per_s": consume_rate,
                "bare_consume_per_s": _bare_consume(bootstrap, bare_topic, count),
                "validate_per_s": validate_rate,
                "json_loads_per_s": loads_rate,
                **checks,
            })
    medians = {k: statistics.median(r[k] for r in runs) for k in runs[0] if k.endswith("_per_s")}
    return {
        "events": count, "repeats": repeats, "partitions": partitions, "data": source_name,
        "cpus": os.cpu_count(), "load_avg_1m": os.getloadavg()[0],
        "medians": medians,
        "ratios": {
            "produce_vs_bare_send": medians["produce_per_s"] / medians["bare_produce_per_s"],
            "consume_vs_bare_consumer": medians["consume_per_s"] / medians["bare_consume_per_s"],
            "validate_vs_json_loads": medians["validate_per_s"] / medians["json_loads_per_s"],
        },
        "checks": "counts equal, no duplicates, per-partition order, exact events: passed",
        "runs": runs,
    }


def format_report(result: dict[str, Any]) -> str:
    """A short human-readable summary of :func:`run`'s result."""
    m, r = result["medians"], result["ratios"]
    return "\n".join([
        f"{result['events']:,} events from {result['data']}, {result['partitions']} partitions, "
        f"median of {result['repeats']} repeats; {result['checks']}",
        f"produce   {m['produce_per_s']:>9,.0f} ev/s  (bare send {m['bare_produce_per_s']:,.0f};"
        f" ratio {r['produce_vs_bare_send']:.2f})",
        f"consume   {m['consume_per_s']:>9,.0f} ev/s  (bare consumer "
        f"{m['bare_consume_per_s']:,.0f}; ratio {r['consume_vs_bare_consumer']:.2f})",
        f"validate  {m['validate_per_s']:>9,.0f} ev/s  (json.loads {m['json_loads_per_s']:,.0f};"
        f" ratio {r['validate_vs_json_loads']:.2f})",
    ])
