"""kafka-python's close race: the receive error of a closed connection is not logged, a real
one still is (real transports on a socket pair)."""

from __future__ import annotations

import logging
import socket

import pytest
from kafka.net.selector import NetworkSelector
from kafka.net.transport import KafkaTCPTransport

from streaming.kafka_io import ClosedTransportRecvFilter, install_log_filters

LOGGER = "kafka.net.transport"


@pytest.fixture
def filtered():
    """The transport logger with the filter installed (removed afterwards)."""
    logger = logging.getLogger(LOGGER)
    before = list(logger.filters)
    install_log_filters()
    install_log_filters()  # idempotent
    assert sum(isinstance(f, ClosedTransportRecvFilter) for f in logger.filters) == 1
    yield
    logger.filters[:] = before


def _receive_errors(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if "Error receiving network data" in r.getMessage()]


def test_recv_on_a_closed_transport_is_not_logged(filtered, caplog):
    net = NetworkSelector()
    ours, peer = socket.socketpair()
    transport = KafkaTCPTransport(net, ours)
    transport.close()  # what Manager.close does on the caller's thread: the socket becomes None
    with caplog.at_level(logging.ERROR, logger=LOGGER):
        _data, error = transport._sock_recv()  # what the IO thread then runs in the race
    assert error is not None and "NoneType" in str(error)  # the race itself is still there
    assert _receive_errors(caplog) == []
    peer.close()
    net.close()


def test_recv_error_on_an_open_transport_is_still_logged(filtered, caplog):
    net = NetworkSelector()
    ours, peer = socket.socketpair()
    transport = KafkaTCPTransport(net, ours)
    ours.close()  # broken underneath, but the transport was never closed
    with caplog.at_level(logging.ERROR, logger=LOGGER):
        transport._sock_recv()
    assert len(_receive_errors(caplog)) == 1
    peer.close()
    net.close()
