"""A real Prometheus server on loopback, scraping given targets: for tests and demos.

Runs the ``prometheus`` binary (Debian package ``prometheus``; ``make prometheus`` installs it)
as a child process with a generated config, a free port and a temporary storage directory, and
answers PromQL through its HTTP API (https://prometheus.io/docs/prometheus/latest/querying/api/).
It is ready in well under a second, but the first scrape comes ~5 s later: Prometheus's
discovery manager hands new targets to the scraper in 5-second batches.

>>> with PrometheusServer({"pipeline": ["127.0.0.1:9100"]}) as prom:  # doctest: +SKIP
...     prom.wait_for('up{job="pipeline"}', lambda v: v == 1)
...     prom.value("sum(rate(dynllm_events_consumed_total[5s]))")
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from streaming.broker import free_port
from streaming.errors import UsageError
from streaming.processes import stop_process

#: Seconds to wait for ``/-/ready`` (Prometheus usually answers within 1-2 s).
START_TIMEOUT_S = 30.0


def prometheus_binary() -> str:
    """Path of the ``prometheus`` executable, or a :class:`UsageError` saying how to install it."""
    path = shutil.which("prometheus")
    if path is None:
        raise UsageError("prometheus not found on PATH: run `make prometheus` "
                         "(apt-get install prometheus) first")
    return path


def scrape_config(targets: Mapping[str, Sequence[str]], scrape_interval_s: float,
                  rule_files: Sequence[str | Path] = ()) -> dict:
    """A Prometheus config scraping each job's ``host:port`` targets at ``/metrics``.

    Args:
        targets: Job name → ``["host:port", ...]``.
        scrape_interval_s: Scrape (and rule evaluation) interval in seconds.
        rule_files: Recording/alerting rule files to load (made absolute).

    Returns:
        The config as a dict (JSON is valid YAML, so it can be written with ``json.dump``).

    >>> scrape_config({"probe": ["127.0.0.1:9"]}, 1)["scrape_configs"][0]["job_name"]
    'probe'
    """
    interval = f"{int(scrape_interval_s * 1000)}ms"
    return {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "rule_files": [str(Path(path).resolve()) for path in rule_files],
        "scrape_configs": [
            {"job_name": job, "scrape_timeout": interval,
             "static_configs": [{"targets": list(hosts)}]}
            for job, hosts in targets.items()
        ],
    }


class PrometheusServer:
    """Run Prometheus on ``127.0.0.1:port`` as a child process; a context manager.

    Args:
        targets: Job name → ``["host:port", ...]`` to scrape at ``/metrics``.
        scrape_interval_s: Scrape interval; 1 s lets ``rate(x[5s])`` work within seconds.
        port: Port for Prometheus's own web/API server; ``None`` picks a free one.
        rule_files: Alerting/recording rule files to evaluate at the scrape interval (e.g.
            ``deploy/prometheus/alerts.yml``).

    Attributes:
        url: ``"http://127.0.0.1:PORT"`` of the API once started.
    """

    def __init__(self, targets: Mapping[str, Sequence[str]], scrape_interval_s: float = 1.0,
                 port: int | None = None, rule_files: Sequence[str | Path] = ()):
        self.targets = {job: list(hosts) for job, hosts in targets.items()}
        self.rule_files = list(rule_files)
        self.scrape_interval_s = scrape_interval_s
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._dir: Path | None = None
        self._process: subprocess.Popen | None = None
        self._log: IO[bytes] | None = None

    def start(self, timeout_s: float = START_TIMEOUT_S) -> PrometheusServer:
        """Write the config, start Prometheus and wait until ``/-/ready`` answers 200."""
        binary = prometheus_binary()
        self._dir = Path(tempfile.mkdtemp(prefix="dynllm-prometheus-"))
        config = self._dir / "prometheus.yml"
        config.write_text(json.dumps(
            scrape_config(self.targets, self.scrape_interval_s, self.rule_files)))
        self._log = (self._dir / "prometheus.log").open("wb")
        self._process = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={self._dir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=subprocess.DEVNULL, stderr=self._log,
        )
        deadline = time.monotonic() + timeout_s
        while not self.ready():
            if self._process.poll() is not None or time.monotonic() > deadline:
                log = (self._dir / "prometheus.log").read_text(errors="replace")[-2000:]
                self.stop()
                raise RuntimeError(f"prometheus did not become ready within {timeout_s}s:\n{log}")
            time.sleep(0.05)
        return self

    def ready(self) -> bool:
        """Whether Prometheus answers ``/-/ready`` with 200 right now."""
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as response:
                return response.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def stop(self, timeout_s: float = 10.0) -> None:
        """Terminate Prometheus (kill after ``timeout_s``) and delete its config and storage."""
        process, self._process = self._process, None
        stop_process(process, timeout_s)
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    @property
    def running(self) -> bool:
        """Whether the Prometheus child process is alive."""
        return self._process is not None and self._process.poll() is None

    def query(self, promql: str) -> list[dict[str, Any]]:
        """Evaluate an instant query now.

        Args:
            promql: A PromQL expression.

        Returns:
            For a vector, one ``{"metric": {label: value}, "value": [ts, "number"]}`` per series;
            for a scalar, a single ``{"metric": {}, "value": [ts, "number"]}``.

        Raises:
            ValueError: Prometheus rejected the query (the message is Prometheus's error).
        """
        data = self.api("query", query=promql)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def api(self, endpoint: str, **params: str) -> Any:
        """GET ``/api/v1/<endpoint>`` (e.g. ``"query"``, ``"rules"``, ``"targets"``).

        Returns:
            The response's ``data`` field.

        Raises:
            ValueError: Prometheus answered with an error (its message is included).
        """
        address = f"{self.url}/api/v1/{endpoint}?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(address, timeout=10) as response:
                body = json.load(response)
        except urllib.error.HTTPError as exc:  # 400/422 carry a JSON error
            body = json.load(exc)
        if body.get("status") != "success":
            raise ValueError(f"{endpoint} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def value(self, promql: str) -> float | None:
        """The single number a query returns, or ``None`` when it returns no series.

        Raises:
            ValueError: The query returns more than one series (aggregate it, e.g. with sum).
        """
        result = self.query(promql)
        if len(result) > 1:
            raise ValueError(f"{promql!r} returned {len(result)} series; expected one")
        return float(result[0]["value"][1]) if result else None

    def wait_for(self, promql: str, accept: Callable[[float], bool] = lambda v: True,
                 timeout_s: float = 30.0) -> float:
        """Poll :meth:`value` until it returns a number that ``accept`` takes.

        Returns:
            The accepted value.

        Raises:
            TimeoutError: Not accepted within ``timeout_s`` (the message has the last value).
        """
        deadline = time.monotonic() + timeout_s
        while True:
            current = self.value(promql)
            if current is not None and accept(current):
                return current
            if time.monotonic() > deadline:
                raise TimeoutError(f"{promql!r} still {current} after {timeout_s}s")
            time.sleep(min(0.25, self.scrape_interval_s / 2))

    def __enter__(self) -> PrometheusServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
