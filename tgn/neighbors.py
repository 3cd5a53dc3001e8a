"""Recent-neighbour buffer: a dense ring of each node's latest neighbours, updated per batch.

The vectorized counterpart of PyG's ``LastNeighborLoader``: buffers ``[num_nodes, size]`` hold
neighbour ids (``-1`` = empty slot) and edge times; :meth:`NeighborBuffer.insert` writes a whole
batch with sort/scatter ops. Slot order carries no meaning; recency is in the stored times.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class NeighborBuffer(nn.Module):
    """The ``size`` most recent neighbours of every node, as registered buffers.

    Args:
        num_nodes: initial number of nodes (see :meth:`grow`).
        size: neighbours kept per node.
    """

    def __init__(self, num_nodes: int, size: int) -> None:
        super().__init__()
        self.size = size
        self.register_buffer("neighbor", torch.full((num_nodes, size), -1, dtype=torch.long))
        self.register_buffer("time", torch.zeros(num_nodes, size, dtype=torch.float64))
        self.register_buffer("count", torch.zeros(num_nodes, dtype=torch.long))  # inserts so far

    @property
    def num_nodes(self) -> int:
        return self.neighbor.size(0)

    def reset_state(self) -> None:
        """Forget every neighbour."""
        self.neighbor.fill_(-1)
        self.time.zero_()
        self.count.zero_()

    def grow(self, num_nodes: int) -> None:
        """Add empty rows up to ``num_nodes`` (no-op if already that large)."""
        extra = num_nodes - self.num_nodes
        if extra > 0:
            empty = self.neighbor.new_full((extra, self.size), -1)
            self.neighbor = torch.cat([self.neighbor, empty])
            self.time = torch.cat([self.time, self.time.new_zeros(extra, self.size)])
            self.count = torch.cat([self.count, self.count.new_zeros(extra)])

    def insert(self, src: Tensor, dst: Tensor, t: Tensor) -> None:
        """Record events ``src[i] — dst[i]`` at ``t[i]`` (``[B]`` each, in time order) both ways."""
        node = torch.stack([src, dst], dim=1).reshape(-1)  # [2B], event-major order
        nbr = torch.stack([dst, src], dim=1).reshape(-1)
        when = t.repeat_interleave(2)
        perm = torch.argsort(node, stable=True)  # group by node, keep time order inside
        node, nbr, when = node[perm], nbr[perm], when[perm]
        nodes, per_node = torch.unique_consecutive(node, return_counts=True)
        first = torch.cumsum(per_node, 0) - per_node
        rank = torch.arange(node.numel(), device=node.device) - first.repeat_interleave(per_node)
        keep = rank >= per_node.repeat_interleave(per_node) - self.size  # only the last `size`
        slot = (self.count[node] + rank) % self.size
        node, slot = node[keep], slot[keep]
        self.neighbor[node, slot] = nbr[keep]
        self.time[node, slot] = when[keep]
        self.count.index_add_(0, nodes, per_node)

    def forward(self, nodes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Neighbours of ``nodes [B]``: ids, times and valid flags, ``[B, size]`` each."""
        neighbor = self.neighbor[nodes]
        return neighbor, self.time[nodes], neighbor >= 0
