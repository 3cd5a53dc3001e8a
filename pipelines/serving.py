"""The state ``dynllm serve`` answers from: per shard, a model, item vectors and purchase
statistics kept fresh from the ``user-embeddings`` changelog.

The pipeline's store (``embeddings-shard-K-of-N.npz``) and checkpoints are rewritten only at
checkpoints (30 s by default). To answer from state about a second behind the pipeline, the
server follows the ``user-embeddings`` topic with its own consumer (no group, every partition,
from the start): each message carries the user's newest embedding, its ``version`` (events of
the user applied so far) and the events that update applied (``[[item_id, ts], ...]``), and
:meth:`ServingShard.apply` replays those events into the shard's copy of the purchase
statistics, so the repeat/explore mixture of the served score moves with the stream too.

Statistics start from the shard's checkpoint (or the run's model before the first checkpoint);
a message's events already in that base (event numbers ``<= `` the base version of the user)
are skipped, so restarts neither lose nor double-count events. Replaying per user gives the
pipeline's statistics up to float rounding: every statistic of :class:`tgn.signals
.PurchaseSignals` is either per (user, item) pair, per user, or a sum over events (item counts,
decayed popularity), and a user's events of one pipeline update arrive in one message.

Whole-catalogue work is cached (:class:`ServedRepeatScore`, :class:`ServedSignals`): the item
prior, and the user-KNN and item-KNN matrices (:class:`NeighborIndex`), refreshed at most every
:data:`KNN_REFRESH_S` (the matrices built from a copy of the pairs, outside the lock requests
take). Shapes: ``U``
users, ``I`` items, ``P`` (user, item) pairs.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor

from tgn.repeat import RepeatScore
from tgn.signals import NEIGHBORS, PurchaseSignals

log = logging.getLogger(__name__)

#: Most seconds the cached whole-catalogue parts of the score (item prior, user-KNN and
#: item-KNN matrices) lag the statistics they are used with.
KNN_REFRESH_S = 1.0
#: Seconds the changelog follower gathers records before applying them in one go.
APPLY_EVERY_S = 0.1


class NeighborIndex:
    """The user-KNN term of :meth:`tgn.signals.PurchaseSignals.neighbor_scores`, with the
    ``log1p(count)`` user × item matrix built once and queried per user.

    Same definition and arithmetic as the reference (mean item vector of the ``k`` most
    cosine-similar users with positive similarity, the user excluded); built from a copy of the
    pairs, so it can be built on another thread while requests use the previous one. A user
    whose pairs changed since the build is queried with his current row.

    Args:
        users: pair users ``[P]``.
        items: pair items ``[P]``.
        counts: pair purchase counts ``[P]``.
        num_items: catalogue width.
    """

    def __init__(self, users: np.ndarray, items: np.ndarray, counts: np.ndarray,
                 num_items: int) -> None:
        self.num_items = num_items
        self.num_users = int(users.max()) + 1 if users.size else 0
        width = max(num_items, int(items.max()) + 1 if items.size else 0)
        # the reference's own expressions, so similarities (and ties between neighbours) come
        # out bit for bit the same
        self.matrix = sp.csr_matrix((np.log1p(counts), (users, items)),
                                    shape=(self.num_users, width))
        norms = np.sqrt(np.asarray(self.matrix.multiply(self.matrix).sum(1)).ravel())
        self.unit = sp.diags(1 / np.maximum(norms, 1e-12)) @ self.matrix
        #: the transposed unit rows, row-major: a query touches only its items' rows
        self.unit_t = self.unit.T.tocsr()
        # item-KNN (PurchaseSignals.item_scores): pair entries 1/sqrt(buyers of the item)
        buyers = np.bincount(items, minlength=width).astype(np.float64)
        self.buyers = sp.csr_matrix((1 / np.sqrt(np.maximum(buyers, 1))[items], (users, items)),
                                    shape=(self.num_users, width))
        self.buyers_t = self.buyers.T.tocsr()

    def item_scores(self, rows: np.ndarray, items: np.ndarray, weights: np.ndarray,
                    queries: int) -> np.ndarray:
        """Item-KNN scores ``[queries, num_items]`` of the reference
        (:meth:`tgn.signals.PurchaseSignals.item_scores`) for query entries ``(rows [M],
        items [M], weights [M])``: the same expressions, on the cached buyer matrix."""
        width = self.buyers.shape[1]
        query = sp.csr_matrix((weights, (rows, items)), shape=(queries, width))
        through = np.asarray((query @ self.buyers_t).todense())  # [Q, U]
        out = np.asarray(self.buyers.T @ through.T).T[:, :self.num_items]
        out /= np.maximum(out.max(1, keepdims=True), 1e-12)
        return np.ascontiguousarray(out, dtype=np.float32)

    def scores(self, items: np.ndarray, counts: np.ndarray, own: int, current: bool,
               k: int = NEIGHBORS) -> np.ndarray:
        """Scores ``[num_items]`` (float32) for a user with pairs ``(items, counts)``.

        Args:
            items: the user's items ``[M]``.
            counts: their purchase counts ``[M]``.
            own: the user's row (not his own neighbour).
            current: the index holds the user's pairs as they are (then its row is used).
            k: neighbours.
        """
        if self.num_users == 0 or items.size == 0:
            return np.zeros(self.num_items, np.float32)
        if current and own < self.num_users:
            query = self.unit[[own]]
        else:  # pairs newer than the index: the user's row as it is now
            inside = items < self.unit.shape[1]
            value = np.log1p(counts[inside])
            value = value / max(float(np.sqrt((value * value).sum())), 1e-12)
            query = sp.csr_matrix((value, (np.zeros(value.size, np.int64), items[inside])),
                                  shape=(1, self.unit.shape[1]))
        sims = torch.from_numpy((query @ self.unit_t).toarray())  # [1, U]
        if own < self.num_users:
            sims[0, own] = -1.0
        top = sims.topk(min(k, self.num_users), dim=1)
        chosen = np.sort(top.indices[top.values > 0].numpy())
        if chosen.size == 0:
            return np.zeros(self.num_items, np.float32)
        mean = self.matrix[chosen].T @ np.full(chosen.size, 1 / chosen.size)
        return mean[:self.num_items].astype(np.float32)


class ServedSignals(PurchaseSignals):
    """:class:`~tgn.signals.PurchaseSignals` with the whole-catalogue parts of the mixture
    cached between updates: the item features (per generation and time) and the user-KNN
    neighbour matrix (:attr:`neighbors`, set by the owner; ``None``: the reference computation).

    Attributes:
        generation: updates applied so far (a cache key).
        neighbors: the neighbour index in use, and :attr:`neighbors_generation`, the generation
            it was built at.
    """

    def __init__(self) -> None:
        self.generation = 0
        self.neighbors: NeighborIndex | None = None
        self.neighbors_generation = -1
        self._features: tuple[tuple[int, float, int], Tensor] | None = None
        super().__init__()

    def reset_state(self) -> None:
        super().reset_state()
        self.generation += 1
        self.neighbors, self.neighbors_generation = None, -1

    def update(self, users: Tensor, items: Tensor, t: Tensor) -> None:
        super().update(users, items, t)
        self.generation += 1

    def item_features(self, t: float, num_items: int) -> Tensor:
        key = (self.generation, float(t), num_items)
        if self._features is None or self._features[0] != key:
            self._features = (key, super().item_features(t, num_items))
        return self._features[1]

    def user_pairs(self, user: int) -> tuple[np.ndarray, np.ndarray]:
        """``(items [M], counts [M])`` of one user's pairs."""
        slots = torch.tensor(list(self.slots_of.get(user, {}).values()), dtype=torch.long)
        return self.pair_item[slots].numpy(), self.count[slots].numpy()

    def pair_copy(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Copies of ``(users [P], items [P], counts [P])`` (to build a :class:`NeighborIndex`
        while the statistics go on)."""
        n = self.size
        return (self.pair_user[:n].numpy().copy(), self.pair_item[:n].numpy().copy(),
                self.count[:n].numpy().copy())

    def item_scores(self, users: Tensor, num_items: int, *args, **kwargs) -> Tensor:
        """The reference's item-KNN scores with the buyer matrix of :attr:`neighbors` (the
        defaults only; other arguments take the reference computation)."""
        from tgn import signals as reference

        index = self.neighbors
        fits = (index is not None and index.num_items == num_items and not args and not kwargs
                and index.buyers.shape[0] > 0)
        if not fits or users.numel() == 0:
            return super().item_scores(users, num_items, *args, **kwargs)
        rows, items, rank = (x.numpy() for x in self.recent_items(users))
        inside = items < index.buyers.shape[1]
        weights = reference.RECENT_DECAY ** rank.astype(np.float64)
        return torch.from_numpy(index.item_scores(rows[inside], items[inside], weights[inside],
                                                  users.numel()))

    def neighbor_scores(self, users: Tensor, t: float, num_items: int,
                        k: int = NEIGHBORS) -> Tensor:
        index = self.neighbors
        if index is None or index.num_items != num_items:
            return super().neighbor_scores(users, t, num_items, k)
        current = self.neighbors_generation == self.generation
        rows = [index.scores(*self.user_pairs(u), own=u, current=current, k=k)
                for u in users.tolist()]
        return torch.from_numpy(np.stack(rows)) if rows else torch.zeros(0, num_items)


class ServedRepeatScore(RepeatScore):
    """:class:`~tgn.repeat.RepeatScore` on :class:`ServedSignals`, its item prior cached per
    statistics generation and time (the MLP over the whole catalogue, ~6 ms on cj26)."""

    def __init__(self, hidden: int) -> None:
        super().__init__(hidden)
        self.signals = ServedSignals()
        self._prior: tuple[int, Tensor] | None = None

    @classmethod
    def copy_of(cls, repeat: RepeatScore) -> ServedRepeatScore:
        """A served copy of ``repeat``: its weights and statistics (exact)."""
        served = cls(repeat.g[0].out_features)
        served.load_state_dict(repeat.state_dict())
        return served.eval()

    def refresh_prior(self, t: float, num_items: int) -> None:
        """Compute the item prior at ``t`` that :meth:`item_prior` answers until the next
        refresh."""
        with torch.no_grad():
            self._prior = (num_items, super().item_prior(t, num_items))

    def item_prior(self, t: float, num_items: int) -> Tensor:
        if self._prior is not None and self._prior[0] == num_items:
            return self._prior[1]
        return super().item_prior(t, num_items)


@dataclass
class UserRow:
    """A user's newest served embedding.

    Attributes:
        shard: the shard that owns the user.
        ts: event time of the user's latest event.
        version: events of the user applied so far.
        embedding: ``[E]`` float32.
        facet_weights: ``[F]`` float32, or ``None``.
    """

    shard: int
    ts: float
    version: int
    embedding: np.ndarray
    facet_weights: np.ndarray | None


class ServingShard:
    """One shard's model with served statistics and item vectors.

    Args:
        model: the shard's ``TGNRecommender`` (its checkpoint, or the run's model).

    Attributes:
        item_ids: the item id of each row of :attr:`item_vectors`.
        item_vectors: ``[I, E]`` item embeddings at the model's latest event time.
        t: the time scores refer to: the latest event time seen (base or changelog).
        applied: per user index, the events of the user in :attr:`signals`.
    """

    def __init__(self, model) -> None:
        self.model = model
        with torch.no_grad():
            self.base_t = float(model.memory.last_update.max()) if model.num_nodes else 0.0
            self.item_vectors = model.item_embeddings(self.base_t)
        self.item_ids: list[str] = model.items.to_list()
        self.t = self.base_t
        self.signals: ServedSignals | None = None
        if model.repeat is not None:
            model.repeat = ServedRepeatScore.copy_of(model.repeat)
            self.signals = model.repeat.signals
        counts = model.neighbors.count[model.user_node].tolist()
        self.applied: dict[int, int] = dict(enumerate(counts))

    def set_items(self, model) -> None:
        """Take the item vectors of a newer checkpoint of this shard (statistics stay)."""
        with torch.no_grad():
            t = float(model.memory.last_update.max()) if model.num_nodes else 0.0
            vectors = model.item_embeddings(t)
        self.item_ids, self.item_vectors = model.items.to_list(), vectors
        self.t = max(self.t, t)
        if self.signals is not None:  # the next refresh rebuilds for the new catalogue width
            self.signals.neighbors_generation = -1

    def apply(self, messages: Iterable[dict]) -> int:
        """Replay the events of ``user-embeddings`` messages not yet in the statistics;
        events applied. Messages of one user go to separate updates (as the pipeline made
        them), others are merged into one update."""
        model, applied = self.model, 0
        batch: list[tuple[int, int, float]] = []
        in_batch: set[int] = set()
        for message in messages:
            events = message.get("events") or []
            if not events:
                continue
            user = int(model.users.encode([str(message["user_id"])], grow=True)[0])
            have = self.applied.get(user, 0)
            first = int(message["version"]) - len(events)  # events of the user before these
            new = events[max(0, have - first):]
            if not new:
                continue
            if user in in_batch:
                applied += self._update(batch)
                batch, in_batch = [], set()
            ids = model.items.encode([str(item) for item, _ts in new], grow=True)
            batch.extend((user, int(i), float(ts)) for i, (_item, ts) in zip(ids, new,
                                                                              strict=True))
            in_batch.add(user)
            self.applied[user] = int(message["version"])
        return applied + self._update(batch)

    def _update(self, batch: list[tuple[int, int, float]]) -> int:
        if not batch:
            return 0
        users, items, ts = zip(*batch, strict=True)
        t = torch.tensor(ts, dtype=torch.float64)
        order = torch.sort(t, stable=True).indices  # time order; a user's own order kept
        if self.signals is not None:
            self.signals.update(torch.tensor(users)[order], torch.tensor(items)[order],
                                t[order])
        self.t = max(self.t, float(t.max()))
        return len(batch)

    def refresh(self, lock: threading.Lock) -> bool:
        """Bring the cached parts up to the statistics if they moved since the last refresh:
        the item prior at :attr:`t` and a copy of the pairs under ``lock``, the neighbour index
        built from the copy outside it; whether it refreshed."""
        signals = self.signals
        if signals is None:
            return False
        with lock:
            generation = signals.generation
            if generation == signals.neighbors_generation:
                return False
            num_items = len(self.item_ids)
            if math.isfinite(self.t):
                self.model.repeat.refresh_prior(self.t, num_items)
            pairs = signals.pair_copy()
        index = NeighborIndex(*pairs, num_items)
        with lock:
            signals.neighbors, signals.neighbors_generation = index, generation
        return True

    def score(self, embedding: np.ndarray, user_id: str) -> Tensor:
        """Served scores ``[I]``: the dot product with the item vectors, mixed with the
        user's purchase history at :attr:`t` (the model's :meth:`mix_history`)."""
        scores = self.item_vectors @ torch.from_numpy(embedding)
        model = self.model
        if model.repeat is None or user_id not in model.users:
            return scores
        index = torch.from_numpy(model.users.encode([user_id], grow=False))
        with torch.no_grad():
            return model.mix_history(scores.unsqueeze(0), index,
                                     torch.tensor([self.t], dtype=torch.float64))[0]

def follow(topic_reader, handle, stop: threading.Event, every_s: float = APPLY_EVERY_S) -> None:
    """Poll ``topic_reader`` until ``stop``; every ``every_s`` pass the JSON values gathered
    (possibly none) to ``handle(values, received_at)`` (the changelog loop of
    :class:`pipelines.server.Recommender`)."""
    import json

    while not stop.is_set():
        values, until = [], time.monotonic() + every_s
        while (left := until - time.monotonic()) > 0:
            for record in topic_reader.poll(left):
                try:
                    values.append(json.loads(record.value))
                except (TypeError, ValueError):
                    log.warning("skipping a %s record that is not JSON", topic_reader.topic)
        handle(values, time.time())


__all__ = ["APPLY_EVERY_S", "KNN_REFRESH_S", "NeighborIndex", "ServedRepeatScore",
           "ServedSignals", "ServingShard", "UserRow", "follow"]
