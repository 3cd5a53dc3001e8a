"""A dataset directory: ``events.parquet``, ``items.parquet``, ``users.parquet``, ``meta.json``.

``meta.json`` records the schema version, counts, the time range and the chronological split
boundaries (70/15/15 of events by time), so every consumer splits the same way::

    {"schema_version": 1, "name": "completejourney", "counts": {"events": …, "users": …,
     "items": …}, "time_range": {"start": …, "end": …},
     "split": {"fractions": [0.7, 0.15, 0.15], "train_end": …, "val_end": …}}

An event with ``ts < train_end`` is training data, ``train_end <= ts < val_end`` validation,
the rest test.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from streaming.errors import UsageError
from streaming.schema import EVENT_SCHEMA, ITEM_SCHEMA, SCHEMA_VERSION

SPLIT_FRACTIONS = (0.70, 0.15, 0.15)
SPLITS = ("train", "val", "test")


def split_boundaries(ts: np.ndarray, fractions: tuple[float, float, float] = SPLIT_FRACTIONS):
    """Timestamps ``(train_end, val_end)`` that cut sorted event times ``ts`` by count fractions.

    Events sharing a timestamp stay on one side, so a basket is never split.
    """
    if len(ts) == 0:
        return 0.0, 0.0
    ts = np.sort(np.asarray(ts, dtype=np.float64))
    train_end = float(ts[min(int(len(ts) * fractions[0]), len(ts) - 1)])
    val_end = float(ts[min(int(len(ts) * (fractions[0] + fractions[1])), len(ts) - 1)])
    return train_end, val_end


@dataclass
class Dataset:
    """An in-memory dataset: Arrow tables plus the metadata dict."""

    events: pa.Table
    items: pa.Table
    users: pa.Table
    meta: dict[str, Any]

    @classmethod
    def load(cls, path: str | Path) -> Dataset:
        """Read a dataset directory; a missing directory or file is a :class:`UsageError`."""
        path = Path(path)
        missing = [n for n in ("events.parquet", "items.parquet", "meta.json")
                   if not (path / n).exists()]
        if missing:
            raise UsageError(f"{path} is not a dataset directory (missing {', '.join(missing)})")
        users_path = path / "users.parquet"
        users = pq.read_table(users_path) if users_path.exists() else pa.table({"user_id": []})
        return cls(
            events=pq.read_table(path / "events.parquet"),
            items=pq.read_table(path / "items.parquet"),
            users=users,
            meta=json.loads((path / "meta.json").read_text()),
        )

    def split(self, name: str) -> pa.Table:
        """The events of split ``name`` (``train``, ``val`` or ``test``), in event-time order."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {SPLITS}")
        ts = self.events.column("ts")
        train_end, val_end = self.meta["split"]["train_end"], self.meta["split"]["val_end"]
        masks = {
            "train": pc.less(ts, train_end),
            "val": pc.and_(pc.greater_equal(ts, train_end), pc.less(ts, val_end)),
            "test": pc.greater_equal(ts, val_end),
        }
        return self.events.filter(masks[name])


def write_dataset(
    path: str | Path,
    events: pa.Table,
    items: pa.Table,
    users: pa.Table | None = None,
    name: str = "custom",
    extra_meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Sort, check and write a dataset directory; returns the ``meta.json`` contents."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    events = events.select(EVENT_SCHEMA.names).cast(EVENT_SCHEMA)
    events = events.sort_by([("ts", "ascending"), ("event_id", "ascending")])
    items = items.select(ITEM_SCHEMA.names).cast(ITEM_SCHEMA).sort_by("item_id")
    if users is None:
        users = pa.table({"user_id": pa.array([], pa.string())})
    users = users.sort_by("user_id")
    ts = events.column("ts").to_numpy()
    train_end, val_end = split_boundaries(ts)
    meta: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "name": name,
        "counts": {
            "events": events.num_rows,
            "users": len(pc.unique(events.column("user_id"))),
            "items": items.num_rows,
            "items_purchased": len(pc.unique(events.column("item_id"))),
            "users_with_attributes": users.num_rows,
        },
        "time_range": {
            "start": float(ts.min()) if len(ts) else None,
            "end": float(ts.max()) if len(ts) else None,
        },
        "split": {"fractions": list(SPLIT_FRACTIONS), "train_end": train_end, "val_end": val_end},
        **(extra_meta or {}),
    }
    pq.write_table(events, path / "events.parquet")
    pq.write_table(items, path / "items.parquet")
    pq.write_table(users, path / "users.parquet")
    (path / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta
