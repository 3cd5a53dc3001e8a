"""The evaluator on a toy stream with ranks worked out by hand (ties included)."""

from __future__ import annotations

import math

import pytest
import torch

from tgn.data import EventBatch
from tgn.evaluate import Evaluator, tie_aware_ranks


def _batch(users: list[int], items: list[int], t0: float = 0.0) -> EventBatch:
    n = len(users)
    return EventBatch(torch.tensor(users), torch.tensor(items),
                      torch.arange(n, dtype=torch.float64) + t0, torch.zeros(n, 2))


class FixedScores:
    """Returns preset scores and counts its updates."""

    def __init__(self, scores: torch.Tensor) -> None:
        self.scores, self.updates = scores, 0

    def score(self, batch: EventBatch) -> torch.Tensor:
        return self.scores

    def update(self, batch: EventBatch) -> None:
        self.updates += len(batch)


def test_tie_aware_rank_counts_half_the_ties():
    scores = torch.tensor([[0.9, 0.5, 0.5, 2.0], [1.0, 1.0, 1.0, 1.0]])
    candidate = torch.tensor([True, True, True, False])
    # row 0: target 1 (0.5); item 0 scores higher (1), item 2 ties (½), item 3 is no candidate
    # row 1: target 0; items 1 and 2 tie → 1 + 0 + 2/2 = 2
    ranks = tie_aware_ranks(scores, torch.tensor([1, 0]), candidate)
    assert ranks.tolist() == [2.5, 2.0]
    assert tie_aware_ranks(scores, torch.tensor([3, 3]), candidate).isinf().all()


def test_evaluator_ranks_from_state_before_the_batch_then_updates():
    history = _batch([0, 1, 2], [1, 2, 0])  # items 0, 1, 2 seen; user 0 already bought item 1
    test = _batch([0, 1, 1], [1, 3, 0], t0=10)
    scores = torch.tensor([[0.9, 0.5, 0.5, 2.0],   # A: user 0 buys 1 → 1 + 1 + ½ = 2.5
                           [0.0, 0.0, 0.0, 5.0],   # B: item 3 never seen before → inf (a miss)
                           [0.1, 0.2, 0.3, 0.0]])  # C: user 1 buys 0 → 1 + 2 = 3
    rec = FixedScores(scores)
    out = Evaluator(ks=(2, 3)).run(rec, test, history, batch_size=3)
    assert rec.updates == 6  # history and test were both applied
    assert out["recall@2"] == 0.0
    assert out["recall@3"] == pytest.approx(2 / 3)
    assert out["ndcg@3"] == pytest.approx((1 / math.log2(3.5) + 1 / math.log2(4)) / 3)
    assert out["mrr"] == pytest.approx((1 / 2.5 + 0 + 1 / 3) / 3)
    # new purchases: B and C (A repeats user 0's item 1) → ranks inf, 3
    assert out["new_events"] == 2 and out["new/recall@3"] == pytest.approx(0.5)
    assert out["unseen_item_events"] == 1 and out["events"] == 3


def test_narrow_scores_are_padded_and_bad_cutoffs_rejected():
    ev = Evaluator(ks=(1, 2))
    ev.observe(_batch([0, 0], [0, 4]))  # candidates: items 0 and 4
    ev.record(_batch([1], [4]), torch.tensor([[1.0, 0.0]]))  # knows 2 items; item 4 gets -inf
    # item 0 (1.0) beats item 4 (-inf); unknown items 1-3 are no candidates → rank 2
    assert ev.results()["recall@1"] == 0.0 and ev.results()["recall@2"] == 1.0
    with pytest.raises(ValueError, match="positive"):
        Evaluator(ks=(0,))
