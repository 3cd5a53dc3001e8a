"""Replay a dataset's events into Kafka as JSON, in event-time order (``dynllm produce``).

Messages are keyed by ``user_id``, so one user's events land on one partition and keep their
order. Pacing is either a fixed rate (events per second) or event time scaled by a speed-up
factor (``speedup=3600`` plays one hour of purchases per second); neither means "as fast as the
broker takes them".
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pyarrow as pa

from streaming.kafka_io import encode_json

#: Rows converted from Arrow to Python at a time.
CHUNK_ROWS = 2048


@dataclass
class ProduceReport:
    """What a replay did.

    Attributes:
        sent: Messages handed to the producer.
        delivered: Messages the broker acknowledged.
        failed: Messages that could not be delivered (with the first error in ``errors``).
        seconds: Wall-clock time from the first send to the final flush.
    """

    sent: int = 0
    delivered: int = 0
    failed: int = 0
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        """Delivered events per second."""
        return self.delivered / self.seconds if self.seconds > 0 else 0.0


def event_messages(events: pa.Table) -> Iterator[tuple[str, bytes, float]]:
    """``(key, JSON value, ts)`` per event row, in table order; unset optional fields omitted."""
    for batch in events.to_batches(max_chunksize=CHUNK_ROWS):
        for row in batch.to_pylist():
            value = {k: v for k, v in row.items() if v is not None}
            yield row["user_id"], encode_json(value), row["ts"]


class _Pacer:
    """Sleeps so that sends follow a fixed rate or scaled event time."""

    def __init__(self, rate: float | None, speedup: float | None) -> None:
        if rate is not None and speedup is not None:
            raise ValueError("give rate or speedup, not both")
        self.rate, self.speedup = rate, speedup
        self._start = time.monotonic()
        self._first_ts: float | None = None

    def wait(self, index: int, ts: float) -> None:
        if self.rate is not None:
            due = self._start + index / self.rate
        elif self.speedup is not None:
            if self._first_ts is None:
                self._first_ts = ts
            due = self._start + (ts - self._first_ts) / self.speedup
        else:
            return
        delay = due - time.monotonic()
        if delay > 0.001:
            time.sleep(delay)


def produce_events(producer, topic: str, events: pa.Table, rate: float | None = None,
                   speedup: float | None = None, progress: bool = True) -> ProduceReport:
    """Send ``events`` (an ``EVENT_SCHEMA`` table, in event-time order) to ``topic``.

    Args:
        producer: A producer from :func:`streaming.kafka_io.json_producer`.
        topic: Destination topic.
        events: The rows to send, in the order to send them.
        rate: Events per second; ``None`` for no rate limit.
        speedup: Event-time seconds per wall-clock second; exclusive with ``rate``.
        progress: Show a tqdm progress bar.

    Returns:
        Counts of sent, delivered and failed messages and the elapsed time.
    """
    from tqdm import tqdm

    report = ProduceReport()
    pacer = _Pacer(rate, speedup)

    def delivered(_metadata: object) -> None:
        report.delivered += 1

    def failed(error: Exception) -> None:
        report.failed += 1
        if not report.errors:
            report.errors.append(repr(error))

    start = time.perf_counter()
    bar = tqdm(total=events.num_rows, unit="ev", disable=not progress, mininterval=0.5)
    with bar:
        for index, (key, value, ts) in enumerate(event_messages(events)):
            pacer.wait(index, ts)
            producer.send(topic, key=key, value=value).add_callback(delivered).add_errback(failed)
            report.sent += 1
            if index % 1000 == 999:
                bar.update(1000)
        bar.update(report.sent - bar.n)
        producer.flush()
    report.seconds = time.perf_counter() - start
    return report
