"""Time-correct profile lookup: the facet vectors a model may use for an event at time ``t``.

A profile carries the timestamp of the last event it was written from. An event of user ``u`` at
time ``t`` may only use a profile of ``u`` whose timestamp is strictly before ``t`` (a profile
written from the same basket would leak the answer); among those, the latest wins.

The lookup is two ``searchsorted`` calls over integer keys, no Python loop per event: profile
timestamps are replaced by their rank among the distinct profile timestamps, a query time ``t`` by
the number of distinct profile timestamps ``< t``, and ``(user, rank)`` is packed into one int64.

Shapes: ``P`` profiles, ``B`` queries, ``F`` facets, ``E`` text embedding width.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor


@dataclass
class ProfileLookup:
    """Result of :meth:`ProfileTable.lookup`.

    Attributes:
        facets: [B, F, E] float32 facet vectors (zeros where there is no valid profile).
        has_profile: [B] bool, a valid profile exists.
        row: [B] int64 row of the profile in the table's sorted order, -1 where none.
    """

    facets: Tensor
    has_profile: Tensor
    row: Tensor


class ProfileTable:
    """All profile versions of all users, sorted by ``(user_index, ts)``.

    Args:
        user_index: [P] int64 dense user index (the graph model's user numbering).
        ts: [P] timestamp of the last event each profile saw (same unit as query times).
        vectors: [P, F, E] facet text embeddings.
        fallback: [P] bool, the profile was written by the rule-based fallback, not the LLM.
    """

    def __init__(self, user_index: Tensor, ts: Tensor, vectors: Tensor,
                 fallback: Tensor | None = None) -> None:
        num = user_index.shape[0]
        if ts.shape != (num,) or vectors.shape[0] != num or vectors.dim() != 3:
            raise ValueError(f"expected user_index [P], ts [P], vectors [P, F, E]; got "
                             f"{list(user_index.shape)}, {list(ts.shape)}, {list(vectors.shape)}")
        fallback = torch.zeros(num, dtype=torch.bool) if fallback is None else fallback.bool()
        user_index, ts = user_index.long(), ts.double()
        order = np.lexsort((ts.numpy(), user_index.numpy()))  # stable: by user, then ts
        order = torch.from_numpy(order)
        self.user_index = user_index[order]
        self.ts = ts[order]
        self.vectors = vectors[order].float()
        self.fallback = fallback[order]
        self.source_row = order  #: [P] position of each sorted row in the input
        self._distinct_ts = torch.unique(self.ts)  # sorted
        self._stride = self._distinct_ts.numel() + 1
        self._keys = self.user_index * self._stride + torch.from_numpy(self._rank(self.ts))

    @classmethod
    def from_export(cls, user_ids: Sequence[str], ts: Sequence[float] | np.ndarray,
                    vectors: np.ndarray | Tensor, fallback: Sequence[bool] | np.ndarray | None,
                    user_to_index: Mapping[str, int]) -> ProfileTable:
        """Build from a profile store export, keeping only users the model knows.

        Args:
            user_ids: [P] string user ids.
            ts: [P] last-seen event time of each profile.
            vectors: [P, F, E] facet vectors.
            fallback: [P] fallback flags, or None.
            user_to_index: the model's user id → dense index map; other users are dropped.
        """
        keep = np.array([u in user_to_index for u in user_ids], dtype=bool)
        index = torch.tensor([user_to_index[u] for u, k in zip(user_ids, keep, strict=True) if k],
                             dtype=torch.long)
        vectors = torch.as_tensor(np.asarray(vectors)[keep])
        flags = None if fallback is None else torch.as_tensor(np.asarray(fallback, bool)[keep])
        return cls(index, torch.as_tensor(np.asarray(ts, np.float64)[keep]), vectors, flags)

    @classmethod
    def empty(cls, num_facets: int = 4, text_dim: int = 384) -> ProfileTable:
        """A table with no profiles: every lookup falls back."""
        return cls(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.float64),
                   torch.zeros(0, num_facets, text_dim))

    def __len__(self) -> int:
        return self.user_index.shape[0]

    @property
    def num_facets(self) -> int:
        """``F``."""
        return self.vectors.shape[1]

    @property
    def text_dim(self) -> int:
        """``E``."""
        return self.vectors.shape[2]

    def _rank(self, t: Tensor) -> np.ndarray:
        """Number of distinct profile timestamps ``< t``, [B] int64."""
        return np.searchsorted(self._distinct_ts.numpy(), np.asarray(t.numpy(), np.float64))

    def latest_rows(self, user_index: Tensor, t: Tensor) -> Tensor:
        """Row of each user's latest profile with ``ts < t``, or -1.

        The bookkeeping runs on NumPy views of the same arrays (a handful of calls of about a
        microsecond each, where the same torch calls cost several each: this runs once per
        streamed batch, on a few dozen users).

        Args:
            user_index: [B] int64.
            t: [B] query times.

        Returns:
            [B] int64 rows into this table's sorted arrays.
        """
        if len(self) == 0:
            return torch.full_like(user_index, -1, dtype=torch.long)
        users = np.asarray(user_index.numpy(), np.int64)
        # rows with key < query are earlier users or this user's profiles strictly before t
        row = np.searchsorted(self._keys.numpy(), users * self._stride + self._rank(t)) - 1
        valid = (row >= 0) & (self.user_index.numpy()[np.maximum(row, 0)] == users)
        return torch.from_numpy(np.where(valid, row, -1))

    def lookup(self, user_index: Tensor, t: Tensor) -> ProfileLookup:
        """Facet vectors of the latest profile strictly before ``t`` for each query.

        Args:
            user_index: [B] int64 user indices.
            t: [B] query times.

        Returns:
            A :class:`ProfileLookup` ([B, F, E] facets, [B] mask, [B] rows).
        """
        row = self.latest_rows(user_index, t)
        has = row >= 0
        if len(self) == 0:
            facets = torch.zeros(row.shape[0], self.num_facets, self.text_dim)
        else:
            facets = self.vectors[row.clamp(min=0)] * has.view(-1, 1, 1)
        return ProfileLookup(facets, has, row)

    def with_users_shuffled(self, seed: int = 0) -> ProfileTable:
        """The same profile versions handed to other users: the users that have profiles are
        permuted at random (a control: if the model reads the profiles' content, this hurts).

        Each user gets all versions of one other user, timestamps included, so lookups stay
        time-correct (a version is still written from events before the query time).
        """
        owners = self.user_index.unique()  # sorted
        order = torch.randperm(owners.numel(), generator=torch.Generator().manual_seed(seed))
        target = torch.empty_like(order)
        target[order] = order.roll(-1)  # one random cycle: nobody keeps their own profiles
        new_owner = owners[target][torch.searchsorted(owners, self.user_index)]
        return ProfileTable(new_owner, self.ts, self.vectors, self.fallback)

    def to_state(self) -> dict[str, Tensor]:
        """Tensors to save beside a checkpoint (sorted order)."""
        return {"user_index": self.user_index, "ts": self.ts, "vectors": self.vectors,
                "fallback": self.fallback}

    @classmethod
    def from_state(cls, state: Mapping[str, Tensor]) -> ProfileTable:
        """Inverse of :meth:`to_state`."""
        return cls(state["user_index"], state["ts"], state["vectors"], state["fallback"])


def read_profile_store(path: str | Path, hops: int | None = None
                       ) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """Read every profile version from a profile store file (the ``profiles`` room's SQLite).

    Reads the file format, not the ``profiles`` package (``tgn`` never imports it): columns
    ``user_id, ts, hops, fallback, dim, vectors`` of table ``profiles``, vectors as float32
    ``[4, dim]`` blobs.

    Args:
        path: the store file.
        hops: keep only profiles written with this prompt kind (2 graph-aware, 1 own history).

    Returns:
        ``(user_ids [P], ts [P] float64, vectors [P, 4, E] float32, fallback [P] bool)``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no profile store at {path}")
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        rows = db.execute("SELECT user_id, ts, fallback, dim, vectors FROM profiles "
                          "WHERE (? IS NULL OR hops = ?) ORDER BY user_id, ts",
                          (hops, hops)).fetchall()
    dims = {r[3] for r in rows}
    if len(dims) > 1:
        raise ValueError(f"{path}: profiles of different widths {sorted(dims)}")
    dim = dims.pop() if dims else 384
    vectors = np.frombuffer(b"".join(r[4] for r in rows), np.float32).reshape(-1, 4, dim)
    return ([r[0] for r in rows], np.array([r[1] for r in rows], np.float64), vectors.copy(),
            np.array([bool(r[2]) for r in rows], bool))


def read_profile_texts(path: str | Path, user_id: str, ts: float, hops: int | None = None
                       ) -> tuple[str, str, str, str] | None:
    """The four facet texts of ``user_id``'s profile written at ``ts`` (None if absent).

    Args:
        path: the profile store file.
        user_id: the user.
        ts: the profile's last-seen event time (as in :class:`ProfileTable`).
        hops: prompt kind, when the store holds several.
    """
    with sqlite3.connect(f"file:{Path(path)}?mode=ro", uri=True) as db:
        row = db.execute("SELECT crowd, interests, categories, brands FROM profiles "
                         "WHERE user_id = ? AND ts = ? AND (? IS NULL OR hops = ?) "
                         "ORDER BY version DESC LIMIT 1", (user_id, ts, hops, hops)).fetchone()
    return None if row is None else tuple(row)  # type: ignore[return-value]
