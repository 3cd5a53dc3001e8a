"""``dynllm monitor``: a real Prometheus scraping the dynllm job names, stopped by SIGTERM."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from streaming.broker import free_port
from streaming.prometheus_server import PrometheusServer

pytestmark = pytest.mark.prometheus


def test_monitor_scrapes_the_pipeline_and_loads_the_alerts(probe_port):
    port, closed = free_port(), free_port()  # nothing listens on `closed`: worker/server down
    process = subprocess.Popen(
        [sys.executable, "-m", "pipelines.cli", "monitor", "--port", str(port),
         "--pipeline", f"127.0.0.1:{probe_port}", "--worker", f"127.0.0.1:{closed}",
         "--server", f"127.0.0.1:{closed}", "--scrape-interval", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first_line = process.stdout.readline()
        assert first_line.startswith(f"Prometheus at http://127.0.0.1:{port} "), first_line
        assert "alert rules from" in process.stdout.readline()
        client = PrometheusServer({}, port=port)  # not started here: used as an API client only
        client.wait_for('up{job="dynllm-pipeline"}', lambda v: v == 1)
        assert client.wait_for('up{job="dynllm-worker"}', timeout_s=5) == 0  # scraped, refused
        assert client.value('dynllm_events_dead_lettered_total{reason="bad_json"}') == 3
        assert len(client.api("rules")["groups"][0]["rules"]) == 7
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
    assert process.returncode == 0, stderr
    assert not client.ready(), "Prometheus still answers after monitor exited"
