"""Heuristic baselines on toy streams."""

from __future__ import annotations

import pytest
import torch

from tgn.baselines import BuyAgain, GlobalPopularity, RecentPopularity
from tgn.data import EventBatch

DAY = 86_400.0


def _batch(users: list[int], items: list[int], days: list[float]) -> EventBatch:
    return EventBatch(torch.tensor(users), torch.tensor(items),
                      torch.tensor(days, dtype=torch.float64) * DAY, torch.zeros(len(users), 2))


def test_popularity_counts_and_recent_window_expires():
    pop, recent = GlobalPopularity(), RecentPopularity(window_days=2)
    for rec in (pop, recent):
        rec.update(_batch([0, 1, 2], [0, 0, 1], [0, 0, 1]))
        rec.update(_batch([0], [2], [3]))  # day 3: window (1, 3] keeps item 1 (day 1) and 2
    probe = _batch([5], [0], [3])
    assert pop.score(probe).tolist() == [[2.0, 1.0, 1.0]]
    assert recent.score(probe).tolist() == [[0.0, 1.0, 1.0]]


def test_buy_again_by_frequency_recency_and_with_popularity_fallback():
    history = _batch([0, 0, 0, 1, 1], [2, 2, 1, 3, 3], [0, 1, 2, 2, 2])
    probe = _batch([0], [0], [3])
    freq, rec, fall = BuyAgain("frequency"), BuyAgain("recency"), BuyAgain(fallback_popularity=True)
    for model in (freq, rec, fall):
        model.update(history)
    # user 0 bought item 2 twice, item 1 once (later): 1 + count; others 0
    assert freq.score(probe).tolist() == [[0.0, 2.0, 3.0, 0.0]]
    # recency: dense rank of last purchase times (item 2 at day 1 → 0, item 1 at day 2 → 1)
    assert rec.score(probe).tolist() == [[0.0, 2.0, 1.0, 0.0]]
    # fallback: popularity / (max + 1) = [0, 1, 2, 2] / 3 added, own items stay on top
    expected = torch.tensor([[0.0, 2 + 1 / 3, 3 + 2 / 3, 2 / 3]])
    torch.testing.assert_close(fall.score(probe), expected)
    with pytest.raises(ValueError, match="unknown order"):
        BuyAgain("alphabet")
