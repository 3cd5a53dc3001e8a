"""Heuristic recommenders, evaluated through the same :class:`~tgn.evaluate.Evaluator`.

Each keeps its own state from the events it is shown (``update``) and scores every item index
it knows (``score``). Grocery data repeats a lot, so these are strong references:

* :class:`GlobalPopularity` — purchases per item so far.
* :class:`RecentPopularity` — purchases per item in a sliding time window.
* :class:`BuyAgain` — the user's own history, by frequency or recency; other items tie at 0,
  or, with ``fallback_popularity``, are ordered by global popularity below the user's own items.
"""

from __future__ import annotations

from collections import deque

import torch
from torch import Tensor

from tgn.data import EventBatch

SECONDS_PER_DAY = 86_400.0


def _grown(counts: Tensor, size: int) -> Tensor:
    """``counts`` zero-padded to at least ``size`` entries."""
    if size <= counts.numel():
        return counts
    return torch.cat([counts, counts.new_zeros(size - counts.numel())])


class GlobalPopularity:
    """Scores an item by how often it was bought so far."""

    def __init__(self) -> None:
        self.counts = torch.zeros(0, dtype=torch.float64)

    def score(self, batch: EventBatch) -> Tensor:
        """``[B, num_items]``: the same popularity row for every user."""
        return self.counts.float().expand(len(batch), -1)

    def update(self, batch: EventBatch) -> None:
        self.counts = _grown(self.counts, int(batch.items.max()) + 1)
        self.counts.index_add_(0, batch.items, torch.ones(len(batch), dtype=torch.float64))


class RecentPopularity(GlobalPopularity):
    """Purchases per item within the last ``window_days`` before the batch."""

    def __init__(self, window_days: float = 7.0) -> None:
        super().__init__()
        self.window_days = window_days
        self._window: deque[EventBatch] = deque()

    def update(self, batch: EventBatch) -> None:
        super().update(batch)
        self._window.append(batch)
        horizon = float(batch.t[-1]) - self.window_days * SECONDS_PER_DAY
        while self._window and float(self._window[0].t[-1]) < horizon:
            self._expire(self._window.popleft(), keep=None)
        if self._window and float(self._window[0].t[0]) < horizon:  # partly expired batch
            head = self._window.popleft()
            keep = head.t >= horizon
            self._expire(head, keep)
            self._window.appendleft(head[keep])

    def _expire(self, batch: EventBatch, keep: Tensor | None) -> None:
        items = batch.items if keep is None else batch.items[~keep]
        self.counts.index_add_(0, items, -torch.ones(items.numel(), dtype=torch.float64))


class BuyAgain:
    """The user's own purchases, ranked by frequency or by recency.

    Args:
        by: ``"frequency"`` (times bought) or ``"recency"`` (latest purchase first).
        fallback_popularity: order items the user never bought by global popularity, below all
            of the user's own items (otherwise they tie at 0).
    """

    def __init__(self, by: str = "frequency", fallback_popularity: bool = False) -> None:
        if by not in ("frequency", "recency"):
            raise ValueError(f"unknown order {by!r}; expected 'frequency' or 'recency'")
        self.by, self.fallback_popularity = by, fallback_popularity
        self.history: dict[int, dict[int, list[float]]] = {}  # user → item → [count, last_t]
        self.popularity = GlobalPopularity()

    def score(self, batch: EventBatch) -> Tensor:
        """``[B, num_items]``: own items score ``>= 1``; others 0 or popularity in ``[0, 1)``."""
        width = max(self.popularity.counts.numel(), int(batch.items.max()) + 1)
        scores = torch.zeros(len(batch), width)
        if self.fallback_popularity:
            counts = _grown(self.popularity.counts, width)
            scores += (counts / (counts.max() + 1)).float()
        for row, user in enumerate(batch.users.tolist()):
            own = self.history.get(user)
            if own:
                items = torch.tensor(list(own.keys()))
                stats = torch.tensor(list(own.values()), dtype=torch.float64)  # [n, 2]
                key = (stats[:, 0] if self.by == "frequency"  # recency: dense rank, ties kept
                       else torch.unique(stats[:, 1], return_inverse=True)[1].double())
                scores[row, items] += 1 + key.float()
        return scores

    def update(self, batch: EventBatch) -> None:
        self.popularity.update(batch)
        for user, item, t in zip(batch.users.tolist(), batch.items.tolist(), batch.t.tolist(),
                                 strict=True):
            stats = self.history.setdefault(user, {}).setdefault(item, [0.0, t])
            stats[0] += 1
            stats[1] = t
