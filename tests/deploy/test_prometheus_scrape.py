"""A real Prometheus server scrapes a real process exposing ``streaming.metrics``: the series
exist under their exported names, counters move, and exact counts survive the trip."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.prometheus


def test_prometheus_scrapes_streaming_metrics(prometheus, probe_port):
    prom = prometheus({"probe": [f"127.0.0.1:{probe_port}"]})
    assert prom.wait_for('up{job="probe"}', lambda v: v == 1) == 1

    # exact counts, by reason, including a reason created at zero
    assert prom.value('dynllm_events_dead_lettered_total{job="probe",reason="bad_json"}') == 3
    assert prom.value('dynllm_events_dead_lettered_total{reason="bad_id"}') == 0
    assert prom.value("sum(dynllm_events_dead_lettered_total)") == 3
    assert prom.value('sum(dynllm_consumer_lag_messages{topic="purchases"})') == 7
    assert prom.value("count(dynllm_consumer_lag_messages)") == 2

    # the counter moves between scrapes and its rate is positive and plausible (≤ 200/s written)
    first = prom.value("dynllm_events_consumed_total")
    later = prom.wait_for("dynllm_events_consumed_total", lambda v: v > first, timeout_s=10)
    assert later > first > 0
    rate = prom.wait_for("rate(dynllm_events_consumed_total[5s])", lambda v: v > 0, timeout_s=10)
    assert 0 < rate <= 250

    # histogram percentiles: every observation is 0.02 s, inside the (0.01, 0.025] bucket
    buckets = "sum by (le) (rate(dynllm_event_to_embedding_seconds_bucket[5s]))"
    p95 = prom.wait_for(f"histogram_quantile(0.95, {buckets})", math.isfinite, timeout_s=10)
    assert 0.01 < p95 <= 0.025

    info = prom.query('dynllm_process_info{job="probe"}')
    assert len(info) == 1 and info[0]["metric"]["role"] == "probe"
    assert info[0]["metric"]["model_id"] == "tiny-test" and info[0]["metric"]["version"]


def test_query_errors_are_reported(prometheus):
    prom = prometheus({})
    with pytest.raises(ValueError, match="parse error"):
        prom.query("sum(rate(dynllm_events_consumed_total[5s])")
    assert prom.value("dynllm_no_such_metric") is None


def test_shipped_alert_rules_evaluate_on_a_real_prometheus(prometheus, probe_port):
    """Prometheus loads deploy/prometheus/alerts.yml and evaluates every rule without error
    (promtool only checks syntax); with no pipeline or worker scraped, their down alerts go
    pending, and the alerts about what the probe does expose stay inactive."""
    rules_file = Path(__file__).resolve().parents[2] / "deploy/prometheus/alerts.yml"
    prom = prometheus({"probe": [f"127.0.0.1:{probe_port}"]}, rule_files=[rules_file])
    prom.wait_for('up{job="probe"}', lambda v: v == 1)
    time.sleep(2 * prom.scrape_interval_s)  # a couple of rule evaluations over scraped data
    rules = [r for g in prom.api("rules")["groups"] for r in g["rules"]]
    assert len(rules) == 7
    assert all(r["health"] == "ok" and not r.get("lastError") for r in rules), rules
    states = {r["name"]: r["state"] for r in rules}
    assert states["DynllmPipelineDown"] == states["DynllmProfileWorkerDown"] == "pending"
    assert states["DynllmDeadLetterSpike"] == states["DynllmConsumerLagGrowing"] == "inactive"
