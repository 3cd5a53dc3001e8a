"""Streaming evaluation: full-catalog, tie-aware ranking, test-then-update.

In the spirit of TGB's ``Evaluator`` (https://github.com/shenyangHuang/TGB) and River's
progressive validation: each batch of purchases is scored from the state *before* the batch —
every candidate item from the same state —, ranked, and only then applied to the recommender.

* Candidates: every item seen in any earlier event (the catalog "up to then"). A purchase of an
  item never seen before cannot be ranked by anyone; it counts as a miss (rank = inf).
* Tie-aware rank (TGB/OGB): ``1 + #(candidates scoring higher) + #(others tying) / 2``.
* Metrics for K in ``ks``: ``recall@K`` (hit rate: one positive per query), ``ndcg@K``
  (``1 / log2(1 + rank)`` if ``rank <= K``), and ``mrr``; the same on ``new/`` purchases only
  (items that user never bought before).

Any object with ``score(batch) -> [B, >= num_items]`` and ``update(batch)`` can be evaluated.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Protocol

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from tgn.data import EventBatch

KS = (10, 20, 50)
PAIR_STRIDE = 1 << 32  # (user, item) → one int64 key


class Recommender(Protocol):
    """What the evaluator needs: score a batch from the current state, then learn from it."""

    def score(self, batch: EventBatch) -> Tensor:
        """Scores ``[B, num_items]`` (extra columns are ignored) for each event's user."""

    def update(self, batch: EventBatch) -> None:
        """Apply the batch's events to the recommender's state."""


def tie_aware_ranks(scores: Tensor, target: Tensor, candidate: Tensor) -> Tensor:
    """Rank ``[B]`` (float, 1 = best) of ``target [B]`` among ``candidate`` items.

    Args:
        scores: ``[B, N]`` scores.
        target: bought item per row ``[B]``.
        candidate: which items may be ranked ``[N]`` (bool); a non-candidate target gets inf.

    >>> scores = torch.tensor([[3.0, 1.0, 3.0, 9.0]])
    >>> tie_aware_ranks(scores, torch.tensor([0]), torch.tensor([True, True, True, False]))
    tensor([1.5000], dtype=torch.float64)
    """
    # rank = 1 + greater + (equal - 1) / 2 = 1 + (C - 1 + Σ sign(s - s_target)) / 2 over the C
    # candidates: one pass of sign() instead of two comparisons (bool sums are slow on CPU)
    pos = scores.gather(1, target.unsqueeze(1))  # [B, 1]
    columns, others = candidate.nonzero().squeeze(1), (~candidate).nonzero().squeeze(1)
    if others.numel() <= columns.numel():  # all columns, minus the few non-candidates
        sign = (scores - pos).sign_().sum(1) - (scores.index_select(1, others) - pos).sign_().sum(1)
    else:
        sign = (scores.index_select(1, columns) - pos).sign_().sum(1)
    rank = 1 + (columns.numel() - 1 + sign.double()) / 2
    return rank.masked_fill(~candidate[target], math.inf)


def ranking_metrics(ranks: Tensor, ks: Iterable[int] = KS, prefix: str = "") -> dict[str, float]:
    """Mean ``recall@K``, ``ndcg@K`` and ``mrr`` of ranks ``[Q]`` (empty → NaN).

    >>> ranking_metrics(torch.tensor([1.0, 4.0, math.inf]), ks=[2])  # doctest: +ELLIPSIS
    {'recall@2': 0.333..., 'ndcg@2': 0.333..., 'mrr': 0.4166...}
    """
    if ranks.numel() == 0:
        return {**{f"{prefix}{m}@{k}": math.nan for k in ks for m in ("recall", "ndcg")},
                f"{prefix}mrr": math.nan}
    ranks = ranks.double()
    out: dict[str, float] = {}
    for k in ks:
        hit = ranks <= k
        out[f"{prefix}recall@{k}"] = hit.double().mean().item()
        out[f"{prefix}ndcg@{k}"] = torch.where(hit, 1 / torch.log2(1 + ranks), 0.0).mean().item()
    out[f"{prefix}mrr"] = (1 / ranks).mean().item()
    return out


class Evaluator:
    """Accumulates test-then-update ranks over a stream of batches.

    Args:
        ks: cut-offs for recall and NDCG.
    """

    def __init__(self, ks: Iterable[int] = KS) -> None:
        self.ks = tuple(int(k) for k in ks)
        if not self.ks or min(self.ks) < 1:
            raise ValueError(f"cut-offs must be positive integers, got {self.ks}")
        self.seen_items = torch.zeros(0, dtype=torch.bool)
        self._pairs = np.zeros(0, dtype=np.int64)  # sorted user * PAIR_STRIDE + item keys
        self._ranks: list[Tensor] = []
        self._new: list[Tensor] = []

    def observe(self, batch: EventBatch) -> Tensor:
        """Mark a batch's items and (user, item) pairs as seen; returns its ``new`` flags ``[B]``.

        ``new[i]`` is true when event ``i``'s user had not bought that item before it.
        """
        top = int(batch.items.max()) + 1 if len(batch) else 0
        if top > self.seen_items.numel():
            grown = torch.zeros(top, dtype=torch.bool)
            grown[: self.seen_items.numel()] = self.seen_items
            self.seen_items = grown
        self.seen_items[batch.items] = True
        keys = batch.users.numpy().astype(np.int64) * PAIR_STRIDE + batch.items.numpy()
        uniq, first = np.unique(keys, return_index=True)  # first occurrence inside the batch
        at = np.searchsorted(self._pairs, uniq)
        known = self._pairs[np.minimum(at, max(0, self._pairs.size - 1))] == uniq if \
            self._pairs.size else np.zeros(uniq.size, dtype=bool)
        new = torch.zeros(len(batch), dtype=torch.bool)
        new[torch.from_numpy(first[~known])] = True
        self._pairs = np.insert(self._pairs, at[~known], uniq[~known])  # stays sorted
        return new

    def record(self, batch: EventBatch, scores: Tensor) -> None:
        """Rank the batch's purchases by ``scores [B, >= seen]``, then observe the batch."""
        n = self.seen_items.numel()
        top = max(n, int(batch.items.max()) + 1)
        if scores.size(1) < top:  # the recommender knows fewer items: they score lowest
            scores = torch.cat([scores, scores.new_full((len(batch), top - scores.size(1)),
                                                        -math.inf)], dim=1)
        candidate = torch.zeros(top, dtype=torch.bool)
        candidate[:n] = self.seen_items
        self._ranks.append(tie_aware_ranks(scores[:, :top], batch.items, candidate))
        self._new.append(self.observe(batch))

    @property
    def ranks(self) -> Tensor:
        """Rank of every recorded purchase ``[N]``, in record order (inf: item never seen)."""
        return torch.cat(self._ranks) if self._ranks else torch.zeros(0)

    def results(self) -> dict[str, float]:
        """Metrics on all recorded purchases and on ``new/`` ones, plus counts."""
        ranks = self.ranks
        new = torch.cat(self._new) if self._new else torch.zeros(0, dtype=torch.bool)
        out = ranking_metrics(ranks, self.ks)
        out.update(ranking_metrics(ranks[new], self.ks, prefix="new/"))
        out.update(events=float(ranks.numel()), new_events=float(new.sum()),
                   unseen_item_events=float(torch.isinf(ranks).sum()))
        return out

    def run(self, recommender: Recommender, test: EventBatch, history: EventBatch | None = None,
            batch_size: int = 1000, progress: bool = False) -> dict[str, float]:
        """Replay ``history`` (update only), then test-then-update on ``test``.

        Args:
            recommender: anything with ``score`` and ``update``.
            test: events to rank, in time order.
            history: earlier events that only warm the state up.
            batch_size: events per batch (scored from the state before the batch).
            progress: show tqdm bars.
        """
        with torch.no_grad():
            if history is not None:
                for batch in tqdm(list(history.batches(batch_size)), desc="warm-up",
                                  disable=not progress):
                    recommender.update(batch)
                    self.observe(batch)
            for batch in tqdm(list(test.batches(batch_size)), desc="test-then-update",
                              disable=not progress):
                self.record(batch, recommender.score(batch))
                recommender.update(batch)
        return self.results()
