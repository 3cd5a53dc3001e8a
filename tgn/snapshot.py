"""Discrete-time snapshot baseline: a GConvGRU over weekly user–item purchase graphs.

The optional ``snapshot`` extra (torch-geometric-temporal; see BENCHMARKS.md for its compile
cost) provides :class:`torch_geometric_temporal.nn.recurrent.GConvGRU`, a GRU whose gates are
Chebyshev graph convolutions. It is imported lazily, so this module loads without the extra.

Model. Graph nodes are the users ``0..U-1`` followed by the items ``U..U+I-1``, each with a learned
embedding ``X [N, d]``. Week ``w`` (``floor((t - origin) / 7 days)``) becomes one undirected
snapshot graph (an edge per bought (user, item) pair, weight ``1 + log(count)``) and advances the
node state ``H_w = GConvGRU(X, graph_w, H_{w-1}) [N, d]``. During week ``w + 1`` a user ``u``
scores item ``i`` with ``<X_u + H_w[u], X_i + H_w[i]>``.

Training (train split only): one pass over the weeks per epoch; the state after week ``w`` is
scored on the purchases of week ``w + 1`` with a BPR loss (one uniform negative among the items
seen through week ``w``); backpropagation through time is truncated every ``bptt_weeks`` weeks.

Streaming. As a :class:`~tgn.evaluate.Recommender` the model changes state **only at week
boundaries**: ``update`` buffers events; once a batch (to score or to apply) starts in a later
week, each finished week is folded into ``H``. Scores inside a week therefore come from the state
at the end of the previous week — a discrete-time model by construction, and a handicap against
the event-level models, which see every earlier purchase. A batch that straddles a boundary is
scored from the state before its first event's week.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from tgn.data import EventBatch

SECONDS_PER_WEEK = 7 * 86_400.0
EXTRA_HINT = ("the snapshot baseline needs the optional extra: pip install 'dynllm[snapshot]' "
              "(torch-geometric-temporal; compiles torch-scatter and torch-sparse)")


def available() -> bool:
    """Whether the ``snapshot`` extra (torch-geometric-temporal) can be imported."""
    try:
        import torch_geometric_temporal  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass(frozen=True)
class SnapshotConfig:
    """Sizes and training settings of the snapshot baseline."""

    dim: int = 32  #: node embedding and state width d
    cheb_k: int = 2  #: Chebyshev filter size K (2 = own vector + one hop)
    epochs: int = 10
    lr: float = 0.01
    bptt_weeks: int = 4  #: weeks between optimizer steps (truncated backprop through time)
    seed: int = 0


def week_index(t: Tensor, origin: float) -> Tensor:
    """Week number ``[B]`` (int64, week 0 starts at ``origin``) of event times ``t [B]``."""
    return torch.div(t - origin, SECONDS_PER_WEEK, rounding_mode="floor").long()


def snapshot_graph(users: Tensor, items: Tensor, num_users: int) -> tuple[Tensor, Tensor]:
    """One week's undirected purchase graph.

    Args:
        users: user indices ``[E]``; items: item indices ``[E]`` (node ``num_users + item``).

    Returns:
        ``edge_index [2, 2P]`` over the ``P`` distinct pairs, both directions, and
        ``edge_weight [2P]`` = ``1 + log(times bought that week)``.

    >>> snapshot_graph(torch.tensor([0, 0, 1]), torch.tensor([1, 1, 0]), num_users=2)
    (tensor([[0, 1, 3, 2],
            [3, 2, 0, 1]]), tensor([1.6931, 1.0000, 1.6931, 1.0000]))
    """
    pairs, counts = torch.unique(torch.stack([users, items + num_users]), dim=1,
                                 return_counts=True)
    weight = 1 + torch.log(counts.float())
    return torch.cat([pairs, pairs.flip(0)], dim=1), torch.cat([weight, weight])


class SnapshotModel(nn.Module):
    """Node embeddings ``X [N, d]`` and a GConvGRU cell that advances the state one week."""

    def __init__(self, num_users: int, num_items: int, config: SnapshotConfig) -> None:
        super().__init__()
        from torch_geometric_temporal.nn.recurrent import GConvGRU

        self.num_users, self.num_items = num_users, num_items
        self.embedding = nn.Embedding(num_users + num_items, config.dim)
        nn.init.normal_(self.embedding.weight, std=0.1)
        self.cell = GConvGRU(config.dim, config.dim, K=config.cheb_k)

    def initial_state(self) -> Tensor:
        """All-zero state ``[N, d]``."""
        return self.embedding.weight.new_zeros(self.embedding.weight.shape)

    def step(self, users: Tensor, items: Tensor, state: Tensor) -> Tensor:
        """State ``[N, d]`` after a week whose purchases are ``users [E]``, ``items [E]``."""
        edge_index, edge_weight = snapshot_graph(users, items, self.num_users)
        return self.cell(self.embedding.weight, edge_index, edge_weight, state)

    def node_vectors(self, state: Tensor) -> tuple[Tensor, Tensor]:
        """Scoring vectors ``X + H``, split into users ``[U, d]`` and items ``[I, d]``."""
        z = self.embedding.weight + state
        return z[: self.num_users], z[self.num_users:]


class SnapshotRecommender:
    """A :class:`SnapshotModel` streamed week by week (state changes only at week boundaries).

    Args:
        model: a trained model.
        origin: start of week 0 (epoch seconds), the first training event's time.
    """

    def __init__(self, model: SnapshotModel, origin: float) -> None:
        self.model, self.origin = model, origin
        self.reset_state()

    def reset_state(self) -> None:
        """Back to the zero state before week 0, with nothing buffered."""
        self.state = self.model.initial_state().detach()
        self.week = 0
        self._buffer: list[EventBatch] = []
        self._vectors = self._refresh()

    def _refresh(self) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            return self.model.node_vectors(self.state)

    def score(self, batch: EventBatch) -> Tensor:
        """``[B, num_items]``: dot products with the state at the end of the week before the
        batch's first event (weeks that ended before it are folded in first; they hold only
        events already passed to ``update``, never the batch's own)."""
        if len(batch):
            self._advance_to(int(week_index(batch.t[:1], self.origin)))
        users, items = self._vectors
        return users[batch.users] @ items.T

    def update(self, batch: EventBatch) -> None:
        """Buffer the batch's events; fold every week that has ended into the state."""
        weeks = week_index(batch.t, self.origin)
        for week in torch.unique_consecutive(weeks).tolist():
            self._advance_to(week)
            self._buffer.append(batch[weeks == week])

    def _advance_to(self, week: int) -> None:
        """Close weeks until ``week`` is the open one (no-op if it already is or is earlier)."""
        while week > self.week:
            self._close_week()

    def _close_week(self) -> None:
        """Advance the state by the buffered week (possibly empty)."""
        events = EventBatch.cat(self._buffer) if self._buffer else None
        users = events.users if events is not None else torch.zeros(0, dtype=torch.long)
        items = events.items if events is not None else torch.zeros(0, dtype=torch.long)
        with torch.no_grad():
            self.state = self.model.step(users, items, self.state)
        self.week += 1
        self._buffer = []
        self._vectors = self._refresh()


def _weekly(events: EventBatch, origin: float) -> list[tuple[Tensor, Tensor]]:
    """``(users [E_w], items [E_w])`` for every week ``0..W-1`` (empty weeks included)."""
    weeks = week_index(events.t, origin)
    return [(events.users[weeks == w], events.items[weeks == w])
            for w in range(int(weeks.max()) + 1)]


def fit_snapshot(train: EventBatch, num_users: int, num_items: int,
                 config: SnapshotConfig = SnapshotConfig(),
                 progress: bool = False) -> tuple[SnapshotRecommender, list[float]]:
    """Train a snapshot model on ``train`` (time-ordered); returns it and the loss per epoch."""
    torch.manual_seed(config.seed)
    origin = float(train.t[0])
    weeks = _weekly(train, origin)
    model = SnapshotModel(num_users, num_items, config)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    losses: list[float] = []
    for _ in tqdm(range(config.epochs), desc="snapshot epochs", disable=not progress):
        state, seen = model.initial_state(), torch.zeros(num_items, dtype=torch.bool)
        total, count, pending = 0.0, 0, []
        for w in range(len(weeks) - 1):
            seen[weeks[w][1]] = True
            state = model.step(*weeks[w], state)
            users, items = weeks[w + 1]
            if users.numel():
                pending.append(_bpr(model, state, users, items, seen.nonzero().squeeze(1)))
            if pending and ((w + 1) % config.bptt_weeks == 0 or w == len(weeks) - 2):
                loss = torch.stack(pending).mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                total, count, pending = total + loss.item() * len(pending), count + len(pending), []
                state = state.detach()
        losses.append(total / max(count, 1))
    model.eval()
    return SnapshotRecommender(model, origin), losses


def _bpr(model: SnapshotModel, state: Tensor, users: Tensor, items: Tensor,
         candidates: Tensor) -> Tensor:
    """BPR loss of positives ``(users [E], items [E])`` against one uniform negative each."""
    user_vec, item_vec = model.node_vectors(state)
    negatives = candidates[torch.randint(candidates.numel(), (users.numel(),))]
    u = user_vec[users]
    margin = (u * item_vec[items]).sum(1) - (u * item_vec[negatives]).sum(1)
    return -F.logsigmoid(margin).mean()
