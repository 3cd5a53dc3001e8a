"""No broker at the address: one clear error, in bounded time, no traceback."""

from __future__ import annotations

import socket
import time

import pytest

from streaming.errors import BrokerUnreachable
from streaming.kafka_io import create_topics


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_create_topics_against_no_broker_fails_in_bounded_time():
    address = f"127.0.0.1:{_closed_port()}"
    started = time.monotonic()
    with pytest.raises(BrokerUnreachable, match=f"cannot reach Kafka at {address}"):
        create_topics(address, ["purchases"], timeout_ms=1000)
    assert time.monotonic() - started < 15
