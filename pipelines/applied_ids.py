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
        self._chunks: deque[pa.RecordBatch] = deque()
        self._size = 0

    def add(self, ids: pa.Array | pa.ChunkedArray, partitions: np.ndarray | None = None,
            offsets: np.ndarray | None = None) -> None:
        """Append a batch's ids (with the partition and offset each was read at, if known),
        dropping whole old batches beyond the capacity."""
        chunk = ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids
        if len(chunk) == 0:
            return
        unknown = np.full(len(chunk), -1)
        self._chunks.append(pa.record_batch(
            [chunk.cast(pa.string()),
             pa.array(unknown if partitions is None else partitions, pa.int32()),
             pa.array(unknown if offsets is None else offsets, pa.int64())],
            names=["event_id", "partition", "offset"]))
        self._size += len(chunk)
        while self._size - len(self._chunks[0]) >= self.capacity:
            self._size -= len(self._chunks.popleft())

    def __len__(self) -> int:
        return self._size

    def to_list(self, below: dict[int, int] | None = None) -> list[str]:
        """The ids, oldest first; with ``below``, only those read below these offsets (or at
        an unknown place)."""
        out: list[str] = []
        for chunk in self._chunks:
            if below is not None:
                part = chunk.column(1).to_numpy()
                floor = np.array([below.get(int(p), 0) for p in part], np.int64)
                keep = (part < 0) | (chunk.column(2).to_numpy() < floor)
                chunk = chunk.filter(pa.array(keep))
            out += chunk.column(0).to_pylist()
        return out

    def to_tensor(self) -> torch.Tensor:
        """``[N]`` uint8: the ids as one Arrow IPC stream (a tensor loads with weights_only)."""
        sink = pa.BufferOutputStream()
        table = (pa.Table.from_batches(list(self._chunks)) if self._chunks else
                 pa.table({"event_id": pa.array([], pa.string()),
                           "partition": pa.array([], pa.int32()),
                           "offset": pa.array([], pa.int64())}))
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        return torch.from_numpy(np.frombuffer(sink.getvalue(), np.uint8).copy())

    @classmethod
    def from_tensor(cls, data: torch.Tensor | None, capacity: int) -> AppliedIds:
        """Rebuild from :meth:`to_tensor` (``None``: empty; ids saved without their places by
        an older version count as read at an unknown place)."""
        ids = cls(capacity)
        if data is not None:
            table = pa.ipc.open_stream(pa.py_buffer(data.numpy().tobytes())).read_all()
            if "offset" in table.column_names:
                ids.add(table.column("event_id"), table.column("partition").to_numpy(),
                        table.column("offset").to_numpy())
            else:
                ids.add(table.column("event_id"))
        return ids


def load_applied_ids(state_dir: str | Path | None, num_shards: int,
                     below: dict[int, int] | None = None) -> list[str]:
    """Every id saved in the shards' checkpoints (shard after shard, oldest first in each).

    Args:
        below: only ids read below these offsets (the reader's start): a record read again
            after a restart meets the filter as it did the first time, so a restart from one
            shard's older checkpoint than another's does not take the re-read records for
            duplicates.
    """
    from pipelines.state import checkpoint_path

    if state_dir is None:
        return []
    ids: list[str] = []
    for shard in range(num_shards):
        path = checkpoint_path(state_dir, shard, num_shards)
        if path.exists():
            extra = torch.load(path, map_location="cpu", weights_only=True)["extra"]
            ids += AppliedIds.from_tensor(extra.get(EXTRA_KEY), sys.maxsize).to_list(below)
    return ids
