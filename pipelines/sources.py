"""``ReadPurchases``: purchase records in batches, from Kafka (live) or a dataset's log (replay).

Live reading is a splittable DoFn on kafka-python (Beam's ``ReadFromKafka`` is a Java
cross-language transform that needs a downloaded expansion service). The whole topic is one
element whose restriction is "every partition from these offsets on"
(:mod:`pipelines.positions`). A call polls one consumer for all partitions again and again for
up to ``call_s``; each poll's records become one :class:`~pipelines.elements.RawBatch`, which the
fused downstream stages process before the next poll, so an event waits at most for the batch
ahead of it. Then the call claims what it read, sets the watermark to the newest produce time and
defers the rest, and the runner finishes the bundle and calls back. A :class:`StopFlag` ends
reading cleanly: the reader emits a last, empty batch marked ``checkpoint`` and claims the end.
Broker outages and a topic recreated under the reader (a memory-only broker restarted) follow the
policy of :mod:`pipelines.outages`: wait and reconnect, or checkpoint and restart on the new log.

Replay reads ``events.parquet`` in row batches; the row number is the offset.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
import uuid
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.watermark_estimators import ManualWatermarkEstimator
from apache_beam.utils.timestamp import Duration, Timestamp

from pipelines.elements import RawBatch, Span
from pipelines.outages import BrokerWatch, mark_log_reset
from pipelines.positions import Positions, TopicPositionsProvider, as_positions
from streaming import metrics
from streaming.kafka_settings import PLAINTEXT, KafkaSettings
from tgn.data import batch_bounds as event_batch_bounds

log = logging.getLogger(__name__)

#: Longest wait of one fetch of the live reader (ms). A sealed micro-batch waits for a poll that
#: shows every partition past it, so the poll rate bounds the latency: a bare consumer at 2,000
#: events/s on the local broker, p50/p99 47/~100 ms at 100 ms, 21-25/60-83 ms at 20 ms.
FETCH_MAX_WAIT_MS = 20

def _remove(*paths: str) -> None:
    for path in paths:
        Path(path).unlink(missing_ok=True)


class StopFlag:
    """Stop (for good, or to restart) signalled as data: two marker files.

    A DoFn gets a pickled copy of the flag, possibly in another process or on another worker of
    a shared filesystem; it reads the markers (a ``stat`` per poll) instead of a process-wide
    registry. The files are removed when the flag that made them is garbage-collected (copies
    made by pickling never remove them).

    Args:
        directory: where the markers live (default: the system's temp directory; give a shared
            one when workers run on other machines).
    """

    def __init__(self, directory: str | Path | None = None) -> None:
        base = Path(directory or tempfile.gettempdir())
        self.stop_path = str(base / f"dynllm-stop-{uuid.uuid4().hex}")
        self.restart_path = f"{self.stop_path}.restart"
        weakref.finalize(self, _remove, self.stop_path, self.restart_path)

    def set(self) -> None:
        """Ask every reader holding this flag to finish."""
        Path(self.stop_path).touch()

    def restart(self) -> bool:
        """Ask the readers to finish so the pipeline can run again; False if already asked."""
        try:
            Path(self.restart_path).touch(exist_ok=False)
        except FileExistsError:
            return False
        return True

    def restart_pending(self) -> bool:
        """A restart was asked for and no stop for good."""
        return os.path.exists(self.restart_path) and not os.path.exists(self.stop_path)

    def rearm(self) -> None:
        """Forget a restart request (the pipeline is about to run again)."""
        Path(self.restart_path).unlink(missing_ok=True)

    def is_set(self) -> bool:
        """Whether :meth:`set` or :meth:`restart` was called."""
        return os.path.exists(self.stop_path) or os.path.exists(self.restart_path)


@dataclass
class CheckpointPolicy:
    """When the reader marks a batch ``checkpoint``: every ``events`` records or ``seconds``."""

    events: int = 50_000
    seconds: float = 30.0
    _count: int = field(default=0, init=False)
    _last: float = field(default_factory=time.monotonic, init=False)

    def due(self, new_records: int) -> bool:
        """Count ``new_records``; True (and reset) when a checkpoint is due."""
        self._count += new_records
        if self._count >= self.events or time.monotonic() - self._last >= self.seconds:
            self._count, self._last = 0, time.monotonic()
            return True
        return False


class IdleWatch:
    """Which partitions are idle: for ``idle_s`` of polling, the reader held everything the
    broker had there (lag 0 in the last fetch, no fetched records waiting) and got none.

    Idle partitions stop holding the event-time watermark back (:mod:`pipelines.watermark`);
    when all are idle, the open micro-batches are sealed. This is the bounded wait: an event
    waits for the other partitions' clocks at most ``idle_s`` after they went quiet.

    Only time spent polling counts (at most :attr:`STEP_S` per poll): while the pipeline is
    busy (a large batch, a checkpoint, a starved CPU) no fetch reaches the reader, so a
    partition's silence then says nothing; counted, it made a partition whose records were
    still on their way idle, and the others' clocks sealed its events as late.

    **Wake-up.** When an idle partition brings records again, every other partition starts its
    quiet time afresh: a stream that resumes after a pause (or starts after every partition
    went idle) reaches the partitions one fetch after another, and the ones not fetched yet
    must hold the watermark back again until they bring records or stay quiet for ``idle_s``.
    Without it the first partition fetched sealed its events alone and the others' first
    events came late (359 of 120,000 in two ``dynllm bench pipeline`` runs).

    Args:
        idle_s: seconds of polling without records before a caught-up partition is idle.
    """

    #: Most seconds one poll interval adds to a partition's quiet time.
    STEP_S = 0.1

    def __init__(self, idle_s: float) -> None:
        self.idle_s = idle_s
        self._quiet: dict[int, float] = {}
        self._polled: float | None = None
        self.reported: frozenset[int] = frozenset()  # as told in the last emitted batch

    def update(self, records: list, partitions, lag, buffered) -> frozenset[int]:
        """The idle partitions after a poll that returned ``records`` (``lag(p)``: records
        not read yet, ``None`` unknown; ``buffered(p)``: fetched records not returned yet)."""
        now = time.monotonic()
        step = 0.0 if self._polled is None else min(now - self._polled, self.STEP_S)
        self._polled = now
        delivered = {r.partition for r in records}
        woke = any(self._quiet.get(p, 0.0) >= self.idle_s for p in delivered)
        for p in partitions:
            busy = p in delivered or lag(p) != 0 or buffered(p)
            self._quiet[p] = 0.0 if busy or woke else self._quiet.get(p, 0.0) + step
        return frozenset(p for p in partitions if self._quiet[p] >= self.idle_s)


@dataclass(frozen=True)
class KafkaTopic:
    """The element the live reader starts from: a topic and the first offset of each partition,
    and the Kafka TLS/SASL settings to read it with (data, so they travel to any worker)."""

    bootstrap_servers: str
    topic: str
    positions: Positions
    settings: KafkaSettings = PLAINTEXT


class LiveReader:
    """One kafka-python consumer for every partition of the topic, at the positions asked for.

    A poll fetches from all partitions at once. Asked for positions other than where the
    consumer stands (a restart, a residual resumed elsewhere), it rebuilds the consumer there.

    Args:
        bootstrap_servers: Kafka ``host:port``.
        topic: the topic.
        max_batch: most records one poll returns.
        settings: Kafka TLS/SASL settings (:mod:`streaming.kafka_settings`).
    """

    def __init__(self, bootstrap_servers: str, topic: str, max_batch: int,
                 settings: KafkaSettings = PLAINTEXT) -> None:
        self.bootstrap_servers, self.topic, self.max_batch = bootstrap_servers, topic, max_batch
        self.settings = settings
        self._reader = None
        self._topic_id: str | None = None  # the topic's id when first seen

    def seek(self, positions: dict[int, int]) -> None:
        """Read from ``positions`` (next offset per partition) on."""
        from streaming.kafka_io import TopicReader

        if self._reader is not None and self._reader.positions == positions:
            return
        if self._reader is not None:
            self._reader.close()
        # kafka-python verifies CRC32C in pure Python: 60% of read time here. TCP already
        # checksums every segment, so the pipeline skips the second check.
        # During an outage, retry the connection at least every second (kafka-python's backoff
        # grows to 30 s by default), and after it refresh metadata at least every 5 s, so that
        # a recreated topic (new id) is noticed within seconds.
        # A fetch waits at most FETCH_MAX_WAIT_MS for records (Tansu holds it that long even
        # when records are there): the watermark moves on every poll.
        self._reader = TopicReader(self.bootstrap_servers, self.topic, sorted(positions),
                                   positions, max_batch=self.max_batch, check_crcs=False,
                                   reconnect_backoff_max_ms=1000, metadata_max_age_ms=5000,
                                   fetch_max_wait_ms=FETCH_MAX_WAIT_MS, settings=self.settings)

    @property
    def positions(self) -> dict[int, int]:
        """Next offset per partition (advanced by every poll)."""
        return dict(self._reader.positions)

    def poll(self, timeout_s: float) -> list:
        """Up to ``max_batch`` records of any partition, in offset order per partition."""
        return self._reader.poll(timeout_s)

    def recreated(self) -> bool:
        """Whether the topic's id changed since this reader first saw it (a new log)."""
        current = self._reader.topic_id() if self._reader is not None else None
        if current is None:
            return False
        self._topic_id = self._topic_id or current
        return current != self._topic_id

    def lag(self, partition: int) -> int | None:
        """Records not yet read: the fetch high watermark minus the next offset."""
        return self._reader.lag(partition) if self._reader is not None else None

    def buffered(self, partition: int) -> bool:
        """Fetched records of ``partition`` that no poll returned yet."""
        return self._reader is not None and self._reader.buffered(partition)

    def close(self) -> None:
        """Close the consumer."""
        if self._reader is not None:
            self._reader.close()


_POSITIONS = beam.DoFn.RestrictionParam(TopicPositionsProvider())
_WATERMARK = beam.DoFn.WatermarkEstimatorParam(ManualWatermarkEstimator.default_provider())


def _empty_batch(positions: dict[int, int], checkpoint: bool = True,
                 idle: frozenset[int] = frozenset(), end: bool = False,
                 last: bool = False) -> RawBatch:
    """A batch with no records that still carries the positions, the idle partitions and a
    ``checkpoint`` (or end-of-input, or last-batch) mark."""
    return RawBatch(Span({p: (o, o) for p, o in positions.items()}, checkpoint, idle=idle,
                         end=end, last=last), [],
                    np.zeros(0, np.int64), np.zeros(0), np.zeros(0, np.int32))


def _records_batch(records: list, before: dict[int, int], after: dict[int, int],
                   checkpoint: bool, polled: float, fetched: float,
                   idle: frozenset[int]) -> RawBatch:
    """One poll's records, from every partition, as one batch over ``[before, after)``."""
    count = len(records)
    span = Span({p: (before[p], after[p]) for p in before}, checkpoint, idle=idle)
    return RawBatch(span.mark("poll", polled).mark("fetch", fetched), [r.value for r in records],
                    np.fromiter((r.offset for r in records), np.int64, count),
                    np.fromiter((r.timestamp_ms for r in records), np.float64, count) / 1000.0,
                    np.fromiter((r.partition for r in records), np.int32, count))


class _ReadKafkaFn(beam.DoFn):
    """Splittable DoFn over a whole topic: polls for up to ``call_s``, then defers the rest.

    Each poll's records (any partitions) become one batch, which the fused downstream stages
    process before the next poll. A call ends after ``call_s`` so the runner can finish the
    bundle (commit state, report progress) and call back with the residual positions.
    """

    def __init__(self, stop: StopFlag, max_batch: int, poll_s: float, call_s: float,
                 policy: CheckpointPolicy, state_dir: str | None, idle_s: float) -> None:
        self.stop, self.max_batch, self.poll_s, self.call_s = stop, max_batch, poll_s, call_s
        self.policy, self.state_dir, self.idle_s = policy, state_dir, idle_s

    def setup(self) -> None:
        self._reader: LiveReader | None = None
        self._watch: BrokerWatch | None = None
        self._idle = IdleWatch(self.idle_s)

    def _new_log(self, topic: str) -> bool:
        """True if the topic was recreated; the first call that sees it asks for a restart."""
        if not self._reader.recreated():
            return False
        if self.stop.restart():
            mark_log_reset(self.state_dir, topic)
            metrics.SOURCE_LOG_RESETS.labels(topic).inc()
            log.warning("topic %s was recreated (new topic id): its old log is gone; "
                        "checkpointing and restarting from the start of the new log", topic)
        return True

    @beam.DoFn.unbounded_per_element()
    def process(self, element: KafkaTopic, tracker=_POSITIONS, watermark=_WATERMARK):
        if self._reader is None:
            self._reader = LiveReader(element.bootstrap_servers, element.topic, self.max_batch,
                                      element.settings)
            self._watch = BrokerWatch(element.bootstrap_servers)
        position = dict(tracker.current_restriction().start)  # advanced by every claim
        deadline = time.monotonic() + self.call_s
        while not self.stop.is_set():
            self._reader.seek(position)
            polled = time.time()
            records = self._reader.poll(self.poll_s)
            if self._new_log(element.topic):  # these records are the new log's: not applied
                break
            batch = self._batch(element.topic, records, position, polled, watermark)
            if batch is not None:
                if not tracker.try_claim(self._reader.positions):
                    return  # split off: the residual reads these records again
                # counted once claimed: a batch dropped by a split must be told again
                self._idle.reported = batch.span.idle
                metrics.EVENTS_CONSUMED.inc(len(records))
                position = self._reader.positions
                yield batch
            if time.monotonic() >= deadline:
                break
        if self.stop.is_set():  # done: a last, empty batch carries the final checkpoint
            tracker.try_claim(None)
            # a stop leaves open micro-batches open (read again at the next start); the last
            # read of a replaced log seals them, as its records cannot be read again
            yield _empty_batch(position, end=self.stop.restart_pending(), last=True)
            return
        tracker.defer_remainder(Duration.of(0))

    def _batch(self, topic: str, records: list, position: dict[int, int], polled: float,
               watermark) -> RawBatch | None:
        """The batch for one poll's ``records`` read from ``position`` on, if any is due."""
        fetched = time.time()
        (self._watch.records_arrived if records else self._watch.read_was_empty)()
        for partition in position:
            lag = self._reader.lag(partition)
            if lag is not None:
                metrics.CONSUMER_LAG.labels(topic, str(partition)).set(lag)
        idle = self._idle.update(records, position, self._reader.lag, self._reader.buffered)
        if idle != self._idle.reported:
            log.info("idle partitions of %s: %s", topic, sorted(idle) or "none")
        if not records:
            due = self.policy.due(0)
            if not due and idle == self._idle.reported:
                return None
            empty = _empty_batch(position, due, idle)  # it may seal events: trace its poll
            empty.span = empty.span.mark("poll", polled).mark("fetch", fetched)
            return empty
        batch = _records_batch(records, position, self._reader.positions,
                               self.policy.due(len(records)), polled, fetched, idle)
        newest = Timestamp(float(batch.produced_at.max()))
        current = watermark.current_watermark()
        if current is None or newest > current:  # a lagging partition's records are older
            watermark.set_watermark(newest)
        return batch

    def teardown(self) -> None:
        if getattr(self, "_reader", None) is not None:
            self._reader.close()


def batch_bounds(start: int, stop: int, size: int, cut: int | None = None,
                 ts: np.ndarray | None = None) -> list[int]:
    """Row boundaries of batches of ``size`` from ``start``, restarting at ``cut`` if given.

    With the log's times ``ts``, the batches from ``cut`` on (the evaluated ones) never split
    a group of equal times, as :meth:`tgn.evaluate.Evaluator.run` batches test events
    (:func:`tgn.data.batch_bounds`); those before ``cut`` are cut by count, as its warm-up.

    >>> batch_bounds(0, 10, 4, cut=5)
    [0, 4, 5, 9, 10]
    >>> batch_bounds(0, 6, 2, cut=2, ts=np.array([0.0, 0.0, 1.0, 1.0, 1.0, 2.0]))
    [0, 2, 5, 6]
    """
    cut = stop if cut is None or not start < cut < stop else cut
    tail = event_batch_bounds(stop - cut if ts is None else ts[cut:stop], size)[:-1]
    return [*range(start, cut, size), *(cut + b for b in tail), stop]


def _compact(rows: pa.Table) -> pa.Table:
    """A copy of a table slice with its own buffers (a pickled slice carries the whole log)."""
    return rows.take(np.arange(rows.num_rows))


class _ReadLogFn(beam.DoFn):
    """Yield a dataset's ``events.parquet`` rows ``[start, stop)`` as Arrow tables."""

    def __init__(self, batch_size: int, policy: CheckpointPolicy, cut: int | None) -> None:
        self.batch_size, self.policy, self.cut = batch_size, policy, cut

    def process(self, element: tuple[str, int, int | None]):
        path, start, stop = element
        log = pq.read_table(path)
        stop = log.num_rows if stop is None else min(stop, log.num_rows)
        bounds = batch_bounds(start, stop, self.batch_size, self.cut,
                              log.column("ts").to_numpy().astype(np.float64))
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
            metrics.EVENTS_CONSUMED.inc(hi - lo)
            span = Span.of(0, lo, hi, checkpoint=hi == stop or self.policy.due(hi - lo),
                           end_of_input=hi == log.num_rows, last=hi == stop)
            yield RawBatch(span.mark("fetch"), _compact(log.slice(lo, hi - lo)),
                           np.arange(lo, hi, dtype=np.int64), np.full(hi - lo, time.time()),
                           np.zeros(hi - lo, np.int32))


class ReadPurchases(beam.PTransform):
    """Purchase records as :class:`~pipelines.elements.RawBatch` es, live or replayed.

    Give either Kafka settings or a log path.

    Args:
        bootstrap_servers: Kafka ``host:port`` (live).
        topic: topic to read (live).
        positions: next offset per partition to start from (from the checkpoints); a missing
            partition starts at 0. For a log, partition 0 is the first row.
        log_path: a dataset's ``events.parquet`` (replay).
        stop_row: replay rows before this one only (``None``: to the end); like a stop, it
            leaves the open micro-batch open: only the log's end seals it.
        cut_row: replayed batches restart at this row (the first test event, so that evaluated
            batches line up with ``dynllm evaluate``'s).
        stop: ends live reading when set.
        max_batch: most records per batch.
        poll_s: longest wait of one poll for Kafka.
        call_s: how long one call of the live reader polls before it hands the rest back to
            the runner (which then finishes the bundle and calls again).
        policy: when batches are marked ``checkpoint``.
        state_dir: where a recreated input topic is marked (see :mod:`pipelines.outages`).
        idle_s: a caught-up partition without records for this long is reported idle (live;
            :class:`IdleWatch`).
        settings: Kafka TLS/SASL settings (live; :mod:`streaming.kafka_settings`).
    """

    def __init__(self, *, bootstrap_servers: str | None = None, topic: str = "purchases",
                 positions: dict[int, int] | None = None, log_path: str | None = None,
                 stop_row: int | None = None, cut_row: int | None = None,
                 stop: StopFlag | None = None,
                 max_batch: int = 2000, poll_s: float = 0.05, call_s: float = 1.0,
                 policy: CheckpointPolicy | None = None, state_dir: str | None = None,
                 idle_s: float = 1.0, settings: KafkaSettings = PLAINTEXT) -> None:
        super().__init__()
        if (bootstrap_servers is None) == (log_path is None):
            raise ValueError("give exactly one of bootstrap_servers and log_path")
        self.bootstrap_servers, self.topic, self.log_path = bootstrap_servers, topic, log_path
        self.positions, self.stop_row, self.cut_row = positions or {}, stop_row, cut_row
        self.stop, self.max_batch, self.poll_s = stop or StopFlag(), max_batch, poll_s
        self.call_s = call_s
        self.policy = policy or CheckpointPolicy()
        self.state_dir, self.idle_s, self.settings = state_dir, idle_s, settings

    def expand(self, pbegin):
        if self.log_path is not None:
            spec = (self.log_path, self.positions.get(0, 0), self.stop_row)
            return (pbegin | "LogPath" >> beam.Create([spec])
                    | "ReadLog" >> beam.ParDo(_ReadLogFn(self.max_batch, self.policy,
                                                         self.cut_row)))
        start = as_positions({p: self.positions.get(p, 0) for p in self._partitions()})
        return (pbegin | "Topic" >> beam.Create([KafkaTopic(self.bootstrap_servers, self.topic,
                                                            start, self.settings)])
                | "ReadKafka" >> beam.ParDo(_ReadKafkaFn(
                    self.stop, self.max_batch, self.poll_s, self.call_s, self.policy,
                    self.state_dir, self.idle_s)))

    def _partitions(self) -> list[int]:
        """The topic's partitions (created with 4 if missing); later-added ones are not read."""
        from streaming.kafka_io import TopicReader, create_topics

        create_topics(self.bootstrap_servers, [self.topic], partitions=4, settings=self.settings)

        with TopicReader(self.bootstrap_servers, self.topic, settings=self.settings) as reader:
            return sorted(reader.positions)
