"""The shipped deploy/ files: promtool accepts them, alerts fire when they should, and every
metric and label a dashboard panel or alert rule queries is one the code exports."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from prometheus_client import REGISTRY
from prometheus_client.metrics import MetricWrapperBase

from streaming import metrics

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
PROMETHEUS = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "dynllm.json"
#: Suffixes prometheus-client adds to a family's name, by family type.
SERIES_SUFFIXES = {"counter": ("_total", "_created"), "gauge": ("",), "info": ("_info",),
                   "histogram": ("_bucket", "_sum", "_count", "_created"),
                   "summary": ("", "_sum", "_count", "_created")}
#: Labels Prometheus itself attaches (job, instance) or that histograms carry (le).
TARGET_LABELS = {"job", "instance", "le"}


def exported_series() -> dict[str, set[str]]:
    """Series name → label names, for every ``dynllm_`` series the default registry exposes."""
    declared = {m._name: m for m in vars(metrics).values() if isinstance(m, MetricWrapperBase)}
    series: dict[str, set[str]] = {}
    for family in REGISTRY.collect():
        if not family.name.startswith("dynllm_"):
            continue
        labels = set(declared[family.name]._labelnames) if family.name in declared else set()
        if family.type == "info":
            labels |= {"role", "version", "model_id"}
        for suffix in SERIES_SUFFIXES[family.type]:
            series[family.name + suffix] = labels
    return series


def dashboard_queries() -> list[tuple[str, str]]:
    """``(PromQL, legendFormat)`` of every panel target in the dashboard."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [(t["expr"], t.get("legendFormat", "")) for p in panels for t in p.get("targets", [])]


def rule_queries() -> list[tuple[str, str]]:
    """``(PromQL, annotation text)`` of every alert rule."""
    groups = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"]
    return [(r["expr"], " ".join(r.get("annotations", {}).values()))
            for g in groups for r in g["rules"]]


def names_and_labels(promql: str, text: str) -> tuple[set[str], set[str]]:
    """Metric names (``dynllm_*``) and label names a query and its legend/annotations use.

    >>> names, labels = names_and_labels('sum by (reason) (rate(dynllm_x_total{job="a"}[5m]))',
    ...                                  "{{reason}}")
    >>> names, sorted(labels)
    ({'dynllm_x_total'}, ['job', 'reason'])
    """
    names = set(re.findall(r"\bdynllm_\w+", promql))
    labels = {label.strip() for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", promql)
              for label in group.split(",") if label.strip()}
    for selector in re.findall(r"\{([^}]*)\}", promql):
        labels |= set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", selector))
    labels |= set(re.findall(r"\{\{\s*\$?(?:labels\.)?(\w+)\s*\}\}", text)) - {"value"}
    return names, labels


def run_promtool(*args: str, cwd: Path = PROMETHEUS) -> str:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool not found: run `make prometheus` (Debian package prometheus)")
    done = subprocess.run([promtool, *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def test_promtool_accepts_config_and_rules():
    assert "SUCCESS" in run_promtool("check", "config", "prometheus.yml")
    out = run_promtool("check", "rules", "alerts.yml")
    assert re.search(r"SUCCESS: [1-9]\d* rules found", out), out


def test_every_alert_fires_in_its_promtool_unit_test():
    """alerts_test.yml asserts each alert both fires and stays quiet on a near miss."""
    run_promtool("test", "rules", "alerts_test.yml")
    tested = set(re.findall(r"alertname: (\w+)", (PROMETHEUS / "alerts_test.yml").read_text()))
    rules = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"][0]["rules"]
    assert {r["alert"] for r in rules} <= tested


def test_promtool_rejects_an_alert_on_a_broken_query(tmp_path):
    """The check is not vacuous: promtool fails on a rules file with a PromQL syntax error."""
    bad = tmp_path / "bad.yml"
    bad.write_text(yaml.safe_dump({"groups": [{"name": "x", "rules": [
        {"alert": "Broken", "expr": "sum(rate(dynllm_events_consumed_total[5m])"}]}]}))
    promtool = shutil.which("promtool") or pytest.fail("promtool not found: run make prometheus")
    done = subprocess.run([promtool, "check", "rules", str(bad)], capture_output=True, text=True)
    assert done.returncode != 0 and "parse error" in done.stdout + done.stderr


@pytest.mark.parametrize("source", ["dashboard", "alerts"])
def test_queries_use_only_exported_metrics_and_labels(source):
    exported = exported_series()
    queries = dashboard_queries() if source == "dashboard" else rule_queries()
    assert len(queries) >= (20 if source == "dashboard" else 7)
    all_labels = set().union(*exported.values()) | TARGET_LABELS
    for promql, text in queries:
        names, labels = names_and_labels(promql, text)
        assert names or "up" in promql, f"query without a dynllm metric: {promql}"
        missing = names - exported.keys()
        assert not missing, f"{source} queries metrics nobody exports: {missing} in {promql}"
        assert labels <= all_labels, f"unknown labels {labels - all_labels} in {promql}"
        for name in names:  # a label selected on a metric must be one of that metric's labels
            for label in re.findall(rf"{name}\{{([^}}]*)\}}", promql):
                used = set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", label))
                assert used <= exported[name] | TARGET_LABELS, f"{used} not on {name}"


def test_name_check_catches_a_misspelled_metric():
    """The coverage test above would fail on a typo like a missing ``_total``."""
    names, _ = names_and_labels("rate(dynllm_events_consumed[5m])", "")
    assert names - exported_series().keys() == {"dynllm_events_consumed"}


def test_dashboard_panels_are_well_formed():
    dashboard = json.loads(DASHBOARD.read_text())
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    datasource = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())["datasources"][0]
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == datasource["uid"], panel["title"]
        assert panel["targets"] and all(t["expr"] for t in panel["targets"]), panel["title"]
    titles = " ".join(p["title"].lower() for p in panels)
    for topic in ("throughput", "lag", "latency", "dead letters", "queue", "staleness",
                  "tokens/s"):
        assert topic in titles, f"no panel about {topic}"
    quantiles = [e for e, _ in dashboard_queries() if "histogram_quantile" in e]
    assert quantiles and all("_bucket" in e and "le" in e for e in quantiles)


def test_scrape_targets_match_compose_services_and_default_ports():
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    services = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())["services"]
    expected = {"dynllm-pipeline": ("pipeline", metrics.PIPELINE_PORT),
                "dynllm-worker": ("worker", metrics.WORKER_PORT),
                "dynllm-server": ("server", metrics.SERVER_PORT)}
    jobs = {job["job_name"]: job["static_configs"][0]["targets"]
            for job in config["scrape_configs"]}
    for job, (service, port) in expected.items():
        assert jobs[job] == [f"{service}:{port}"]
        command = services[service]["command"]
        flag = "--port" if service == "server" else "--metrics-port"
        assert command[command.index(flag) + 1] == str(port), service
    assert services["pipeline"]["environment"]["DYNLLM_METRICS_ADDR"] == "0.0.0.0"


def compose_commands() -> list[tuple[str, list[str]]]:
    """``(service, dynllm arguments)`` of every dynllm invocation in docker-compose.yml."""
    services = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())["services"]
    commands = []
    for name, service in services.items():
        if service.get("image") != "dynllm:latest":
            continue
        if service.get("entrypoint") == ["sh", "-c"]:  # a shell script of dynllm commands
            for part in re.findall(r"dynllm ([^;|&]+)", service["command"][0]):
                commands.append((name, shlex.split(part)))
        else:
            commands.append((name, service["command"]))
    return commands


def test_compose_commands_parse_with_the_real_cli(capsys):
    """Every dynllm command in docker-compose.yml is accepted by today's ``dynllm`` parser."""
    from pipelines.cli import build_parser

    parser = build_parser()
    known = set(parser._subparsers._group_actions[0].choices)
    commands = compose_commands()
    assert {name for name, _ in commands} >= {"setup", "producer", "pipeline", "worker", "server"}
    missing = sorted({args[0] for _, args in commands} - known)
    for service, args in commands:
        if args[0] in missing:
            continue
        try:
            parser.parse_args(args)
        except SystemExit:
            pytest.fail(f"{service}: dynllm {' '.join(args)}\n{capsys.readouterr().err}")
    if missing:
        pytest.skip(f"subcommands not registered yet: {missing}")


def test_compose_file_follows_the_compose_spec(tmp_path):
    """docker-compose.yml validates against the Compose Specification's JSON schema (vendored in
    check-jsonschema, offline), and a misspelled key would not."""
    check = Path(sys.executable).with_name("check-jsonschema")
    compose = DEPLOY / "docker-compose.yml"
    args = [str(check), "--builtin-schema", "vendor.compose-spec"]
    done = subprocess.run([*args, str(compose)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(compose.read_text().replace("depends_on:", "depend_on:", 1))
    done = subprocess.run([*args, str(broken)], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "depend_on" in done.stdout + done.stderr
