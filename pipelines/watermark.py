"""``SealMicroBatches``: micro-batches cut in event time and sealed by a watermark.

The graph memory applies events in micro-batches, and which events share a batch changes the
state (events of one batch are applied together, from the memory before it). So the batches
must be a function of the log, not of what each poll of the reader happened to return. Here:

* **The rule** (:class:`BatchRule`). Sort every valid event by ``(ts, event_id)``; a batch
  starts at the first event after the previous batch and takes up to ``events`` events, all in
  the event-time window ``[k * window_s, (k + 1) * window_s)`` of its first event.
* **The watermark.** Per source partition, its clock is the newest event time read from it. The
  watermark is the smallest clock, less ``lateness_s``, over the partitions that are not idle;
  every event older than the watermark has been read, so a batch whose events all lie below it
  and that is full (or whose window ends at or below it) is sealed and goes on to the memory.
  Partitions the reader reports idle (it holds everything the broker has there and nothing came
  for ``idle_s``, :class:`pipelines.elements.Span` ``idle``) do not hold it back; when every
  partition is idle, or the input ends, every open batch is sealed (so the last events of a
  stream do not wait for the next ones).
* **Late events.** An event more than ``lateness_s`` older than an earlier event of its own
  partition, or one at or before the last sealed event, is dead-lettered with reason
  ``late_event``. The first test depends on the partition's log alone; the second can only hit
  an event that arrives after its partition was reported idle or after an idle seal, the one
  place where arrival timing enters (docs/pipeline.md, "Event time").
* **Restarts.** Each sealed batch carries a :class:`Frontier`: the last sealed ``(ts,
  event_id)``, per partition the first offset not sealed yet (where a restarted reader starts),
  the clock there and the offsets read so far. A shard saves it with its checkpoint; a restarted
  pipeline reads again from there, skips what it had sealed and rebuilds the same batches.

The sealed batches are therefore the same live, in a replay of the same events and after any
number of crashes, and so is the state (``tests/reliability/test_crash_safety.py``).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, field, replace

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from apache_beam import pvalue
from apache_beam.coders import VarIntCoder
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec

from pipelines.elements import BATCH_EVENTS, EventsBatch, Span
from streaming import metrics
from streaming.schema import events_to_table
from streaming.validation import DeadLetter, Reason

#: ``(ts, event_id)``: the order events are applied in; :data:`START` is before every event.
Key = tuple[float, str]
START: Key = (-math.inf, "")
#: Tag of the late events' output of :class:`SealMicroBatches`.
LATE_EVENTS = "late_events"


@dataclass(frozen=True)
class BatchRule:
    """How the sorted stream of events is cut into micro-batches (saved with checkpoints).

    Attributes:
        events: most events in a batch; ``None``: every incoming batch is sealed as it comes
            (the replay of ``dynllm replay --evaluate``, whose batches follow the evaluator's).
        window_s: a batch never spans an event-time window of this many seconds.
        lateness_s: how far an event may be behind the newest one of its partition and still
            be applied (the watermark waits this much longer).
    """

    events: int | None = BATCH_EVENTS
    window_s: float = 86400.0
    lateness_s: float = 0.0

    def __post_init__(self) -> None:
        if self.events is not None and self.events < 1:
            raise ValueError(f"events must be >= 1, got {self.events}")
        if not self.window_s > 0 or self.lateness_s < 0:
            raise ValueError(f"need window_s > 0 and lateness_s >= 0, got {self}")


@dataclass(frozen=True)
class Frontier:
    """Where the sealed stream stands: what a shard checkpoints so a restart rebuilds it.

    Attributes:
        last: ``(ts, event_id)`` of the last sealed event (:data:`START`: none yet).
        resume: per partition, the first offset not sealed yet (the reader restarts there).
        read: per partition, the next offset the reader had read.
        clocks: per partition, the newest event time before ``resume``.
        rule: the :class:`BatchRule` as a dict.
        cuts: digest (hex) of every micro-batch sealed up to ``last``, by its last event and
            size (:func:`chain_cuts`): two runs sealed the same batches iff their digests at the
            same ``last`` are equal (the state after them then is the same).
    """

    last: Key = START
    resume: dict[int, int] = field(default_factory=dict)
    read: dict[int, int] = field(default_factory=dict)
    clocks: dict[int, float] = field(default_factory=dict)
    rule: dict = field(default_factory=dict)
    cuts: str = ""

    def to_dict(self) -> dict:
        """Plain types, for a checkpoint's ``extra`` (loads with ``weights_only``)."""
        return {"last_ts": float(self.last[0]), "last_id": self.last[1],
                "resume": dict(self.resume), "read": dict(self.read),
                "clocks": {p: float(c) for p, c in self.clocks.items()}, "rule": dict(self.rule),
                "cuts": self.cuts}

    @classmethod
    def from_dict(cls, data: dict) -> Frontier:
        """Inverse of :meth:`to_dict`."""
        ints = lambda d: {int(p): int(o) for p, o in d.items()}  # noqa: E731
        return cls((float(data["last_ts"]), str(data["last_id"])), ints(data["resume"]),
                   ints(data["read"]), {int(p): float(c) for p, c in data["clocks"].items()},
                   dict(data.get("rule", {})), str(data.get("cuts", "")))


def chain_cuts(cuts: str, last: Key, events: int) -> str:
    """The digest of the sealed batches ``cuts`` followed by one of ``events`` events ending at
    ``last`` (BLAKE2b, 16 bytes, hex).

    >>> a = chain_cuts("", (1.0, "e1"), 2)
    >>> a == chain_cuts("", (1.0, "e1"), 2) != chain_cuts("", (1.0, "e1"), 3)
    True
    """
    entry = f"{cuts}|{last[0]!r}|{last[1]}|{events}".encode()
    return hashlib.blake2b(entry, digest_size=16).hexdigest()


def after_key(events: pa.Table, key: Key) -> np.ndarray:
    """``[B]`` bool: events whose ``(ts, event_id)`` comes after ``key``.

    >>> t = events_to_table([])
    >>> after_key(t, START).tolist()
    []
    """
    ts = events.column("ts").to_numpy()
    later = ts > key[0]
    same = ts == key[0]
    if same.any():
        later |= same & pc.greater(events.column("event_id"), key[1]).to_numpy(
            zero_copy_only=False)
    return later


def _key_at(events: pa.Table, row: int) -> Key:
    return float(events.column("ts")[row].as_py()), str(events.column("event_id")[row].as_py())


@dataclass
class _Buffer:
    """Events read but not sealed, sorted by ``(ts, event_id)``; ``prior``: each one's partition
    clock before it (what a restart from its offset starts the clock at)."""

    batch: EventsBatch
    prior: np.ndarray

    def __len__(self) -> int:
        return len(self.batch)

    def rows(self, lo: int, hi: int) -> EventsBatch:
        mask = np.zeros(len(self), bool)
        mask[lo:hi] = True
        return self.batch.take(mask)

    def drop_first(self, count: int) -> None:
        keep = np.arange(len(self)) >= count
        self.batch, self.prior = self.batch.take(keep), self.prior[keep]


class Sealer:
    """The event-time batching of :mod:`pipelines.watermark`, without Beam (one instance per
    pipeline: it sees every partition).

    Args:
        rule: how batches are cut.
        frontier: where a restarted pipeline's checkpoint left the sealed stream (``None``:
            from the start).
    """

    def __init__(self, rule: BatchRule, frontier: Frontier | None = None) -> None:
        self.rule = rule
        frontier = frontier or Frontier()
        self.last: Key = frontier.last
        self.cuts = frontier.cuts
        self.clocks: dict[int, float] = dict(frontier.clocks)
        self.read: dict[int, int] = dict(frontier.resume)  # next offset, this incarnation
        self._seen = dict(frontier.read)  # offsets below these were read before a restart
        self.watermark = -math.inf
        self._buffer: _Buffer | None = None
        self.sealed = 0  # micro-batches sealed

    def add(self, batch: EventsBatch) -> tuple[list[EventsBatch], list[DeadLetter]]:
        """Take in one parsed batch; the micro-batches it seals (in order) and its late events.

        A batch marked ``checkpoint`` hands the mark to the last micro-batch it seals, or to an
        empty one carrying the frontier.
        """
        for partition, (_start, end) in batch.span.ranges.items():
            self.read[partition] = max(self.read.get(partition, 0), end)
            self.clocks.setdefault(partition, -math.inf)
        letters: list[DeadLetter] = []
        if len(batch):
            batch, prior, letters = self._admit(batch)
            self._append(batch, prior)
        if self.rule.events is None:
            out = self._pass_through(batch)
        else:
            out = self._seal(batch.span)
        if batch.span.checkpoint:
            if not out:
                out.append(self._sealed_batch(self._empty_like(batch), self.last))
            out[-1] = replace(out[-1], span=replace(out[-1].span, checkpoint=True))
        metrics.EVENTS_WAITING.set(len(self._buffer) if self._buffer is not None else 0)
        return out, letters

    def _admit(self, batch: EventsBatch) -> tuple[EventsBatch, np.ndarray, list[DeadLetter]]:
        """Update the clocks; drop re-read sealed events; split off the late ones."""
        ts = batch.events.column("ts").to_numpy()
        prior = np.empty(len(batch))
        for partition in np.unique(batch.partitions).tolist():
            rows = np.flatnonzero(batch.partitions == partition)  # in offset order
            clock = self.clocks.get(partition, -math.inf)
            newest = np.maximum.accumulate(ts[rows])
            prior[rows] = np.maximum(clock, np.concatenate([[-math.inf], newest[:-1]]))
            self.clocks[partition] = max(clock, float(newest[-1]))
        if self.rule.events is None:
            return batch, prior, []
        late = ts < prior - self.rule.lateness_s
        sealed = ~after_key(batch.events, self.last)
        seen = batch.offsets < np.array([self._seen.get(int(p), 0) for p in batch.partitions],
                                        np.int64)
        skipped = sealed & seen & ~late  # applied before a restart: read again, not again applied
        late |= sealed & ~seen
        letters = [DeadLetter(Reason.LATE_EVENT, f"ts {row['ts']} behind its partition's "
                              f"event time or the sealed frontier", row)
                   for row in batch.events.filter(pa.array(late)).to_pylist()]
        metrics.EVENTS_SEALED.labels("late").inc(len(letters))
        metrics.EVENTS_SEALED.labels("skipped").inc(int(skipped.sum()))
        keep = ~(late | skipped)
        return batch.take(keep), prior[keep], letters

    def _append(self, batch: EventsBatch, prior: np.ndarray) -> None:
        if len(batch) == 0:
            return
        if self._buffer is not None and len(self._buffer):
            old = self._buffer.batch
            batch = EventsBatch(batch.span, pa.concat_tables([old.events, batch.events]),
                                np.concatenate([old.offsets, batch.offsets]),
                                np.concatenate([old.produced_at, batch.produced_at]),
                                np.concatenate([old.partitions, batch.partitions]))
            prior = np.concatenate([self._buffer.prior, prior])
        order = pc.sort_indices(batch.events, [("ts", "ascending"),
                                               ("event_id", "ascending")]).to_numpy()
        batch = EventsBatch(batch.span, batch.events.take(order), batch.offsets[order],
                            batch.produced_at[order], batch.partitions[order])
        self._buffer = _Buffer(batch, prior[order])

    def _update_watermark(self, span: Span) -> bool:
        """Advance the watermark; True when everything open is to be sealed (all idle, end)."""
        active = [c for p, c in self.clocks.items() if p not in span.idle]
        if span.end or not active:
            return True
        self.watermark = max(self.watermark, min(active) - self.rule.lateness_s)
        if math.isfinite(self.watermark):
            metrics.WATERMARK.set(self.watermark)
        return False

    def _seal(self, span: Span) -> list[EventsBatch]:
        """The complete micro-batches at the head of the buffer, removed from it."""
        flush = self._update_watermark(span)
        buffer, out = self._buffer, []
        if buffer is None or not len(buffer):
            return out
        ts = buffer.batch.events.column("ts").to_numpy()
        final = len(ts) if flush else int(np.searchsorted(ts, self.watermark, "left"))
        window = np.floor(ts / self.rule.window_s)
        start = 0
        while start < final:
            window_end = int(np.searchsorted(window, window[start], "right"))
            stop = min(start + self.rule.events, window_end)
            closed = (window[start] + 1) * self.rule.window_s <= self.watermark
            if not (flush or (stop - start == self.rule.events and stop <= final)
                    or (stop == window_end and window_end <= final and closed)):
                break
            out.append(self._sealed_batch(buffer.rows(start, stop), _key_at(
                buffer.batch.events, stop - 1), span, drop=stop - start))
            ts, window, final = ts[stop - start:], window[stop - start:], final - (stop - start)
        return out

    def _pass_through(self, batch: EventsBatch) -> list[EventsBatch]:
        """``events is None``: the incoming batch is one micro-batch."""
        buffer = self._buffer
        self._buffer = None
        if buffer is None or not len(buffer):
            return []
        return [self._sealed_batch(buffer.batch, max(self.last, _key_at(
            buffer.batch.events, len(buffer) - 1)), batch.span)]

    def _sealed_batch(self, rows: EventsBatch, last: Key, span: Span | None = None,
                      drop: int = 0) -> EventsBatch:
        """``rows`` as a sealed micro-batch ending at ``last``; ``drop`` rows leave the buffer."""
        if drop:
            self._buffer.drop_first(drop)
        if len(rows):  # an empty one (a checkpoint mark's) is not a cut
            self.cuts = chain_cuts(self.cuts, last, len(rows))
        after, self.last = self.last, last
        self.sealed += 1
        metrics.EVENTS_SEALED.labels("sealed").inc(len(rows))
        span = (span or rows.span).mark("seal")
        return replace(rows, span=replace(span, checkpoint=False), after=after,
                       frontier=self.frontier())

    def frontier(self) -> Frontier:
        """The frontier now: per partition, the oldest unsealed event's offset and clock."""
        resume, clocks = dict(self.read), dict(self.clocks)
        buffer = self._buffer
        if buffer is not None and len(buffer):
            parts, offsets = buffer.batch.partitions, buffer.batch.offsets
            for partition in np.unique(parts).tolist():
                rows = np.flatnonzero(parts == partition)
                first = rows[np.argmin(offsets[rows])]
                resume[partition] = int(offsets[first])
                clocks[partition] = float(buffer.prior[first])
        read = {p: max(o, self._seen.get(p, 0)) for p, o in self.read.items()}
        return Frontier(self.last, resume, read, clocks, asdict(self.rule), self.cuts)

    @staticmethod
    def _empty_like(batch: EventsBatch) -> EventsBatch:
        none = np.zeros(0)
        return EventsBatch(batch.span, events_to_table([]), none.astype(np.int64), none,
                           none.astype(np.int32))


class _SealFn(beam.DoFn):
    """Stateful (one key: the whole stream): a :class:`Sealer` over every partition.

    Attributes:
        SEALED: micro-batches sealed at the last checkpoint (Beam state; it also keeps the
            stream on one worker). Written at checkpoints only (each write costs the in-process
            runner a deep-size walk of its state cache).
    """

    SEALED = ReadModifyWriteStateSpec("sealed", VarIntCoder())
    _sealed = beam.DoFn.StateParam(SEALED)

    def __init__(self, rule: BatchRule, frontier: Frontier | None) -> None:
        self.rule, self.frontier = rule, frontier

    def setup(self) -> None:
        self._sealer: Sealer | None = None
        metrics.init_label_values(metrics.EVENTS_SEALED, "outcome",
                                  ["sealed", "late", "skipped"])

    def process(self, keyed: tuple[int, EventsBatch], sealed=_sealed):
        if self._sealer is None:
            self._sealer = Sealer(self.rule, self.frontier)
        out, letters = self._sealer.add(keyed[1])
        for letter in letters:
            metrics.EVENTS_DEAD_LETTERED.labels(str(letter.reason)).inc()
            yield pvalue.TaggedOutput(LATE_EVENTS, letter)
        yield from out
        if keyed[1].span.checkpoint:
            sealed.write(self._sealer.sealed)


class SealMicroBatches(beam.PTransform):
    """Parsed batches (as read) → sealed micro-batches (main) + late events (tagged).

    Args:
        rule: how micro-batches are cut.
        frontier: the checkpointed frontier to resume from (``None``: the start).

    Returns (from ``expand``):
        A ``DoOutputsTuple``: ``.events`` the sealed :class:`EventsBatch` es in order,
        ``[LATE_EVENTS]`` the late events as dead letters.
    """

    def __init__(self, rule: BatchRule, frontier: Frontier | None = None) -> None:
        super().__init__()
        self.rule, self.frontier = rule, frontier

    def expand(self, batches):
        return (batches
                | "KeyStream" >> beam.Map(lambda batch: (0, batch))
                | "Seal" >> beam.ParDo(_SealFn(self.rule, self.frontier)).with_outputs(
                    LATE_EVENTS, main="events"))
