"""``dynllm monitor``: a local Prometheus scraping the dynllm processes, without Docker.

Starts the ``prometheus`` binary (Debian package; ``make prometheus``) on loopback with a
generated config that scrapes the pipeline, the profile worker and the server under the job names
of ``deploy/prometheus/prometheus.yml`` and evaluates ``deploy/prometheus/alerts.yml`` when the
source tree is at hand. Its storage is a temporary directory, deleted on exit: this is for looking
at a running system, not for keeping history (use ``deploy/docker-compose.yml`` for that).
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

from streaming import metrics
from streaming.errors import UsageError

#: The shipped alert rules, present in a source checkout (not in an installed wheel).
ALERTS_FILE = Path(__file__).resolve().parents[1] / "deploy" / "prometheus" / "alerts.yml"


def _monitor(args: argparse.Namespace) -> int:
    from streaming.prometheus_server import PrometheusServer

    targets = {"dynllm-pipeline": [args.pipeline], "dynllm-worker": [args.worker],
               "dynllm-server": [args.server]}
    rules = [ALERTS_FILE] if ALERTS_FILE.exists() and not args.no_alerts else []
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stop (and clean up) like Ctrl-C
    prom = PrometheusServer(targets, args.scrape_interval, port=args.port, rule_files=rules)
    try:
        prom.start()
    except RuntimeError as exc:  # e.g. the port is taken: say why in one line
        reason = str(exc).strip().splitlines()[-1]
        raise UsageError(f"prometheus did not start on port {args.port}: {reason}") from None
    try:
        print(f"Prometheus at {prom.url} (graph: {prom.url}/graph, targets: {prom.url}/targets, "
              f"alerts: {prom.url}/alerts)", flush=True)
        print("scraping " + ", ".join(f"{job} {hosts[0]}" for job, hosts in targets.items())
              + (f"; alert rules from {rules[0]}" if rules else "; no alert rules"), flush=True)
        while prom.running:
            time.sleep(1)
    finally:
        prom.stop()
    print("dynllm: prometheus exited on its own", file=sys.stderr)
    return 1


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``monitor``."""
    cmd = commands.add_parser("monitor", help="run a local Prometheus scraping the dynllm "
                              "processes (needs the prometheus binary: make prometheus)")
    cmd.add_argument("--port", type=int, default=9090, help="Prometheus web/API port (9090)")
    cmd.add_argument("--pipeline", default=f"127.0.0.1:{metrics.PIPELINE_PORT}",
                     help="pipeline metrics HOST:PORT (%(default)s)")
    cmd.add_argument("--worker", default=f"127.0.0.1:{metrics.WORKER_PORT}",
                     help="profile worker metrics HOST:PORT (%(default)s)")
    cmd.add_argument("--server", default=f"127.0.0.1:{metrics.SERVER_PORT}",
                     help="server HOST:PORT, scraped at /metrics (%(default)s)")
    cmd.add_argument("--scrape-interval", type=float, default=5.0,
                     help="seconds between scrapes (5)")
    cmd.add_argument("--no-alerts", action="store_true", help="do not load deploy alert rules")
    cmd.set_defaults(func=_monitor)
