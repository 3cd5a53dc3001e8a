"""The live reader's restriction (all partitions of a topic) and multi-partition batch spans.

One live batch holds whatever a poll returned from any partitions; a shard applies it only when
it starts at the shard's positions in every partition and drops offsets it had applied already.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from pipelines.elements import EventsBatch, Span
from pipelines.positions import PositionsTracker, TopicPositions, as_positions
from pipelines.state import ShardState
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


def _batch(rows: list[tuple[int, int]], ranges: dict[int, tuple[int, int]]) -> EventsBatch:
    """A batch of events ``(partition, offset)`` whose ids name them, e.g. ``"1:4"``."""
    ids = [f"{p}:{o}" for p, o in rows]
    events = pa.table({"event_id": ids, "user_id": ["u"] * len(ids), "item_id": ["i"] * len(ids),
                       "ts": [1.0] * len(ids), "quantity": [1.0] * len(ids),
                       "price": [0.0] * len(ids), "basket_id": [None] * len(ids),
                       "store_id": [None] * len(ids)}, schema=EVENT_SCHEMA)
    return EventsBatch(Span(ranges), events, np.array([o for _, o in rows], np.int64),
                       np.zeros(len(rows)), np.array([p for p, _ in rows], np.int32))


def _accepted(state: ShardState, batch: EventsBatch) -> list[list[str]]:
    return [b.events.column("event_id").to_pylist() for b in state.accept(batch)]


def test_multi_partition_batches_wait_for_their_turn_in_every_partition():
    state = ShardState(None, 0, 1, {}, None)
    first = _batch([(0, 0), (1, 0), (0, 1)], {0: (0, 2), 1: (0, 1)})
    second = _batch([(1, 1), (0, 2)], {0: (2, 3), 1: (1, 2)})
    assert _accepted(state, second) == []  # starts beyond the positions: waits
    assert _accepted(state, first) == [["0:0", "1:0", "0:1"], ["1:1", "0:2"]]
    assert state.positions == {0: 3, 1: 2}


def test_after_a_restart_offsets_applied_before_are_dropped_per_partition():
    # the checkpoint said: partition 0 applied up to 2, partition 1 up to 1; the reader resumed
    # from older positions (another shard's), so the first batch overlaps what was applied
    state = ShardState(None, 0, 1, {0: 2, 1: 1}, None)
    batch = _batch([(0, 1), (1, 0), (0, 2), (1, 1)], {0: (1, 3), 1: (0, 2)})
    assert _accepted(state, batch) == [["0:2", "1:1"]]
    old = _batch([(0, 0)], {0: (0, 1), 1: (0, 0)})  # wholly applied before: dropped
    assert _accepted(state, old) == []
    empty = _batch([], {0: (3, 3), 1: (2, 2)})  # an empty checkpoint batch still passes
    assert _accepted(state, empty) == [[]]
    assert state.positions == {0: 3, 1: 2}
