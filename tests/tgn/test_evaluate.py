"""The evaluator on a toy stream with ranks worked out by hand (ties included)."""

from __future__ import annotations

import math

import pytest
import torch

from tgn.data import EventBatch
from tgn.evaluate import (
    HISTORY_SLICES,
    Evaluator,
    UserSet,
    basket_metrics,
    repeat_share,
    tie_aware_ranks,
    top_candidate_scores,
)


def _batch(users: list[int], items: list[int], t0: float = 0.0,
           t: list[float] | None = None) -> EventBatch:
    n = len(users)
    times = torch.tensor(t, dtype=torch.float64) if t is not None else \
        torch.arange(n, dtype=torch.float64) + t0
    return EventBatch(torch.tensor(users), torch.tensor(items), times, torch.zeros(n, 2))


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
    # explore purchases: B and C (A repeats user 0's item 1) → ranks inf, 3
    assert out["explore_events"] == 2 and out["explore/recall@3"] == pytest.approx(0.5)
    assert out["repeat_events"] == 1 and out["repeat/recall@3"] == 1.0
    assert out["unseen_item_events"] == 1 and out["events"] == 3


def test_narrow_scores_are_padded_and_bad_cutoffs_rejected():
    ev = Evaluator(ks=(1, 2))
    ev.observe(_batch([0, 0], [0, 4]))  # candidates: items 0 and 4
    ev.record(_batch([1], [4]), torch.tensor([[1.0, 0.0]]))  # knows 2 items; item 4 gets -inf
    # item 0 (1.0) beats item 4 (-inf); unknown items 1-3 are no candidates → rank 2
    assert ev.results()["recall@1"] == 0.0 and ev.results()["recall@2"] == 1.0
    with pytest.raises(ValueError, match="positive"):
        Evaluator(ks=(0,))


def test_repeat_and_explore_split_with_duplicate_lines():
    ev = Evaluator(ks=(2,))
    ev.observe(_batch([0, 0, 1, 2], [0, 1, 2, 3]))  # u0 bought 0, 1; u1 bought 2; 4 items seen
    test = _batch([0, 0, 1, 1, 1], [1, 3, 2, 0, 0], t=[5, 5, 6, 6, 6])
    scores = torch.tensor([[2.0, 3.0, 1.0, 0.0],    # u0 buys 1 (repeat): rank 1
                           [3.0, 2.0, 1.0, 0.5],    # u0 buys 3 (explore): rank 4
                           [0.0, 1.0, 2.0, 0.0],    # u1 buys 2 (repeat): rank 1
                           [1.0, 1.0, 3.0, 0.0],    # u1 buys 0 (explore): 1 + 1 + ½ = 2.5
                           [1.0, 1.0, 3.0, 0.0]])   # same line again: still explore, 2.5
    ev.record(test, scores)
    out = ev.results()
    assert (out["repeat_events"], out["explore_events"]) == (2, 3)
    assert out["repeat/recall@2"] == 1.0 and out["repeat/mrr"] == 1.0
    assert out["explore/recall@2"] == 0.0
    assert out["explore/mrr"] == pytest.approx((1 / 4 + 2 / 2.5) / 3)
    assert out["recall@2"] == pytest.approx(2 / 5)
    # after the batch, u1's item 0 is known: now a repeat
    ev.record(_batch([1], [0], t0=9), torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    assert ev.results()["repeat_events"] == 3


def test_repeat_share_counts_ties_by_expectation_and_skips_non_candidates():
    ev = Evaluator(ks=(1, 2))
    ev.observe(_batch([0, 0, 1, 2], [0, 1, 2, 3]))  # items 0-3 seen; item 4 never
    test = _batch([0, 1], [2, 3], t0=10)
    scores = torch.tensor([[5.0, 1.0, 4.0, 3.0, 99.0],   # top-2 {0, 2}: u0 bought 0 → ½
                           [1.0, 1.0, 1.0, 9.0, 99.0]])  # top {3}, then 1 place for 3 tied
    ev.record(test, scores)                               # items, u1 bought 2 → (0 + ⅓) / 2
    out = ev.results()
    assert out["repeat_share@1"] == pytest.approx((1 + 0) / 2)  # u0's top-1 is its item 0
    assert out["repeat_share@2"] == pytest.approx((1 / 2 + 1 / 6) / 2)


def test_run_never_splits_a_timestamp_across_batches():
    class StateSpy(FixedScores):
        """Notes (batch length, events applied so far) at every scoring."""

        def __init__(self, scores: torch.Tensor) -> None:
            super().__init__(scores)
            self.seen: list[tuple[int, int]] = []

        def score(self, batch: EventBatch) -> torch.Tensor:
            self.seen.append((len(batch), self.updates))
            return self.scores[: len(batch)]

    rec = StateSpy(torch.zeros(6, 3))
    # a basket of u1 at t=1 (3 lines, one item twice) would straddle a cut at 2 events
    test = _batch([0, 1, 1, 1, 2, 2], [1, 2, 2, 0, 1, 2], t=[0, 1, 1, 1, 2, 2])
    Evaluator(ks=(1,)).run(rec, test, _batch([0], [0], t=[-1]), batch_size=2)
    # each batch is scored from the state after every earlier event and none of its own
    assert rec.seen == [(1, 1), (3, 2), (2, 5)]
    assert [len(b) for b in test.batches(2)] == [2, 2, 2]  # the plain cut splits the basket
    assert [len(b) for b in test.batches(3, whole_times=True)] == [1, 3, 2]
    with pytest.raises(ValueError, match="positive"):
        next(test.batches(0))


def test_history_slices_cut_at_5_and_30_prior_lines_and_count_recorded_batches():
    lines = {0: 5, 1: 6, 2: 30, 3: 31}  # prior purchase lines per user; user 4 is new
    history = _batch([u for u, n in lines.items() for _ in range(n)],
                     [0] * sum(lines.values()))  # everyone bought item 0 (only)
    ev = Evaluator(ks=(1,), slices={**HISTORY_SLICES, "odd": UserSet(torch.tensor([0, 1]) > 0)})
    ev.observe(history)
    ev.observe(_batch([5], [1]))  # item 1 seen, by a user outside the test
    # each user buys item 1 (explore); users 0 and 2 rank it first, the others second
    scores = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])
    ev.record(_batch([0, 1, 2, 3, 4], [1, 1, 1, 1, 1], t0=100), scores)
    out = ev.results()
    # 5 → cold, 6 → light, 30 → light, 31 → heavy, a new user (0 lines) → cold
    assert (out["cold/events"], out["light/events"], out["heavy/events"]) == (2, 2, 1)
    assert out["cold/recall@1"] == 0.5 and out["light/recall@1"] == 0.5
    assert out["heavy/recall@1"] == 0.0 and out["heavy/explore/recall@1"] == 0.0
    assert out["cold/explore_events"] == 2 and out["cold/repeat_events"] == 0
    assert math.isnan(out["cold/repeat/recall@1"])  # no repeat in the slice: NaN, not 0
    assert out["odd/events"] == 1 and out["odd/recall@1"] == 0.0  # user 1 only (mask [F, T])
    # the test batch counts as history for the next one: user 0 now has 6 lines → light
    ev.record(_batch([0], [0], t0=200), torch.tensor([[1.0, 0.0]]))
    out = ev.results()
    assert (out["cold/events"], out["light/events"]) == (2, 3)
    assert out["light/repeat/recall@1"] == 1.0 and out["light/repeat_events"] == 1


def test_slice_names_are_checked():
    assert "cold/events" not in Evaluator(slices={}).results()
    for name in ("repeat", "a/b", ""):
        with pytest.raises(ValueError, match="slice names"):
            Evaluator(slices={name: HISTORY_SLICES["cold"]})


class PerUser(FixedScores):
    """Row ``users[i]`` of the preset scores for every event ``i``."""

    def score(self, batch: EventBatch) -> torch.Tensor:
        return self.scores[batch.users]


def test_basket_recall_and_ndcg_count_distinct_items_and_pick_each_users_last_basket():
    rows = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0],    # u0: items ranked 0, 1, 2, 3, 4
                         [0.0, 0.0, 5.0, 0.0, 0.0]])   # u1: item 2 first
    history = _batch([9] * 5, [0, 1, 2, 3, 4])  # items 0-4 seen; item 5 is not
    test = _batch([0, 0, 0, 1, 1, 0], [1, 1, 3, 2, 5, 0], t=[10, 10, 10, 10, 10, 20])
    out = Evaluator(ks=(2,), basket_ks=(2,)).run(PerUser(rows), test, history, batch_size=2)
    idcg2 = 1 + 1 / math.log2(3)
    # u0@10: {1 (rank 2), 3 (rank 4)} (item 1 twice counts once) → recall ½, DCG 1/log2(3)
    # u1@10: {2 (rank 1), 5 (unseen: a miss)} → recall ½, DCG 1
    # u0@20: {0 (rank 1)} → recall 1, NDCG 1 (ideal DCG of one hit)
    ndcg = [1 / math.log2(3) / idcg2, 1 / idcg2, 1.0]
    assert (out["baskets"], out["last_baskets"]) == (3, 2)
    assert out["basket/recall@2"] == pytest.approx((0.5 + 0.5 + 1) / 3)
    assert out["basket/ndcg@2"] == pytest.approx(sum(ndcg) / 3)
    # last baskets: u0's at t=20 and u1's only one
    assert out["last_basket/recall@2"] == pytest.approx((1 + 0.5) / 2)
    assert out["last_basket/ndcg@2"] == pytest.approx((ndcg[2] + ndcg[1]) / 2)
    assert out["events"] == 6 and out["recall@2"] == pytest.approx(4 / 6)  # per event: lines


def test_basket_hits_are_capped_at_k_when_ties_straddle_it():
    # three items of one basket tie for places 1-3: tie-aware rank 2 each, all "<= 2"
    out = basket_metrics(torch.zeros(3, dtype=torch.long), torch.ones(3, dtype=torch.float64),
                         torch.tensor([0, 1, 2]), torch.tensor([2.0, 2.0, 2.0]), ks=[2])
    assert out["basket/recall@2"] == pytest.approx(2 / 3) and out["basket/ndcg@2"] == 1.0
    assert math.isnan(basket_metrics(*[torch.zeros(0)] * 4)["basket/recall@10"])


def test_block_top_k_and_repeat_share_match_a_brute_force_on_wide_rows():
    gen = torch.Generator().manual_seed(0)
    n, ks = 3000, (3, 5)  # 46 blocks of 64: the block path, not the small-row fallback
    scores = torch.cat([torch.randn(3, n, generator=gen),                      # no ties
                        torch.randint(0, 3, (3, n), generator=gen).float()])   # huge ties
    candidate = torch.rand(n, generator=gen) > 0.2
    scores[2, ~candidate] = 100.0  # non-candidates on top: the row is redone in full
    exact = scores.masked_fill(~candidate, -math.inf).topk(6, dim=1).values
    assert torch.equal(top_candidate_scores(scores, candidate, 6), exact)
    rows = torch.arange(6).repeat_interleave(40)
    past = torch.stack([candidate.nonzero().squeeze(1)[torch.randperm(int(candidate.sum()),
                                                                       generator=gen)[:40]]
                        for _ in range(6)]).reshape(-1)
    expected = torch.zeros(6, len(ks), dtype=torch.float64)
    for r in range(6):
        row, mine = scores[r, candidate], scores[r, past[rows == r]]
        for j, k in enumerate(ks):
            threshold = row.sort(descending=True).values[k - 1]
            above, tied = int((row > threshold).sum()), int((row == threshold).sum())
            hits = (mine > threshold).sum() + (mine == threshold).sum() * (k - above) / tied
            expected[r, j] = hits / k
    assert torch.allclose(repeat_share(scores, candidate, rows, past, ks), expected)
