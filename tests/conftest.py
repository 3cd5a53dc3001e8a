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


@pytest.fixture
def prometheus():
    """Factory starting **real Prometheus servers** (Debian ``prometheus``) on loopback.

    Call it with job name → ``["host:port", ...]`` targets that serve ``/metrics`` (and optionally
    ``rule_files=[...]`` to evaluate); it returns a started
    :class:`streaming.prometheus_server.PrometheusServer` scraping them every second (generated
    config, free port, temp storage dir; all stopped and deleted at teardown). Query it with
    ``.query(promql)`` (raw result list), ``.value(promql)`` (one number or None),
    ``.wait_for(promql, accept, timeout_s)`` and ``.api("rules")`` for other API endpoints. The
    first scrape lands ~5 s after start, so wait for ``up`` before asserting, and use rate
    windows of at least ``[5s]``::

        def test_pipeline_metrics(kafka_broker, prometheus):
            metrics_port = ...  # start the process under test with its metrics server
            prom = prometheus({"pipeline": [f"127.0.0.1:{metrics_port}"]})
            prom.wait_for('up{job="pipeline"}', lambda v: v == 1)
            prom.wait_for("sum(dynllm_events_dead_lettered_total)", lambda v: v == n_bad)
            assert prom.value("sum(rate(dynllm_events_consumed_total[5s]))") > 0

    Metrics are process-global: if the code under test runs inside the pytest process (its
    ``start_metrics_server(0)`` port as the target), counters still hold what earlier tests added,
    so assert differences from a value read first, or run the process under test as a
    subprocess. A missing binary fails with a UsageError telling to run ``make prometheus``.
    """
    from streaming.prometheus_server import PrometheusServer

    servers = []

    def start(targets, scrape_interval_s: float = 1.0, rule_files=()) -> PrometheusServer:
        server = PrometheusServer(targets, scrape_interval_s, rule_files=rule_files).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()
