"""Decide whether a raw record is a valid purchase event: :func:`validate_event`.

Every record that enters the system (a Kafka message value, a line of a replay file, a dict from
a test) goes through :func:`validate_event`, which returns either a
:class:`~streaming.schema.PurchaseEvent` or a :class:`DeadLetter` carrying one of a small fixed
set of :class:`Reason` codes (low cardinality: they become a Prometheus label), a short detail for
people, and the raw record for replay. It never raises, whatever the input.

Accepted wire form (see :mod:`streaming.schema`): a JSON object with string ids (integer ids are
accepted and turned into strings), ``ts`` in epoch seconds, ``quantity > 0`` and ``price >= 0``,
all finite, and at most ``max_quantity`` / ``max_price`` (:class:`ValidationRules`: a finite but
implausible value such as ``quantity: 1e30`` is a bug upstream, not a purchase, and would swamp
the memory update). Unknown extra fields are ignored so producers can add fields without
breaking readers.

>>> event = validate_event(b'{"event_id": "e1", "user_id": 7, "item_id": "i1", "ts": 1.5,'
...                        b' "quantity": 1, "price": 2.0}')
>>> event.user_id, event.quantity
('7', 1.0)
>>> print(validate_event(b'{"event_id": "e1"').reason)
bad_json
"""

from __future__ import annotations

import json
import math
import time
from collections import deque
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from streaming.schema import REQUIRED_EVENT_FIELDS, PurchaseEvent

#: Longest accepted identifier, in characters.
MAX_ID_CHARS = 256
#: Longest value quoted in a dead letter's detail.
_MAX_QUOTE = 60

_decode_json = json.JSONDecoder().decode


class Reason(StrEnum):
    """Why a record was dead-lettered; the values are stable metric label values."""

    OVERSIZED = "oversized"  # longer than ``max_bytes``
    BAD_ENCODING = "bad_encoding"  # bytes that are not UTF-8
    BAD_JSON = "bad_json"  # not parseable as JSON
    NOT_AN_OBJECT = "not_an_object"  # JSON, but not an object
    MISSING_FIELD = "missing_field"  # a required field is absent or null
    BAD_TYPE = "bad_type"  # a field has the wrong JSON type
    BAD_ID = "bad_id"  # empty, too long or unprintable identifier
    BAD_TIMESTAMP = "bad_timestamp"  # NaN, infinite or negative ``ts``
    FUTURE_TIMESTAMP = "future_timestamp"  # ``ts`` beyond now + ``max_future_skew_s``
    BAD_QUANTITY = "bad_quantity"  # NaN, infinite, zero or negative quantity
    BAD_PRICE = "bad_price"  # NaN, infinite or negative price
    IMPLAUSIBLE_VALUE = "implausible_value"  # quantity or price above its configured bound
    UNKNOWN_ITEM = "unknown_item"  # ``item_id`` not in the required catalog
    DUPLICATE_EVENT_ID = "duplicate_event_id"  # ``event_id`` seen recently
    LATE_EVENT = "late_event"  # behind its partition's event time (pipelines/watermark.py)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A record that is not a valid event.

    Attributes:
        reason: One :class:`Reason` (a ``str``), usable as a metric label.
        detail: A short explanation for people (may quote a truncated value; never used as a
            label).
        raw: The record exactly as received (``bytes``, ``str``, ``dict`` or anything else).
        received_at: Wall-clock epoch seconds when it was rejected.
    """

    reason: Reason
    detail: str
    raw: Any
    received_at: float = field(default_factory=time.time)


@dataclass(frozen=True, slots=True)
class ValidationRules:
    """Options of :func:`validate_event`.

    Attributes:
        catalog: If given, ``item_id`` must be one of these ids (``unknown_item`` otherwise).
        max_future_skew_s: How far past the clock ``ts`` may lie (producers' clocks drift, but an
            event a year ahead is a bug).
        max_bytes: Largest accepted raw record; checked before parsing, so a huge record costs
            nothing. For ``str`` input it counts UTF-8 bytes.
        max_quantity: Largest plausible quantity of one purchase line (Complete Journey's
            largest is 48,073: fuel, counted in small units; a million leaves room for such
            units and still stops ``1e30``).
        max_price: Largest plausible price of one line (Complete Journey's largest: 840).
        clock: Returns "now" in epoch seconds (injectable for tests and replays).
    """

    catalog: Collection[str] | None = None
    max_future_skew_s: float = 86_400.0
    max_bytes: int = 64 * 1024
    max_quantity: float = 1e6
    max_price: float = 1e6
    clock: Callable[[], float] = time.time


#: How many recent event ids :class:`RecentIds` holds by default (~100 bytes of RAM each).
RECENT_IDS_CAPACITY = 1_000_000


class RecentIds:
    """A bounded memory of recently seen event ids (first in, first out).

    Kafka delivers at least once, so a re-sent event must not be counted twice. Memory is
    bounded by ``capacity`` ids; a duplicate older than that is not caught.

    >>> seen = RecentIds(capacity=2)
    >>> [seen.add(x) for x in ["a", "b", "a", "c", "a"]]
    [True, True, False, True, True]
    """

    def __init__(self, capacity: int = RECENT_IDS_CAPACITY) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._ids: set[str] = set()
        self._order: deque[str] = deque()

    def add(self, event_id: str) -> bool:
        """Remember ``event_id``; returns ``False`` if it was already remembered."""
        if event_id in self._ids:
            return False
        self._ids.add(event_id)
        self._order.append(event_id)
        if len(self._order) > self.capacity:
            self._ids.discard(self._order.popleft())
        return True

    def __len__(self) -> int:
        return len(self._ids)


DEFAULT_RULES = ValidationRules()


class _Invalid(Exception):
    """Raised inside the checks (invalid records only) and caught in :func:`validate_event`."""

    def __init__(self, reason: Reason, detail: str) -> None:
        self.reason, self.detail = reason, detail


def validate_event(
    raw: Any, rules: ValidationRules = DEFAULT_RULES, recent: RecentIds | None = None
) -> PurchaseEvent | DeadLetter:
    """Turn a raw record into a :class:`PurchaseEvent`, or say why not; never raises.

    Args:
        raw: A JSON document as ``bytes`` (UTF-8) or ``str``, or an already parsed ``dict``.
        rules: Catalog, future-skew and size limits.
        recent: If given, an event whose ``event_id`` it already holds is a
            ``duplicate_event_id`` dead letter; valid events are added to it.

    Returns:
        The event, or a :class:`DeadLetter` with a :class:`Reason`.
    """
    try:
        event = _check_fields(_parse(raw, rules.max_bytes), rules)
    except _Invalid as invalid:
        return DeadLetter(invalid.reason, invalid.detail, raw)
    if recent is not None and not recent.add(event.event_id):
        return DeadLetter(Reason.DUPLICATE_EVENT_ID, f"event_id {_quote(event.event_id)}", raw)
    return event


def _parse(raw: Any, max_bytes: int) -> dict:
    if isinstance(raw, dict):
        return raw
    if isinstance(raw, bytes | bytearray | memoryview):
        if len(raw) > max_bytes:
            raise _Invalid(Reason.OVERSIZED, f"{len(raw)} bytes > {max_bytes}")
        try:
            text = bytes(raw).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _Invalid(Reason.BAD_ENCODING, f"not UTF-8 at byte {exc.start}") from None
    elif isinstance(raw, str):
        size = len(raw) if raw.isascii() else len(raw.encode("utf-8", "surrogatepass"))
        if size > max_bytes:
            raise _Invalid(Reason.OVERSIZED, f"{size} bytes > {max_bytes}")
        text = raw
    else:
        raise _Invalid(Reason.NOT_AN_OBJECT, f"a {type(raw).__name__}, not JSON")
    try:
        obj = _decode_json(text)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise _Invalid(Reason.BAD_JSON, str(exc)[:_MAX_QUOTE * 2]) from None
    if not isinstance(obj, dict):
        raise _Invalid(Reason.NOT_AN_OBJECT, f"JSON {type(obj).__name__}, not an object")
    return obj


def _check_fields(obj: dict, rules: ValidationRules) -> PurchaseEvent:
    get = obj.get
    for name in REQUIRED_EVENT_FIELDS:
        if get(name) is None:
            raise _Invalid(Reason.MISSING_FIELD, name)
    event_id = _id("event_id", get("event_id"))
    user_id = _id("user_id", get("user_id"))
    item_id = _id("item_id", get("item_id"))
    basket_id, store_id = get("basket_id"), get("store_id")
    if basket_id is not None:
        basket_id = _id("basket_id", basket_id)
    if store_id is not None:
        store_id = _id("store_id", store_id)
    ts = _number("ts", get("ts"))
    quantity = _number("quantity", get("quantity"))
    price = _number("price", get("price"))
    if not (math.isfinite(ts) and ts >= 0.0):
        raise _Invalid(Reason.BAD_TIMESTAMP, f"ts={ts!r}")
    if ts > rules.clock() + rules.max_future_skew_s:
        raise _Invalid(Reason.FUTURE_TIMESTAMP,
                       f"ts={ts!r} is more than {rules.max_future_skew_s:g}s ahead")
    if not (math.isfinite(quantity) and quantity > 0.0):
        raise _Invalid(Reason.BAD_QUANTITY, f"quantity={quantity!r}")
    if not (math.isfinite(price) and price >= 0.0):
        raise _Invalid(Reason.BAD_PRICE, f"price={price!r}")
    if quantity > rules.max_quantity:
        raise _Invalid(Reason.IMPLAUSIBLE_VALUE,
                       f"quantity={quantity!r} > max_quantity {rules.max_quantity:g}")
    if price > rules.max_price:
        raise _Invalid(Reason.IMPLAUSIBLE_VALUE,
                       f"price={price!r} > max_price {rules.max_price:g}")
    if rules.catalog is not None and item_id not in rules.catalog:
        raise _Invalid(Reason.UNKNOWN_ITEM, f"item_id {_quote(item_id)}")
    return PurchaseEvent(event_id, user_id, item_id, ts, quantity, price, basket_id, store_id)


def _id(name: str, value: Any) -> str:
    """A good identifier (integers become strings), else :class:`_Invalid`."""
    if type(value) is str:
        if 0 < len(value) <= MAX_ID_CHARS and value.isprintable() and not value.isspace():
            return value
        raise _Invalid(Reason.BAD_ID, f"{name} {_quote(value)}")
    if type(value) is int and value.bit_length() < 800:  # str() of a huge int raises
        return str(value)
    raise _Invalid(Reason.BAD_TYPE, f"{name} is {_type_name(value)}, not a string")


def _number(name: str, value: Any) -> float:
    """``value`` as a float if it is a JSON number (not a bool), else :class:`_Invalid`."""
    kind = type(value)
    if kind is float:
        return value
    if kind is int:
        try:
            return float(value)
        except OverflowError:
            return math.inf if value > 0 else -math.inf
    raise _Invalid(Reason.BAD_TYPE, f"{name} is {_type_name(value)}, not a number")


def _type_name(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )


def _quote(text: str) -> str:
    """``text`` quoted and cut to a bounded length for a detail message."""
    shown = text if len(text) <= _MAX_QUOTE else text[:_MAX_QUOTE] + "…"
    return ascii(shown)
