"""Event-time micro-batches: the same batches whatever the polls, the partitions and restarts.

The sealer is fed the way the live reader feeds it — polls that return random runs of records
from random partitions, checkpoints and restarts at random points — and must cut exactly the
micro-batches a replay of the same events in one sorted log cuts.
"""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.elements import EventsBatch, Span
from pipelines.state import shard_of
from pipelines.watermark import BatchRule, Sealer
from streaming.validation import Reason

RULE = BatchRule(events=50, window_s=3600.0)


def _batch(events: pa.Table, partitions: np.ndarray, offsets: np.ndarray,
           ranges: dict[int, tuple[int, int]], idle: frozenset[int] = frozenset(),
           end: bool = False, checkpoint: bool = False) -> EventsBatch:
    return EventsBatch(Span(ranges, checkpoint, idle=idle, end=end), events,
                       offsets.astype(np.int64), np.zeros(len(offsets)),
                       partitions.astype(np.int32))


def _ids(batches: list[EventsBatch]) -> list[list[str]]:
    return [b.events.column("event_id").to_pylist() for b in batches if len(b)]


@pytest.fixture(scope="module")
def events(cj_small) -> pa.Table:
    return pq.read_table(cj_small / "events.parquet").slice(0, 1500)


def _replay(events: pa.Table, rule: BatchRule = RULE) -> list[EventsBatch]:
    """The micro-batches of the events as one sorted log read in chunks of 400 rows."""
    sealer, out = Sealer(rule), []
    for lo in range(0, events.num_rows, 400):
        hi = min(lo + 400, events.num_rows)
        out += sealer.add(_batch(events.slice(lo, hi - lo), np.zeros(hi - lo),
                                 np.arange(lo, hi), {0: (lo, hi)},
                                 end=hi == events.num_rows))[0]
    return out


def _replayed(events: pa.Table, rule: BatchRule = RULE) -> list[list[str]]:
    return _ids(_replay(events, rule))


def _cuts(batches: list[EventsBatch]) -> str:
    """The sealed-batch digest after the last batch with events."""
    return [b for b in batches if len(b)][-1].frontier.cuts


class _Topic:
    """The events on 4 partitions keyed by user, read by random polls."""

    def __init__(self, events: pa.Table) -> None:
        part = shard_of(events.column("user_id").to_pylist(), 4)
        self.logs = {p: events.filter(pa.array(part == p)) for p in range(4)}

    def read(self, sealer: Sealer, start: dict[int, int], rng, stop_after: int | None = None,
             idle_at_end: bool = True) -> list[EventsBatch]:
        """Poll from ``start`` until every partition is read (or ``stop_after`` polls)."""
        position, out, polls = dict(start), [], 0
        while any(position[p] < self.logs[p].num_rows for p in position):
            if stop_after is not None and polls == stop_after:
                return out
            polls += 1
            chosen = [p for p in position if rng.random() < 0.6] or [0]
            tables, parts, offsets, ranges = [], [], [], {}
            for p in position:
                take = min(int(rng.integers(0, 60)), self.logs[p].num_rows - position[p])
                take = take if p in chosen else 0
                tables.append(self.logs[p].slice(position[p], take))
                parts.append(np.full(take, p))
                offsets.append(np.arange(position[p], position[p] + take))
                ranges[p] = (position[p], position[p] + take)
                position[p] += take
            out += sealer.add(_batch(pa.concat_tables(tables), np.concatenate(parts),
                                     np.concatenate(offsets), ranges,
                                     checkpoint=rng.random() < 0.2))[0]
        if idle_at_end:  # the reader reports every partition idle once nothing comes
            out += sealer.add(_batch(self.logs[0].slice(0, 0), np.zeros(0), np.zeros(0),
                                     {p: (o, o) for p, o in position.items()},
                                     idle=frozenset(position)))[0]
        return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_live_polls_cut_the_batches_of_a_sorted_replay(events, seed):
    topic = _Topic(events)
    live = topic.read(Sealer(RULE), dict.fromkeys(range(4), 0), np.random.default_rng(seed))
    expected = _replayed(events)
    assert _ids(live) == expected
    assert _cuts(live) == _cuts(_replay(events)) != _cuts(_replay(events, BatchRule(49, 3600.0)))
    assert max(len(b) for b in expected) == RULE.events  # both limits cut batches here
    assert len(expected) > events.num_rows // RULE.events


def test_restarts_from_any_sealed_frontier_rebuild_the_same_batches(events):
    topic, rng = _Topic(events), np.random.default_rng(5)
    frontier, applied, restarts = None, [], 0
    for _ in range(8):  # read a while, "crash", restart from the last checkpointed frontier
        sealer = Sealer(RULE, frontier)
        start = dict(frontier.resume) if frontier else dict.fromkeys(range(4), 0)
        out = topic.read(sealer, start, rng, stop_after=int(rng.integers(3, 12)),
                         idle_at_end=False)
        checkpoints = [i for i, b in enumerate(out) if b.span.checkpoint]
        if checkpoints:  # what the last checkpoint holds survives the crash
            applied += out[:checkpoints[-1] + 1]
            frontier, restarts = out[checkpoints[-1]].frontier, restarts + 1
    applied += topic.read(Sealer(RULE, frontier), dict(frontier.resume), rng)
    assert restarts >= 5
    assert _ids(applied) == _replayed(events)
    assert _cuts(applied) == _cuts(_replay(events))  # the digest goes on from the frontier


def test_late_events_are_dead_letters_unless_within_the_allowed_lateness(events):
    rows = events.slice(0, 300)
    ts = rows.column("ts").to_numpy()
    late_row = int(np.flatnonzero(ts > ts[0] + 7200)[0])  # two hours after the first event
    order = np.r_[np.arange(late_row, 300), np.arange(0, late_row)]  # the first rows come last
    shuffled = rows.take(order)
    for lateness, expect_late in ((0.0, late_row), (ts[-1] - ts[0], 0)):
        sealer = Sealer(BatchRule(events=50, lateness_s=lateness))
        out, letters = sealer.add(_batch(shuffled, np.zeros(300), np.arange(300), {0: (0, 300)}))
        more, _ = sealer.add(_batch(shuffled.slice(0, 0), np.zeros(0), np.zeros(0),
                                    {0: (300, 300)}, end=True))
        assert len(letters) == expect_late
        assert {d.reason for d in letters} <= {Reason.LATE_EVENT}
        applied = sum(len(b) for b in out + more)
        assert applied == 300 - expect_late
        if not expect_late:  # within the lateness: the batches of the sorted log
            assert _ids(out + more) == _replayed(rows, BatchRule(events=50, lateness_s=lateness))


def test_an_idle_partition_stops_holding_the_watermark_back(events):
    rows = events.slice(0, 200)
    sealer = Sealer(RULE)
    ranges = {0: (0, 200), 1: (0, 0)}  # partition 1 never gets a record
    out, _ = sealer.add(_batch(rows, np.zeros(200), np.arange(200), ranges))
    assert out == [] and len(sealer.frontier().resume) == 2  # held back by partition 1
    out, _ = sealer.add(_batch(rows.slice(0, 0), np.zeros(0), np.zeros(0),
                               {0: (200, 200), 1: (0, 0)}, idle=frozenset({1})))
    sealed = sum(len(b) for b in out)
    assert 0 < sealed < 200  # up to the watermark of partition 0; its newest basket waits
    assert out[-1].frontier.resume[1] == 0 and out[-1].frontier.resume[0] > 0


def test_only_time_spent_polling_makes_a_quiet_partition_idle():
    from pipelines.sources import IdleWatch

    def poll(watch, records=(), lag=0, buffered=False):
        return watch.update(list(records), [0, 1], lambda p: lag, lambda p: buffered)

    class Rec:
        partition = 0

    watch = IdleWatch(idle_s=0.25)
    poll(watch, [Rec()])
    time.sleep(1.0)  # the pipeline was busy: no poll, no fetch; this must not count
    assert poll(watch, [Rec()]) == frozenset()
    for _ in range(3):  # polling while partition 1 brings nothing, caught up
        time.sleep(0.11)
        idle = poll(watch, [Rec()])
    assert idle == frozenset({1})
    assert poll(watch, [Rec()], buffered=True) == frozenset()  # fetched, not yet returned
    time.sleep(0.11)
    assert poll(watch, [Rec()], lag=None) == frozenset()  # its end not known yet


def test_a_partition_waking_up_makes_the_others_prove_idleness_again():
    """A stream resuming after every partition went idle reaches them one fetch after another:
    the ones not fetched yet must hold the watermark back again for ``idle_s``."""
    from pipelines.sources import IdleWatch

    class Rec:
        def __init__(self, partition: int) -> None:
            self.partition = partition

    watch = IdleWatch(idle_s=0.25)
    poll = lambda records=(): watch.update(list(records), [0, 1, 2], lambda p: 0,  # noqa: E731
                                           lambda p: False)
    poll()
    for _ in range(4):
        time.sleep(0.11)
        idle = poll()
    assert idle == frozenset({0, 1, 2})  # the stream has not started
    assert poll([Rec(0)]) == frozenset()  # partition 0 wakes: 1 and 2 are not idle any more
    for _ in range(4):  # partition 0 keeps bringing records, 1 and 2 stay quiet
        time.sleep(0.11)
        idle = poll([Rec(0)])
    assert idle == frozenset({1, 2})  # the bounded wait: idle again after idle_s of polling
    assert poll([Rec(0), Rec(1)]) == frozenset()  # 1 wakes: 2 waits again; 0 was never idle


@pytest.mark.kafka
def test_an_idle_report_split_off_by_the_runner_is_sent_again(kafka_broker):
    """The runner may split the reader's restriction between a poll and its claim (Beam's
    dynamic split); the batch of that poll is then not emitted, so what it reported (here: the
    partition went idle, which seals the open micro-batches) must come again from the
    residual, or the last events of a quiet stream would wait for ever."""
    from apache_beam.io.watermark_estimators import ManualWatermarkEstimator
    from apache_beam.runners.sdf_utils import ThreadsafeRestrictionTracker

    from pipelines.positions import PositionsTracker, TopicPositions
    from pipelines.sources import CheckpointPolicy, KafkaTopic, StopFlag, _ReadKafkaFn
    from streaming.kafka_io import create_topics, json_producer

    create_topics(kafka_broker, ["purchases"], partitions=1)
    producer = json_producer(kafka_broker)
    for i in range(5):
        producer.send("purchases", {"event_id": f"e{i}"}, partition=0)
    producer.close()

    class SplitAtIdle(PositionsTracker):
        """Splits (as a runner's split request would) at the second claim of the end: the
        first is the records' batch, the second the idle report."""

        def __init__(self, restriction: TopicPositions) -> None:
            super().__init__(restriction)
            self.ends, self.residual = 0, None

        def try_claim(self, position):
            self.ends += position == {0: 5}
            if self.ends == 2:
                self.residual = self.try_split(0.0)[1]
            return super().try_claim(position)

    reader = _ReadKafkaFn(StopFlag(), max_batch=100, poll_s=0.05, call_s=3.0,
                          policy=CheckpointPolicy(10**9, 1e9), state_dir=None, idle_s=0.3)
    reader.setup()
    element = KafkaTopic(kafka_broker, "purchases", ((0, 0),))
    split = SplitAtIdle(TopicPositions(((0, 0),)))
    first = list(reader.process(element, ThreadsafeRestrictionTracker(split),
                                ManualWatermarkEstimator(None)))
    assert sum(len(b) for b in first) == 5 and not any(b.span.idle for b in first)
    assert split.residual == TopicPositions(((0, 5),))  # split after the records, at the idle
    rest = list(reader.process(element, ThreadsafeRestrictionTracker(PositionsTracker(
        split.residual)), ManualWatermarkEstimator(None)))
    # the residual's first batch tells it again (a later poll may see the partition busy a
    # moment, e.g. a fetch in flight, and report it idle again: never records)
    assert rest and rest[0].span.idle == frozenset({0}) and not any(len(b) for b in rest)
    reader.teardown()
