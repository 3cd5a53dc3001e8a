"""The (user, item) pairs of :class:`tgn.signals.PurchaseSignals` as one sorted sparse index,
and the user-KNN and item-KNN arithmetic on it.

Both KNN terms of the mixture read every pair: the user-KNN term
(:meth:`PairIndex.user_knn`, TIFU-KNN's neighbour part, https://arxiv.org/abs/2006.00556) a
``log1p(count)`` user × item matrix, the item-KNN term (:meth:`PairIndex.item_knn`, item-based
CF, https://doi.org/10.1145/371920.372071) a ``1/sqrt(buyers)`` one. Both are the same sparse
structure (the pairs sorted by user, then item) with other data, so :class:`PairOrder` keeps
that sort (merging new pairs in as they come) and a :class:`PairIndex`, a snapshot of the
pairs at one statistics generation, builds each matrix once, on first use.

The matrices and products are the expressions the uncached computation used (a CSR built from
the pairs, which scipy sorts the same way), so the scores are the same numbers (tested equal);
for a few queries (a served request) the final ``[Q, U] → [Q, N]`` product runs sparse ×
sparse instead of dense: the same sums, in the same order.
Shapes: ``P`` pairs, ``U`` users (largest user index + 1), ``W`` items (largest item index +
1), ``Q`` queries, ``N`` the caller's catalogue width.
"""

from __future__ import annotations

from functools import cached_property

import numpy as np
import scipy.sparse as sp
import torch

_ITEM_BITS = 32
#: Most queries whose KNN product runs sparse × sparse (more: dense, as a batch is cheaper so).
SPARSE_QUERIES = 4


class PairOrder:
    """Pair slots sorted by ``(user, item)``, kept sorted as pairs are added.

    Pairs are only ever added (a slot is never reused), so the slots not yet in the order are
    sorted alone and merged in: ``O(P)`` per update instead of sorting all ``P`` again.

    Attributes:
        keys: ``[P]`` int64 ``user << 32 | item``, ascending.
        slots: ``[P]`` the slot of each key.
    """

    def __init__(self) -> None:
        self.keys = np.zeros(0, np.int64)
        self.slots = np.zeros(0, np.int64)

    def extend(self, users: np.ndarray, items: np.ndarray) -> None:
        """Merge in the slots from ``len(slots)`` on of the pairs ``(users [P], items [P])``."""
        have = self.slots.size
        if users.size == have:
            return
        keys = (users[have:].astype(np.int64) << _ITEM_BITS) | items[have:].astype(np.int64)
        new = np.argsort(keys, kind="stable")
        at = np.searchsorted(self.keys, keys[new])
        self.keys = np.insert(self.keys, at, keys[new])
        self.slots = np.insert(self.slots, at, new + have)


class PairIndex:
    """The pairs at one statistics generation as CSR structure, with the KNN matrices on it.

    Holds copies (a snapshot): the statistics may move on while it is in use.

    Args:
        order: the sorted pair slots.
        log_counts: ``log1p(count)`` of every slot ``[P]`` (float64).
        generation: the statistics generation the snapshot is of.
    """

    def __init__(self, order: PairOrder, log_counts: np.ndarray, generation: int) -> None:
        self.generation = generation
        self.users = order.keys >> _ITEM_BITS  # [P] ascending
        self.items = order.keys & ((1 << _ITEM_BITS) - 1)  # [P] ascending within a user
        self.log_counts = log_counts[order.slots]  # [P]
        self.num_users = int(self.users[-1]) + 1 if self.users.size else 0
        self.width = int(self.items.max()) + 1 if self.items.size else 0
        self.indptr = np.searchsorted(self.users, np.arange(self.num_users + 1))

    def _csr(self, data: np.ndarray) -> sp.csr_matrix:
        """``[U, W]`` with ``data [P]`` on the pairs."""
        return sp.csr_matrix((data, self.items, self.indptr), shape=(self.num_users, self.width))

    @cached_property
    def counts(self) -> sp.csr_matrix:
        """``[U, W]`` ``log1p(count)`` of each pair: the user-KNN item vectors."""
        return self._csr(self.log_counts)

    @cached_property
    def unit(self) -> sp.csr_matrix:
        """``[U, W]`` :attr:`counts` rows scaled to unit length."""
        matrix = self.counts
        norms = np.sqrt(np.asarray(matrix.multiply(matrix).sum(1)).ravel())
        return sp.diags(1 / np.maximum(norms, 1e-12)) @ matrix

    @cached_property
    def unit_t(self) -> sp.csr_matrix:
        """``[W, U]`` :attr:`unit` transposed, row-major (a query touches only its items')."""
        return self.unit.T.tocsr()

    @cached_property
    def buyers(self) -> sp.csr_matrix:
        """``[U, W]`` ``1/sqrt(buyers of the item)`` on each pair: the item-KNN cosine rows."""
        buyers = np.bincount(self.items, minlength=self.width).astype(np.float64)
        return self._csr((1 / np.sqrt(np.maximum(buyers, 1)))[self.items])

    @cached_property
    def buyers_t(self) -> sp.csr_matrix:
        """``[W, U]`` :attr:`buyers` transposed, row-major."""
        return self.buyers.T.tocsr()

    def build(self) -> PairIndex:
        """Build every matrix now (off a request path); returns ``self``."""
        _ = self.unit_t, self.buyers_t
        return self

    def unit_rows(self, users: np.ndarray) -> sp.csr_matrix:
        """``[Q, W]`` the unit rows of ``users [Q]`` (zero for a user past the index)."""
        known = users < self.num_users
        return (sp.diags(known.astype(np.float64))
                @ self.unit[np.minimum(users, self.num_users - 1)])

    def _through(self, left: sp.csr_matrix, right: sp.csr_matrix,
                 num_items: int) -> np.ndarray:
        """``[Q, num_items]`` float64 ``left [Q, U] @ right [U, W]`` (zero past
        :attr:`width`; may be a strided view). Few queries: sparse × sparse; many: the dense
        product of the uncached computation (memory-bound, but a sparse result this dense
        costs more). Either sums each entry over users in ascending order from zero: the same
        numbers."""
        if left.shape[0] <= SPARSE_QUERIES:
            left.sort_indices()
            out = (left @ right).toarray()
        else:
            out = np.asarray(right.T @ left.toarray().T).T  # [Q, W]
        if num_items <= self.width:
            return out[:, :num_items]
        return np.concatenate([out, np.zeros((out.shape[0], num_items - self.width))], 1)

    def user_knn(self, query: sp.csr_matrix, own: np.ndarray, num_items: int,
                 k: int) -> np.ndarray:
        """User-KNN scores ``[Q, num_items]`` (float32): the mean :attr:`counts` row of the
        ``k`` users most cosine-similar (similarity > 0) to each unit query row.

        Args:
            query: ``[Q, W]`` unit-length query rows.
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
        keep = (top.values > 0).numpy()
        chosen = keep.sum(1)  # [Q]
        rows = np.repeat(np.arange(q), chosen)
        weights = sp.csr_matrix((1.0 / chosen[rows], (rows, top.indices.numpy()[keep])),
                                shape=(q, self.num_users))  # [Q, U] 1/chosen on each
        return np.ascontiguousarray(self._through(weights, self.counts, num_items),
                                    dtype=np.float32)

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
        through = query @ self.buyers_t  # [Q, U] weight of each buyer
        out = self._through(through, self.buyers, num_items)
        out /= np.maximum(out.max(1, keepdims=True), 1e-12)
        return np.ascontiguousarray(out, dtype=np.float32)


__all__ = ["PairIndex", "PairOrder"]
