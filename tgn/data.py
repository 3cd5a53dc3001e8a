"""Purchase events as tensors: :class:`EventBatch` and encoding from Arrow tables.

Users and items are kept in two :class:`~tgn.ids.IdMap` s (dense user and item indices); a
model maps those to graph nodes itself. Event features are ``[log1p(price), log1p(quantity)]``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from tgn.ids import IdMap

#: Width of the raw event features (:func:`event_features`).
MSG_DIM = 2


@dataclass(frozen=True)
class EventBatch:
    """Purchase events in time order.

    Attributes:
        users: dense user indices ``[B]`` (int64).
        items: dense item indices ``[B]`` (int64).
        t: event times ``[B]`` (float64 epoch seconds, non-decreasing).
        feats: event features ``[B, MSG_DIM]`` (float32).
    """

    users: Tensor
    items: Tensor
    t: Tensor
    feats: Tensor

    def __len__(self) -> int:
        return self.users.numel()

    def __getitem__(self, index: slice | Tensor) -> EventBatch:
        return EventBatch(self.users[index], self.items[index], self.t[index], self.feats[index])

    def batches(self, size: int, whole_times: bool = False) -> Iterator[EventBatch]:
        """Consecutive slices of at most ``size`` events (with ``whole_times``: cut only where
        ``t`` changes, see :func:`batch_bounds`).

        >>> b = EventBatch(torch.zeros(5, dtype=torch.long), torch.zeros(5, dtype=torch.long),
        ...                torch.tensor([0.0, 1.0, 1.0, 1.0, 2.0]), torch.zeros(5, MSG_DIM))
        >>> [x.t.tolist() for x in b.batches(2)]
        [[0.0, 1.0], [1.0, 1.0], [2.0]]
        >>> [x.t.tolist() for x in b.batches(2, whole_times=True)]
        [[0.0], [1.0, 1.0, 1.0], [2.0]]
        """
        bounds = batch_bounds(self.t.numpy() if whole_times else len(self), size)
        for start, end in zip(bounds[:-1], bounds[1:], strict=True):
            yield self[start:end]

    @staticmethod
    def cat(parts: list[EventBatch]) -> EventBatch:
        """Concatenate batches in order."""
        return EventBatch(*(torch.cat([getattr(p, f) for p in parts])
                            for f in ("users", "items", "t", "feats")))


def batch_bounds(t: np.ndarray | int, size: int) -> list[int]:
    """Boundaries ``[0, …, L]`` of consecutive batches of at most ``size`` events.

    Given event times ``t [L]`` (non-decreasing) rather than a length ``L``, a cut falls only
    where ``t`` changes, so events of equal time (a basket: one user's lines at one timestamp)
    always share a batch: a batch ends before the time group that would straddle its
    ``size``-th event, or after that group when the group alone fills it (a group longer than
    ``size`` is one batch).

    >>> batch_bounds(5, 2), batch_bounds(np.array([0.0, 1.0, 1.0, 1.0, 2.0]), 2)
    ([0, 2, 4, 5], [0, 1, 4, 5])
    """
    if size < 1:
        raise ValueError(f"batch size must be positive, got {size}")
    if isinstance(t, int):
        return [*range(0, t, size), t]
    bounds, start, n = [0], 0, len(t)
    while start < n:
        end = min(start + size, n)
        if end < n and t[end] == t[end - 1]:
            group_start = int(np.searchsorted(t, t[end], side="left"))
            end = group_start if group_start > start else \
                int(np.searchsorted(t, t[end], side="right"))
        bounds.append(end)
        start = end
    return bounds


def event_features(price: np.ndarray, quantity: np.ndarray) -> Tensor:
    """``[log1p(price), log1p(quantity)]`` as ``[B, 2]`` float32 (negatives clipped to 0)."""
    cols = [np.log1p(np.clip(np.asarray(c, dtype=np.float64), 0, None)) for c in (price, quantity)]
    return torch.from_numpy(np.stack(cols, axis=1).astype(np.float32))


def encode_events(table: pa.Table, users: IdMap, items: IdMap, grow: bool = True) -> EventBatch:
    """Turn an ``EVENT_SCHEMA`` table into an :class:`EventBatch`.

    Args:
        table: events sorted by time.
        users: user id map (grows with unseen users when ``grow``).
        items: item id map (likewise).
        grow: add unknown ids to the maps; otherwise an unknown id raises ``KeyError``.
    """
    user_idx = users.encode(table.column("user_id").to_pylist(), grow=grow)
    item_idx = items.encode(table.column("item_id").to_pylist(), grow=grow)
    ts = table.column("ts").to_numpy().astype(np.float64)
    if len(ts) > 1 and np.any(np.diff(ts) < 0):
        raise ValueError("events must be sorted by time")
    feats = event_features(table.column("price").to_numpy(), table.column("quantity").to_numpy())
    return EventBatch(torch.from_numpy(user_idx), torch.from_numpy(item_idx),
                      torch.from_numpy(ts), feats)


def distinct_queries(users: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The distinct ``(user, time)`` queries of rows ``(users [B], t [B])`` (a basket is many
    rows of one user at one time): ``(query_users [Q], query_t [Q] float64, inverse [B],
    first [Q])``, queries sorted by user then time, ``inverse`` each row's query and ``first``
    each query's first row (one stable ``lexsort``: several times faster than
    ``torch.unique(dim=0)`` on small batches)."""
    u, times = users.numpy(), t.to(torch.float64).numpy()
    order = np.lexsort((times, u))  # by user, then time; equal rows in row order
    su, st = u[order], times[order]
    new = np.ones(order.size, dtype=bool)
    new[1:] = (su[1:] != su[:-1]) | (st[1:] != st[:-1])
    inverse = np.empty(order.size, dtype=np.int64)
    inverse[order] = np.cumsum(new) - 1
    return (torch.from_numpy(su[new].astype(np.int64)), torch.from_numpy(st[new]),
            torch.from_numpy(inverse), torch.from_numpy(order[new]))


def latest_per_user(users: np.ndarray,
                    t: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """What a streaming step embeds: each distinct user of rows ``(users [B], t [B])`` once, at
    its latest time: ``(distinct users [U] sorted, latest time [U] float64, inverse [B] each
    row's user, first [U] each user's first row)``.

    >>> [x.tolist() for x in latest_per_user(np.array([3, 1, 3]), np.array([1.0, 2.0, 5.0]))]
    [[1, 3], [2.0, 5.0], [1, 0, 1], [1, 0]]
    """
    distinct, first, inverse = np.unique(users, return_index=True, return_inverse=True)
    latest = np.full(len(distinct), -np.inf)
    np.maximum.at(latest, inverse, t)
    return distinct, latest, inverse, first


def expand_rows(rows: Tensor, index: Tensor) -> Tensor:
    """``rows [Q, ...]`` gathered by ``index [B]`` into ``[B, ...]`` (``np.take``: several times
    faster than ``index_select`` on wide float rows on CPU; rows that need a gradient are
    indexed with torch)."""
    if rows.requires_grad:
        return rows[index]
    return torch.from_numpy(np.take(rows.numpy(), index.numpy(), axis=0))
