"""Out-of-order events: the pipeline's policy (see docs/reliability.md, "Late events").

Events arrive late by up to ``LATENESS_S`` of event time (a test parameter: the bound the policy is
checked against). The pipeline never drops a late event: each micro-batch is applied in event-time
order, and a batch's events are applied after those of earlier batches, with time gaps clamped
at zero and node clocks that never run backwards. Replayed through the real pipeline from a log
whose rows are in arrival order.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipelines.pipeline import PipelineConfig, run_pipeline
from pipelines.state import checkpoint_path

N_EVENTS = 2000
BATCH = 250
HOUR, DAY = 3600.0, 86400.0


def _replay(run_dir, events: pa.Table, state_dir):
    """Replay ``events`` in row order (= arrival order); the final checkpointed model."""
    from tgn.model import TGNRecommender

    log = state_dir / "arrival.parquet"
    pq.write_table(events, log)
    run_pipeline(PipelineConfig(run_dir=str(run_dir), state_dir=str(state_dir), log_path=str(log),
                                fresh_state=True, max_batch=BATCH, checkpoint_events=10**9))
    return TGNRecommender.load(checkpoint_path(state_dir, 0, 1))


@pytest.fixture(scope="module")
def in_order(run_dir, cj_small, tmp_path_factory):
    """``(events in event-time order, the model after replaying them)``."""
    events = pq.read_table(cj_small / "events.parquet").slice(0, N_EVENTS)
    return events, _replay(run_dir, events, tmp_path_factory.mktemp("in_order"))


@pytest.mark.parametrize("lateness_s", [HOUR, 3 * DAY])
def test_late_events_are_applied_once_and_clocks_never_go_back(run_dir, in_order, tmp_path,
                                                               lateness_s):
    events, _ = in_order
    ts = events.column("ts").to_numpy()
    arrival = ts + np.random.default_rng(7).uniform(0, lateness_s, len(ts))
    late = events.take(np.argsort(arrival, kind="stable"))
    moved = late.column("ts").to_numpy()
    assert (moved < np.maximum.accumulate(moved)).sum() > N_EVENTS // 20  # many really late
    model = _replay(run_dir, late, tmp_path)

    users = events.column("user_id").to_pylist()
    counts = model.neighbors.count[model.user_node].tolist()
    assert {u: n for u, n in zip(model.users.to_list(), counts, strict=True) if n} == Counter(
        users)  # none dropped, none twice
    newest = {}
    for user, t in zip(users, ts.tolist(), strict=True):
        newest[user] = max(newest.get(user, 0.0), t)
    nodes = model.user_node[torch.from_numpy(model.users.encode(list(newest), grow=False))]
    torch.testing.assert_close(model.memory.last_update[nodes],
                               torch.tensor(list(newest.values()), dtype=torch.float64))


def test_disorder_within_a_micro_batch_changes_nothing(run_dir, in_order, tmp_path):
    events, expected = in_order
    rng = np.random.default_rng(3)
    order = np.concatenate([lo + rng.permutation(min(BATCH, N_EVENTS - lo))
                            for lo in range(0, N_EVENTS, BATCH)])
    model = _replay(run_dir, events.take(order), tmp_path)
    for name in ("memory.memory", "memory.last_update", "neighbors.neighbor", "neighbors.time",
                 "neighbors.count"):
        torch.testing.assert_close(model.get_buffer(name), expected.get_buffer(name))
