"""The (user, item) pairs of :class:`tgn.signals.PurchaseSignals` as one sorted sparse index,
and the user-KNN and item-KNN arithmetic on it.

Both KNN terms of the mixture read every pair: the user-KNN term
(:meth:`PairIndex.user_knn`, TIFU-KNN's neighbour part, https://arxiv.org/abs/2006.00556) a
``log1p(count)`` user × item matrix, the item-KNN term (:meth:`PairIndex.item_knn`, item-based
CF, https://doi.org/10.1145/371920.372071) a ``1/sqrt(buyers)`` one. Both are the same sparse
structure (the pairs sorted by user, then item) with other data, so :class:`PairOrder` keeps
that sort (merging new pairs in as they come) and a :class:`PairIndex`, a snapshot of the
pairs at one statistics generation, builds each matrix once, on first use.

The matrices are the ones the uncached computation built (a CSR of the pairs, which scipy
sorts the same way) and the products are its expressions on them, so the scores are the same
numbers (tested equal, bit for bit on cj26).
Shapes: ``P`` pairs, ``U`` users (largest user index + 1), ``W`` items (largest item index +
1), ``Q`` queries, ``N`` the caller's catalogue width.
"""

from __future__ import annotations

from functools import cached_property

import numpy as np
import scipy.sparse as sp
import torch

_ITEM_BITS = 32


class PairOrder:
    """Pair slots sorted by ``(major, minor)`` (user then item, or item then user), kept
    sorted as pairs are added.

    Pairs are only ever added (a slot is never reused), so the slots not yet in the order are
    sorted alone and merged in: ``O(P)`` per update instead of sorting all ``P`` again.

    Attributes:
        keys: ``[P]`` int64 ``major << 32 | minor``, ascending.
        slots: ``[P]`` the slot of each key.
    """

    def __init__(self) -> None:
        self.keys = np.zeros(0, np.int64)
        self.slots = np.zeros(0, np.int64)

    def extend(self, major: np.ndarray, minor: np.ndarray) -> None:
        """Merge in the slots from ``len(slots)`` on of the pairs ``(major [P], minor [P])``."""
        have = self.slots.size
        if major.size == have:
            return
        keys = (major[have:].astype(np.int64) << _ITEM_BITS) | minor[have:].astype(np.int64)
        new = np.argsort(keys, kind="stable")
        at = np.searchsorted(self.keys, keys[new])
        self.keys = np.insert(self.keys, at, keys[new])
        self.slots = np.insert(self.slots, at, new + have)

    def split(self) -> tuple[np.ndarray, np.ndarray]:
        """``(major [P], minor [P])`` of the sorted keys (copies)."""
        return self.keys >> _ITEM_BITS, self.keys & ((1 << _ITEM_BITS) - 1)


class PairIndex:
    """The pairs at one statistics generation as CSR structure, with the KNN matrices on it.

    Holds copies (a snapshot): the statistics may move on while it is in use. Each matrix is
    built from the two kept sorts, never by sorting or transposing: ``O(P)`` gathers.

    Args:
        by_user: the pair slots sorted by user, then item.
        by_item: the pair slots sorted by item, then user.
        log_counts: ``log1p(count)`` of every slot ``[P]`` (float64).
        generation: the statistics generation the snapshot is of.
    """

    def __init__(self, by_user: PairOrder, by_item: PairOrder, log_counts: np.ndarray,
                 generation: int) -> None:
        self.generation = generation
        self.users, self.items = by_user.split()  # [P] by user, then item
        self.log_counts = log_counts[by_user.slots]  # [P]
        self._item_users = by_item.split()  # ([P] items, [P] users) by item, then user
        self._item_log_counts = log_counts[by_item.slots]
        self.num_users = int(self.users[-1]) + 1 if self.users.size else 0
        self.width = int(self._item_users[0][-1]) + 1 if self.users.size else 0
        self.indptr = np.searchsorted(self.users, np.arange(self.num_users + 1))
        self._item_indptr = np.searchsorted(self._item_users[0], np.arange(self.width + 1))

    def _csr_t(self, data: np.ndarray) -> sp.csr_matrix:
        """``[W, U]`` with ``data [P]`` (by item) on the pairs: what ``.T.tocsr()`` of the
        ``[U, W]`` CSR of the pairs gives (rows by item, users ascending in each)."""
        return sp.csr_matrix((data, self._item_users[1], self._item_indptr),
                             shape=(self.width, self.num_users))

    @cached_property
    def counts_t(self) -> sp.csr_matrix:
        """``[W, U]`` ``log1p(count)`` of each pair, rows by item: the user-KNN item vectors
        of the users, transposed, row-major."""
        return self._csr_t(self._item_log_counts)

    @cached_property
    def _inverse_norms(self) -> np.ndarray:
        """``[U]`` 1 / the length of each user's ``log1p(count)`` row (scipy's row sum: one
        ``reduceat`` over each non-empty row's squares)."""
        sums = np.zeros(self.num_users)
        rows = np.flatnonzero(np.diff(self.indptr))
        sums[rows] = np.add.reduceat(self.log_counts * self.log_counts, self.indptr[rows])
        return 1 / np.maximum(np.sqrt(sums), 1e-12)

    @cached_property
    def unit_t(self) -> sp.csr_matrix:
        """``[W, U]`` :attr:`counts_t` with each user scaled to unit length (a
        query touches only its items' rows)."""
        return self._csr_t(self._inverse_norms[self._item_users[1]] * self._item_log_counts)

    @cached_property
    def _item_scale(self) -> np.ndarray:
        """``[W]`` 1 / sqrt(buyers of each item)."""
        buyers = np.diff(self._item_indptr).astype(np.float64)
        return 1 / np.sqrt(np.maximum(buyers, 1))

    @cached_property
    def buyers_t(self) -> sp.csr_matrix:
        """``[W, U]`` ``1/sqrt(buyers of the item)`` on each pair, rows by item: the item-KNN
        cosine rows of the users, transposed, row-major."""
        return self._csr_t(self._item_scale[self._item_users[0]])

    def build(self) -> PairIndex:
        """Build every matrix now (off a request path); returns ``self``."""
        _ = self.counts_t, self.unit_t, self.buyers_t
        return self

    def unit_rows(self, users: np.ndarray) -> sp.csr_matrix:
        """``[Q, W]`` the unit rows of ``users [Q]`` (empty for a user past the index)."""
        known = users < self.num_users
        starts = self.indptr[users[known]]
        lens = np.zeros(users.size, np.int64)
        lens[known] = self.indptr[users[known] + 1] - starts
        ends = np.cumsum(lens[known])
        entry = np.arange(int(lens.sum())) + np.repeat(starts - ends + lens[known], lens[known])
        unit = self._inverse_norms[self.users[entry]] * self.log_counts[entry]
        return sp.csr_matrix((unit, self.items[entry], np.concatenate([[0], np.cumsum(lens)])),
                             shape=(users.size, self.width))

    @staticmethod
    def _dense_times(left: np.ndarray, right_t: sp.csr_matrix, num_items: int) -> np.ndarray:
        """``[Q, min(num_items, W)]`` float64 ``left [Q, U] @ right [U, W]`` from ``right_t``
        (``right`` transposed, row-major; the result is a strided view). The uncached
        computation's product: each entry summed from zero over users in ascending order
        (faster than a sparse product even for one query). scipy's row-major product with a
        row-major ``left.T`` reads the pairs once for all queries (~4x faster than the
        column-major one for 8 queries; the same sums)."""
        return (right_t @ np.ascontiguousarray(left.T)).T[:, :num_items]

    @staticmethod
    def _float32(out: np.ndarray, num_items: int) -> np.ndarray:
        """``[Q, num_items]`` float32 copy of ``out [Q, ≤ num_items]``, zero-padded."""
        if out.shape[1] == num_items:
            return np.ascontiguousarray(out, dtype=np.float32)
        padded = np.zeros((out.shape[0], num_items), np.float32)
        padded[:, :out.shape[1]] = out
        return padded

    def user_knn(self, query: sp.csr_matrix, own: np.ndarray, num_items: int,
                 k: int) -> np.ndarray:
        """User-KNN scores ``[Q, num_items]`` (float32): the mean ``log1p(count)`` row of the
        ``k`` users most cosine-similar (similarity > 0) to each query row.

        Args:
            query: ``[Q, W]`` query rows (summed in stored order; :meth:`unit_rows`).
            own: ``[Q]`` each query's own user, never its own neighbour (``>= U``: none).
            num_items: catalogue width of the answer.
            k: neighbours.
        """
        q = query.shape[0]
        if self.num_users == 0 or q == 0:
            return np.zeros((q, num_items), np.float32)
        sims = torch.from_numpy((query @ self.unit_t).toarray())  # [Q, U]
        mine = np.flatnonzero(own < self.num_users)
        sims[torch.from_numpy(mine), torch.from_numpy(own[mine])] = -1.0
        top = sims.topk(min(k, self.num_users), dim=1)
        weights = torch.zeros_like(sims).scatter_(1, top.indices, (top.values > 0).double())
        weights /= weights.sum(1, keepdim=True).clamp_min(1)  # [Q, U] 1/chosen on each
        return self._float32(self._dense_times(weights.numpy(), self.counts_t, num_items),
                             num_items)

    def item_knn(self, rows: np.ndarray, items: np.ndarray, weights: np.ndarray,
                 queries: int, num_items: int) -> np.ndarray:
        """Item-KNN scores ``[queries, num_items]`` (float32, each row scaled to a maximum
        of 1): the cosine of every item's buyer set with the query's weighted items.

        Args:
            rows: ``[M]`` query of each entry.
            items: ``[M]`` item of each entry (items past :attr:`width` are left out).
            weights: ``[M]`` weight of each entry.
            queries: ``Q``.
            num_items: catalogue width of the answer.
        """
        if self.num_users == 0 or queries == 0:
            return np.zeros((queries, num_items), np.float32)
        inside = items < self.width
        query = sp.csr_matrix((weights[inside], (rows[inside], items[inside])),
                              shape=(queries, self.width))
        through = (query @ self.buyers_t).toarray()  # [Q, U] weight of each buyer
        # row-major first: the row maxima and the division over the strided view cost several
        # times more (the same numbers)
        out = np.ascontiguousarray(self._dense_times(through, self.buyers_t, num_items))
        out /= np.maximum(out.max(1, keepdims=True), 1e-12)
        return self._float32(out, num_items)


__all__ = ["PairIndex", "PairOrder"]
