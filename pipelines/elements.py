"""The elements that flow between the pipeline's transforms.

Beam's per-element overhead caps a Python pipeline at ~5k elements/s on this machine, so an
element is a *batch* of events and every per-event step is vectorized. Each batch remembers
where it came from: per source partition, the half-open offset range ``[start, end)`` it covers
(a Kafka partition's offsets, or row numbers of a replayed log; one live batch holds everything a
poll returned, from any number of partitions). That is what makes recovery exact: a shard applies
a batch only when it starts at the shard's own positions, skips offsets it already applied, and
saves its positions in the same file as its memory.

Shapes: ``B`` events in a batch, ``U`` distinct users in it, ``E`` embedding width, ``F`` facets.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pyarrow as pa

#: Most events per micro-batch by default: at 2,000 events/s a batch of 200 fills in 100 ms, and
#: each batch pays a fixed model cost, so smaller batches cost replay throughput. Measured on
#: cj26 (BENCHMARKS.md, "Streaming pipeline"): 200 gave live p99 268-289 ms and replay ~27k/s;
#: 150 gave 244-273 ms (median of 6: 258) and 18-22k/s, so it was not kept; 100: ~12.6k/s.
BATCH_EVENTS = 200


@dataclass(frozen=True)
class Span:
    """Where a batch came from, and when it passed each stage.

    Attributes:
        ranges: per source partition, ``(start, end)``: the reader's position before the read
            and the offset after the last record read (``start == end``: nothing read there).
        checkpoint: every shard saves its state after applying this batch (the reader sets it
            every N events / T seconds and on shutdown, so all shards save at the same place).
        trace: ``(stage, wall-clock seconds)`` marks in passing order (see :meth:`mark`), for
            the latency breakdown of ``dynllm bench pipeline``.
        idle: partitions the reader found idle when it read this batch: it had everything the
            broker held there and nothing new had come for ``idle_s`` (they stop holding the
            watermark back, :mod:`pipelines.watermark`).
        end: the end of the input (a replay's last rows, or the last read of a log that was
            replaced): every open micro-batch is sealed.
        last: the reader's last batch (it stops): every shard finishes its checkpoint write
            before the pipeline ends.
    """

    ranges: dict[int, tuple[int, int]]
    checkpoint: bool = False
    trace: tuple[tuple[str, float], ...] = field(default=(), compare=False)
    idle: frozenset[int] = frozenset()
    end: bool = False
    last: bool = False

    @classmethod
    def of(cls, partition: int, start: int, end: int, checkpoint: bool = False,
           end_of_input: bool = False, last: bool = False) -> Span:
        """A span over one partition.

        >>> Span.of(3, 10, 15).ranges
        {3: (10, 15)}
        """
        return cls({partition: (start, end)}, checkpoint, end=end_of_input, last=last)

    def mark(self, stage: str, at: float | None = None) -> Span:
        """This span with ``stage`` marked as passed at ``at`` (default: now)."""
        return replace(self, trace=(*self.trace, (stage, time.time() if at is None else at)))


@dataclass
class RawBatch:
    """Records as read, not yet validated.

    Attributes:
        span: partition and offset range.
        values: ``B`` raw records: a list (``bytes`` from Kafka, or ``dict`` s), or the rows of a
            log as an Arrow table.
        offsets: ``[B]`` int64 offset of each record.
        produced_at: ``[B]`` float64 wall-clock seconds each record was produced (Kafka's
            record timestamp; the read time for a replayed log).
        partitions: ``[B]`` int32 source partition of each record.
    """

    span: Span
    values: list[Any] | pa.Table
    offsets: np.ndarray
    produced_at: np.ndarray
    partitions: np.ndarray

    def __len__(self) -> int:
        return len(self.values)


@dataclass
class EventsBatch:
    """Valid events of one batch (or of one shard's part of it).

    Attributes:
        span: partition and offset range of the batch it came from.
        events: ``EVENT_SCHEMA`` table, ``B`` rows, in read order.
        offsets: ``[B]`` int64 source offsets.
        produced_at: ``[B]`` float64 produce times (wall clock).
        partitions: ``[B]`` int32 source partitions.
        after: for a sealed micro-batch, the ``(ts, event_id)`` of the last event sealed before
            it (``None``: not sealed yet, as parsed).
        frontier: for a sealed micro-batch, where the sealed stream stands after it (a
            :class:`pipelines.watermark.Frontier`: what a shard saves with its checkpoint).
    """

    span: Span
    events: pa.Table
    offsets: np.ndarray
    produced_at: np.ndarray
    partitions: np.ndarray
    after: tuple[float, str] | None = None
    frontier: Any = None

    def __len__(self) -> int:
        return self.events.num_rows

    def take(self, mask: np.ndarray) -> EventsBatch:
        """The rows where boolean ``mask [B]`` holds (same span)."""
        return replace(self, events=self.events.filter(pa.array(mask)),
                       offsets=self.offsets[mask], produced_at=self.produced_at[mask],
                       partitions=self.partitions[mask])


@dataclass
class UserStates:
    """Per-user output of one memory update: the temporal embeddings of the users it touched.

    Attributes:
        shard: the shard that applied the events.
        span: the batch's partition and offset range.
        user_ids: ``U`` string ids.
        user_index: ``[U]`` int64 dense user indices of the shard's model.
        ts: ``[U]`` float64 event time of each user's latest event in the batch.
        version: ``[U]`` int64 events of the user applied so far (grows by one per event).
        events_before: ``[U]`` int64 the user's event count before this batch.
        temporal: ``[U, E]`` float32 temporal user embeddings after the update.
        produced_at: ``[B]`` float64 produce times of the batch's events (for latency).
        first_produced_at: ``[U]`` float64 produce time of each user's earliest event in it.
        embedding: ``[U, E]`` float32 final embeddings (set by ``FuseEmbeddings``).
        facet_weights: ``[U, F]`` float32 facet relevance, or ``None`` without fusion.
        has_profile: ``[U]`` bool, a valid profile was fused.
        event_user: ``[B']`` int64 position in ``user_ids`` of each applied event, in the order
            applied (event time); with ``event_items`` and ``event_ts`` what the
            ``user-embeddings`` changelog publishes, so a consumer can keep the purchase
            statistics of the served score (docs/pipeline.md, "Serving contract").
        event_items: ``B'`` item ids of the applied events.
        event_ts: ``[B']`` float64 event times of the applied events.
    """

    shard: int
    span: Span
    user_ids: list[str]
    user_index: np.ndarray
    ts: np.ndarray
    version: np.ndarray
    events_before: np.ndarray
    temporal: np.ndarray
    produced_at: np.ndarray
    first_produced_at: np.ndarray
    embedding: np.ndarray | None = None
    facet_weights: np.ndarray | None = None
    has_profile: np.ndarray | None = None
    event_user: np.ndarray | None = None
    event_items: list[str] | None = None
    event_ts: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.user_ids)
