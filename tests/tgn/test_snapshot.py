"""The weekly GConvGRU snapshot baseline (optional ``snapshot`` extra; skipped without it)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("torch_geometric_temporal")

from tgn.baselines import GlobalPopularity  # noqa: E402
from tgn.data import MSG_DIM, EventBatch  # noqa: E402
from tgn.evaluate import Evaluator  # noqa: E402
from tgn.snapshot import SECONDS_PER_WEEK, SnapshotConfig, fit_snapshot  # noqa: E402

pytestmark = pytest.mark.snapshot

USERS = ITEMS = 8
ORIGIN = 1_500_000_000.0


def rotating_purchases(weeks: range) -> EventBatch:
    """User ``u`` buys item ``(u + w) % ITEMS`` in week ``w``: every item equally often overall,
    so only the previous week's purchase tells which item comes next."""
    users = torch.arange(USERS).repeat(len(weeks))
    week = torch.tensor(list(weeks)).repeat_interleave(USERS)
    t = ORIGIN + week * SECONDS_PER_WEEK + 3600.0 * (1 + users)
    return EventBatch(users, (users + week) % ITEMS, t.double(), torch.zeros(len(t), MSG_DIM))


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny graphs: two threads on the shared cores are many times slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("seed", [0, 1])
def test_learns_the_planted_weekly_rotation_better_than_popularity(seed):
    train, test = rotating_purchases(range(16)), rotating_purchases(range(16, 22))
    recommender, losses = fit_snapshot(train, USERS, ITEMS,
                                       SnapshotConfig(dim=16, epochs=30, lr=0.02, seed=seed))
    assert losses[-1] < 0.5 * losses[0]
    ours = Evaluator(ks=(1, 3)).run(recommender, test, history=train, batch_size=USERS)
    popularity = Evaluator(ks=(1, 3)).run(GlobalPopularity(), test, history=train,
                                          batch_size=USERS)
    # popularity ties all 8 items: tie-aware rank 4.5 for everyone, recall@3 = 0, mrr = 1/4.5;
    # a state that lags a week too many ranks the right item second (recall@1 = 0)
    assert popularity["recall@3"] == 0.0
    assert ours["recall@1"] > 0.8 and ours["mrr"] > 0.9, ours


def test_state_changes_only_at_week_boundaries():
    train = rotating_purchases(range(4))
    recommender, _ = fit_snapshot(train, USERS, ITEMS, SnapshotConfig(dim=8, epochs=1))
    week3, week4 = train[-USERS:], rotating_purchases(range(4, 5))
    for batch in train.batches(USERS):
        recommender.update(batch)
    assert recommender.week == 3  # week 3 is still open: its events are only buffered
    in_week3 = recommender.score(week3)
    in_week4 = recommender.score(week4)  # a batch in week 4 first folds week 3 into the state
    assert recommender.week == 4 and not torch.equal(in_week3, in_week4)
    recommender.update(week4[:3])  # part of week 4: buffered, scores unchanged
    assert torch.equal(recommender.score(week4), in_week4)
    assert in_week4.shape == (USERS, ITEMS)
