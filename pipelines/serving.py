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
prior, and the pair index of the user-KNN and item-KNN terms (:class:`tgn.pair_index.PairIndex`,
the statistics' own), refreshed at most every :data:`KNN_REFRESH_S` (a snapshot of the pairs
taken under the lock requests take, its matrices built outside it). Shapes: ``U`` users, ``I``
items, ``P`` (user, item) pairs.
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

from tgn.pair_index import PairIndex
from tgn.repeat import RepeatScore
from tgn.signals import NEIGHBORS, PurchaseSignals

log = logging.getLogger(__name__)

#: Most seconds the cached whole-catalogue parts of the score (item prior, user-KNN and
#: item-KNN matrices) lag the statistics they are used with.
KNN_REFRESH_S = 1.0
#: Seconds the changelog follower gathers records before applying them in one go.
APPLY_EVERY_S = 0.1


class ServedSignals(PurchaseSignals):
    """:class:`~tgn.signals.PurchaseSignals` with the whole-catalogue parts of the mixture
    cached between updates: the item features (per generation and time) and the pair index of
    the KNN terms (:attr:`pinned`, a :class:`~tgn.pair_index.PairIndex` the owner pins at each
    refresh, so no request builds one).

    Attributes:
        pinned: the pair index requests use (``None`` before the first refresh: then the
            statistics' own, current one). It can be older than the statistics by up to a
            refresh; a queried user's own user-KNN row is then taken as it is now.
    """

    def __init__(self) -> None:
        self.pinned: PairIndex | None = None
        self._features: tuple[tuple[int, float, int], Tensor] | None = None
        super().__init__()

    def reset_state(self) -> None:
        super().reset_state()
        self.pinned = None

    def item_features(self, t: float, num_items: int) -> Tensor:
        key = (self.generation, float(t), num_items)
        if self._features is None or self._features[0] != key:
            self._features = (key, super().item_features(t, num_items))
        return self._features[1]

    def snapshot(self) -> PairIndex:
        """A pair index of the statistics as they are (copies: it stays valid as they move)."""
        return super().pair_index()

    def pair_index(self) -> PairIndex:
        return self.pinned if self.pinned is not None else self.snapshot()

    def neighbor_scores(self, users: Tensor, t: float, num_items: int,
                        k: int = NEIGHBORS) -> Tensor:
        index = self.pair_index()
        if index.generation == self.generation or users.numel() == 0:
            return super().neighbor_scores(users, t, num_items, k)
        # pairs newer than the index: each queried user's row as it is now (its length does
        # not matter: only the order of the similarities does)
        runs = [list(self.slots_of.get(u, {}).values()) for u in users.tolist()]
        slots = torch.tensor([s for r in runs for s in r], dtype=torch.long)
        rows = np.repeat(np.arange(len(runs)), [len(r) for r in runs])
        items = self.pair_item[slots].numpy()
        inside = items < index.width
        query = sp.csr_matrix((torch.log1p(self.count[slots]).numpy()[inside],
                               (rows[inside], items[inside])),
                              shape=(len(runs), index.width))
        return torch.from_numpy(index.user_knn(query, users.numpy(), num_items, k))


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
        self.item_ids, self.t, self.item_vectors = self.items_of(model)
        self.signals: ServedSignals | None = None
        if model.repeat is not None:
            model.repeat = ServedRepeatScore.copy_of(model.repeat)
            self.signals = model.repeat.signals
        counts = model.neighbors.count[model.user_node].tolist()
        self.applied: dict[int, int] = dict(enumerate(counts))
        self._refreshed: tuple[int, int] | None = None  # (generation, items) of the caches

    @staticmethod
    def items_of(model) -> tuple[list[str], float, Tensor]:
        """``(item ids, t, item vectors [I, E])`` of a checkpoint at its latest event time."""
        with torch.no_grad():
            t = float(model.memory.last_update.max()) if model.num_nodes else 0.0
            return model.items.to_list(), t, model.item_embeddings(t)

    def set_items(self, item_ids: list[str], t: float, vectors: Tensor) -> None:
        """Take the item vectors of a newer checkpoint of this shard (:meth:`items_of`;
        statistics stay)."""
        self.item_ids, self.item_vectors = item_ids, vectors
        self.t = max(self.t, t)
        self._refreshed = None  # the next refresh takes the prior of the new catalogue

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
        the item prior at :attr:`t` and a snapshot of the pair index under ``lock``, its
        matrices built outside it, then pinned; whether it refreshed."""
        signals = self.signals
        if signals is None:
            return False
        with lock:
            key = (signals.generation, len(self.item_ids))
            if key == self._refreshed:
                return False
            if math.isfinite(self.t):
                self.model.repeat.refresh_prior(self.t, key[1])
            index = signals.snapshot()
        index.build()
        with lock:
            signals.pinned, self._refreshed = index, key
        return True

    def top(self, embeddings: np.ndarray, user_ids: list[str], k: int) -> tuple[Tensor, Tensor]:
        """The ``k`` best items of users ``user_ids [B]`` with ``embeddings [B, E]`` by the
        served score: ``(scores [B, k'], item rows [B, k'])``, best first, ``k' = min(k, I)``;
        -inf scores (probability 0) last. The score is the dot product with the item vectors
        mixed with each user's purchase history at :attr:`t` (the model's
        :meth:`~tgn.model.TGNRecommender.mix_history`, one call for the batch), taken by
        :meth:`tgn.repeat.Mixture.top` without building the ``[B, I]`` log-probabilities."""
        scores = torch.from_numpy(embeddings) @ self.item_vectors.T  # [B, I]
        model = self.model
        k = min(k, scores.size(1))
        known = ([b for b, user in enumerate(user_ids) if user in model.users]
                 if model.repeat is not None else [])
        if len(known) < len(user_ids):  # no history to mix: the dot product alone
            values, items = torch.topk(scores, k, dim=1)
        else:
            values, items = torch.full((len(user_ids), k), -torch.inf), torch.zeros(
                len(user_ids), k, dtype=torch.long)
        if not known:
            return values, items
        index = torch.from_numpy(model.users.encode([user_ids[b] for b in known], grow=False))
        rows = torch.tensor(known)
        explore = scores if len(known) == len(user_ids) else scores[rows]  # no copy if all
        t = torch.full((len(known),), self.t, dtype=torch.float64)
        with torch.no_grad():
            values[rows], items[rows] = model.repeat.mixture(explore, index, t).top(k)
        return values, items


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


__all__ = ["APPLY_EVERY_S", "KNN_REFRESH_S", "ServedRepeatScore",
           "ServedSignals", "ServingShard", "UserRow", "follow"]
