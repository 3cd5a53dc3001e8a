"""Shared fixtures: real data slices. Room-specific fixtures live in tests/<room>/conftest.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

#: The small real slice used across the suite: weeks 1-4 of Complete Journey, users and items
#: with at least 5 events, first 20k events.
CJ_SMALL = {"weeks": (1, 4), "min_user_events": 5, "min_item_events": 5, "max_events": 20_000}


@pytest.fixture(scope="session")
def cj_small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dataset directory holding a small real Complete Journey slice (see ``CJ_SMALL``)."""
    from streaming.completejourney import prepare

    out = tmp_path_factory.mktemp("cj_small")
    prepare(out, **CJ_SMALL)
    return out


@pytest.fixture
def kafka_broker():
    """``"127.0.0.1:PORT"`` of a fresh local Tansu broker (memory-only, starts in ~70 ms)."""
    from streaming.broker import Broker

    with Broker() as broker:
        yield broker.bootstrap_servers
