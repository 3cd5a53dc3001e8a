"""A learned repeat-purchase score for (user, item) pairs with history.

Grocery purchases repeat: on Complete Journey the user's own purchase counts ("buy again") rank
the next purchase far better than a dot product of temporal embeddings does. Repeat-aware
recommenders (ReCANet, https://arxiv.org/abs/2204.12440; the repeat/explore split of
RepeatNet, https://arxiv.org/abs/1812.02646) add a score for pairs the user bought before.

:class:`RepeatScore` keeps, for every (user, item) pair seen in the stream, its purchase count
and last purchase time, and scores a pair with history by a tiny MLP::

    g(log1p(count), log1p(days since the last purchase))  -> scalar

Pairs without history score 0. The state is a nested dict ``user → item → slot`` into growable
tensors (one dict lookup per event, no loop over the catalog), saved through
:meth:`RepeatScore.get_extra_state` as one ``[P, 4]`` float64 tensor (a copy), so
``state_dict()`` and ``torch.load(weights_only=True)`` carry it exactly.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

SECONDS_PER_DAY = 86_400.0
#: Width of the hidden layer of ``g``.
HIDDEN = 16


class RepeatScore(nn.Module):
    """Purchase history per (user, item) pair and the learned score ``g`` of it.

    Args:
        hidden: hidden width of ``g``'s MLP.
    """

    def __init__(self, hidden: int = HIDDEN) -> None:
        super().__init__()
        self.g = nn.Sequential(nn.Linear(2, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        with torch.no_grad():  # starts as "no repeat term"; training grows it from the data
            self.g[2].weight.zero_()
            self.g[2].bias.zero_()
        self.reset_state()

    # -- state -------------------------------------------------------------------------------

    def reset_state(self) -> None:
        """Forget every pair (counts and times); keeps the weights of ``g``."""
        self._slots: dict[int, dict[int, int]] = {}  # user → item → slot
        self.size = 0  # pairs in use
        self._user = torch.zeros(0, dtype=torch.long)  # [capacity]
        self._item = torch.zeros(0, dtype=torch.long)
        self._count = torch.zeros(0, dtype=torch.float64)
        self._last = torch.zeros(0, dtype=torch.float64)  # epoch seconds; -inf when unused

    def _reserve(self, size: int) -> None:
        """Grow the pair tensors (capacity doubles) to hold ``size`` pairs."""
        capacity = self._user.numel()
        if size <= capacity:
            return
        extra = max(size, 2 * capacity, 1024) - capacity
        self._user = torch.cat([self._user, self._user.new_zeros(extra)])
        self._item = torch.cat([self._item, self._item.new_zeros(extra)])
        self._count = torch.cat([self._count, self._count.new_zeros(extra)])
        self._last = torch.cat([self._last, self._last.new_full((extra,), -torch.inf)])

    def update(self, users: Tensor, items: Tensor, t: Tensor) -> None:
        """Record purchases ``(users [B], items [B], t [B])`` (count += 1, last = max time)."""
        slots, start = [], self.size
        size = start
        for user, item in zip(users.tolist(), items.tolist(), strict=True):
            own = self._slots.get(user)
            if own is None:
                own = self._slots[user] = {}
            slot = own.get(item)
            if slot is None:
                slot = own[item] = size
                size += 1
            slots.append(slot)
        index = torch.tensor(slots, dtype=torch.long)
        if size > start:
            self._reserve(size)
            new = index >= start
            self._user[index[new]] = users[new]
            self._item[index[new]] = items[new]
            self.size = size
        self._count.index_add_(0, index, torch.ones(index.numel(), dtype=torch.float64))
        self._last.scatter_reduce_(0, index, t.to(torch.float64), "amax")

    def slots(self, users: Tensor, items: Tensor) -> Tensor:
        """Slot of each pair ``(users [N], items [N])``, -1 for a pair without history."""
        found = [self._slots.get(u, {}).get(i, -1)
                 for u, i in zip(users.tolist(), items.tolist(), strict=True)]
        return torch.tensor(found, dtype=torch.long)

    def history(self, users: Tensor, items: Tensor) -> tuple[Tensor, Tensor]:
        """``(count [N], last purchase time [N])`` of pairs; ``(0, -inf)`` without history."""
        slot = self.slots(users, items)
        has = slot >= 0
        count = torch.where(has, self._count[slot.clamp_min(0)], 0.0)
        last = torch.where(has, self._last[slot.clamp_min(0)], -torch.inf)
        return count, last

    def _pairs_of(self, users: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The pairs of ``users [Q]``, grouped by user (vectorized: no loop over users).

        Returns ``(picked [S'], first [Q], lens [Q])``: slots sorted by user (stably, so in
        first-purchase order), and where each queried user's run starts and how long it is
        (0 for a user without history).
        """
        owner = self._user[: self.size]
        wanted = torch.zeros(int(users.max()) + 1 if users.numel() else 0, dtype=torch.bool)
        wanted[users] = True
        picked = (owner < wanted.numel()).logical_and_(wanted[owner.clamp_max(wanted.numel() - 1)]
                                                       ).nonzero().squeeze(1)
        picked = picked[torch.argsort(owner[picked], stable=True)]
        first = torch.searchsorted(owner[picked], users)  # [Q] the user's first pair
        lens = torch.searchsorted(owner[picked], users, right=True) - first  # [Q]
        return picked, first, lens

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
        hit = self._item[picked[(first + idx).clamp_max(last)]] == exclude
        # uniform over the other len-1 items: step 1..len-1 places on from the excluded one
        step = 1 + (other_u * (span - 1)).long().clamp_max((span - 2).clamp_min(0))
        idx = torch.where(hit, (idx + step) % span, idx)
        items = self._item[picked[(first + idx).clamp_max(last)]]
        return torch.where((lens > 1) | ((lens == 1) & ~hit), items, -1)

    # -- scores ------------------------------------------------------------------------------

    def _g(self, slot: Tensor, t: Tensor) -> Tensor:
        """``g`` of pairs with history ``slot [M]`` (all >= 0) at times ``t [M]`` → ``[M]``."""
        dtype = self.g[0].weight.dtype
        days = (t.to(torch.float64) - self._last[slot]).clamp_min(0) / SECONDS_PER_DAY
        x = torch.stack([torch.log1p(self._count[slot]), torch.log1p(days)], dim=1).to(dtype)
        return self.g(x).squeeze(1)

    def pair_scores(self, users: Tensor, items: Tensor, t: Tensor) -> Tensor:
        """Term ``[N]`` for pairs ``(users [N], items [N])`` at times ``t [N]``; 0 without
        history. Differentiable in ``g``'s weights (BPR adds it to both sides)."""
        slot = self.slots(users, items)
        has = slot >= 0
        out = torch.zeros(slot.numel(), dtype=self.g[0].weight.dtype)
        if bool(has.any()):
            out = out.index_put((has.nonzero().squeeze(1),), self._g(slot[has], t[has]))
        return out

    def user_terms(self, users: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Sparse term of every pair of each row's user: ``(rows [M], items [M], values [M])``.

        ``g`` runs once per distinct ``(user, t)`` of ``users [B]``, ``t [B]`` (a basket is many
        rows of one user at one time) and its values are gathered for each row.
        """
        if users.numel() == 0:
            empty = torch.zeros(0, dtype=torch.long)
            return empty, empty, torch.zeros(0, dtype=self.g[0].weight.dtype)
        key = torch.stack([users.to(torch.float64), t.to(torch.float64)], dim=1)
        queries, inverse = torch.unique(key, dim=0, return_inverse=True)  # [Q, 2], [B]
        picked, first, lens = self._pairs_of(queries[:, 0].long())
        offsets = lens.cumsum(0) - lens
        slot = picked[(first - offsets).repeat_interleave(lens)
                      + torch.arange(int(lens.sum()))]  # [S] query by query
        q_time = queries[:, 1].repeat_interleave(lens)
        values = self._g(slot, q_time) if slot.numel() else torch.zeros(0)  # [S]
        # rows: each row b takes the entries of its query inverse[b]
        row_lens = lens[inverse]  # [B]
        rows = torch.arange(users.numel()).repeat_interleave(row_lens)  # [M]
        row_start = (row_lens.cumsum(0) - row_lens).repeat_interleave(row_lens)
        q_start = offsets[inverse].repeat_interleave(row_lens)
        pos = q_start + torch.arange(rows.numel()) - row_start  # [M] entry in slot/values
        return rows, self._item[slot[pos]], values[pos]

    def add_to(self, scores: Tensor, users: Tensor, t: Tensor) -> Tensor:
        """Add the term to ``scores [B, N]`` in place (rows: ``users [B]`` at ``t [B]``)."""
        rows, items, values = self.user_terms(users, t)
        keep = items < scores.size(1)
        values = values[keep].to(scores.dtype)
        if scores.is_contiguous():  # (row, item) entries are distinct: a flat index_add is exact
            scores.view(-1).index_add_(0, rows[keep] * scores.size(1) + items[keep], values)
        else:
            scores.index_put_((rows[keep], items[keep]), values, accumulate=True)
        return scores

    def dense(self, users: Tensor, t: Tensor, num_items: int) -> Tensor:
        """The term as a dense ``[B, num_items]`` matrix (0 for pairs without history)."""
        return self.add_to(torch.zeros(users.numel(), num_items), users, t)

    # -- saving ------------------------------------------------------------------------------

    def get_extra_state(self) -> Tensor:
        """A copy of the pairs as ``[P, 4]`` float64: user, item, count, last time (ids are
        exact in float64 up to 2**53)."""
        n = self.size
        return torch.stack([self._user[:n].double(), self._item[:n].double(),
                            self._count[:n].clone(), self._last[:n].clone()], dim=1)

    def set_extra_state(self, state: Tensor) -> None:
        """Restore pairs saved by :meth:`get_extra_state` (replaces the current ones)."""
        self.reset_state()
        n = state.size(0)
        self._reserve(n)
        self._user[:n] = state[:, 0].long()
        self._item[:n] = state[:, 1].long()
        self._count[:n] = state[:, 2]
        self._last[:n] = state[:, 3]
        self.size = n
        for slot, (user, item) in enumerate(zip(self._user[:n].tolist(), self._item[:n].tolist(),
                                                strict=True)):
            self._slots.setdefault(user, {})[item] = slot


__all__ = ["RepeatScore"]
