"""Vectorized TGN node memory: a GRU over messages, with tensor-only message aggregation.

Follows the memory of TGN (Rossi et al., 2020, https://arxiv.org/abs/2006.10637) and the
state verbs of PyG's ``torch_geometric.nn.models.tgn.TGNMemory``, but keeps no per-node message
store: :meth:`Memory.update_state` builds the messages of a batch, aggregates them per node with
index/scatter ops (``"last"`` or ``"mean"``) and runs one ``GRUCell`` call over the touched nodes.
Memory and last-update times are registered buffers, so ``state_dict`` saves them exactly.

Gradients: the buffer itself never enters the autograd graph (a graph through a ``[N, D]``
buffer costs dense ``[N, D]`` gradients per read). The rows a training-mode update writes are
kept aside with their graph until :meth:`Memory.detach`; :meth:`Memory.get` serves them, so a
loss computed after the update reaches the GRU and the message path (PyG's lazy update, vectorized).

Message of node ``n`` from an event ``(src, dst, t, msg)`` it takes part in::

    [memory[n] ‖ memory[other] ‖ cos_time(t - last_update[n]) ‖ msg]
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

AGGREGATIONS = ("last", "mean")
SECONDS_PER_HOUR = 3600.0


class TimeEncoder(nn.Module):
    """Cosine time encoding ``cos(w · Δt + b)`` (TGAT, https://arxiv.org/abs/2002.07962).

    Δt is measured in hours and frequencies start at ``10**-linspace(0, 5, dim)`` per hour (the
    log-spaced init of GraphMixer/DyGLib, in a unit that suits shopping): gaps from an hour to
    years all land on some informative dimension, and phases stay small enough for the fast path
    of ``cos`` (it is ~10x slower on arguments of ~1e6).

    Args:
        dim: output width.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.out_channels = dim
        self.lin = nn.Linear(1, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.lin.weight.copy_(1.0 / 10 ** torch.linspace(0, 5, self.out_channels)[:, None])
            self.lin.bias.zero_()

    def forward(self, dt: Tensor) -> Tensor:
        """Encode time gaps ``dt [*]`` (seconds) as ``[*, dim]``."""
        hours = (dt / SECONDS_PER_HOUR).to(self.lin.weight.dtype).unsqueeze(-1)
        return torch.cos(self.lin(hours))


class Memory(nn.Module):
    """Per-node memory ``[num_nodes, memory_dim]`` updated by a GRU cell from event messages.

    Args:
        num_nodes: initial number of nodes (see :meth:`grow`).
        memory_dim: memory width ``D``.
        msg_dim: width of raw event features (e.g. price and quantity).
        time_encoder: shared :class:`TimeEncoder` (its width is the time width ``T``).
        aggregation: ``"last"`` (each node keeps its latest message of a batch) or ``"mean"``.
    """

    def __init__(self, num_nodes: int, memory_dim: int, msg_dim: int,
                 time_encoder: TimeEncoder, aggregation: str = "last") -> None:
        super().__init__()
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"unknown aggregation {aggregation!r}; expected one of {AGGREGATIONS}")
        self.memory_dim, self.msg_dim, self.aggregation = memory_dim, msg_dim, aggregation
        self.time_enc = time_encoder
        self.gru = nn.GRUCell(2 * memory_dim + time_encoder.out_channels + msg_dim, memory_dim)
        self.register_buffer("memory", torch.zeros(num_nodes, memory_dim))
        # float64: epoch seconds (~1.5e9) lose minutes of precision in float32
        self.register_buffer("last_update", torch.zeros(num_nodes, dtype=torch.float64))
        self._fresh: tuple[Tensor, Tensor] | None = None  # (row of node or -1 [N], values [U, D])

    @property
    def num_nodes(self) -> int:
        return self.memory.size(0)

    def reset_parameters(self) -> None:
        self.gru.reset_parameters()
        self.reset_state()

    def reset_state(self) -> None:
        """Zero every node's memory and last-update time."""
        self.memory.zero_()
        self.last_update.zero_()
        self._fresh = None

    def detach(self) -> None:
        """Cut the memory out of the autograd graph (call after each optimiser step)."""
        self._fresh = None

    def get(self, nodes: Tensor) -> Tensor:
        """Memory rows ``[*nodes.shape, D]``; rows updated since :meth:`detach` keep gradients."""
        rows = self.memory.index_select(0, nodes.reshape(-1)).view(*nodes.shape, self.memory_dim)
        if self._fresh is None:
            return rows
        row_of, values = self._fresh
        row = row_of[nodes]
        return torch.where((row >= 0).unsqueeze(-1), values[row.clamp_min(0)], rows)

    def grow(self, num_nodes: int) -> None:
        """Add zero-memory nodes up to ``num_nodes`` (no-op if already that large)."""
        extra = num_nodes - self.num_nodes
        if extra > 0:
            self.memory = torch.cat([self.memory, self.memory.new_zeros(extra, self.memory_dim)])
            self.last_update = torch.cat([self.last_update, self.last_update.new_zeros(extra)])

    def update_state(self, src: Tensor, dst: Tensor, t: Tensor, msg: Tensor) -> None:
        """Apply a batch of events (in time order) to the memory of both endpoints.

        Args:
            src: source nodes ``[B]`` (int64).
            dst: destination nodes ``[B]`` (int64).
            t: event times ``[B]`` (float64 seconds, non-decreasing).
            msg: raw event features ``[B, msg_dim]``.
        """
        num_events = src.numel()
        node = torch.cat([src, dst])  # [2B]: each event updates both endpoints
        other = torch.cat([dst, src])
        nodes, inverse = torch.unique(node, return_inverse=True)  # [U], [2B]
        if self.aggregation == "last":
            # latest event per node; for one event the dst copy (side 1) wins over src (side 0)
            side = torch.arange(2, device=node.device).repeat_interleave(num_events)
            order = torch.arange(num_events, device=node.device).repeat(2) * 2 + side
            latest = order.new_full((nodes.numel(),), -1).scatter_reduce_(0, inverse, order, "amax")
            pick = (latest % 2) * num_events + latest // 2  # [U] positions in the 2B arrays
            when = t.repeat(2)[pick]
            message = self._messages(node[pick], other[pick], when, msg.repeat(2, 1)[pick])
        else:
            full = self._messages(node, other, t.repeat(2), msg.repeat(2, 1))  # [2B, M]
            count = torch.zeros(nodes.numel(), device=node.device).index_add_(
                0, inverse, torch.ones_like(inverse, dtype=full.dtype))
            message = full.new_zeros(nodes.numel(), full.size(1)).index_add_(0, inverse, full)
            message = message / count[:, None]
            when = self.last_update.new_zeros(nodes.numel()).scatter_reduce_(
                0, inverse, t.repeat(2), "amax", include_self=False)
        updated = self.gru(message, self.get(nodes))  # [U, D]
        self.memory[nodes] = updated.detach()
        # a late event (older than the node's clock) must not turn the clock back
        self.last_update[nodes] = torch.maximum(self.last_update[nodes], when)
        if torch.is_grad_enabled() and updated.requires_grad:
            row_of = torch.full((self.num_nodes,), -1, dtype=torch.long, device=nodes.device)
            if self._fresh is not None:  # an earlier update of this step keeps its rows
                old_rows, old_values = self._fresh
                keep = (old_rows >= 0) & (row_of.scatter(0, nodes, 0) < 0)
                row_of[keep] = torch.arange(int(keep.sum()), device=nodes.device)
                kept = old_values[old_rows[keep]]
                row_of[nodes] = torch.arange(nodes.numel(), device=nodes.device) + kept.size(0)
                self._fresh = (row_of, torch.cat([kept, updated]))
            else:
                row_of[nodes] = torch.arange(nodes.numel(), device=nodes.device)
                self._fresh = (row_of, updated)

    def _messages(self, node: Tensor, other: Tensor, t: Tensor, msg: Tensor) -> Tensor:
        """Messages ``[E, 2D + T + msg_dim]`` for nodes ``node [E]`` meeting ``other [E]``."""
        dt = (t - self.last_update[node]).clamp_min(0)
        return torch.cat([self.get(node), self.get(other), self.time_enc(dt),
                          msg.to(self.memory.dtype)], dim=1)


def gru_input_dim(memory_dim: int, time_dim: int, msg_dim: int) -> int:
    """Width of a memory message (the GRU input), for benchmarks that mirror the memory."""
    return 2 * memory_dim + time_dim + msg_dim


__all__ = ["AGGREGATIONS", "Memory", "TimeEncoder", "gru_input_dim"]
