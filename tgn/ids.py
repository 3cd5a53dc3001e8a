"""String ids → dense indices that can grow while a stream runs.

Datasets and the wire carry user and item ids as strings; the model works on dense ``int64``
indices. An :class:`IdMap` hands out indices in first-seen order and never reuses or reorders
them, so a checkpoint's tensors stay aligned with its map when new ids arrive.

>>> ids = IdMap(["u1", "u2"])
>>> ids.encode(["u2", "u9", "u1"]).tolist()
[1, 2, 0]
>>> len(ids), ids.decode([2])
(3, ['u9'])
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np


class IdMap:
    """A growing, order-preserving map from string ids to ``0..len-1``.

    Args:
        ids: initial ids; duplicates keep their first index.
    """

    def __init__(self, ids: Iterable[str] = ()) -> None:
        self._index: dict[str, int] = {}
        self._ids: list[str] = []
        self.add(ids)

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, key: object) -> bool:
        return key in self._index

    def add(self, ids: Iterable[str]) -> int:
        """Append ids not yet known; returns how many were new."""
        before = len(self._ids)
        for key in ids:
            if key not in self._index:
                self._index[key] = len(self._ids)
                self._ids.append(key)
        return len(self._ids) - before

    def encode(self, ids: Sequence[str], grow: bool = True) -> np.ndarray:
        """Indices of ``ids`` as an ``int64`` array ``[len(ids)]``.

        Args:
            ids: string ids.
            grow: add unknown ids (else an unknown id is a ``KeyError``).
        """
        if grow:
            self.add(ids)
        index = self._index
        return np.fromiter((index[k] for k in ids), dtype=np.int64, count=len(ids))

    def decode(self, indices: Iterable[int]) -> list[str]:
        """The string ids of dense ``indices``."""
        return [self._ids[int(i)] for i in indices]

    def to_list(self) -> list[str]:
        """All ids in index order (what a checkpoint stores)."""
        return list(self._ids)
