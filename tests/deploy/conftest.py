"""Fixtures of the deploy tests: a small real process exposing ``streaming.metrics``."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

#: A small process using streaming.metrics the way the pipeline does: 3 bad records up front,
#: then 10 consumed records and one 20 ms event→embedding latency every 50 ms until killed.
PROBE = textwrap.dedent("""
    import time
    from streaming import metrics as m

    m.process_info("probe", model_id="tiny-test")
    m.init_label_values(m.EVENTS_DEAD_LETTERED, "reason", ["bad_json", "bad_id"])
    for _ in range(3):
        m.EVENTS_DEAD_LETTERED.labels(reason="bad_json").inc()
    for partition in (0, 1):
        m.CONSUMER_LAG.labels(topic="purchases", partition=str(partition)).set(7 * partition)
    server = m.start_metrics_server(0)
    print(server.server_port, flush=True)
    while True:
        m.EVENTS_CONSUMED.inc(10)
        m.EVENT_TO_EMBEDDING_SECONDS.observe(0.02)
        time.sleep(0.05)
""")


@pytest.fixture
def probe_port():
    """Port of a running probe process's /metrics (the process is killed afterwards)."""
    process = subprocess.Popen([sys.executable, "-c", PROBE], stdout=subprocess.PIPE, text=True)
    try:
        yield int(process.stdout.readline())
    finally:
        process.kill()
        process.wait()
        process.stdout.close()
