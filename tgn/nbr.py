"""Next-basket-recommendation baselines, streaming: TIFU-KNN and UP-CF@r.

* TIFU-KNN — Hu et al., "Modeling Personalized Item Frequency Information for Next-basket
  Recommendation", SIGIR 2020 (https://arxiv.org/abs/2006.00556).
* UP-CF@r — Faggioli et al., "Recency Aware Collaborative Filtering for Next Basket
  Recommendation", UMAP 2020 (https://doi.org/10.1145/3340631.3394850).

Both are built from two reusable parts, also meant as features for other models:

* :class:`BasketVectors` — per-user sparse item vectors ``[num_users, N]``, a weighted sum of the
  user's basket multi-hot vectors; the weight of a basket depends only on its position from the
  newest and the user's basket count (a :class:`BasketWeighting`: :class:`TIFUDecay`,
  :class:`RecentBaskets`).
* :class:`UserKNN` — user-based neighbour scores ``[B, N]``: similarity measured on one
  :class:`BasketVectors` (cosine or asymmetric cosine), neighbours' rows of another (or the same)
  aggregated as a mean of the top ``k`` or a similarity-weighted sum.

A basket is the set of items one user bought at one timestamp (:class:`~tgn.data.EventBatch` has
no basket id; in Complete Journey every line of a basket shares its ``ts``; a log without baskets
has one-event baskets). A basket cut by a batch boundary continues in the next batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor

from tgn.data import EventBatch, expand_rows


class BasketWeighting(Protocol):
    """Weight of a basket from its position and the user's basket count."""

    def __call__(self, position: np.ndarray, count: np.ndarray) -> np.ndarray:
        """Weights ``[L]`` (float64) of baskets at ``position [L]`` (0 = the user's newest) for
        users with ``count [L]`` baskets."""


@dataclass(frozen=True)
class TIFUDecay:
    """TIFU-KNN's time-decayed, group-decayed mean (Hu et al. 2020, Eqs. 3–4).

    The user's ``n`` baskets are split into ``K = ceil(n / m)`` groups of ``m`` from the newest
    (the oldest group holds the remaining ``n - m (K - 1)``). A group vector is the mean of its
    baskets, the ``i``-th newest in the group weighted ``r_b ** i``; the user vector is the mean
    of the group vectors, the ``j``-th newest group weighted ``r_g ** j``.

    >>> w = TIFUDecay(m=2, r_b=0.5, r_g=0.1)(np.arange(3), np.full(3, 3))
    >>> w.round(4).tolist()  # groups {newest, 2nd} / 2 and {3rd} / 1, mean of K = 2 groups
    [0.25, 0.125, 0.05]
    """

    m: int = 3
    r_b: float = 0.9
    r_g: float = 0.6

    def __call__(self, position: np.ndarray, count: np.ndarray) -> np.ndarray:
        groups = -(-count // self.m)  # K = ceil(n / m)
        group, inside = np.divmod(position, self.m)
        size = np.where(group == groups - 1, count - self.m * (groups - 1), self.m)
        return self.r_b ** inside * self.r_g ** group / (size * groups)


@dataclass(frozen=True)
class RecentBaskets:
    """UP-CF's recency-aware user-wise popularity: the share of the user's last ``r`` baskets
    holding the item (``r=None``: all baskets).

    >>> RecentBaskets(r=2)(np.arange(3), np.full(3, 3)).tolist()
    [0.5, 0.5, 0.0]
    """

    r: int | None = None

    def __call__(self, position: np.ndarray, count: np.ndarray) -> np.ndarray:
        if self.r is None:
            return 1.0 / count
        return (position < self.r) / np.minimum(count, self.r)


class BasketVectors:
    """Per-user sparse item vectors from the user's baskets, kept up to date from a stream.

    ``vector(u) = sum over u's baskets b of weighting(position(b), n_u) * multihot(b)``; with
    ``binary``, the indicator of the items ``u`` ever bought (within weighted baskets).

    ``update`` only appends the batch's baskets and marks its users stale; their rows are
    recomputed from their whole basket history (weights shift as baskets arrive) on the next
    read, in one sparse build for all stale users.

    Args:
        weighting: basket weight by position and count.
        binary: store ``1`` for every non-zero entry.
    """

    def __init__(self, weighting: BasketWeighting, binary: bool = False) -> None:
        self.weighting, self.binary = weighting, binary
        self.reset_state()

    def reset_state(self) -> None:
        """Forget all baskets."""
        self._items: list[np.ndarray] = []  # user → item per basket line (int64)
        self._basket: list[np.ndarray] = []  # user → basket ordinal per line (int64)
        self._count = np.zeros(0, dtype=np.int64)  # baskets per user
        self._last_t = np.zeros(0, dtype=np.float64)  # time of the user's newest basket
        self._rows: list[tuple[np.ndarray, np.ndarray]] = []  # user → (items, values)
        self._stale: set[int] = set()
        self._matrix: sp.csr_matrix | None = None
        self.num_items = 0

    @property
    def num_users(self) -> int:
        """Rows of :attr:`matrix`: one past the largest user index seen."""
        return self._count.size

    @property
    def active(self) -> np.ndarray:
        """Users with at least one basket ``[num_users]`` (bool)."""
        return self._count > 0

    def counts(self, users: Tensor) -> Tensor:
        """Baskets seen per user ``[B]`` (int64; 0 for unknown users)."""
        idx = users.numpy()
        known = idx < self._count.size
        out = np.zeros(idx.size, dtype=np.int64)
        out[known] = self._count[idx[known]]
        return torch.from_numpy(out)

    def update(self, batch: EventBatch) -> None:
        """Append the batch's baskets (one per user and timestamp)."""
        if len(batch) == 0:
            return
        self._grow(int(batch.users.max()) + 1)
        self.num_items = max(self.num_items, int(batch.items.max()) + 1)
        users, items, t = batch.users.numpy(), batch.items.numpy(), batch.t.numpy()
        order = np.lexsort((items, t, users))
        users, items, t = users[order], items[order], t[order]
        keep = np.ones(users.size, dtype=bool)  # one line per (user, basket, item)
        keep[1:] = (users[1:] != users[:-1]) | (t[1:] != t[:-1]) | (items[1:] != items[:-1])
        users, items, t = users[keep], items[keep], t[keep]
        starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
        new = np.r_[True, (users[1:] != users[:-1]) | (t[1:] != t[:-1])]
        new[starts] = t[starts] != self._last_t[users[starts]]  # else: the last basket goes on
        steps = np.cumsum(new)
        ends = np.r_[starts[1:], users.size]
        for start, end in zip(starts.tolist(), ends.tolist(), strict=True):
            ordinal = steps[start:end] - steps[start] + new[start]  # 0: the continued basket
            self._append(int(users[start]), items[start:end], ordinal, float(t[end - 1]))

    def _append(self, user: int, items: np.ndarray, ordinal: np.ndarray, last_t: float) -> None:
        """Add one user's lines ``[L]``; ``ordinal [L]`` numbers the batch's new baskets from 1
        (0: lines continuing the user's last basket)."""
        last = self._count[user] - 1
        basket = last + ordinal
        if ordinal[0] == 0:  # continued basket: drop items already in it
            tail = self._items[user][self._basket[user] == last]
            fresh = ~(np.isin(items, tail) & (ordinal == 0))
            items, basket = items[fresh], basket[fresh]
        self._items[user] = np.concatenate([self._items[user], items])
        self._basket[user] = np.concatenate([self._basket[user], basket])
        self._count[user] += int(ordinal[-1])
        self._last_t[user] = last_t
        self._stale.add(user)
        self._matrix = None

    def _grow(self, num_users: int) -> None:
        extra = num_users - self._count.size
        if extra > 0:
            empty = np.zeros(0, dtype=np.int64)
            self._items += [empty] * extra
            self._basket += [empty] * extra
            self._rows += [(empty, np.zeros(0))] * extra
            self._count = np.concatenate([self._count, np.zeros(extra, dtype=np.int64)])
            self._last_t = np.concatenate([self._last_t, np.full(extra, -math.inf)])

    def _refresh(self) -> None:
        """Recompute the rows of stale users from their basket histories (one COO build)."""
        if not self._stale:
            return
        stale = np.fromiter(sorted(self._stale), dtype=np.int64)
        lengths = np.array([self._items[u].size for u in stale.tolist()])
        rows = np.repeat(np.arange(stale.size), lengths)
        items = np.concatenate([self._items[u] for u in stale.tolist()])
        basket = np.concatenate([self._basket[u] for u in stale.tolist()])
        count = self._count[stale][rows]
        weight = self.weighting(count - 1 - basket, count)
        part = sp.coo_matrix((weight, (rows, items)), shape=(stale.size, self.num_items)).tocsr()
        part.eliminate_zeros()  # baskets outside the window (RecentBaskets) weigh 0
        for row, user in enumerate(stale.tolist()):
            lo, hi = part.indptr[row], part.indptr[row + 1]
            values = np.ones(hi - lo) if self.binary else part.data[lo:hi]
            self._rows[user] = (part.indices[lo:hi].astype(np.int64), values)
        self._stale.clear()

    @property
    def matrix(self) -> sp.csr_matrix:
        """All users' vectors, ``[num_users, num_items]`` CSR (float64)."""
        self._refresh()
        if self._matrix is None or self._matrix.shape[1] != self.num_items:
            lengths = np.array([r[0].size for r in self._rows], dtype=np.int64)
            indptr = np.r_[0, np.cumsum(lengths)]
            indices = np.concatenate([r[0] for r in self._rows]) if self._rows else lengths
            data = np.concatenate([r[1] for r in self._rows]) if self._rows else np.zeros(0)
            self._matrix = sp.csr_matrix((data, indices, indptr),
                                         shape=(self.num_users, self.num_items))
        return self._matrix

    def vectors(self, users: Tensor, width: int | None = None) -> sp.csr_matrix:
        """Vectors of ``users [B]`` as ``[B, width]`` CSR (default width: items seen); users
        never seen get empty rows."""
        matrix = self.matrix
        width = self.num_items if width is None else width
        idx = users.numpy()
        known = idx < matrix.shape[0]
        rows = sp.csr_matrix((idx.size, matrix.shape[1]))
        if known.any():
            pick = sp.csr_matrix((np.ones(known.sum()), (np.flatnonzero(known), idx[known])),
                                 shape=(idx.size, matrix.shape[0]))
            rows = (pick @ matrix).tocsr()
        rows.resize((idx.size, width))
        return rows

    def dense(self, users: Tensor, width: int | None = None) -> Tensor:
        """Vectors of ``users [B]`` as a dense ``[B, width]`` float32 tensor."""
        return torch.from_numpy(self.vectors(users, width).toarray().astype(np.float32))


class UserKNN:
    """User-based neighbour scores over :class:`BasketVectors`.

    ``score(u, i) = sum over neighbours v of w(u, v) * values[v, i]``, where the similarity
    ``s(u, v)`` is measured on ``space`` and

    * ``aggregate="mean"`` (TIFU-KNN): ``w = 1 / k'`` for the ``k'`` = ``min(k, candidates)``
      most similar users;
    * ``aggregate="sum"`` (UP-CF): ``w = s(u, v) ** q`` for the ``k`` most similar users
      (``k=None``: all users).

    Candidates are users with at least one basket, minus ``u`` unless ``include_self``. A user
    with an empty vector has no similar users; with ``cold_crowd`` he gets the mean of all
    candidates' ``values`` rows instead of zeros.

    Args:
        space: vectors the similarity is measured on.
        values: vectors aggregated over neighbours (default: ``space``).
        k: neighbours per user (``None``: all candidates).
        similarity: ``"cosine"`` or ``"asymmetric"`` (asymmetric cosine on the binarised
            vectors: ``|I_u ∩ I_v| / (|I_u| ** alpha * |I_v| ** (1 - alpha))``).
        alpha: asymmetry of ``"asymmetric"`` (0.5 = cosine of the item sets).
        q: locality exponent of ``aggregate="sum"``.
        aggregate: ``"mean"`` or ``"sum"``.
        include_self: the user may be his own neighbour.
        cold_crowd: fall back to the mean of all candidates for users with empty vectors.
    """

    def __init__(self, space: BasketVectors, values: BasketVectors | None = None,
                 k: int | None = 900, similarity: str = "cosine", alpha: float = 0.5,
                 q: float = 1.0, aggregate: str = "mean", include_self: bool = False,
                 cold_crowd: bool = True) -> None:
        if similarity not in ("cosine", "asymmetric"):
            raise ValueError(f"unknown similarity {similarity!r}; expected 'cosine' or "
                             "'asymmetric'")
        if aggregate not in ("mean", "sum"):
            raise ValueError(f"unknown aggregate {aggregate!r}; expected 'mean' or 'sum'")
        if k is not None and k < 1:
            raise ValueError(f"k must be a positive integer or None, got {k}")
        self.space, self.values = space, space if values is None else values
        self.k, self.similarity, self.alpha, self.q = k, similarity, alpha, q
        self.aggregate, self.include_self, self.cold_crowd = aggregate, include_self, cold_crowd

    def similarities(self, users: Tensor) -> Tensor:
        """Similarity of ``users [B]`` to every user ``[B, num_users]`` (float64; ``-inf`` for
        non-candidates)."""
        base = self.space.matrix
        query = self.space.vectors(users)
        if self.similarity == "asymmetric":
            base, query = (m.astype(bool).astype(np.float64) for m in (base, query))
            left = np.power(np.asarray(query.sum(1)).ravel(), self.alpha)
            right = np.power(np.asarray(base.sum(1)).ravel(), 1 - self.alpha)
        else:
            left, right = (np.sqrt(np.asarray(m.multiply(m).sum(1)).ravel())
                           for m in (query, base))
        dots = (query @ base.T).toarray()
        sims = dots / np.maximum(np.outer(left, right), 1e-300)
        sims[:, ~self.space.active] = -math.inf
        if not self.include_self:
            idx = users.numpy()
            mine = idx < base.shape[0]
            sims[np.flatnonzero(mine), idx[mine]] = -math.inf
        return torch.from_numpy(sims)

    def weights(self, users: Tensor) -> Tensor:
        """Neighbour weights ``w(u, v)`` of ``users [B]``: ``[B, num_users]`` float64."""
        sims = self.similarities(users)
        candidate = torch.isfinite(sims)
        if self.k is not None and self.k < sims.size(1):
            top = sims.topk(self.k, dim=1).indices
            chosen = torch.zeros_like(candidate).scatter_(1, top, True) & candidate
        else:
            chosen = candidate
        if self.aggregate == "mean":
            weights = chosen.double() / chosen.sum(1, keepdim=True).clamp(min=1)
        else:
            weights = torch.where(chosen, sims.clamp(min=0), 0.0).pow(self.q)
        if self.cold_crowd:
            cold = self.space.vectors(users).getnnz(axis=1) == 0
            crowd = candidate.double() / candidate.sum(1, keepdim=True).clamp(min=1)
            weights[torch.from_numpy(cold)] = crowd[torch.from_numpy(cold)]
        return weights

    def neighbor_scores(self, users: Tensor, width: int | None = None) -> Tensor:
        """Neighbour scores of ``users [B]``: dense ``[B, width]`` float32 (default width:
        items seen by ``values``)."""
        weights = self.weights(users).numpy()  # [B, U]
        values = self.values.matrix
        width = self.values.num_items if width is None else width
        out = np.zeros((users.numel(), width), dtype=np.float32)
        if values.shape[0]:
            common = min(values.shape[0], weights.shape[1])
            out[:, :values.shape[1]] = (values[:common].T @ weights[:, :common].T).T
        return torch.from_numpy(out)


def _unique_rows(batch: EventBatch) -> tuple[Tensor, Tensor]:
    """The batch's distinct users ``[b]`` and each event's row among them ``[B]``."""
    return torch.unique(batch.users, return_inverse=True)


class TIFUKNN:
    """TIFU-KNN, streaming: ``alpha * own + (1 - alpha) * mean of the k nearest users``.

    The user vector is :class:`TIFUDecay` over his baskets; neighbours by cosine on the same
    vectors. The paper's dunnhumby settings are k=900, m=3, r_b=0.9, r_g=0.6, alpha=0.2.

    Args:
        k: neighbours.
        m: group size.
        r_b: within-group decay.
        r_g: group decay.
        alpha: weight of the user's own vector.
    """

    # Chosen on cj26 validation (benchmarks/nbr_val.json; 18 settings, every other val batch of
    # 2000 scored): Recall@20 0.1580 / @10 0.1115 against 0.1237 / 0.0855 for the paper's
    # settings; slower group decay (r_g 0.8) and more weight on the own vector (alpha 0.8) win
    # on grocery repeats; k=300 scores within 0.0003.
    def __init__(self, k: int = 900, m: int = 3, r_b: float = 0.9, r_g: float = 0.8,
                 alpha: float = 0.8) -> None:
        self.k, self.m, self.r_b, self.r_g, self.alpha = k, m, r_b, r_g, alpha
        self.vectors = BasketVectors(TIFUDecay(m, r_b, r_g))
        self.knn = UserKNN(self.vectors, k=k, similarity="cosine", aggregate="mean")

    def reset_state(self) -> None:
        """Forget all events."""
        self.vectors.reset_state()

    def score(self, batch: EventBatch) -> Tensor:
        """``[B, num_items]`` float32 from the state before the batch."""
        users, rows = _unique_rows(batch)
        own = self.vectors.dense(users)
        scores = self.alpha * own + (1 - self.alpha) * self.knn.neighbor_scores(users)
        return expand_rows(scores, rows)

    def update(self, batch: EventBatch) -> None:
        """Add the batch's baskets."""
        self.vectors.update(batch)


class UPCF:
    """UP-CF@r, streaming: ``score(u, i) = sum_v s(u, v) ** q * pop_r(v, i)``.

    ``pop_r`` is :class:`RecentBaskets` (share of the user's last ``r`` baskets holding the
    item); ``s`` the asymmetric cosine of the users' item sets (all baskets), the user himself
    included (``s(u, u) = 1``, so a large ``q`` tends to the user's own popularity).

    Args:
        r: recency window in baskets (``None``: all).
        alpha: asymmetry of the cosine.
        q: locality exponent.
        k: neighbours (``None``: all users).
    """

    # Chosen on cj26 validation (benchmarks/nbr_val.json; r in {5, 25, all} x alpha in
    # {0.25, 0.75} x q in {1, 5}, every other val batch of 2000 scored): all baskets, alpha 0.75,
    # q 5 give Recall@20 0.1628 / @10 0.1144 (r=25: 0.1617; r=5: 0.1235; q=1: <= 0.083).
    def __init__(self, r: int | None = None, alpha: float = 0.75, q: float = 5.0,
                 k: int | None = None) -> None:
        self.r, self.alpha, self.q, self.k = r, alpha, q, k
        self.popularity = BasketVectors(RecentBaskets(r))
        self.items = BasketVectors(RecentBaskets(None), binary=True)
        self.knn = UserKNN(self.items, self.popularity, k=k, similarity="asymmetric",
                           alpha=alpha, q=q, aggregate="sum", include_self=True)

    def reset_state(self) -> None:
        """Forget all events."""
        self.popularity.reset_state()
        self.items.reset_state()

    def score(self, batch: EventBatch) -> Tensor:
        """``[B, num_items]`` float32 from the state before the batch."""
        users, rows = _unique_rows(batch)
        return expand_rows(self.knn.neighbor_scores(users), rows)

    def update(self, batch: EventBatch) -> None:
        """Add the batch's baskets."""
        self.popularity.update(batch)
        self.items.update(batch)
