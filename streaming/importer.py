"""Bring your own purchase log: CSV, TSV or Parquet files and a column mapping.

``--map user=customer,item=sku,ts=time,price=amount`` maps canonical names (left) to your
columns (right). Event keys: ``user``, ``item``, ``ts`` (required), ``quantity``, ``price``,
``event_id``, ``basket``, ``store``. Item-file keys: ``item`` (shared), ``title``, ``category``,
``brand``, ``item_price``. Timestamps may be epoch seconds or any date-time string pandas parses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa

from streaming.dataset import write_dataset
from streaming.errors import UsageError

EVENT_KEYS = {"user": "user_id", "item": "item_id", "ts": "ts", "quantity": "quantity",
              "price": "price", "event_id": "event_id", "basket": "basket_id",
              "store": "store_id"}
ITEM_KEYS = {"item": "item_id", "title": "title", "category": "category", "brand": "brand",
             "item_price": "price"}
REQUIRED_KEYS = ("user", "item", "ts")


def parse_mapping(text: str) -> dict[str, str]:
    """``"user=a,item=b"`` → ``{"user": "a", "item": "b"}``; unknown keys are a UsageError."""
    mapping: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, column = part.partition("=")
        if not sep or not column:
            raise UsageError(f"--map entry {part!r} is not KEY=COLUMN")
        if key not in EVENT_KEYS and key not in ITEM_KEYS:
            known = ", ".join(sorted(EVENT_KEYS.keys() | ITEM_KEYS.keys()))
            raise UsageError(f"--map key {key!r} is unknown; known keys: {known}")
        mapping[key] = column
    missing = [k for k in REQUIRED_KEYS if k not in mapping]
    if missing:
        raise UsageError(f"--map needs {', '.join(missing)}")
    return mapping


def read_table_file(path: str | Path) -> pd.DataFrame:
    """Read a CSV, TSV or Parquet file by its suffix, all columns as found."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return pd.read_parquet(path)
    if suffix in (".csv", ".tsv", ".txt"):
        return pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",", dtype=str)
    raise UsageError(f"{path}: expected .csv, .tsv or .parquet")


def _rename(frame: pd.DataFrame, mapping: dict[str, str], keys: dict[str, str], what: str):
    used = {mapping[k]: name for k, name in keys.items() if k in mapping}
    absent = [c for c in used if c not in frame.columns]
    if absent:
        raise UsageError(f"{what} file has no column(s) {', '.join(absent)}")
    return frame[list(used)].rename(columns=used)


def _to_epoch_seconds(values: pd.Series) -> pd.Series:
    numeric = pd.to_numeric(values, errors="coerce")
    if numeric.notna().all():
        return numeric.astype(float)
    parsed = pd.to_datetime(values, utc=True, errors="coerce")
    if parsed.isna().any():
        bad = values[parsed.isna()].iloc[0]
        raise UsageError(f"timestamp {bad!r} is neither epoch seconds nor a date-time")
    return (parsed - pd.Timestamp(0, tz="UTC")).dt.total_seconds()


def import_files(
    out: str | Path, events: str | Path, items: str | Path, mapping_text: str,
    users: str | Path | None = None,
) -> dict[str, Any]:
    """Write a dataset directory from your files; returns its ``meta.json``."""
    mapping = parse_mapping(mapping_text)
    ev = _rename(read_table_file(events), mapping, EVENT_KEYS, "events")
    ev["ts"] = _to_epoch_seconds(ev["ts"])
    for column, default in (("quantity", 1.0), ("price", 0.0)):
        values = ev[column] if column in ev else pd.Series(default, index=ev.index)
        ev[column] = pd.to_numeric(values, errors="coerce").astype(float)
    if "event_id" not in ev:
        ev["event_id"] = "row" + pd.Series(range(len(ev)), index=ev.index).astype(str)
    for column in ("basket_id", "store_id"):
        ev[column] = ev[column].astype(str) if column in ev else None
    for column in ("user_id", "item_id", "event_id"):
        ev[column] = ev[column].astype(str)
    bad = ev["quantity"].isna() | ev["price"].isna() | (ev["price"] < 0)
    if bad.any():
        raise UsageError(f"{int(bad.sum())} event rows have a missing or negative quantity/price")
    it = _rename(read_table_file(items), mapping, ITEM_KEYS, "items")
    it["item_id"] = it["item_id"].astype(str)
    for column in ("title", "category", "brand"):
        it[column] = it[column].astype(str) if column in it else ""
    prices = it["price"] if "price" in it else pd.Series(float("nan"), index=it.index)
    it["price"] = pd.to_numeric(prices, errors="coerce").astype(float)
    unknown = set(ev["item_id"]) - set(it["item_id"])
    if unknown:
        raise UsageError(f"{len(unknown)} event items are not in the item file, e.g. "
                         f"{sorted(unknown)[0]!r}")
    us = None
    if users is not None:
        frame = read_table_file(users).astype(str)
        column = mapping.get("user", "user_id")
        if column not in frame:
            raise UsageError(f"users file has no column {column!r}")
        us = pa.Table.from_pandas(frame.rename(columns={column: "user_id"}), preserve_index=False)
    return write_dataset(
        out, pa.Table.from_pandas(ev, preserve_index=False),
        pa.Table.from_pandas(it, preserve_index=False), us, name=Path(events).stem,
        extra_meta={"source": str(events), "mapping": mapping},
    )
