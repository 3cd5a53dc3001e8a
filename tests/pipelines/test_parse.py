"""``ParseAndValidate``: the Arrow fast path agrees with ``validate_event``; counts add up."""

from __future__ import annotations

import math
import time

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to

from pipelines.elements import RawBatch, Span
from pipelines.parse import (
    DEAD_LETTERS,
    ParseAndValidate,
    _json_table,
    _validate_list,
    _validate_table,
)
from streaming.schema import EVENT_SCHEMA
from streaming.validation import DeadLetter, RecentIds, ValidationRules, validate_event

GOOD = {"event_id": "e1", "user_id": "u1", "item_id": "i1", "ts": 100.0, "quantity": 1.0,
        "price": 2.5, "basket_id": "b1", "store_id": None}
#: (change to GOOD, expected reason or None if still valid)
CASES = [
    ({}, None),
    ({"event_id": "e2", "user_id": "café"}, None),  # non-ASCII: decided by validate_event
    ({"event_id": "e3", "price": math.nan}, "bad_price"),
    ({"event_id": "e4", "quantity": -1.0}, "bad_quantity"),
    ({"event_id": "e5", "user_id": ""}, "bad_id"),
    ({"event_id": "e6", "user_id": "   "}, "bad_id"),
    ({"event_id": "e7", "ts": math.inf}, "bad_timestamp"),
    ({"event_id": "e8", "ts": time.time() + 10 * 86_400}, "future_timestamp"),
    ({"event_id": "e1"}, "duplicate_event_id"),
    ({"event_id": "e9", "basket_id": "bad\nid"}, "bad_id"),
    ({"event_id": "e10", "item_id": "x" * 300}, "bad_id"),
    ({"event_id": "e11", "quantity": 0.0}, "bad_quantity"),
    ({"event_id": "e12", "quantity": 1e30}, "implausible_value"),
    ({"event_id": "e13", "price": 5e6}, "implausible_value"),
    ({"event_id": "e14", "quantity": 48_073.0}, None),  # Complete Journey's largest line
]


def _table() -> pa.Table:
    return pa.Table.from_pylist([{**GOOD, **change} for change, _ in CASES], schema=EVENT_SCHEMA)


def test_table_fast_path_matches_validate_event_row_by_row():
    rules = ValidationRules()
    fast = _validate_table(_table(), rules, RecentIds())
    slow = _validate_list(_table().to_pylist(), rules, RecentIds())
    assert fast[1].tolist() == slow[1].tolist() == [r is None for _, r in CASES]
    assert fast[0].equals(slow[0])
    assert sorted(str(d.reason) for d in fast[2]) == sorted(r for _, r in CASES if r)


def test_catalog_rule_on_the_fast_path():
    events, good, letters = _validate_table(_table().slice(0, 2),
                                            ValidationRules(catalog={"other"}), RecentIds())
    assert not good.any() and events.num_rows == 0
    assert {str(d.reason) for d in letters} == {"unknown_item"}


def test_parse_and_validate_tags_dead_letters_and_counts_add_up():
    raw = [b'{"event_id":"a","user_id":"u","item_id":"i","ts":1,"quantity":1,"price":1}',
           b"not json", b'{"event_id":"b"}', b"\xff\xfe",
           b'{"event_id":"c","user_id":"u","item_id":"i","ts":2,"quantity":2,"price":0}']
    batch = RawBatch(Span.of(3, 10, 15), raw, np.arange(10, 15), np.zeros(5),
                     np.full(5, 3, np.int32))
    with BeamTestPipeline() as p:
        out = p | beam.Create([batch]) | ParseAndValidate()
        assert_that(out.events | beam.Map(lambda b: (b.events.column("event_id").to_pylist(),
                                                     b.offsets.tolist(), b.partitions.tolist(),
                                                     b.span.ranges, [s for s, _ in b.span.trace])),
                    equal_to([(["a", "c"], [10, 14], [3, 3], {3: (10, 15)}, ["parse"])]),
                    label="Events")
        assert_that(out[DEAD_LETTERS] | beam.Map(lambda d: str(d.reason)),
                    equal_to(["bad_json", "missing_field", "bad_encoding"]), label="Letters")


def test_json_batch_fast_path_matches_validate_event_and_keeps_raw_bytes():
    import json

    rows = [{k: v for k, v in row.items() if v is not None} for row in _table().to_pylist()
            if all(not isinstance(v, float) or math.isfinite(v) for v in row.values())]
    raw = [json.dumps(r).encode() for r in rows]
    raw.append(json.dumps({**rows[0], "event_id": "big", "pad": "x" * 70_000}).encode())
    raw.append(b'{"event_id": "e99", "user_id": "u", "item_id": "i", "ts": 5, "quantity": 1,'
               b' "price": null}')
    assert _json_table(raw) is not None  # this batch takes the Arrow path
    rules = ValidationRules()
    fast = _validate_list(raw, rules, RecentIds())
    recent = RecentIds()
    slow = [validate_event(v, rules, recent) for v in raw]
    assert fast[1].tolist() == [type(r) is not DeadLetter for r in slow]
    assert sorted(str(d.reason) for d in fast[2]) == sorted(
        str(r.reason) for r in slow if type(r) is DeadLetter)
    assert all(type(d.raw) is bytes for d in fast[2])  # dead letters keep what was received
    # one record that is not JSON sends the whole batch down the per-record path, same result
    mixed = _validate_list([b"not json", *raw], rules, RecentIds())
    assert mixed[1].tolist() == [False, *fast[1].tolist()]
