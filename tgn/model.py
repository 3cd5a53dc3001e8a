"""The temporal graph recommender: memory + recent neighbours + attention + time projection.

Users and items share one node space: a user's node is ``user_node[user_index]``, an item's
``item_node[item_index]``. Nodes are handed out in first-seen order, so the state grows when a
stream brings unseen users or items (:meth:`TGNRecommender.encode`) without retraining.

Streaming use from a checkpoint::

    model = TGNRecommender.load("run/model.pt")
    batch = model.encode(events_table)          # grows id maps and state for unseen ids
    scores = model.score(batch)                 # [B, num_items], all from the same state
    model.update(batch)                         # then apply the events
    model.save("run/live.pt")                   # weights + state + id maps, one atomic file
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch
from torch import Tensor, nn

from tgn.data import MSG_DIM, EventBatch, encode_events
from tgn.embedding import IdentityHead, TemporalAttention, TimeProjection
from tgn.ids import IdMap
from tgn.memory import Memory, TimeEncoder
from tgn.neighbors import NeighborBuffer
from tgn.repeat import RepeatScore

CHECKPOINT_FORMAT = 1


@dataclass
class TGNConfig:
    """Model sizes; defaults follow TGN's paper setup scaled to a 2-core CPU."""

    memory_dim: int = 100
    time_dim: int = 32  # cosine features; 100 (TGN) costs 2x in attention on 2 cores
    embed_dim: int = 100
    heads: int = 2
    neighbors: int = 5  # TGN uses 10, DynLLM 3: 5 halves the attention cost of 10
    aggregation: str = "last"  # TGN's best-performing aggregator
    msg_dim: int = MSG_DIM
    #: mix the dot product with the purchase history: the repeat/explore mixture of
    #: :mod:`tgn.repeat`; a saved config without the field (older checkpoints) loads as ``False``
    repeat: bool = True


class TGNRecommender(nn.Module):
    """Scores every catalog item for a user by a dot product of temporal embeddings, and, with
    ``config.repeat``, turns the dot products into a repeat/explore mixture over the purchase
    history (:class:`~tgn.repeat.RepeatScore`).

    With the mixture, the score of user ``u`` and item ``i`` at time ``t`` is a log-probability:
    ``log P(repeat) + log softmax_history(g)`` for the user's own items, ``log P(explore) +
    log softmax_others(prior + w·<user_embeddings(u, t), item_embeddings(t)[i]>)`` for the
    others; the user embeddings (what the pipeline emits) are the dot-product part, see
    :meth:`score_users`.

    Args:
        config: model sizes.
        users: user id map (copied reference; grows with the stream).
        items: item id map.
        user_head: ``head(z [B, E], user_index [B], t [B]) -> [B, E]`` applied to user
            embeddings (identity by default; the DynLLM fusion head plugs in here).
    """

    def __init__(self, config: TGNConfig | None = None, users: IdMap | None = None,
                 items: IdMap | None = None, user_head: nn.Module | None = None) -> None:
        super().__init__()
        self.config = config = config or TGNConfig()
        self.users, self.items = users or IdMap(), items or IdMap()
        self.time_enc = TimeEncoder(config.time_dim)
        self.memory = Memory(0, config.memory_dim, config.msg_dim, self.time_enc,
                             config.aggregation)
        self.neighbors = NeighborBuffer(0, config.neighbors)
        self.attention = TemporalAttention(config.memory_dim, self.time_enc, config.embed_dim,
                                           config.heads)
        self.projection = TimeProjection(config.embed_dim)
        self.user_head = user_head or IdentityHead()
        self.register_buffer("user_node", torch.zeros(0, dtype=torch.long))
        self.register_buffer("item_node", torch.zeros(0, dtype=torch.long))
        # created last, so the other weights draw the same numbers with and without it
        self.repeat = RepeatScore() if config.repeat else None
        self._sync_nodes()

    @property
    def num_nodes(self) -> int:
        return self.memory.num_nodes

    def _sync_nodes(self) -> None:
        """Give graph nodes to ids added to the maps since the last call."""
        start = self.num_nodes
        new_users = len(self.users) - self.user_node.numel()
        new_items = len(self.items) - self.item_node.numel()
        nodes = torch.arange(start, start + new_users + new_items)
        self.user_node = torch.cat([self.user_node, nodes[:new_users]])
        self.item_node = torch.cat([self.item_node, nodes[new_users:]])
        self.memory.grow(start + new_users + new_items)
        self.neighbors.grow(start + new_users + new_items)

    def encode(self, events: pa.Table) -> EventBatch:
        """Encode an ``EVENT_SCHEMA`` table, growing id maps and state for unseen ids."""
        batch = encode_events(events, self.users, self.items, grow=True)
        self._sync_nodes()
        return batch

    def reset_state(self) -> None:
        """Forget all events (memory, last-update times, neighbours, purchase history); keeps
        weights and ids."""
        self.memory.reset_state()
        self.neighbors.reset_state()
        if self.repeat is not None:
            self.repeat.reset_state()

    def detach(self) -> None:
        """Cut the state out of the autograd graph (after each optimiser step)."""
        self.memory.detach()

    def update(self, batch: EventBatch) -> None:
        """Apply events to the memory, the neighbour buffer and the purchase history
        (gradients flow in train mode)."""
        src, dst = self.user_node[batch.users], self.item_node[batch.items]
        self.memory.update_state(src, dst, batch.t, batch.feats)
        self.neighbors.insert(src, dst, batch.t)
        if self.repeat is not None:
            self.repeat.update(batch.users, batch.items, batch.t)

    @torch.no_grad()
    def apply_events(self, events: EventBatch, batch_size: int = 2000) -> None:
        """:meth:`update` with ``events`` in time-ordered batches of ``batch_size``, without
        gradients, continuing from the current state (warm-up, checkpoint state)."""
        for batch in events.batches(batch_size):
            self.update(batch)

    def embed_nodes(self, nodes: Tensor, t: Tensor) -> Tensor:
        """Attention embeddings ``[B, E]`` of ``nodes [B]`` at times ``t [B]`` (float64 s)."""
        neighbor, when, valid = self.neighbors(nodes)  # [B, K] each
        dt = (t.unsqueeze(1) - when).clamp_min(0)
        degree = self.neighbors.count[nodes]
        return self.attention(self.memory, nodes, neighbor, dt, valid, degree)

    def user_embeddings(self, user_index: Tensor, t: Tensor) -> Tensor:
        """Final user embeddings ``[B, E]`` for users ``[B]`` at times ``t [B]``."""
        nodes = self.user_node[user_index]
        z = self.embed_nodes(nodes, t)
        z = self.projection(z, (t - self.memory.last_update[nodes]).clamp_min(0))
        return self.user_head(z, user_index, t)

    def item_embeddings(self, t: float | Tensor, items: Tensor | None = None,
                        chunk: int = 8192) -> Tensor:
        """Item embeddings ``[N, E]`` at time ``t`` (scalar or ``[N]``); all items by default."""
        items = torch.arange(self.item_node.numel()) if items is None else items
        t = torch.as_tensor(t, dtype=torch.float64).expand(items.numel())
        parts = [self.embed_nodes(self.item_node[items[i:i + chunk]], t[i:i + chunk])
                 for i in range(0, items.numel(), chunk)]
        return torch.cat(parts) if parts else self.memory.memory.new_zeros(0,
                                                                           self.config.embed_dim)

    def mix_history(self, scores: Tensor, user_index: Tensor, t: Tensor) -> Tensor:
        """Final scores ``[B, N]`` from dot products ``scores [B, N]`` of users ``[B]`` at
        ``t [B]``: the repeat/explore mixture (:meth:`~tgn.repeat.RepeatScore.mix`) with the dot
        product as the explore logit; the dot products unchanged without ``config.repeat``."""
        if self.repeat is None:
            return scores
        return self.repeat.mix(scores, user_index, t)

    @torch.no_grad()
    def score_users(self, user_index: Tensor, t: Tensor, item_time: float | Tensor | None = None,
                    mix: bool = True) -> Tensor:
        """Full scores ``[B, num_items]``: dot product of the users' embeddings at ``t [B]``
        with every item's embedding at ``item_time`` (default ``t[0]``), mixed with the
        purchase history (:meth:`mix_history`)."""
        users = self.user_embeddings(user_index, t)
        scores = users @ self.item_embeddings(t[0] if item_time is None else item_time).T
        return self.mix_history(scores, user_index, t) if mix else scores

    @torch.no_grad()
    def score(self, batch: EventBatch) -> Tensor:
        """Scores ``[B, num_items]`` of every item for each event's user, from the current state.

        Items are embedded once at the batch's first time, so all candidates share one state;
        the repeat term sees only purchases applied before the batch.
        """
        return self.score_users(batch.users, batch.t)

    def save(self, path: str | Path, extra: dict[str, Any] | None = None) -> None:
        """Write weights, state and id maps to one file, atomically (temp file + rename)."""
        write_checkpoint(self.checkpoint_payload(extra), path)

    def checkpoint_payload(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """What :meth:`save` writes. The tensors are the live ones: clone them to keep a
        snapshot while the model goes on (the id lists are copies)."""
        return {"format": CHECKPOINT_FORMAT, "config": asdict(self.config),
                "users": self.users.to_list(), "items": self.items.to_list(),
                "state": self.state_dict(), "extra": extra or {}}

    @classmethod
    def load(cls, path: str | Path, user_head: nn.Module | None = None,
             statistics: bool = True) -> TGNRecommender:
        """Rebuild a model saved by :meth:`save` (pass the same kind of ``user_head``);
        ``statistics=False`` leaves the repeat term's purchase statistics empty (a reader that
        keeps its own, like the changelog server, skips rebuilding them: ~0.2 s on cj26)."""
        return cls.from_payload(torch.load(path, map_location="cpu", weights_only=True),
                                user_head, statistics, source=path)

    @classmethod
    def from_payload(cls, payload: dict[str, Any], user_head: nn.Module | None = None,
                     statistics: bool = True,
                     source: str | Path = "checkpoint") -> TGNRecommender:
        """Rebuild a model from a :meth:`checkpoint_payload` already read (``source`` names it
        in errors); the tensors are copied into the new model, so one payload can build many."""
        if payload.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{source}: unsupported checkpoint format {payload.get('format')!r}")
        config = TGNConfig(**{"repeat": False, **payload["config"]})  # older: no repeat term
        model = cls(config, IdMap(payload["users"]),
                    IdMap(payload["items"]), user_head)
        state = payload["state"]
        if not statistics and model.repeat is not None:
            state = {**state, "repeat._extra_state": model.repeat.get_extra_state()}  # empty
        model.load_state_dict(state)
        model.checkpoint_extra = payload["extra"]
        return model


def write_checkpoint(payload: dict[str, Any], path: str | Path) -> None:
    """Write a :meth:`TGNRecommender.checkpoint_payload` to ``path`` atomically (temp file +
    rename), so a crash mid-write leaves the previous checkpoint intact."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
