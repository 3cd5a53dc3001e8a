"""Streaming purchase statistics: the features of the repeat term and of the item prior.

What next-basket work exploits on grocery logs, kept incrementally so a stream can update it
event by event (no pass over the log):

* per (user, item) pair — count, last time, time-decayed counts (TIFU-KNN's decayed frequency,
  https://arxiv.org/abs/2006.00556), the position in the item's repurchase cycle (time since the
  last purchase against the item's typical interval: what TAIW and ReCANet use);
* per user — purchase lines, baskets (distinct times) and repeat lines (repeat propensity);
* per item — purchases, first-time purchases ("explore" buyers), repeat purchases, the mean log
  repurchase interval, and time-decayed popularity of all purchases and of first-time purchases.

:class:`PurchaseSignals` holds this state; :meth:`PurchaseSignals.pair_features` and
:meth:`PurchaseSignals.item_features` turn it into model inputs at a query time. Everything is
a function of the events applied so far, in order: replaying a log gives the same tensors.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from tgn.pair_index import PairIndex, PairOrder

SECONDS_PER_DAY = 86_400.0
#: Half-lives (days) of the decayed per-pair counts.
PAIR_HALF_LIVES = (7.0, 30.0, 120.0)
#: Half-lives (days) of the decayed item popularity (all purchases and first-time purchases).
ITEM_HALF_LIVES = (3.0, 14.0)
#: Width of :meth:`PurchaseSignals.pair_features`.
PAIR_FEATURES = 7 + len(PAIR_HALF_LIVES)
#: Width of :meth:`PurchaseSignals.user_features`.
USER_FEATURES = 4
#: Width of :meth:`PurchaseSignals.item_features`.
ITEM_FEATURES = 3 + 2 * len(ITEM_HALF_LIVES)
#: Neighbours of :meth:`PurchaseSignals.neighbor_scores`.
NEIGHBORS = 300
#: Most recent items of a user that :meth:`PurchaseSignals.item_scores` starts from, and the
#: weight ratio of each one to the next newer one (by purchase order, not by time: the same on
#: logs of any pace).
RECENT_ITEMS = 10
RECENT_DECAY = 0.8
#: Prior strength (pseudo-events) of the shrunk rates and mean intervals.
PRIOR = 5.0
#: Largest exponent ``rate · (t − origin)`` of the scaled item popularity before the table is
#: rescaled to a new origin (``2**200``, far from float64's ``2**1024``; 600 days of events at
#: the 3-day half-life).
POP_RESCALE_EXPONENT = 200 * math.log(2)


def _rates(tau_days: tuple[float, ...]) -> Tensor:
    """Decay rates ``[H]`` (1/s) of half-lives in days."""
    return torch.tensor([math.log(2) / (d * SECONDS_PER_DAY) for d in tau_days],
                        dtype=torch.float64)


def _grow(x: Tensor, size: int, fill: float = 0.0) -> Tensor:
    """``x`` padded along dim 0 with ``fill`` to at least ``size`` rows (capacity doubles)."""
    if size <= x.size(0):
        return x
    extra = max(size, 2 * x.size(0), 1024) - x.size(0)
    return torch.cat([x, x.new_full((extra, *x.shape[1:]), fill)])


def _logit(p: Tensor) -> Tensor:
    return torch.log(p) - torch.log1p(-p)


class PurchaseSignals:
    """Pair, user and item purchase statistics, updated batch by batch.

    Pairs are kept in slots (``user → item → slot`` dicts into growable tensors), users and
    items by dense index. All times are float64 epoch seconds.

    Attributes:
        generation: changes with every :meth:`update`, :meth:`reset_state` and
            :meth:`load_packed` (a cache key: what is cached per generation, the pair index of
            the KNN terms, the bought mask, the global repurchase interval, is a function of
            the state).
    """

    def __init__(self) -> None:
        self.pair_rates, self.item_rates = _rates(PAIR_HALF_LIVES), _rates(ITEM_HALF_LIVES)
        self.generation = 0
        self.reset_state()

    def reset_state(self) -> None:
        """Forget every event."""
        self.generation += 1
        self._by_user, self._by_item, self._index = PairOrder(), PairOrder(), None
        # per-generation caches: (generation, value)
        self._global_gap: tuple[int, Tensor] | None = None
        self._bought: tuple[tuple[int, int], Tensor] | None = None
        self.slots_of: dict[int, dict[int, int]] = {}  # user → item → slot
        self.size = 0
        self.pair_user = torch.zeros(0, dtype=torch.long)
        self.pair_item = torch.zeros(0, dtype=torch.long)
        self.count = torch.zeros(0, dtype=torch.float64)
        self.last = torch.zeros(0, dtype=torch.float64)
        self.decayed = torch.zeros(0, len(PAIR_HALF_LIVES), dtype=torch.float64)  # at `last`
        # users: lines, baskets, repeat lines, last time
        self.user_stats = torch.zeros(0, 4, dtype=torch.float64)
        # items: purchases, first-time purchases, repeats, Σ log interval days, intervals
        self.item_stats = torch.zeros(0, 5, dtype=torch.float64)
        # decayed item popularity scaled to `origin`: at time t it is item_pop·exp(−rate·(t −
        # origin)), so an event adds exp(rate·(t_event − origin)) and the rest stays untouched
        self.item_pop = torch.zeros(0, 2 * len(ITEM_HALF_LIVES), dtype=torch.float64)
        self.origin = -math.inf
        self.clock = -math.inf  # newest time of the last update: features never decay before it

    # -- state -------------------------------------------------------------------------------

    def slots(self, users: Tensor, items: Tensor) -> Tensor:
        """Slot of each pair ``(users [N], items [N])``, -1 for a pair without history."""
        found = [self.slots_of.get(u, {}).get(i, -1)
                 for u, i in zip(users.tolist(), items.tolist(), strict=True)]
        return torch.tensor(found, dtype=torch.long)

    def update(self, users: Tensor, items: Tensor, t: Tensor) -> None:
        """Apply purchases ``(users [B], items [B], t [B])`` (time-ordered)."""
        if users.numel() == 0:
            return
        self.generation += 1
        t = t.to(torch.float64)
        slots, size = [], self.size
        for user, item in zip(users.tolist(), items.tolist(), strict=True):
            own = self.slots_of.setdefault(user, {})
            slot = own.get(item)
            if slot is None:
                slot = own[item] = size
                size += 1
            slots.append(slot)
        index = torch.tensor(slots, dtype=torch.long)
        before = torch.where(index < self.size, index, -1)  # history before the batch
        if size > self.size:
            self.pair_user, self.pair_item = _grow(self.pair_user, size), _grow(self.pair_item,
                                                                                 size)
            self.count, self.decayed = _grow(self.count, size), _grow(self.decayed, size)
            self.last = _grow(self.last, size, -math.inf)
            new = index >= self.size
            self.pair_user[index[new]], self.pair_item[index[new]] = users[new], items[new]
            self.size = size
        touched, inverse = torch.unique(index, return_inverse=True)  # [T], [B]
        self._update_items(items, t, before, inverse)
        self._update_users(users, t, before)
        # pairs: decay the stored values to the pair's newest time, add each event's share
        old = self.last[touched]
        newest = old.clone().scatter_reduce_(0, inverse, t, "amax")  # [T]
        gap = torch.where(torch.isinf(old), 0.0, newest - old)
        self.decayed[touched] *= torch.exp(-gap.unsqueeze(1) * self.pair_rates)
        share = torch.exp(-(newest[inverse] - t).unsqueeze(1) * self.pair_rates)  # [B, H]
        self.decayed.index_add_(0, index, share)
        self.count.index_add_(0, index, torch.ones(index.numel(), dtype=torch.float64))
        self.last[touched] = newest

    def _update_users(self, users: Tensor, t: Tensor, before: Tensor) -> None:
        top = int(users.max()) + 1
        self.user_stats = _grow(self.user_stats, top)
        stats = self.user_stats
        # a basket = a distinct (user, time) not yet counted: newer than the user's last time
        times, t_rank = torch.unique(t, return_inverse=True)
        key = torch.unique(users * times.numel() + t_rank)  # distinct (user, time) as one int
        uu, ut = key // times.numel(), times[key % times.numel()]
        fresh = ut > torch.where(stats[uu, 0] > 0, stats[uu, 3], -math.inf)
        ones = torch.ones(users.numel(), dtype=torch.float64)
        stats[:, 0].index_add_(0, users, ones)
        stats[:, 1].index_add_(0, uu[fresh], torch.ones(int(fresh.sum()), dtype=torch.float64))
        stats[:, 2].index_add_(0, users, (before >= 0).double())
        stats[:, 3].scatter_reduce_(0, users, t, "amax")

    def _update_items(self, items: Tensor, t: Tensor, before: Tensor, pair: Tensor) -> None:
        """Item rows of purchases ``items [B]`` at ``t [B]``; ``before [B]``: each one's pair
        slot before the batch (-1: none); ``pair [B]``: which of the batch's distinct pairs."""
        top = int(items.max()) + 1
        self.item_stats, self.item_pop = _grow(self.item_stats, top), _grow(self.item_pop, top)
        repeat = before >= 0
        # a pair first bought in this batch counts once as a first-time purchase
        first = torch.zeros(items.numel(), dtype=torch.bool)
        first_pos = torch.full((int(pair.max()) + 1,), items.numel()).scatter_reduce_(
            0, pair, torch.arange(items.numel()), "amin")
        first[first_pos] = True
        first &= ~repeat
        stats = self.item_stats
        stats[:, 0].index_add_(0, items, torch.ones(items.numel(), dtype=torch.float64))
        stats[:, 1].index_add_(0, items, first.double())
        stats[:, 2].index_add_(0, items, (~first).double())
        gap = (t - self.last[before.clamp_min(0)]) / SECONDS_PER_DAY
        has_gap = repeat & (gap > 0.5)  # a re-buy at least half a day later
        stats[:, 3].index_add_(0, items[has_gap], torch.log(gap[has_gap]))
        stats[:, 4].index_add_(0, items[has_gap], torch.ones(int(has_gap.sum()),
                                                             dtype=torch.float64))
        self.clock = float(t.max())
        if not abs(self.clock - self.origin) * float(self.item_rates.max()) \
                <= POP_RESCALE_EXPONENT:  # rare (or the first batch): O(items)
            self.item_pop = self._item_pop_at(self.item_pop, self.clock)
            self.origin = self.clock
        h = len(ITEM_HALF_LIVES)
        share = torch.exp((t - self.origin).unsqueeze(1) * self.item_rates)  # [B, H]
        self.item_pop[:, :h].index_add_(0, items, share)
        self.item_pop[:, h:].index_add_(0, items[first], share[first])

    def _item_pop_at(self, pop: Tensor, t: float) -> Tensor:
        """Scaled popularity rows ``pop [N, 2H]`` as the decayed popularity at time ``t``."""
        if not math.isfinite(self.origin):
            return pop.clone()  # no event yet: all zero
        return pop * torch.exp(-(t - self.origin) * self.item_rates).repeat(2)

    # -- features ----------------------------------------------------------------------------

    def pair_features(self, slot: Tensor, t: Tensor) -> Tensor:
        """Features ``[M, PAIR_FEATURES]`` (float32) of pairs with history ``slot [M]`` at
        times ``t [M]``: log count, log days since last, log decayed counts, log share of the
        user's baskets, cycle position (log days since last − the item's mean log interval),
        item re-buy rate (logit), user repeat propensity (logit), log user lines."""
        t = t.to(torch.float64)
        user, item = self.pair_user[slot], self.pair_item[slot]
        elapsed = (t - self.last[slot]).clamp_min(0)
        days = elapsed / SECONDS_PER_DAY
        decayed = self.decayed[slot] * torch.exp(-elapsed.unsqueeze(1) * self.pair_rates)
        ustats, istats = self.user_stats[user], self.item_stats[item]
        count = self.count[slot]
        mean_gap = self._mean_log_gap(istats)
        rebuy = (istats[:, 2] + 1) / (istats[:, 0] + 2)
        propensity = (ustats[:, 2] + 1) / (ustats[:, 0] + 2)
        cols = [torch.log1p(count), torch.log1p(days), *torch.log1p(decayed).unbind(1),
                torch.log(count / ustats[:, 1].clamp_min(1)).clamp_max(0),
                (torch.log(days.clamp_min(0.5)) - mean_gap).clamp(-5, 5),
                _logit(rebuy), _logit(propensity), torch.log1p(ustats[:, 0])]
        return torch.stack(cols, 1).float()

    def user_features(self, users: Tensor, t: Tensor) -> Tensor:
        """Features ``[Q, USER_FEATURES]`` (float32) of users ``[Q]`` at times ``t [Q]``: log
        lines, log baskets, repeat propensity (logit), log days since the user's last basket."""
        stats = _grow(self.user_stats, int(users.max()) + 1 if users.numel() else 0)[users]
        days = ((t.to(torch.float64) - stats[:, 3]) / SECONDS_PER_DAY).clamp(0, 365)
        days = torch.where(stats[:, 0] > 0, days, 365.0)
        propensity = (stats[:, 2] + 1) / (stats[:, 0] + 2)
        return torch.stack([torch.log1p(stats[:, 0]), torch.log1p(stats[:, 1]),
                            _logit(propensity), torch.log1p(days)], 1).float()

    def pair_index(self) -> PairIndex:
        """The pairs as one sorted sparse index (:class:`~tgn.pair_index.PairIndex`), built
        once per :attr:`generation` and shared by both KNN terms; the sorts (by user, by
        item) are kept across updates (new pairs are merged in)."""
        if self._index is None or self._index.generation != self.generation:
            n = self.size
            users, items = self.pair_user[:n].numpy(), self.pair_item[:n].numpy()
            self._by_user.extend(users, items)
            self._by_item.extend(items, users)
            self._index = PairIndex(self._by_user, self._by_item,
                                    torch.log1p(self.count[:n]).numpy(), self.generation)
        return self._index

    def neighbor_scores(self, users: Tensor, t: float, num_items: int,
                        k: int = NEIGHBORS) -> Tensor:
        """User-KNN scores ``[Q, num_items]`` (float32) of ``users [Q]``: the mean of the ``k``
        most similar users' item vectors (``log1p(count)``: no time scale, so it means the same
        on logs of any pace), by cosine of the same vectors — the 2-hop neighbourhood (items of
        users who bought what ``u`` bought), as in TIFU-KNN's neighbour part. The user is not
        his own neighbour. ``t`` is the query time (the vectors hold only earlier events)."""
        q = users.numel()
        if self.size == 0 or q == 0:
            return torch.zeros(q, num_items)
        index, idx = self.pair_index(), users.numpy()
        return torch.from_numpy(index.user_knn(index.unit_rows(idx), idx, num_items, k))

    def recent_items(self, users: Tensor, recent: int = RECENT_ITEMS) -> tuple[Tensor, Tensor,
                                                                              Tensor]:
        """Each user's ``recent`` newest distinct items (by last purchase, ties by first
        purchase): ``(rows [M], items [M], rank [M])`` with ``rows`` the position in ``users
        [Q]`` and ``rank`` 0 for the newest."""
        runs = [list(self.slots_of.get(u, {}).values()) for u in users.tolist()]
        lens = np.array([len(r) for r in runs], dtype=np.int64)
        slots = np.array([s for r in runs for s in r], dtype=np.int64)
        rows = np.repeat(np.arange(len(runs)), lens)
        order = np.lexsort((slots, -self.last[slots].numpy(), rows)) if slots.size else slots
        rank = np.arange(slots.size) - np.repeat(np.cumsum(lens) - lens, lens)
        keep = rank < recent
        return (torch.from_numpy(rows[keep]), self.pair_item[torch.from_numpy(slots[order][keep])],
                torch.from_numpy(rank[keep]))

    def item_scores(self, users: Tensor, num_items: int, recent: int = RECENT_ITEMS,
                    decay: float = RECENT_DECAY) -> Tensor:
        """Item-KNN scores ``[Q, num_items]`` (float32, each row scaled to a maximum of 1) of
        ``users [Q]``: the similarity of every item to the user's ``recent`` newest items,
        weighted ``decay ** rank``, by the cosine of the items' buyer sets ("bought together
        by the same households", item-based CF, https://doi.org/10.1145/371920.372071, with
        the session-KNN recency weighting of https://arxiv.org/abs/1803.09587). The
        sequential signal that the per-user counts miss: what follows what a user just bought.
        A user without history scores 0 everywhere."""
        q = users.numel()
        if self.size == 0 or q == 0:
            return torch.zeros(q, num_items)
        rows, items, rank = (x.numpy() for x in self.recent_items(users, recent))
        return torch.from_numpy(self.pair_index().item_knn(
            rows, items, decay ** rank.astype(np.float64), q, num_items))

    def bought(self, num_items: int) -> Tensor:
        """``[num_items]`` bool: bought by anyone so far (the items a model may recommend);
        computed once per :attr:`generation` (callers must not change it)."""
        key = (self.generation, num_items)
        if self._bought is None or self._bought[0] != key:
            self._bought = (key, _grow(self.item_stats, num_items)[:num_items, 0] > 0)
        return self._bought[1]

    def _mean_log_gap(self, istats: Tensor) -> Tensor:
        """Mean log repurchase interval (days) per item row, shrunk to the global mean (two
        sums over every item: computed once per :attr:`generation`)."""
        if self._global_gap is None or self._global_gap[0] != self.generation:
            total = self.item_stats[:, 4].sum()
            glob = (self.item_stats[:, 3].sum() / total if total > 0
                    else torch.tensor(math.log(7.0)))
            self._global_gap = (self.generation, glob)
        return (istats[:, 3] + PRIOR * self._global_gap[1]) / (istats[:, 4] + PRIOR)

    def item_features(self, t: float, num_items: int) -> Tensor:
        """Features ``[num_items, ITEM_FEATURES]`` (float32) of every item at time ``t``: log
        purchases, log first-time buyers, re-buy rate (logit), log decayed popularity of all
        purchases and of first-time purchases."""
        stats = _grow(self.item_stats, num_items)[:num_items]
        rebuy = (stats[:, 2] + 1) / (stats[:, 0] + 2)
        cols = [torch.log1p(stats[:, 0]), torch.log1p(stats[:, 1]), _logit(rebuy),
                *torch.log1p(self.item_popularity(t, num_items)).unbind(1)]
        return torch.stack(cols, 1).float()

    def item_popularity(self, t: float, num_items: int) -> Tensor:
        """Decayed popularity ``[num_items, 2H]`` (float64) at time ``t`` (no earlier than the
        last update's newest event): ``Σ exp(−rate · (t − t_event))`` over each item's
        purchases (the first ``H`` columns, one per :data:`ITEM_HALF_LIVES`) and over its
        first-time purchases (the last ``H``)."""
        pop = _grow(self.item_pop, num_items)[:num_items]
        return self._item_pop_at(pop, max(t, self.clock))

    # -- saving ------------------------------------------------------------------------------

    def packed(self) -> Tensor:
        """A copy of the whole state as one 1-D float64 tensor: the pair, user and item row
        counts, the clock and the popularity's origin, then the ``[P, 4 + H]`` pairs (user,
        item, count, last, decayed), ``[U, 4]`` user and ``[I, 5 + 2H']`` item rows (stats,
        scaled popularity), flattened (ids are exact in float64 up to 2**53)."""
        n, users, items = self.size, self.user_stats.size(0), self.item_stats.size(0)
        pairs = torch.cat([self.pair_user[:n, None].double(), self.pair_item[:n, None].double(),
                           self.count[:n, None], self.last[:n, None], self.decayed[:n]], 1)
        head = torch.tensor([n, users, items, self.clock, self.origin], dtype=torch.float64)
        return torch.cat([head, pairs.flatten(), self.user_stats.flatten(),
                          torch.cat([self.item_stats, self.item_pop[:items]], 1).flatten()])

    def load_packed(self, state: Tensor) -> None:
        """Restore what :meth:`packed` returned (replaces the current state)."""
        self.reset_state()
        n, users, items = (int(x) for x in state[:3].tolist())
        h, w_item = len(PAIR_HALF_LIVES), 5 + 2 * len(ITEM_HALF_LIVES)
        head = state.numel() - n * (4 + h) - users * 4 - items * w_item
        # a 4-value head (from before the origin) holds the popularity at the clock: origin =
        # clock is the same state
        self.clock = float(state[3])
        self.origin = float(state[4]) if head == 5 else self.clock
        pairs, rest = state[head:head + n * (4 + h)].view(n, 4 + h), state[head + n * (4 + h):]
        self.pair_user, self.pair_item = pairs[:, 0].long(), pairs[:, 1].long()
        self.count, self.last = pairs[:, 2].clone(), pairs[:, 3].clone()
        self.decayed = pairs[:, 4:].clone()
        self.user_stats = rest[:users * 4].view(users, 4).clone()
        item_rows = rest[users * 4:].view(items, w_item)
        self.item_stats, self.item_pop = item_rows[:, :5].clone(), item_rows[:, 5:].clone()
        self.size = n
        for slot, (user, item) in enumerate(zip(self.pair_user.tolist(), self.pair_item.tolist(),
                                                strict=True)):
            self.slots_of.setdefault(user, {})[item] = slot
