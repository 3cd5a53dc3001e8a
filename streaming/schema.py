"""The canonical data model: purchase events, the item catalog and user attributes.

Every source (Complete Journey, a user's own CSV, the Kafka topic ``purchases``) is turned into
these shapes; everything downstream reads only these.

A purchase event on the wire is a JSON object::

    {"event_id": "e1", "user_id": "u7", "item_id": "i42", "ts": 1483272000.0,
     "quantity": 1.0, "price": 2.49, "basket_id": "b9"}

``basket_id`` and ``store_id`` are optional. Identifiers are strings everywhere, so any source's ids
fit; models map them to dense integer indices themselves.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import pyarrow as pa

SCHEMA_VERSION = 1

#: Columns of ``events.parquet``, sorted by ``(ts, event_id)``.
EVENT_SCHEMA = pa.schema(
    [
        pa.field("event_id", pa.string(), nullable=False),
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("ts", pa.float64(), nullable=False),  # epoch seconds
        pa.field("quantity", pa.float64(), nullable=False),
        pa.field("price", pa.float64(), nullable=False),  # paid for the line, >= 0
        pa.field("basket_id", pa.string()),
        pa.field("store_id", pa.string()),
    ]
)

#: Columns of ``items.parquet``: text an LLM can read, plus a typical unit price.
ITEM_SCHEMA = pa.schema(
    [
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("title", pa.string()),  # short human-readable name
        pa.field("category", pa.string()),  # path "Department > Category > Type"
        pa.field("brand", pa.string()),
        pa.field("price", pa.float64()),  # median unit price seen in the log
    ]
)

#: ``users.parquet`` has ``user_id`` plus any number of string attribute columns.
USER_ID_FIELD = pa.field("user_id", pa.string(), nullable=False)

REQUIRED_EVENT_FIELDS = ("event_id", "user_id", "item_id", "ts", "quantity", "price")
OPTIONAL_EVENT_FIELDS = ("basket_id", "store_id")


@dataclass(frozen=True, slots=True)
class PurchaseEvent:
    """One purchase line: ``user_id`` bought ``quantity`` of ``item_id`` at time ``ts``."""

    event_id: str
    user_id: str
    item_id: str
    ts: float
    quantity: float = 1.0
    price: float = 0.0
    basket_id: str | None = None
    store_id: str | None = None

    def to_dict(self) -> dict[str, object]:
        """The wire form, without unset optional fields."""
        return {k: v for k, v in asdict(self).items() if v is not None}


def events_to_table(events: list[PurchaseEvent]) -> pa.Table:
    """Build an ``EVENT_SCHEMA`` table from events (in the given order)."""
    columns = {f.name: [getattr(e, f.name) for e in events] for f in EVENT_SCHEMA}
    return pa.table(columns, schema=EVENT_SCHEMA)


def table_to_events(table: pa.Table) -> list[PurchaseEvent]:
    """Inverse of :func:`events_to_table`; extra columns are ignored."""
    names = [f.name for f in EVENT_SCHEMA if f.name in table.column_names]
    return [PurchaseEvent(**row) for row in table.select(names).to_pylist()]
