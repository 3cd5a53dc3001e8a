"""Fixtures of the tgn room: a tiny hand-made dataset and a small model config."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from streaming.dataset import write_dataset
from tgn.model import TGNConfig


@pytest.fixture
def tiny_config() -> TGNConfig:
    """Small enough for milliseconds per batch, big enough to exercise every code path."""
    return TGNConfig(memory_dim=8, time_dim=4, embed_dim=8, heads=2, neighbors=3)


@pytest.fixture
def tiny_table() -> pa.Table:
    """The 360 events of :func:`tiny_events`."""
    return tiny_events()


def tiny_events(num_users: int = 12, num_items: int = 20, per_user: int = 30) -> pa.Table:
    """Users cycle through a few favourite items, one purchase per hour, in time order."""
    rows = []
    for step in range(per_user):
        for u in range(num_users):
            item = (u * 3 + step % 4) % num_items  # each user keeps 4 favourites
            rows.append({"event_id": f"e{len(rows)}", "user_id": f"u{u}", "item_id": f"i{item}",
                         "ts": 1_500_000_000.0 + 3600.0 * step + u, "quantity": 1.0 + u % 2,
                         "price": 0.5 + item / 10, "basket_id": None, "store_id": None})
    return pa.Table.from_pylist(rows)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dataset directory of :func:`tiny_events` (360 events) with a 20-item catalog."""
    out = tmp_path_factory.mktemp("tiny")
    items = pa.table({"item_id": [f"i{i}" for i in range(20)],
                      "title": [f"item {i}" for i in range(20)], "category": ["A > B"] * 20,
                      "brand": ["National"] * 20, "price": [1.0] * 20})
    write_dataset(out, tiny_events(), items, name="tiny")
    return out
