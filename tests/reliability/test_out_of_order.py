"""Out-of-order events: the pipeline's policy (docs/pipeline.md, "Event time").

Events arrive late by up to ``LATENESS_S`` of event time (a test parameter). Within the allowed
lateness (``--allowed-lateness``) the arrival order changes nothing: the micro-batches are cut
from the events sorted by ``(ts, event_id)`` and sealed by the watermark, so the state equals
that of the events in order, tensor for tensor. Beyond it, an event older than an earlier one of
its partition by more than the allowed lateness is a dead letter ``late_event``, and the state is
that of the other events in order. Replayed through the real pipeline from logs whose rows are
in arrival order (one partition).
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipelines.pipeline import PipelineConfig, run_pipeline
from pipelines.state import checkpoint_path
from streaming.deadletter import decode_raw

N_EVENTS = 2000
HOUR, DAY = 3600.0, 86400.0
BUFFERS = ("memory.memory", "memory.last_update", "neighbors.neighbor", "neighbors.time",
           "neighbors.count")


def _replay(run_dir, events: pa.Table, state_dir, lateness_s: float = 0.0):
    """Replay ``events`` in row order (= arrival order): the final model and its dead letters."""
    from tgn.model import TGNRecommender

    state_dir.mkdir(exist_ok=True)
    log, letters = state_dir / "arrival.parquet", state_dir / "dead.jsonl"
    pq.write_table(events, log)
    run_pipeline(PipelineConfig(run_dir=str(run_dir), state_dir=str(state_dir), log_path=str(log),
                                fresh_state=True, checkpoint_events=10**9,
                                dead_letter_path=str(letters), lateness_s=lateness_s))
    dead = [json.loads(line) for line in letters.read_text().splitlines()] if letters.exists() \
        else []
    return TGNRecommender.load(checkpoint_path(state_dir, 0, 1)), dead


def _arrival(events: pa.Table, lateness_s: float) -> pa.Table:
    """``events`` in the order they arrive when each is late by up to ``lateness_s``."""
    ts = events.column("ts").to_numpy()
    arrival = ts + np.random.default_rng(7).uniform(0, lateness_s, len(ts))
    return events.take(np.argsort(arrival, kind="stable"))


def _assert_same(got, want) -> None:
    assert got.users.to_list() == want.users.to_list()
    for name in BUFFERS:
        assert torch.equal(got.get_buffer(name), want.get_buffer(name)), name


@pytest.fixture(scope="module")
def in_order(run_dir, cj_small, tmp_path_factory):
    """``(events in event-time order, the model after replaying them)``."""
    events = pq.read_table(cj_small / "events.parquet").slice(0, N_EVENTS)
    return events, _replay(run_dir, events, tmp_path_factory.mktemp("in_order"))[0]


@pytest.mark.parametrize("lateness_s", [HOUR, 3 * DAY])
def test_disorder_within_the_allowed_lateness_changes_nothing(run_dir, in_order, tmp_path,
                                                              lateness_s):
    events, expected = in_order
    late = _arrival(events, lateness_s)
    moved = late.column("ts").to_numpy()
    assert (moved < np.maximum.accumulate(moved)).sum() > N_EVENTS // 20  # many really late
    model, dead = _replay(run_dir, late, tmp_path, lateness_s=lateness_s)
    assert dead == []
    _assert_same(model, expected)


def test_events_beyond_the_allowed_lateness_are_dead_letters(run_dir, cj_small, tmp_path):
    events = pq.read_table(cj_small / "events.parquet").slice(0, N_EVENTS)
    late = _arrival(events, 3 * DAY)
    ts = late.column("ts").to_numpy()
    newest_before = np.maximum.accumulate(np.r_[-np.inf, ts[:-1]])
    behind = ts < newest_before - HOUR  # more than the allowed hour behind an earlier event
    assert behind.sum() > N_EVENTS // 20
    model, dead = _replay(run_dir, late, tmp_path / "late", lateness_s=HOUR)
    assert {d["reason"] for d in dead} == {"late_event"}
    assert sorted(decode_raw(d["raw"], d["raw_encoding"])["event_id"] for d in dead) == sorted(
        late.column("event_id").filter(pa.array(behind)).to_pylist())
    on_time = late.filter(pa.array(~behind))
    order = np.lexsort([np.array(on_time.column("event_id").to_pylist(), object),
                        on_time.column("ts").to_numpy()])
    expected, _ = _replay(run_dir, on_time.take(order), tmp_path / "sorted")
    _assert_same(model, expected)
