"""``dynllm bench serving``: how fresh and how fast ``/recommend`` is with the pipeline running.

Everything runs as real separate processes on the same machine: a local broker (this process),
``dynllm run`` (the live pipeline), ``dynllm serve --bootstrap-servers`` (following the
``user-embeddings`` changelog), a producer process sending the dataset's log at ``--rate``
events/s, and a load process sending ``/recommend`` requests at ``--request-rate``.

1. **State**: the run's model warmed on the first ``--warm-events`` events (memory, neighbours
   and purchase statistics: a server with a realistic user-KNN matrix), saved as the run the
   pipeline and the server start from; the live stream continues the log after them.
2. **Freshness**: every ``--probe-every`` seconds the producer process puts one purchase for
   one of ``--probe-users`` probe households (ids no log event uses, so nothing else moves
   their version) into its stream, with the event time of the log row it sent last (the
   pipeline seals micro-batches by an event-time watermark: a probe out of time order would be
   late); this process polls ``/recommend`` for that household every ``--poll-ms`` until the
   answer's ``version`` counts the purchase. Freshness = that answer's arrival − the time the
   producer sent it: produce → pipeline (including the wait for the watermark) → changelog →
   server → answer, quantised by the poll interval. These polls are ``/recommend`` requests
   too, on top of the load (``probe_requests_per_s`` in the report).
3. **Latency**: the load process sends requests open-loop at a fixed schedule (households of
   the stream's first seconds, ``k=10``) over ``--connections`` keep-alive connections; a
   request's latency is its answer's arrival − its scheduled send time, so a server that falls
   behind shows it.

Use ``flock -x /tmp/dynllm-bench.lock dynllm bench serving --json OUT``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

TOPIC = "purchases"


def warm_run(data_dir: str, out: Path, events: int) -> str:
    """A run directory: an untrained TGN (timing only) that has applied the first ``events``
    events of the dataset (memory, neighbours, purchase statistics)."""
    import pyarrow.parquet as pq

    from pipelines.bench import untrained_run
    from tgn.run import Run

    out.mkdir(parents=True, exist_ok=True)
    run = Run.open(untrained_run(data_dir, out))
    model = run.model().eval()
    table = pq.read_table(Path(data_dir) / "events.parquet").slice(0, events)
    model.apply_events(model.encode(table))
    model.save(run.model_path)
    return str(run.path)


def _get_json(url: str, timeout: float = 5.0) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as err:
        return err.code, {}
    except OSError:
        return 0, {}


def _probe_value(n: int, probe_users: int, item: str, ts: float) -> tuple[str, int, bytes]:
    """Probe ``n``: ``(household, the version that counts it, the event as JSON)``."""
    user = f"probe-{n % probe_users}"
    return user, n // probe_users + 1, json.dumps({
        "event_id": f"probe-{n}", "user_id": user, "item_id": item, "ts": ts,
        "quantity": 1.0, "price": 1.0}).encode()


def _produce_main(argv: list[str]) -> None:
    """Child process: send rows ``[start, start + rate·seconds)`` of the log at ``rate``/s, and
    every ``probe_every`` s from ``probe_from`` s to ``probe_until`` s one probe purchase with
    the event time of the row sent last (in time order with the stream, so never late); each
    probe is printed as a JSON line ``{"user", "version", "produced"}``."""
    import pyarrow.parquet as pq

    from pipelines.load_bench import _send, fast_producer

    bootstrap, log_path, start, rate, seconds = (argv[0], argv[1], int(argv[2]),
                                                 float(argv[3]), float(argv[4]))
    probe_every, probe_from, probe_until = float(argv[5]), float(argv[6]), float(argv[7])
    probe_users, probe_item, n = int(argv[8]), argv[9], int(argv[10])
    rows = pq.read_table(log_path).slice(start, int(rate * seconds)).to_pylist()
    values = [json.dumps({k: v for k, v in row.items() if v is not None}).encode()
              for row in rows]
    producer = fast_producer(bootstrap)
    print("ready", flush=True)
    began = time.monotonic()
    next_probe = began + probe_from
    for i, value in enumerate(values):
        delay = began + i / rate - time.monotonic()
        if delay > 0.001:
            time.sleep(delay)
        _send(producer, value)
        if time.monotonic() >= next_probe and next_probe < began + probe_until:
            user, version, probe = _probe_value(n, probe_users, probe_item, rows[i]["ts"])
            produced = time.time()
            _send(producer, probe)
            print(json.dumps({"user": user, "version": version, "produced": produced}),
                  flush=True)
            n, next_probe = n + 1, next_probe + probe_every
        producer.poll(0)
    producer.flush(30)
    print(json.dumps({"sent": len(values), "seconds": time.monotonic() - began}), flush=True)


def _follow_probes(lines, seen, deadline_s: float, poll_ms: float) -> tuple[list[float], int, int]:
    """Poll ``/recommend`` (``seen(user, version)``) for every probe the feeder announces on
    ``lines`` (its stdout) until it reports its end; returns ``(freshness ms per probe seen,
    probes missed, polls)`` and leaves the feeder's last line in ``lines.report``."""
    announced: queue.Queue = queue.Queue()

    def read() -> None:
        for line in lines:
            announced.put(json.loads(line))
        announced.put(None)

    threading.Thread(target=read, daemon=True).start()
    fresh, outstanding, missed, polls, done = [], [], 0, 0, False
    while not done or outstanding:
        while True:
            try:
                item = announced.get_nowait()
            except queue.Empty:
                break
            if item is None or "sent" in item:
                done = done or item is None
                lines.report = item or lines.report
            else:
                outstanding.append(item)
        for probe in list(outstanding):
            polls += 1
            if seen(probe["user"], probe["version"]):
                fresh.append((time.time() - probe["produced"]) * 1000.0)
                outstanding.remove(probe)
            elif time.time() - probe["produced"] > deadline_s:
                missed += 1
                outstanding.remove(probe)
        time.sleep(poll_ms / 1000)
    return fresh, missed, polls


def _load_main(argv: list[str]) -> None:
    """Child process: open-loop ``/recommend`` load; prints one JSON report."""
    host, port, rate, seconds, connections = (argv[0], int(argv[1]), float(argv[2]),
                                              float(argv[3]), int(argv[4]))
    users = json.loads(Path(argv[5]).read_text())
    rng = np.random.default_rng(0)
    total = int(rate * seconds)
    picks = rng.integers(0, len(users), total)
    jobs: queue.Queue = queue.Queue()
    results: list[tuple[float, float, int]] = []  # (scheduled, done, status)
    lock = threading.Lock()

    def worker() -> None:
        conn = http.client.HTTPConnection(host, port, timeout=10)
        while (job := jobs.get()) is not None:
            scheduled, user = job
            try:
                conn.request("GET", f"/recommend?user={user}&k=10")
                reply = conn.getresponse()
                reply.read()
                status = reply.status
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection(host, port, timeout=10)
                status = 0
            with lock:
                results.append((scheduled, time.perf_counter(), status))
        conn.close()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(connections)]
    for thread in threads:
        thread.start()
    print("ready", flush=True)
    began = time.perf_counter()
    for i in range(total):
        scheduled = began + i / rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        jobs.put((scheduled, users[picks[i]]))
    for _ in threads:
        jobs.put(None)
    for thread in threads:
        thread.join(30)
    done = np.array([r[1] for r in results])
    latency = (done - np.array([r[0] for r in results])) * 1000.0
    statuses = [r[2] for r in results]
    print(json.dumps({"requests": len(results), "latency_ms": latency.tolist(),
                      "span_s": float(done.max() - began) if done.size else 0.0,
                      "ok": sum(s == 200 for s in statuses),
                      "statuses": {str(s): statuses.count(s) for s in set(statuses)}}),
          flush=True)


class _Lines:
    """A child's stdout lines, with the last report line kept (:func:`_follow_probes`)."""

    def __init__(self, stream) -> None:
        self.stream, self.report = stream, None

    def __iter__(self):
        return iter(self.stream)


def _child(args: list[str], log: Path | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE if log is None
                            else log.open("ab"), stderr=subprocess.STDOUT if log else None,
                            text=log is None)


def _wait(check, timeout_s: float, what: str, every_s: float = 0.1) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out {what}")
        time.sleep(every_s)


def bench_serving(data_dir: str, warm_events: int, rate: float, seconds: float,
                  request_rate: float, connections: int, probe_every: float, probe_users: int,
                  poll_ms: float, work: Path) -> dict[str, object]:
    """The serving figures (see the module docstring)."""
    import pyarrow.parquet as pq

    from streaming.broker import Broker, free_port
    from streaming.kafka_io import create_topics, json_producer

    log_path = str(Path(data_dir) / "events.parquet")
    started = time.perf_counter()
    run = warm_run(data_dir, work / "run", warm_events)
    warm_s = time.perf_counter() - started
    events = pq.read_table(log_path, columns=["user_id", "item_id", "ts"])
    head = events.slice(0, warm_events)
    # requested households: those of the stream's first seconds (they have embeddings by the
    # time the load starts)
    early = events.slice(warm_events, int(rate * min(5.0, seconds / 6)))
    users = sorted(set(early.column("user_id").to_pylist()))
    (work / "users.json").write_text(json.dumps(users))
    probe_item = str(head.column("item_id")[0])
    probe_t = float(head.column("ts")[warm_events - 1])
    procs: list[subprocess.Popen] = []
    load_avg = [os.getloadavg()]
    with Broker() as broker:
        bootstrap = broker.bootstrap_servers
        create_topics(bootstrap, [TOPIC], partitions=4)
        create_topics(bootstrap, ["user-embeddings"], partitions=4)
        port, metrics_port = free_port(), free_port()
        try:
            procs.append(_child(["-m", "pipelines.cli", "run", "--bootstrap-servers", bootstrap,
                                 "--run", run, "--state-dir", str(work / "state"),
                                 "--metrics-port", str(metrics_port),
                                 "--no-profile-requests"], work / "pipeline.log"))
            procs.append(_child(["-m", "pipelines.cli", "serve", "--run", run, "--state-dir",
                                 str(work / "state"), "--data", data_dir, "--port", str(port),
                                 "--bootstrap-servers", bootstrap], work / "server.log"))
            base = f"http://127.0.0.1:{port}"
            _wait(lambda: _get_json(f"{base}/healthz")[0] == 200, 300, "for the server")
            producer = json_producer(bootstrap, linger_ms=0)

            def probe(n: int) -> tuple[str, int]:
                # before the stream in event time (nothing it sends is late behind these), and
                # in the order sent (the sealer orders ties by event id: "probe-10" < "probe-9")
                ts = probe_t - 1.0 + n / (10.0 * probe_users)
                user, version, value = _probe_value(n, probe_users, probe_item, ts)
                producer.send(TOPIC, key=user, value=json.loads(value))
                producer.flush()
                return user, version

            def seen(user: str, version: int) -> bool:
                status, body = _get_json(f"{base}/recommend?user={user}&k=1")
                return status == 200 and body.get("version", 0) >= version

            # the pipeline is up and the server follows it once a first probe comes back
            for n in range(probe_users):
                user, version = probe(n)
                _wait(lambda u=user, v=version: seen(u, v), 300, "for the first probes")
            warmup = min(5.0, seconds / 6)  # the stream's own warm-up
            feeder = _child(["-m", "pipelines.serving_bench", "produce", bootstrap, log_path,
                             str(warm_events), str(rate), str(seconds), str(probe_every),
                             str(warmup + 1.0), str(seconds - 12), str(probe_users),
                             probe_item, str(probe_users)])
            feeder.stdout.readline()  # ready
            time.sleep(warmup)
            loader = _child(["-m", "pipelines.serving_bench", "load", "127.0.0.1", str(port),
                             str(request_rate), str(seconds - 10), str(connections),
                             str(work / "users.json")])
            loader.stdout.readline()  # ready
            load_avg.append(os.getloadavg())
            polling_from = time.monotonic()
            lines = _Lines(feeder.stdout)
            fresh, missed, polls = _follow_probes(lines, seen, 10.0, poll_ms)
            polling_s = time.monotonic() - polling_from
            load_avg.append(os.getloadavg())
            load = json.loads(loader.stdout.readline())
            loader.wait(60)
            produced_report = lines.report
            feeder.wait(60)
            load_avg.append(os.getloadavg())
            producer.close()
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
    latency = np.asarray(load["latency_ms"])
    fresh_ms = np.asarray(fresh)
    return {
        "served_freshness_p50_ms": float(np.percentile(fresh_ms, 50)),
        "served_freshness_p99_ms": float(np.percentile(fresh_ms, 99)),
        "served_freshness_max_ms": float(fresh_ms.max()),
        "probes": int(fresh_ms.size), "probes_missed": missed, "poll_ms": poll_ms,
        "probe_requests_per_s": (polls + fresh_ms.size) / max(polling_s, 1e-9),
        "recommend_rate": load["requests"] / max(load["span_s"], 1e-9),
        "recommend_target_rate": request_rate,
        "recommend_p50_ms": float(np.percentile(latency, 50)),
        "recommend_p99_ms": float(np.percentile(latency, 99)),
        "recommend_max_ms": float(latency.max()),
        "recommend_requests": load["requests"], "recommend_statuses": load["statuses"],
        "events_rate": produced_report["sent"] / max(produced_report["seconds"], 1e-9),
        "events_target_rate": rate, "seconds": seconds, "warm_events": warm_events,
        "warm_s": warm_s, "connections": connections,
        "load_average_1m": [round(a[0], 2) for a in load_avg],
        "data": data_dir,
    }


def _bench(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        report = bench_serving(args.data, args.warm_events, args.rate, args.seconds,
                               args.request_rate, args.connections, args.probe_every,
                               args.probe_users, args.poll_ms, Path(tmp))
    report["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"served freshness p50 {report['served_freshness_p50_ms']:.0f} ms, p99 "
          f"{report['served_freshness_p99_ms']:.0f} ms ({report['probes']} probes, "
          f"{report['probes_missed']} missed) at {report['events_rate']:,.0f} events/s; "
          f"/recommend p50 {report['recommend_p50_ms']:.1f} ms, p99 "
          f"{report['recommend_p99_ms']:.1f} ms at {report['recommend_rate']:.0f} req/s; "
          f"load average {report['load_average_1m']}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def add_bench_arguments(bench_targets: argparse._SubParsersAction) -> None:
    """Add ``bench serving``."""
    bench = bench_targets.add_parser("serving", help="produce→/recommend freshness and "
                                                     "/recommend latency, pipeline running")
    bench.add_argument("--data", default="data/cj26", help="dataset directory (data/cj26)")
    bench.add_argument("--warm-events", type=int, default=400_000,
                       help="log events applied to the model before the live part (400000)")
    bench.add_argument("--rate", type=float, default=2000.0, help="live events/s (2000)")
    bench.add_argument("--seconds", type=float, default=60.0, help="live duration (60)")
    bench.add_argument("--request-rate", type=float, default=200.0,
                       help="/recommend requests/s of the load process (200)")
    bench.add_argument("--connections", type=int, default=8,
                       help="keep-alive connections of the load process (8)")
    bench.add_argument("--probe-every", type=float, default=0.5,
                       help="seconds between freshness probes (0.5)")
    bench.add_argument("--probe-users", type=int, default=20, help="probe households (20)")
    bench.add_argument("--poll-ms", type=float, default=20.0,
                       help="probe poll interval of /recommend (20 ms)")
    bench.add_argument("--json", help="write the figures to this JSON file")
    bench.set_defaults(func=_bench)


if __name__ == "__main__" and sys.argv[1:2] == ["produce"]:
    _produce_main(sys.argv[2:])
elif __name__ == "__main__" and sys.argv[1:2] == ["load"]:
    _load_main(sys.argv[2:])
