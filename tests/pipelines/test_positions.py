"""The live reader's restriction (all partitions of a topic), and how a shard takes the sealed
micro-batches: in sealing order, dropping what it had applied before a restart.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from pipelines.elements import EventsBatch, Span
from pipelines.positions import PositionsTracker, TopicPositions, as_positions
from pipelines.state import ShardState
from pipelines.watermark import START, Frontier
from streaming.schema import EVENT_SCHEMA


def test_tracker_claims_positions_and_defers_the_rest():
    tracker = PositionsTracker(TopicPositions(((0, 5), (1, 0))))
    assert tracker.try_claim({0: 9, 1: 3})
    assert tracker.try_claim({0: 9, 1: 4})
    assert tracker.current_progress().completed_work == 4 + 4  # records claimed: 4 on 0, 4 on 1
    primary, residual = tracker.try_split(0)
    assert primary == TopicPositions(((0, 5), (1, 0)), ((0, 9), (1, 4)))
    assert residual == TopicPositions(((0, 9), (1, 4)))  # the next call starts there
    assert not tracker.try_claim({0: 10})  # nothing is left after the split
    tracker.check_done()
    assert tracker.try_split(0) is None


def test_tracker_end_claim_and_misuse():
    tracker = PositionsTracker(TopicPositions(((0, 2),)))
    with pytest.raises(ValueError, match="neither ended nor deferred"):
        tracker.check_done()
    with pytest.raises(ValueError, match="below"):
        tracker.try_claim({0: 1})  # offsets never go back
    assert tracker.try_claim(None)  # shutdown: the end is claimed, nothing is deferred
    tracker.check_done()
    assert tracker.current_restriction() == TopicPositions(((0, 2),), ((0, 2),))
    assert tracker.try_split(0) is None
    assert as_positions({3: 1, 0: 7}) == ((0, 7), (3, 1))


def _sealed(rows: list[tuple[int, int, float]], after: tuple[float, str],
            resume: dict[int, int]) -> EventsBatch:
    """A sealed micro-batch of events ``(partition, offset, ts)`` whose ids name them
    (``"1:4"``), sealed right after ``after``, leaving the reader to resume at ``resume``."""
    ids = [f"{p}:{o}" for p, o, _ in rows]
    events = pa.table({"event_id": ids, "user_id": ["u"] * len(ids), "item_id": ["i"] * len(ids),
                       "ts": [t for _, _, t in rows], "quantity": [1.0] * len(ids),
                       "price": [0.0] * len(ids), "basket_id": [None] * len(ids),
                       "store_id": [None] * len(ids)}, schema=EVENT_SCHEMA)
    last = max([(t, f"{p}:{o}") for p, o, t in rows], default=after)
    return EventsBatch(Span({p: (o, o) for p, o in resume.items()}), events,
                       np.array([o for _, o, _ in rows], np.int64), np.zeros(len(rows)),
                       np.array([p for p, _, _ in rows], np.int32), after,
                       Frontier(last, resume, resume, {}))


def _accepted(state: ShardState, batch: EventsBatch) -> list[list[str]]:
    return [b.events.column("event_id").to_pylist() for b in state.accept(batch)]


def test_sealed_micro_batches_wait_for_their_turn():
    state = ShardState(None, 0, 1, {}, None)
    first = _sealed([(0, 0, 1.0), (1, 0, 1.0), (0, 1, 2.0)], START, {0: 2, 1: 1})
    second = _sealed([(1, 1, 3.0), (0, 2, 3.0)], (2.0, "0:1"), {0: 3, 1: 2})
    assert _accepted(state, second) == []  # sealed after one not seen yet: waits
    assert _accepted(state, first) == [["0:0", "1:0", "0:1"], ["1:1", "0:2"]]
    assert state.positions == {0: 3, 1: 2} and state.last == (3.0, "1:1")


def test_after_a_restart_what_the_shard_applied_is_dropped():
    # this shard had applied up to (2.0, "0:1"); the sealer restarted from another shard's
    # older frontier, so the micro-batches come again from an earlier place
    state = ShardState(None, 0, 1, {0: 2, 1: 1}, None, frontier=Frontier((2.0, "0:1")))
    old = _sealed([(0, 0, 1.0)], START, {0: 1, 1: 0})  # wholly applied before: dropped
    assert _accepted(state, old) == []
    overlap = _sealed([(1, 0, 1.5), (0, 1, 2.0), (1, 1, 2.0), (0, 2, 3.0)], (1.0, "0:0"),
                      {0: 3, 1: 2})
    assert _accepted(state, overlap) == [["1:1", "0:2"]]
    empty = _sealed([], (3.0, "0:2"), {0: 3, 1: 2})  # an empty checkpoint batch still passes
    assert _accepted(state, empty) == [[]]
    assert state.positions == {0: 3, 1: 2}
