"""Streaming evaluation: full-catalog, tie-aware ranking, test-then-update.

In the spirit of TGB's ``Evaluator`` (https://github.com/shenyangHuang/TGB) and River's
progressive validation: each batch of purchases is scored from the state *before* the batch —
every candidate item from the same state —, ranked, and only then applied to the recommender.
:meth:`Evaluator.run` never splits a group of equal timestamps across two batches
(:meth:`~tgn.data.EventBatch.batches` with ``whole_times``), so every line of a basket is
scored from the state as of the basket's start.

* Candidates: every item seen in any earlier event (the catalog "up to then"). A purchase of an
  item never seen before cannot be ranked by anyone; it counts as a miss (rank = inf).
* Tie-aware rank (TGB/OGB): ``1 + #(candidates scoring higher) + #(others tying) / 2``, the
  expected position under random tie-breaking; a rank counts as a hit at ``K`` when ``<= K``.
* Per-event metrics (the primary protocol; one query per purchase line) for K in ``ks``:
  ``recall@K`` (hit rate: one positive per query), ``ndcg@K`` (``1 / log2(1 + rank)`` if
  ``rank <= K``), and ``mrr``; the same on ``repeat/`` purchases (the user bought that item in
  an earlier batch: something the recommender's state could know) and on ``explore/`` ones
  (all others, duplicate lines of a new item in one basket included).
* ``repeat_share@K``: mean over queries of the share of the top-K candidates that the user
  bought before the batch (ties at position K counted by their expected share).
* Slices: all of the above again on named subsets of the events, ``<slice>/recall@20``,
  ``<slice>/explore/recall@20``, … with ``<slice>/events`` and the other counts. A slice is a
  function of the batch and of each event's *prior history length* (purchase lines of its user
  observed before the event's batch, warm-up included); by default :data:`HISTORY_SLICES`:
  ``cold`` (<= 5 lines), ``light`` (6-30), ``heavy`` (> 30). :class:`UserSet` slices by user.
* Basket protocol (:func:`basket_metrics`, next-basket recommendation as in TAIW,
  https://github.com/alexeyromanov-hse/time_aware_item_weighting, and "A Next Basket
  Recommendation Reality Check", https://arxiv.org/abs/2109.04644): a basket is the set of
  *distinct* items among the recorded lines of one user at one timestamp; ``basket/recall@K``
  = mean over baskets of ``|top-K ∩ basket| / |basket|``, ``basket/ndcg@K`` = DCG of the hits
  over the ideal DCG of ``min(|basket|, K)`` hits; ``last_basket/…`` the same over each user's
  latest recorded basket (the evaluated split's last one). Counting, precisely:

  - an item's rank is its per-event tie-aware rank among all candidates, the basket's other
    items included (they share the top-K list); duplicate lines of an item count once, with
    their best rank (equal anyway when every line of a basket is scored from one state);
  - a hit is ``rank <= K`` (as per event), and contributes ``1 / log2(1 + rank)`` to the DCG;
  - an item never seen before stays in ``|basket|`` as a miss, so such a basket cannot reach
    recall 1, as with the full ground-truth baskets of the NBR literature;
  - ties straddling place K can give more than K items ``rank <= K``: hits are capped at K
    and NDCG at 1, so no basket scores above a perfect list.

  The counts are ``baskets`` and ``last_baskets`` (users). Lines of one basket that a caller
  of :meth:`Evaluator.record` splits across batches are still grouped, but were scored from
  two states; :meth:`Evaluator.run` never splits them.

Any object with ``score(batch) -> [B, >= num_items]`` and ``update(batch)`` can be evaluated.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Protocol

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from tgn.data import MSG_DIM, EventBatch, distinct_queries

KS = (10, 20, 50)
BASKET_KS = (10, 20)
PAIR_STRIDE = 1 << 32  # (user, item) → one int64 key
#: A slice: ``(batch, prior_lines [B] int64) -> [B] bool``, which of the batch's events it holds.
SliceFn = Callable[[EventBatch, Tensor], Tensor]
#: Prefixes the evaluator writes itself; slice names must differ from them.
RESERVED = ("repeat", "explore", "basket", "last_basket")


class Recommender(Protocol):
    """What the evaluator needs: score a batch from the current state, then learn from it."""

    def score(self, batch: EventBatch) -> Tensor:
        """Scores ``[B, num_items]`` (extra columns are ignored) for each event's user.

        A row depends on the event's user and time only (the repeat share is computed once
        per user and time of a batch)."""

    def update(self, batch: EventBatch) -> None:
        """Apply the batch's events to the recommender's state."""


@dataclass(frozen=True)
class HistoryLength:
    """Events whose user had ``low <= prior lines <= high`` before the event's batch.

    >>> HistoryLength(6, 30)(None, torch.tensor([5, 6, 30, 31]))
    tensor([False,  True,  True, False])
    """

    low: int = 0
    high: float = math.inf

    def __call__(self, batch: EventBatch | None, prior_lines: Tensor) -> Tensor:
        return (prior_lines >= self.low) & (prior_lines <= self.high)


@dataclass(frozen=True, eq=False)
class UserSet:
    """Events of the users flagged in ``users [num_users]`` (bool; users past its end: out)."""

    users: Tensor

    def __call__(self, batch: EventBatch, prior_lines: Tensor) -> Tensor:
        inside = batch.users < self.users.numel()
        return inside & self.users[torch.where(inside, batch.users, 0)] if self.users.numel() \
            else torch.zeros(len(batch), dtype=torch.bool)


#: Slices by prior history length (purchase lines of the user before the event's batch).
HISTORY_SLICES: Mapping[str, SliceFn] = MappingProxyType({
    "cold": HistoryLength(0, 5), "light": HistoryLength(6, 30), "heavy": HistoryLength(31)})


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
    # candidates
    sign = candidate_sign_sums(scores, scores.gather(1, target.unsqueeze(1)), candidate)
    rank = 1 + (int(candidate.sum()) - 1 + sign) / 2
    return rank.masked_fill(~candidate[target], math.inf)


def candidate_sign_sums(scores: Tensor, pivot: Tensor, candidate: Tensor) -> Tensor:
    """``Σ_{candidates} sign(scores - pivot)`` per row ``[B]`` (float64), for ``pivot [B, 1]``.

    One pass of ``sign()`` instead of two comparisons (bool sums are slow on CPU); with few
    non-candidates, over all columns minus theirs.

    >>> candidate_sign_sums(torch.tensor([[3.0, 1.0, 3.0, 9.0]]), torch.tensor([[3.0]]),
    ...                     torch.tensor([True, True, True, False]))
    tensor([-1.], dtype=torch.float64)
    """
    columns, others = candidate.nonzero().squeeze(1), (~candidate).nonzero().squeeze(1)
    if others.numel() <= columns.numel():
        sign = (scores - pivot).sign_().sum(1) - \
            (scores.index_select(1, others) - pivot).sign_().sum(1)
    else:
        sign = (scores.index_select(1, columns) - pivot).sign_().sum(1)
    return sign.double()


def top_candidate_scores(scores: Tensor, candidate: Tensor, width: int,
                         block: int = 64) -> Tensor:
    """The ``width`` best candidate scores of each row, descending ``[B, width]`` (exact).

    A full-row ``topk`` costs as much as ranking; instead the row's maxima per ``block``
    columns pick the ``2 · width`` best blocks, and only those (plus the columns past the last
    whole block) are masked and searched. A row whose non-candidates leave the result below the
    best block left out is redone over the whole masked row.

    >>> top_candidate_scores(torch.tensor([[1.0, 7.0, 3.0, 9.0]]),
    ...                      torch.tensor([True, True, True, False]), 2)
    tensor([[7., 3.]])
    """
    b, n = scores.shape
    blocks, spare = n // block, 2 * width
    if blocks <= spare:
        return scores.masked_fill(~candidate, -math.inf).topk(width, dim=1).values
    whole = blocks * block
    grid = scores[:, :whole].reshape(b, blocks, block)  # a view
    best = grid.amax(2).topk(spare + 1, dim=1)  # [B, spare + 1] best block maxima
    chosen = best.indices[:, :spare]
    pool = grid.gather(1, chosen.unsqueeze(2).expand(b, spare, block))  # [B, spare, block]
    keep = candidate[:whole].view(blocks, block)[chosen]
    pool = torch.cat([torch.where(keep, pool, -math.inf).view(b, -1),
                      scores[:, whole:].masked_fill(~candidate[whole:], -math.inf)], dim=1)
    values = pool.topk(width, dim=1).values
    # every element outside the pool is <= the best block left out
    redo = (values[:, -1] < best.values[:, spare]).nonzero().squeeze(1)
    if redo.numel():
        values[redo] = scores[redo].masked_fill(~candidate, -math.inf).topk(width, dim=1).values
    return values


def repeat_share(scores: Tensor, candidate: Tensor, rows: Tensor, past: Tensor,
                 ks: Iterable[int] = KS) -> Tensor:
    """Expected share ``[B, len(ks)]`` of each row's top-K candidates that are "past" items.

    Ties are counted by expectation under random tie-breaking: with ``a`` candidates scoring
    above the K-th best score and ``e`` tying with it, each tied item fills the last ``K - a``
    places with probability ``(K - a) / e``. With fewer than K candidates the list is all of
    them. The K-th best scores come from :func:`top_candidate_scores`; a full pass only for
    rows whose tie goes on past place K.

    Args:
        scores: ``[B, N]`` scores.
        candidate: which items may be listed ``[N]`` (bool).
        rows: row of each past (row, item) pair ``[P]``.
        past: item of each pair ``[P]`` (a candidate; one pair per row and item).
        ks: list lengths.

    >>> scores = torch.tensor([[5.0, 4.0, 4.0, 4.0, 9.0], [1.0, 2.0, 3.0, 4.0, 0.0]])
    >>> candidate = torch.tensor([True, True, True, True, False])
    >>> # row 0 bought 1 before: top-2 = {0} + one of the tied {1, 2, 3}; row 1 bought 0 and 3
    >>> repeat_share(scores, candidate, torch.tensor([0, 1, 1]), torch.tensor([1, 0, 3]), [2])
    tensor([[0.1667],
            [0.5000]], dtype=torch.float64)
    """
    ks = tuple(ks)
    b, n_cand = scores.size(0), int(candidate.sum())
    out = torch.zeros(b, len(ks), dtype=torch.float64)
    if b == 0 or n_cand == 0:
        return out
    values = top_candidate_scores(scores, candidate, min(max(ks) + 1, n_cand))
    past_scores = scores[rows, past]  # [P]
    counted = torch.full((b,), math.nan, dtype=values.dtype)  # tie counted over the row at
    count = torch.zeros(b, dtype=torch.long)
    for j, k in enumerate(ks):
        k = min(k, n_cand)
        threshold = values[:, k - 1]  # [B] the k-th best candidate score
        above = (values[:, :k] > threshold.unsqueeze(1)).sum(1)
        tied = (values[:, :k] == threshold.unsqueeze(1)).sum(1)
        if k < n_cand:  # the tie may go on past place k: count it over the whole row
            on = (values[:, k] == threshold) & (counted != threshold)
            if on.any():
                sign = candidate_sign_sums(scores[on], threshold[on].unsqueeze(1), candidate)
                count[on] = n_cand - 2 * above[on] + sign.long()  # C = above + below + equal
                counted[on] = threshold[on]
            tied = torch.where((values[:, k] == threshold), count, tied)
        past_above = torch.zeros(b, dtype=torch.float64).index_add_(
            0, rows, (past_scores > threshold[rows]).double())
        past_tied = torch.zeros(b, dtype=torch.float64).index_add_(
            0, rows, (past_scores == threshold[rows]).double())
        out[:, j] = (past_above + past_tied * (k - above) / tied.clamp_min(1)) / k
    return out


def basket_metrics(users: Tensor, t: Tensor, items: Tensor, ranks: Tensor,
                   ks: Iterable[int] = BASKET_KS) -> dict[str, float]:
    """``basket/`` and ``last_basket/`` recall@K and ndcg@K of purchase lines ``[L]``.

    Args:
        users: user of each line ``[L]``.
        t: time of each line ``[L]`` (a basket: one user's lines at one time).
        items: item of each line ``[L]``.
        ranks: tie-aware rank of each line's item ``[L]`` (inf: never seen, a miss).
        ks: list lengths.

    >>> # u0 at t=1: items 5, 6 (5 twice), ranks 1 and 3; u0 at t=2: item 7 unseen; u1: rank 2
    >>> out = basket_metrics(torch.tensor([0, 0, 0, 0, 1]), torch.tensor([1., 1., 1., 2., 1.]),
    ...                      torch.tensor([5, 6, 5, 7, 8]),
    ...                      torch.tensor([1.0, 3.0, 1.0, math.inf, 2.0]), ks=[2])
    >>> {k: round(v, 4) for k, v in out.items()}  # doctest: +NORMALIZE_WHITESPACE
    {'basket/recall@2': 0.5, 'basket/ndcg@2': 0.4147, 'last_basket/recall@2': 0.5,
     'last_basket/ndcg@2': 0.3155, 'baskets': 3.0, 'last_baskets': 2.0}
    """
    ks = tuple(ks)
    u, when, it, r = (x.numpy() for x in (users, t, items, ranks.double()))
    if u.size == 0:
        return {**{f"{scope}/{m}@{k}": math.nan for scope in ("basket", "last_basket")
                   for k in ks for m in ("recall", "ndcg")}, "baskets": 0.0, "last_baskets": 0.0}
    order = np.lexsort((r, it, when, u))  # by user, time, item; an item's best rank first
    u, when, it, r = u[order], when[order], it[order], r[order]
    starts = np.r_[True, (u[1:] != u[:-1]) | (when[1:] != when[:-1])]  # [L] a basket begins
    distinct = starts | np.r_[True, it[1:] != it[:-1]]
    basket, r = np.cumsum(starts)[distinct] - 1, r[distinct]  # [D] basket of each item
    n = int(basket[-1]) + 1
    size = np.bincount(basket, minlength=n)
    owner = u[starts]
    last = np.r_[owner[1:] != owner[:-1], True]  # [n] each user's latest basket
    out: dict[str, float] = {}
    for k in ks:
        hit = r <= k
        hits = np.minimum(np.bincount(basket, hit, minlength=n), k)
        dcg = np.bincount(basket, np.where(hit, 1 / np.log2(1 + r), 0.0), minlength=n)
        ideal = np.cumsum(1 / np.log2(2 + np.arange(k)))[np.minimum(size, k) - 1]
        recall, ndcg = hits / size, np.minimum(dcg / ideal, 1.0)
        for scope, chosen in (("basket", slice(None)), ("last_basket", last)):
            out[f"{scope}/recall@{k}"] = float(recall[chosen].mean())
            out[f"{scope}/ndcg@{k}"] = float(ndcg[chosen].mean())
    sorted_out = {f"{scope}/{m}@{k}": out[f"{scope}/{m}@{k}"]
                  for scope in ("basket", "last_basket") for k in ks for m in ("recall", "ndcg")}
    return {**sorted_out, "baskets": float(n), "last_baskets": float(last.sum())}


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
        ks: cut-offs for recall, NDCG and the repeat share.
        slices: named event subsets scored on their own (``None``: :data:`HISTORY_SLICES`;
            ``{}``: none), e.g. ``{**HISTORY_SLICES, "profiled": UserSet(mask)}``.
        basket_ks: cut-offs of the basket protocol.
    """

    def __init__(self, ks: Iterable[int] = KS, slices: Mapping[str, SliceFn] | None = None,
                 basket_ks: Iterable[int] = BASKET_KS) -> None:
        self.ks, self.basket_ks = tuple(int(k) for k in ks), tuple(int(k) for k in basket_ks)
        for cuts in (self.ks, self.basket_ks):
            if not cuts or min(cuts) < 1:
                raise ValueError(f"cut-offs must be positive integers, got {cuts}")
        self.slices = dict(HISTORY_SLICES if slices is None else slices)
        bad = [name for name in self.slices if not name or "/" in name or name in RESERVED]
        if bad:
            raise ValueError(f"slice names must be non-empty, without '/', not {RESERVED}: {bad}")
        self.seen_items = torch.zeros(0, dtype=torch.bool)
        self.user_lines = torch.zeros(0, dtype=torch.long)  # [num_users] lines observed
        self._pairs = np.zeros(0, dtype=np.int64)  # sorted user * PAIR_STRIDE + item keys
        self._ranks: list[Tensor] = []  # [B] per recorded batch
        self._repeat: list[Tensor] = []  # [B] bool
        self._share: list[Tensor] = []  # [B, len(ks)]
        self._in_slice: dict[str, list[Tensor]] = {name: [] for name in self.slices}  # [B] bool
        self._recorded: list[EventBatch] = []  # for the baskets

    def observe(self, batch: EventBatch) -> None:
        """Mark a batch's items and (user, item) pairs as seen (an update without scoring)."""
        if len(batch) == 0:
            return
        self.seen_items = _grown(self.seen_items, int(batch.items.max()) + 1)
        self.seen_items[batch.items] = True
        self.user_lines = _grown(self.user_lines, int(batch.users.max()) + 1)
        self.user_lines.index_add_(0, batch.users, torch.ones_like(batch.users))
        keys = np.unique(self._keys(batch.users, batch.items))
        fresh = keys[~self._known(keys)]
        self._pairs = np.insert(self._pairs, np.searchsorted(self._pairs, fresh), fresh)

    def prior_lines(self, users: Tensor) -> Tensor:
        """``[B]`` purchase lines observed for each of ``users [B]`` (0 for a new user)."""
        inside = users < self.user_lines.numel()
        return torch.where(inside, self.user_lines[torch.where(inside, users, 0)], 0) \
            if self.user_lines.numel() else torch.zeros_like(users)

    def bought_before(self, users: Tensor, items: Tensor) -> Tensor:
        """``[B]`` bool: whether each (user, item) pair was observed (in an earlier batch)."""
        return torch.from_numpy(self._known(self._keys(users, items)))

    def past_items(self, users: Tensor) -> tuple[Tensor, Tensor]:
        """Every (row, item) with ``item`` observed for ``users[row]``: rows ``[P]``, items ``[P]``.

        Rows of one user repeat that user's items (sorted by item).
        """
        u = users.numpy().astype(np.int64)
        lo = np.searchsorted(self._pairs, u * PAIR_STRIDE)
        hi = np.searchsorted(self._pairs, (u + 1) * PAIR_STRIDE)
        counts = hi - lo
        rows = np.repeat(np.arange(u.size), counts)
        offsets = np.arange(rows.size) - np.repeat(np.cumsum(counts) - counts, counts)
        items = self._pairs[lo[rows] + offsets] - u[rows] * PAIR_STRIDE
        return torch.from_numpy(rows), torch.from_numpy(items)

    def record(self, batch: EventBatch, scores: Tensor) -> None:
        """Rank the batch's purchases by ``scores [B, >= seen]``, then observe the batch."""
        if len(batch) == 0:
            return
        n = self.seen_items.numel()
        top = max(n, int(batch.items.max()) + 1)
        if scores.size(1) < top:  # the recommender knows fewer items: they score lowest
            scores = torch.cat([scores, scores.new_full((len(batch), top - scores.size(1)),
                                                        -math.inf)], dim=1)
        scores = scores[:, :top]
        candidate = torch.zeros(top, dtype=torch.bool)
        candidate[:n] = self.seen_items
        self._ranks.append(tie_aware_ranks(scores, batch.items, candidate))
        self._repeat.append(self.bought_before(batch.users, batch.items))
        # rows of one user at one time score alike (scores are per event's user): one share
        _, _, inverse, first = distinct_queries(batch.users, batch.t)
        share = repeat_share(scores[first], candidate,
                             *self.past_items(batch.users[first]), self.ks)  # [G, len(ks)]
        self._share.append(share[inverse])
        self._recorded.append(batch)
        prior = self.prior_lines(batch.users)
        for name, chosen in self.slices.items():
            self._in_slice[name].append(chosen(batch, prior))
        self.observe(batch)

    @property
    def ranks(self) -> Tensor:
        """Rank of every recorded purchase ``[N]``, in record order (inf: item never seen)."""
        return torch.cat(self._ranks) if self._ranks else torch.zeros(0)

    def results(self) -> dict[str, float]:
        """Metrics on all recorded purchases and per slice (``<slice>/`` prefix), each also on
        ``repeat/`` and ``explore/`` ones, the basket protocol, and counts; a flat dict of
        floats."""
        ranks = self.ranks
        repeat = _cat(self._repeat, torch.zeros(0, dtype=torch.bool))
        share = _cat(self._share, torch.zeros(0, len(self.ks), dtype=torch.float64))
        out = self._subset_metrics(ranks, repeat, share, "")
        for name, parts in self._in_slice.items():
            chosen = _cat(parts, torch.zeros(0, dtype=torch.bool))
            out.update(self._subset_metrics(ranks[chosen], repeat[chosen], share[chosen],
                                            f"{name}/"))
        empty = torch.zeros(0, dtype=torch.long)
        lines = EventBatch.cat(self._recorded) if self._recorded else \
            EventBatch(empty, empty, empty.double(), torch.zeros(0, MSG_DIM))
        out.update(basket_metrics(lines.users, lines.t, lines.items, ranks, self.basket_ks))
        return out

    def _subset_metrics(self, ranks: Tensor, repeat: Tensor, share: Tensor,
                        prefix: str) -> dict[str, float]:
        """Per-event metrics of ranks ``[Q]`` (``repeat [Q]``, ``share [Q, len(ks)]``)."""
        out = ranking_metrics(ranks, self.ks, prefix)
        out.update(ranking_metrics(ranks[repeat], self.ks, f"{prefix}repeat/"))
        out.update(ranking_metrics(ranks[~repeat], self.ks, f"{prefix}explore/"))
        for j, k in enumerate(self.ks):
            out[f"{prefix}repeat_share@{k}"] = share[:, j].mean().item() if ranks.numel() \
                else math.nan
        out.update({f"{prefix}events": float(ranks.numel()),
                    f"{prefix}repeat_events": float(repeat.sum()),
                    f"{prefix}explore_events": float((~repeat).sum()),
                    f"{prefix}unseen_item_events": float(torch.isinf(ranks).sum())})
        return out

    def run(self, recommender: Recommender, test: EventBatch, history: EventBatch | None = None,
            batch_size: int = 1000, progress: bool = False) -> dict[str, float]:
        """Replay ``history`` (update only), then test-then-update on ``test``.

        Test batches never split a group of equal timestamps (a basket), so each is scored
        from the state as of its start; a batch may hence be shorter than ``batch_size``, or
        longer when one timestamp alone has more events. Warm-up batches are cut by count
        (nothing is scored there), as the replay pipeline cuts the events before its test rows.

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
            for batch in tqdm(list(test.batches(batch_size, whole_times=True)),
                              desc="test-then-update", disable=not progress):
                self.record(batch, recommender.score(batch))
                recommender.update(batch)
        return self.results()

    @staticmethod
    def _keys(users: Tensor, items: Tensor) -> np.ndarray:
        return users.numpy().astype(np.int64) * PAIR_STRIDE + items.numpy()

    def _known(self, keys: np.ndarray) -> np.ndarray:
        """``[K]`` bool: which pair keys are in the sorted ``_pairs``."""
        if self._pairs.size == 0:
            return np.zeros(keys.size, dtype=bool)
        at = np.minimum(np.searchsorted(self._pairs, keys), self._pairs.size - 1)
        return self._pairs[at] == keys


def _cat(parts: list[Tensor], empty: Tensor) -> Tensor:
    return torch.cat(parts) if parts else empty


def _grown(x: Tensor, size: int) -> Tensor:
    """``x [M]`` zero-padded to ``size`` entries (``x`` itself when long enough)."""
    return torch.cat([x, x.new_zeros(size - x.numel())]) if size > x.numel() else x
