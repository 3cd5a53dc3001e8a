"""The repeat/explore mixture: how the model's final scores use the purchase history.

Grocery purchases repeat: on Complete Journey a household's own purchase counts ("buy again")
rank the next purchase better than a dot product of temporal embeddings does, while 56% of the
purchases are items the household never bought. Following RepeatNet
(https://arxiv.org/abs/1812.02646) and ReCANet (https://arxiv.org/abs/2204.12440), the score of
item ``i`` for user ``u`` at time ``t`` is a log-probability of a two-way mixture::

    P(i) = P(repeat | u, t) · softmax_{i ∈ history(u)}(g(pair features))
         + P(explore | u, t) · softmax_{i ∉ history(u), bought by anyone}(
               prior(i) + w·dot(u, i) + v·knn(u, i) + x·near(u, i))

with ``g``, ``prior`` and the gate small MLPs over :class:`~tgn.signals.PurchaseSignals`
features (counts, decayed counts, recency against the item's repurchase cycle, the user's
repeat propensity, item popularity and first-time buyers; ``g`` sees the pair's item features
too), ``dot`` the temporal model's
dot product, ``knn`` the user-KNN score of the 2-hop neighbourhood
(:meth:`~tgn.signals.PurchaseSignals.neighbor_scores`) and ``near`` the item-KNN score of the
user's newest items (:meth:`~tgn.signals.PurchaseSignals.item_scores`). Scores are comparable
across the two parts, so a strong new item can outrank a weak old one. The weights are fitted
by the negative log-likelihood of each purchase over the full catalog
(:func:`tgn.train.fit_history`). The state (the statistics) is saved through
:meth:`RepeatScore.get_extra_state` as one float64 tensor (a copy), so ``state_dict()`` and
``torch.load(weights_only=True)`` carry it exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tgn.data import distinct_queries, expand_rows
from tgn.signals import ITEM_FEATURES, PAIR_FEATURES, USER_FEATURES, PurchaseSignals

#: Scale of the user-KNN score inside its log feature (decayed counts of a neighbourhood mean
#: are mostly far below 1).
NEIGHBOR_SCALE = 100.0
#: Width of the hidden layer of ``g``.
HIDDEN = 32
#: Parameters of terms added after checkpoints were first written (loaded as zero if absent).
ADDED_TERMS = ("item_weight", "repeat_dot_weight", "explore_terms.")


def _explore_logits(prior: Tensor, weights: Tensor, explore: Tensor, near: Tensor,
                    similar: Tensor) -> Tensor:
    """``prior [N] + Σ_j weights[:, j] · term_j`` ``[Q, N]`` over the five explore terms: the
    dot product ``explore [Q, N]``, then for each KNN score ``[Q, N]`` (user-KNN ``near``,
    item-KNN ``similar``) ``log1p(NEIGHBOR_SCALE · score)`` and ``score > 0``.

    Summed in that order, so the same float32 numbers as a chain of ``+``; each product is out
    of place (its gradient needs the term) and added in place into one buffer, without a new
    ``[Q, N]`` tensor per sum (``weights [Q, 5]`` may require a gradient: training fits them).
    """
    w = weights.unsqueeze(2).unbind(1)  # 5 × [Q, 1]
    out = prior + w[0] * explore
    for w_log, w_any, score in ((w[1], w[2], near), (w[3], w[4], similar)):
        out.add_(w_log * (NEIGHBOR_SCALE * score).log1p_())
        out.add_(w_any * (score > 0))
    return out


@dataclass
class Mixture:
    """The repeat/explore mixture of ``Q`` queries over ``N`` items in parts
    (:meth:`RepeatScore.mixture`): the explore logits of the whole catalogue and the repeat
    logits of the ``M`` (query, item) entries of each query's history, before either softmax.

    Attributes:
        others: ``[Q, N]`` explore logits; -inf for an item of the query's history or one
            nobody bought.
        rows: ``[M]`` query of each history entry.
        items: ``[M]`` item of each history entry (all ``< N``).
        values: ``[M]`` repeat logit of each history entry.
        has: ``[Q]`` bool, the query's user has history.
        log_repeat: ``[Q]`` log P(repeat) (-inf without history).
        log_explore: ``[Q]`` log P(explore) (0 without history).
    """

    others: Tensor
    rows: Tensor
    items: Tensor
    values: Tensor
    has: Tensor
    log_repeat: Tensor
    log_explore: Tensor

    def dense(self) -> Tensor:
        """Log-probabilities ``[Q, N]`` of every item (:meth:`RepeatScore.log_probs`)."""
        q, n = self.others.shape
        rows, items, has = self.rows, self.items, self.has
        history = torch.zeros(q, n, dtype=torch.bool)
        history[rows, items] = True
        repeat = torch.full((q, n), -torch.inf).index_put((rows, items), self.values)
        log_repeat_items = torch.log_softmax(repeat[has], 1)
        out = (self.log_explore.unsqueeze(1) + torch.log_softmax(self.others, 1)
               ).masked_fill(history, 0.0)
        out = out.index_put((has.nonzero().squeeze(1),),
                            torch.where(history[has], self.log_repeat[has].unsqueeze(1)
                                        + log_repeat_items, out[has]))
        return out.masked_fill(torch.isnan(out), -torch.inf)  # a row with nothing to explore

    def top(self, k: int) -> tuple[Tensor, Tensor]:
        """The ``k`` best items of each query by :meth:`dense` without assembling it:
        ``(log-probabilities [Q, k], items [Q, k])``, best first (equal ones by item);
        ``-inf`` entries (fewer than ``k`` items with probability > 0) last. The explore part
        is ranked by its logits and its values are :meth:`dense`'s, bit for bit; the repeat
        softmax runs over the ``M`` history entries only (a segment logsumexp), equal to
        :meth:`dense`'s up to float rounding (≤ 1e-5)."""
        q, n = self.others.shape
        rows = self.rows
        k_explore = min(k, n)
        # explore: the row's best explore logits, as :meth:`dense` has them (log_softmax: a
        # few times faster than logsumexp on CPU, and the same numbers as dense's)
        best_items = torch.topk(self.others, k_explore, dim=1).indices  # [Q, k]
        best = self.log_explore.unsqueeze(1) + torch.log_softmax(self.others, 1).gather(
            1, best_items)
        # repeat: every history entry, log softmax within its query
        top_value = torch.full((q,), -torch.inf).scatter_reduce(0, rows, self.values, "amax")
        total = torch.zeros(q).index_add_(0, rows, torch.exp(self.values - top_value[rows]))
        entry = self.log_repeat[rows] + self.values - (top_value + torch.log(total))[rows]
        # each query's entries side by side after its explore candidates: [Q, k + most M]
        counts = torch.bincount(rows, minlength=q)
        width = k_explore + (int(counts.max()) if rows.numel() else 0)
        values = torch.full((q, width), -torch.inf)
        items = torch.zeros(q, width, dtype=torch.long)
        values[:, :k_explore], items[:, :k_explore] = best, best_items
        order = torch.argsort(rows, stable=True)
        start = counts.cumsum(0) - counts
        col = k_explore + torch.arange(rows.numel()) - start[rows[order]]
        values[rows[order], col] = entry[order]
        items[rows[order], col] = self.items[order]
        values = values.masked_fill(torch.isnan(values), -torch.inf)  # nothing to explore
        # best first, ties by item (the same order whatever else the batch holds)
        by_item = torch.argsort(items, dim=1, stable=True)
        values, items = values.gather(1, by_item), items.gather(1, by_item)
        at = torch.argsort(values, dim=1, descending=True, stable=True)[:, :min(k, n)]
        return values.gather(1, at), items.gather(1, at)


class RepeatScore(nn.Module):
    """Purchase statistics (:class:`~tgn.signals.PurchaseSignals`) and the learned terms on them:

    * ``g``: the repeat term of a (user, item) pair with history, an MLP over
      :meth:`~tgn.signals.PurchaseSignals.pair_features` (counts, decayed counts, recency, the
      item's repurchase cycle, the user's repeat propensity) and the item's
      :meth:`~tgn.signals.PurchaseSignals.item_features` (its popularity now);
    * ``prior``: an item prior shared by every user, an MLP over
      :meth:`~tgn.signals.PurchaseSignals.item_features` (popularity, recent popularity,
      first-time buyers, the item's re-buy rate).

    Both last layers start at zero (the term starts as "nothing"); training grows them.

    Args:
        hidden: hidden width of both MLPs.
    """

    def __init__(self, hidden: int = HIDDEN) -> None:
        super().__init__()
        self.g = nn.Sequential(nn.Linear(PAIR_FEATURES + ITEM_FEATURES, hidden), nn.ReLU(),
                               nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        self.prior = nn.Sequential(nn.Linear(ITEM_FEATURES, hidden), nn.ReLU(),
                                   nn.Linear(hidden, 1))
        self.gate = nn.Sequential(nn.Linear(USER_FEATURES, hidden), nn.ReLU(),
                                  nn.Linear(hidden, 1))
        #: per-user change of the explore part's five term weights (dot product, user-KNN and
        #: item-KNN: log and indicator each) from the user's features: how far to trust the
        #: personal terms over the prior depends on how much history there is (zero at start)
        self.explore_terms = nn.Sequential(nn.Linear(USER_FEATURES, hidden), nn.ReLU(),
                                           nn.Linear(hidden, 5))
        self.explore_weight = nn.Parameter(torch.zeros(()))
        #: weight of the temporal model's dot product inside the repeat part
        self.repeat_dot_weight = nn.Parameter(torch.zeros(()))
        #: weights of log1p(NEIGHBOR_SCALE · s) and [s > 0], s the user-KNN score of an item
        self.neighbor_weight = nn.Parameter(torch.zeros(2))
        #: weights of log1p(NEIGHBOR_SCALE · s) and [s > 0], s the item-KNN score of an item
        self.item_weight = nn.Parameter(torch.zeros(2))
        with torch.no_grad():
            for last in (self.g[-1], self.prior[-1], self.gate[-1], self.explore_terms[-1]):
                last.weight.zero_()
                last.bias.zero_()
        self.signals = PurchaseSignals()

    # -- state -------------------------------------------------------------------------------

    def reset_state(self) -> None:
        """Forget every event; keeps the weights."""
        self.signals.reset_state()

    @property
    def size(self) -> int:
        """Pairs with history."""
        return self.signals.size

    def update(self, users: Tensor, items: Tensor, t: Tensor) -> None:
        """Record purchases ``(users [B], items [B], t [B])``."""
        self.signals.update(users, items, t)

    def slots(self, users: Tensor, items: Tensor) -> Tensor:
        """Slot of each pair ``(users [N], items [N])``, -1 for a pair without history."""
        return self.signals.slots(users, items)

    def _pairs_of(self, users: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The pairs of ``users [Q]``, grouped by user, from the ``user → item → slot`` dicts
        (cost: the queried users' pairs only, not all pairs).

        Returns ``(picked [S'], first [Q], lens [Q])``: slots query by query (each user's in
        first-purchase order), and where each query's run starts and how long it is (0 for a
        user without history).
        """
        runs = [list(self.signals.slots_of.get(u, {}).values()) for u in users.tolist()]
        lens = torch.tensor([len(r) for r in runs], dtype=torch.long)
        picked = torch.tensor([s for r in runs for s in r], dtype=torch.long)
        return picked, lens.cumsum(0) - lens, lens

    def sample_history(self, users: Tensor, exclude: Tensor,
                       generator: torch.Generator | None = None) -> Tensor:
        """One item per row drawn uniformly from the row's user's recorded purchases ``[N]``.

        Only pairs recorded so far (:meth:`update`) can be drawn, so in training the draw never
        sees the batch being scored or anything after it. ``exclude [N]`` (the positive) is
        never drawn: a hit on it is redrawn among the user's other items. Rows whose user has
        no other item get -1. Two ``torch.rand(N)`` draws per call, whatever the history.

        Args:
            users: user index per row ``[N]``.
            exclude: item index per row that must not be drawn ``[N]``.
            generator: random source (reproducible draws).
        """
        first_u = torch.rand(users.numel(), generator=generator, dtype=torch.float64)
        other_u = torch.rand(users.numel(), generator=generator, dtype=torch.float64)
        if users.numel() == 0:
            return torch.zeros(0, dtype=torch.long)
        picked, first, lens = self._pairs_of(users)  # one query per row: fine for a batch
        if picked.numel() == 0:
            return torch.full((users.numel(),), -1, dtype=torch.long)
        last = picked.numel() - 1  # rows without history read some slot; masked at the end
        span = lens.clamp_min(1)
        idx = (first_u * span).long().clamp_max(span - 1)  # [N] position in the user's run
        hit = self.signals.pair_item[picked[(first + idx).clamp_max(last)]] == exclude
        # uniform over the other len-1 items: step 1..len-1 places on from the excluded one
        step = 1 + (other_u * (span - 1)).long().clamp_max((span - 2).clamp_min(0))
        idx = torch.where(hit, (idx + step) % span, idx)
        items = self.signals.pair_item[picked[(first + idx).clamp_max(last)]]
        return torch.where((lens > 1) | ((lens == 1) & ~hit), items, -1)

    # -- scores ------------------------------------------------------------------------------

    def _g(self, slot: Tensor, t: Tensor, item_features: Tensor) -> Tensor:
        """``g`` of pairs with history ``slot [M]`` (all >= 0) at times ``t [M]`` → ``[M]``:
        the pair's features and its item's row of ``item_features [N, ITEM_FEATURES]`` (an item
        bought more by everyone this week is likelier bought again, too)."""
        items = self.signals.pair_item[slot].clamp_max(item_features.size(0) - 1)
        return self.g(torch.cat([self.signals.pair_features(slot, t), item_features[items]],
                                1)).squeeze(1)

    def item_prior(self, t: float, num_items: int) -> Tensor:
        """The item prior ``[num_items]`` at time ``t`` (same for every user)."""
        return self.prior(self.signals.item_features(t, num_items)).squeeze(1)

    def user_terms(self, users: Tensor, t: Tensor, item_features: Tensor
                   ) -> tuple[Tensor, Tensor, Tensor]:
        """Sparse term of every pair of each row's user: ``(rows [M], items [M], values [M])``.

        ``g`` runs once per distinct ``(user, t)`` of ``users [B]``, ``t [B]`` (a basket is many
        rows of one user at one time) and its values are gathered for each row;
        ``item_features [N, ITEM_FEATURES]`` are the items' features at the batch's time.
        """
        if users.numel() == 0:
            empty = torch.zeros(0, dtype=torch.long)
            return empty, empty, torch.zeros(0, dtype=self.g[0].weight.dtype)
        query_users, query_t, inverse, _ = distinct_queries(users, t)
        slot, offsets, lens = self._pairs_of(query_users)  # [S] query by query
        values = (self._g(slot, query_t.repeat_interleave(lens), item_features) if slot.numel()
                  else torch.zeros(0))  # [S]
        # rows: each row b takes the entries of its query inverse[b] (numpy: a few small
        # index operations, cheaper than torch's per-op overhead at a request's size)
        row_lens = lens.numpy()[inverse.numpy()]  # [B]
        rows = np.repeat(np.arange(users.numel()), row_lens)  # [M]
        pos = (np.repeat(offsets.numpy()[inverse.numpy()] - (np.cumsum(row_lens) - row_lens),
                         row_lens) + np.arange(rows.size))  # [M] entry in slot/values
        pos = torch.from_numpy(pos)
        return torch.from_numpy(rows), self.signals.pair_item[slot[pos]], values[pos]

    def log_probs(self, explore: Tensor, users: Tensor, t: Tensor) -> Tensor:
        """Mixture log-probabilities ``[Q, N]`` of every item for queries ``(users [Q], t [Q])``.

        ``log P(i) = log P(repeat) + log softmax_{history}(g)_i`` for an item of the user's
        history, ``log P(explore) + log softmax_{others}(prior + w·explore)_i`` for any other
        item bought by anyone so far (the rest: -inf). ``explore [Q, N]``: a user-dependent
        explore logit (the temporal model's dot product; zeros for none), ``w`` is learned.
        A user without history explores with probability 1. Differentiable in the weights.
        (:meth:`mixture` in parts, :meth:`Mixture.dense`.)
        """
        return self.mixture(explore, users, t).dense()

    def mixture(self, explore: Tensor, users: Tensor, t: Tensor) -> Mixture:
        """The terms of :meth:`log_probs` before its normalisation (:class:`Mixture`): what
        both the dense log-probabilities and the served top-k (:meth:`Mixture.top`) are made
        of. Arguments as :meth:`log_probs`."""
        q, n = explore.shape
        now = float(t.min()) if q else 0.0
        prior = self.item_prior(now, n)  # [N]
        rows, items, values = self.user_terms(users, t, self.signals.item_features(now, n))
        keep = items < n
        rows, items = rows[keep], items[keep]
        values = values[keep] + self.repeat_dot_weight * explore[rows, items]
        bought = self.signals.bought(n)  # [N]
        near = self.signals.neighbor_scores(users, now, n)  # [Q, N]
        similar = self.signals.item_scores(users, n)  # [Q, N]
        user_features = self.signals.user_features(users, t)  # [Q, USER_FEATURES]
        weights = (torch.cat([self.explore_weight.view(1), self.neighbor_weight,
                              self.item_weight]) + self.explore_terms(user_features))  # [Q, 5]
        others = _explore_logits(prior, weights, explore, near, similar).masked_fill_(
            ~bought, -torch.inf)
        others.index_put_((rows, items), others.new_tensor(-torch.inf))  # the history
        has = torch.zeros(q, dtype=torch.bool).index_fill_(0, rows, True)
        gate = self.gate(user_features).squeeze(1)  # [Q] logit
        return Mixture(others, rows, items, values, has,
                       torch.where(has, F.logsigmoid(gate), -torch.inf),
                       torch.where(has, F.logsigmoid(-gate), 0.0))

    def mix(self, scores: Tensor, users: Tensor, t: Tensor) -> Tensor:
        """The model's final scores ``[B, N]`` from dot products ``scores [B, N]`` of rows
        ``(users [B], t [B])``: :meth:`log_probs` once per distinct ``(user, t)``, per row."""
        if users.numel() == 0:
            return scores
        query_users, query_t, inverse, first = distinct_queries(users, t)
        mixed = self.log_probs(scores[first], query_users, query_t)
        return expand_rows(mixed, inverse)

    def dense(self, users: Tensor, t: Tensor, num_items: int) -> Tensor:
        """:meth:`mix` without a temporal model (explore logits 0): ``[B, num_items]``."""
        return self.mix(torch.zeros(users.numel(), num_items), users, t)

    # -- saving ------------------------------------------------------------------------------

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any,
                              **kwargs: Any) -> None:
        # checkpoints from before a term was added load with the term at zero, which is exactly
        # the model they saved: missing parameters of the added terms, and ``g``'s first layer
        # without the item-feature columns
        for name, param in self.named_parameters():
            if name.startswith(ADDED_TERMS):
                state_dict.setdefault(prefix + name, torch.zeros_like(param))
        first = state_dict.get(f"{prefix}g.0.weight")
        if first is not None and first.size(1) == PAIR_FEATURES:
            state_dict[f"{prefix}g.0.weight"] = torch.cat(
                [first, first.new_zeros(first.size(0), ITEM_FEATURES)], 1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def get_extra_state(self) -> Tensor:
        """A copy of the purchase statistics as one 1-D float64 tensor
        (:meth:`~tgn.signals.PurchaseSignals.packed`), so ``state_dict()`` stays tensors only."""
        return self.signals.packed()

    def set_extra_state(self, state: Tensor) -> None:
        """Restore statistics saved by :meth:`get_extra_state` (replaces the current ones)."""
        self.signals.load_packed(state)


__all__ = ["Mixture", "RepeatScore"]
