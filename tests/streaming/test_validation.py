"""The validator: one bad record per reason, hypothesis junk, exact round trip of valid events."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streaming.schema import PurchaseEvent
from streaming.validation import (
    DeadLetter,
    Reason,
    RecentIds,
    ValidationRules,
    validate_event,
)

NOW = 1_700_000_000.0
RULES = ValidationRules(catalog={"i1", "i2"}, max_future_skew_s=3600.0, max_bytes=5000,
                        clock=lambda: NOW)
GOOD = {"event_id": "e1", "user_id": "u1", "item_id": "i1", "ts": 1_600_000_000.0,
        "quantity": 2.0, "price": 3.5, "basket_id": "b1"}


def with_(**changes: object) -> bytes:
    """``GOOD`` with fields changed (``None`` removes one), as JSON bytes."""
    record = {**GOOD, **changes}
    return json.dumps({k: v for k, v in record.items() if v is not None}).encode()


BAD_RECORDS = [
    (b"x" * 5001, Reason.OVERSIZED),
    ("é" * 3000, Reason.OVERSIZED),  # 3000 characters, 6000 UTF-8 bytes
    (b'{"event_id": "\xff\xfe"}', Reason.BAD_ENCODING),
    (b'{"event_id": "e1", ', Reason.BAD_JSON),
    (b"[" * 2400 + b"]" * 2400, Reason.BAD_JSON),  # too deep: json's RecursionError
    (b"", Reason.BAD_JSON),
    (b"[1, 2]", Reason.NOT_AN_OBJECT),
    (b'"a string"', Reason.NOT_AN_OBJECT),
    (42, Reason.NOT_AN_OBJECT),
    (None, Reason.NOT_AN_OBJECT),
    (with_(price=None), Reason.MISSING_FIELD),
    (with_(user_id=None), Reason.MISSING_FIELD),
    (with_(user_id=["u1"]), Reason.BAD_TYPE),
    (with_(user_id=True), Reason.BAD_TYPE),
    (with_(ts="1600000000"), Reason.BAD_TYPE),
    (with_(quantity=True), Reason.BAD_TYPE),
    (with_(basket_id={"id": 1}), Reason.BAD_TYPE),
    (with_(event_id=""), Reason.BAD_ID),
    (with_(user_id="   "), Reason.BAD_ID),
    (with_(item_id="i\x001"), Reason.BAD_ID),
    (with_(event_id="e" * 257), Reason.BAD_ID),
    (with_(ts=-1.0), Reason.BAD_TIMESTAMP),
    (b'{"event_id": "e1", "user_id": "u1", "item_id": "i1", "ts": NaN, "quantity": 1,'
     b' "price": 1}', Reason.BAD_TIMESTAMP),
    (with_(ts=10**400), Reason.BAD_TIMESTAMP),  # an integer beyond float range
    (with_(ts=NOW + 3601), Reason.FUTURE_TIMESTAMP),
    (with_(quantity=0), Reason.BAD_QUANTITY),
    (with_(quantity=-1.0), Reason.BAD_QUANTITY),
    (b'{"event_id": "e1", "user_id": "u1", "item_id": "i1", "ts": 1, "quantity": Infinity,'
     b' "price": 1}', Reason.BAD_QUANTITY),
    (with_(price=-0.01), Reason.BAD_PRICE),
    ({**GOOD, "price": math.nan}, Reason.BAD_PRICE),
    (with_(item_id="i3"), Reason.UNKNOWN_ITEM),
    (with_(quantity=1e30), Reason.IMPLAUSIBLE_VALUE),  # finite, but no purchase line
    (with_(price=2e6), Reason.IMPLAUSIBLE_VALUE),
]


@pytest.mark.parametrize(("raw", "reason"), BAD_RECORDS)
def test_each_bad_record_gets_its_reason(raw, reason):
    result = validate_event(raw, RULES)
    assert isinstance(result, DeadLetter), result
    assert result.reason == reason, result.detail
    assert result.raw is raw
    assert 0 < len(result.detail) < 200


def test_every_reason_but_duplicates_is_covered_by_the_table():
    # duplicates need a memory of ids, late events the pipeline's watermark
    assert {r for _, r in BAD_RECORDS} == set(Reason) - {Reason.DUPLICATE_EVENT_ID,
                                                         Reason.LATE_EVENT}


def test_good_record_in_every_input_form():
    expected = PurchaseEvent("e1", "u1", "i1", 1_600_000_000.0, 2.0, 3.5, "b1")
    for raw in (with_(), with_().decode(), bytearray(with_()), dict(GOOD)):
        assert validate_event(raw, RULES) == expected
    # integer ids and numbers are accepted and normalised
    event = validate_event(with_(user_id=7, quantity=1, ts=5), RULES)
    assert (event.user_id, event.quantity, event.ts) == ("7", 1.0, 5.0)
    # unknown extra fields are ignored; without a catalog any item is fine
    assert validate_event(with_(extra={"x": 1}, item_id="zz")).item_id == "zz"


def test_duplicates_are_caught_only_when_valid():
    recent = RecentIds(capacity=10)
    assert isinstance(validate_event(with_(price=-1), RULES, recent), DeadLetter)
    assert isinstance(validate_event(with_(), RULES, recent), PurchaseEvent)
    again = validate_event(with_(), RULES, recent)
    assert again.reason == Reason.DUPLICATE_EVENT_ID
    assert len(recent) == 1


def test_recent_ids_forget_beyond_capacity():
    recent = RecentIds(capacity=3)
    assert all(recent.add(f"e{i}") for i in range(5))
    assert len(recent) == 3
    assert recent.add("e0")  # forgotten, so accepted again
    assert not recent.add("e4")
    with pytest.raises(ValueError):
        RecentIds(capacity=0)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12,
)
FIELD_NAMES = st.sampled_from(["event_id", "user_id", "item_id", "ts", "quantity", "price",
                               "basket_id", "store_id", "other"])
JUNK = st.one_of(
    st.binary(max_size=300),
    st.text(max_size=300),
    JSON_VALUES,
    JSON_VALUES.map(lambda v: json.dumps(v).encode()),
    st.dictionaries(FIELD_NAMES, JSON_VALUES, max_size=9),
    st.dictionaries(FIELD_NAMES, JSON_VALUES, max_size=9).map(lambda d: json.dumps(d)),
    st.builds(lambda name, value: {**GOOD, name: value}, FIELD_NAMES, JSON_VALUES),
)


@settings(max_examples=200, deadline=None)
@given(JUNK)
def test_junk_never_raises_and_always_has_a_reason(raw):
    result = validate_event(raw, RULES, RecentIds())
    if isinstance(result, DeadLetter):
        assert result.reason in set(Reason)
        assert isinstance(result.detail, str) and len(result.detail) < 200
    else:  # only a junk dict that happens to be a full valid event may pass, and then exactly
        assert isinstance(result, PurchaseEvent)
        assert result.item_id in RULES.catalog and result.quantity > 0 and result.price >= 0


@settings(max_examples=100, deadline=None)
@given(st.binary(min_size=1, max_size=200))
def test_random_bytes_are_dead_letters(raw):
    assert isinstance(validate_event(raw, RULES), DeadLetter)


IDS = st.text(st.characters(categories=["L", "M", "N", "P", "S"]), min_size=1, max_size=40)
EVENTS = st.builds(
    PurchaseEvent,
    event_id=IDS, user_id=IDS, item_id=st.sampled_from(["i1", "i2"]),
    ts=st.floats(0, NOW), quantity=st.floats(1e-6, 1e6), price=st.floats(0, 1e6),
    basket_id=st.none() | IDS, store_id=st.none() | IDS,
)


@settings(max_examples=200, deadline=None)
@given(EVENTS)
def test_valid_events_round_trip_exactly(event):
    raw = json.dumps(event.to_dict()).encode()
    assert validate_event(raw, RULES) == event
    assert validate_event(event.to_dict(), RULES) == event


def test_plausibility_bounds_are_configurable():
    """A shop that sells by the gram raises ``max_quantity``; the default stops it."""
    record = {**GOOD, "quantity": 2e6}
    assert validate_event(record, RULES).reason == Reason.IMPLAUSIBLE_VALUE
    loose = dataclasses.replace(RULES, max_quantity=1e7)
    assert validate_event(record, loose).quantity == 2e6
