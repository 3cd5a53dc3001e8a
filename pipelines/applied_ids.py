"""The ids of the events a shard applied last, saved with its checkpoint.

``ParseAndValidate`` drops an event whose id it has seen recently (a producer that re-sent it).
Its memory of ids (:class:`streaming.validation.RecentIds`) lives in the process, so a restarted
pipeline would let a re-sent copy of an event applied before the restart through. Each shard
therefore keeps the ids of the last events it applied (:class:`AppliedIds`, Arrow strings: about
16 bytes an id) and saves them in its checkpoint with the positions they go with; a starting
pipeline fills the filter from every shard's checkpoint (:func:`load_applied_ids`). Only ids
below the checkpointed positions are saved, so a record the restarted reader reads again (it
starts at the checkpoint) is never taken for a duplicate of itself (with several shards, see
docs/reliability.md).
"""

from __future__ import annotations

import sys
from collections import deque
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

#: Key of the ids in a checkpoint's ``extra``: Arrow IPC stream bytes, a ``[N]`` uint8 tensor.
EXTRA_KEY = "applied_ids"


class AppliedIds:
    """At least the last ``capacity`` event ids applied (whole batches: up to one batch more).

    Args:
        capacity: how many ids to keep.

    >>> ids = AppliedIds(capacity=2)
    >>> ids.add(pa.array(["a", "b"])); ids.add(pa.array(["c", "d"])); ids.to_list()
    ['c', 'd']
    >>> AppliedIds.from_tensor(ids.to_tensor(), capacity=2).to_list()
    ['c', 'd']
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._chunks: deque[pa.Array] = deque()
        self._size = 0

    def add(self, ids: pa.Array | pa.ChunkedArray) -> None:
        """Append a batch's ids, dropping whole old batches beyond the capacity."""
        chunk = pa.concat_arrays(ids.chunks) if isinstance(ids, pa.ChunkedArray) else ids
        if len(chunk) == 0:
            return
        self._chunks.append(chunk)
        self._size += len(chunk)
        while self._size - len(self._chunks[0]) >= self.capacity:
            self._size -= len(self._chunks.popleft())

    def __len__(self) -> int:
        return self._size

    def to_list(self) -> list[str]:
        """The ids, oldest first."""
        return [e for chunk in self._chunks for e in chunk.to_pylist()]

    def to_tensor(self) -> torch.Tensor:
        """``[N]`` uint8: the ids as one Arrow IPC stream (a tensor loads with weights_only)."""
        ids = pa.concat_arrays(list(self._chunks)) if self._chunks else pa.array([], pa.string())
        sink = pa.BufferOutputStream()
        batch = pa.record_batch([ids.cast(pa.string())], names=["event_id"])
        with pa.ipc.new_stream(sink, batch.schema) as writer:
            writer.write_batch(batch)
        return torch.from_numpy(np.frombuffer(sink.getvalue(), np.uint8).copy())

    @classmethod
    def from_tensor(cls, data: torch.Tensor | None, capacity: int) -> AppliedIds:
        """Rebuild from :meth:`to_tensor` (``None``: empty)."""
        ids = cls(capacity)
        if data is not None:
            table = pa.ipc.open_stream(pa.py_buffer(data.numpy().tobytes())).read_all()
            ids.add(table.column("event_id"))
        return ids


def load_applied_ids(state_dir: str | Path | None, num_shards: int) -> list[str]:
    """Every id saved in the shards' checkpoints (shard after shard, oldest first in each)."""
    from pipelines.state import checkpoint_path

    if state_dir is None:
        return []
    ids: list[str] = []
    for shard in range(num_shards):
        path = checkpoint_path(state_dir, shard, num_shards)
        if path.exists():
            extra = torch.load(path, map_location="cpu", weights_only=True)["extra"]
            ids += AppliedIds.from_tensor(extra.get(EXTRA_KEY), sys.maxsize).to_list()
    return ids
