"""``dynllm bench load``: sustained rate, bounded memory and lag, then a 10× burst that drains.

1. **Capacity**: the live pipeline (in this process, FnApiRunner, a local broker) drains a
   pre-filled backlog of ``--calibrate-events``; its read rate is the capacity ``C``.
2. **Steady**: a producer process (librdkafka, :func:`fast_producer`) sends at ``--rate``
   (default ``--load-share`` × C) for ``--duration`` seconds. Every second the bench records RSS
   of this process (pipeline and model; the producer is a separate process), records the broker
   acknowledged, records consumed and the lag (acknowledged − consumed).
3. **Burst**: ``--burst-factor`` × the rate for ``--burst-seconds``, then back to the steady rate
   until the lag is back under its steady 95th percentile (or ``--max-drain`` seconds).

Events cycle through a dataset's log with fresh event ids and shifted times, so the stream never
ends and duplicates stay real duplicates. Writes a JSON report and a PNG plot.
Use ``flock /tmp/dynllm-bench.lock dynllm bench load ...``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from streaming.kafka_settings import PLAINTEXT, KafkaSettings

TOPIC = "purchases"


def _consumed() -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("dynllm_events_consumed_total") or 0.0


def _messages(log_path: str, start: int = 0):
    """Endless JSON event values from round ``start`` on: round 0 is the log as it is, each later
    round the log again with new event ids and times shifted by the log's span."""
    import pyarrow.parquet as pq

    from streaming.producer import event_messages

    table = pq.read_table(log_path)
    ts = table.column("ts").to_numpy()
    span = float(ts.max() - ts.min()) + 1.0
    rows = table.to_pylist()
    for round_ in range(start, sys.maxsize):
        if round_ == 0:
            yield from (value for _key, value, _ts in event_messages(table))
            continue
        for row in rows:
            row = {k: v for k, v in row.items() if v is not None}
            row["event_id"] = f"{row['event_id']}#{round_}"
            row["ts"] += round_ * span
            yield json.dumps(row, separators=(",", ":")).encode()


def fast_producer(bootstrap_servers: str, on_delivery=None,
                  settings: KafkaSettings = PLAINTEXT):
    """A librdkafka (``confluent-kafka``) producer with the pipeline's delivery guarantees.

    Idempotent with ``acks=all`` like :data:`streaming.kafka_io.PRODUCER_DEFAULTS`, but it sends
    300k records/s from one process where kafka-python managed ~10k/s on these cores (measured),
    so the bench's producer neither caps the burst nor takes the pipeline's CPU.

    Args:
        bootstrap_servers: Kafka ``host:port``.
        on_delivery: ``f(err, msg)`` called (inside ``poll``/``flush``) once per record.
        settings: TLS/SASL settings (:mod:`streaming.kafka_settings`).
    """
    from confluent_kafka import Producer

    from streaming.kafka_io import librdkafka_config

    config = librdkafka_config(bootstrap_servers, settings, **{
        "enable.idempotence": True, "acks": "all", "linger.ms": 20, "batch.size": 1 << 20,
        "queue.buffering.max.messages": 1_000_000, "queue.buffering.max.kbytes": 1 << 20,
        "log_level": 3})
    if on_delivery is not None:
        config["on_delivery"] = on_delivery
    return Producer(config)


def _send(producer, value: bytes) -> None:
    """Queue one record, waiting while librdkafka's queue is full."""
    while True:
        try:
            producer.produce(TOPIC, value)
            return
        except BufferError:
            producer.poll(0.01)


def produce_schedule(bootstrap_servers: str, messages, phases: list[tuple[float, float]],
                     report=print, every_s: float = 0.2) -> int:
    """Send ``messages`` at ``rate`` for ``seconds``, phase after phase; records acknowledged.

    Every phase but the last is encoded before the first send (the last one, a drain tail of
    unknown length, is encoded on the fly), so the burst measures sending, not JSON encoding.

    Args:
        bootstrap_servers: Kafka ``host:port``.
        messages: an endless iterator of encoded values.
        phases: ``[(events per s, seconds), ...]``.
        report: called with the count of records the broker acknowledged so far, every
            ``every_s`` and at the end (``report("ready")`` once encoding is done).
    """
    acked, failed = [0], [0]

    def delivered(err, _msg) -> None:
        if err is None:
            acked[0] += 1
        else:
            failed[0] += 1

    counts = [int(rate * seconds) + 1 for rate, seconds in phases[:-1]]
    encoded = [[next(messages) for _ in range(n)] for n in counts]
    producer = fast_producer(bootstrap_servers, on_delivery=delivered)
    report("ready")
    reported = 0.0
    for index, (rate, seconds) in enumerate(phases):
        queue = iter(encoded[index]) if index < len(encoded) else messages
        started, sent = time.monotonic(), 0
        while (elapsed := time.monotonic() - started) < seconds:
            for _ in range(int(elapsed * rate) - sent):
                _send(producer, next(queue))
                sent += 1
            producer.poll(0)
            if time.monotonic() - reported >= every_s:
                report(acked[0])
                reported = time.monotonic()
            time.sleep(0.002)
        if index < len(encoded):
            encoded[index] = []  # free what was sent
    producer.flush(60)
    if failed[0]:
        raise RuntimeError(f"{failed[0]} records not delivered")
    report(acked[0])
    return acked[0]


def _produce_main(argv: list[str]) -> None:
    """Child process: ``BOOTSTRAP LOG RATE:SECONDS[,RATE:SECONDS...]``; prints records acked."""
    bootstrap, log_path, schedule = argv
    phases = [tuple(float(x) for x in p.split(":")) for p in schedule.split(",")]
    # round 0 (the log itself) was the calibration backlog
    produce_schedule(bootstrap, _messages(log_path, start=1), phases,
                     report=lambda x: print(x, flush=True))


def _rss_mb() -> float:
    import psutil

    return psutil.Process(os.getpid()).memory_info().rss / 2**20


def _fill_backlog(bootstrap: str, log_path: str, events: int) -> None:
    """Produce the first ``events`` of the log before the pipeline starts (the capacity test)."""
    producer = fast_producer(bootstrap)
    messages = _messages(log_path)
    for _ in range(events):
        _send(producer, next(messages))
    if producer.flush(60):
        raise RuntimeError("backlog not delivered")


def _capacity(events: int) -> float:
    """Events/s the just-started pipeline reads from the backlog (from its first record on)."""
    while _consumed() == 0:
        time.sleep(0.05)
    started, base = time.monotonic(), _consumed()
    while _consumed() < 0.9 * events:  # the last partial batches are not representative
        time.sleep(0.05)
    capacity = (_consumed() - base) / (time.monotonic() - started)
    while _consumed() < events:  # the load starts on an empty backlog
        time.sleep(0.05)
    return capacity


def _sample_while(child: subprocess.Popen, base: float, started: float, until) -> list[list]:
    """Per second ``[t, sent, consumed, lag, rss_mb]``, until ``until(samples)`` or child exit."""
    sent, samples = 0, []
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(child.stdout), daemon=True)
    reader.start()
    next_at = time.monotonic()
    while child.poll() is None and not until(samples):
        next_at += 1.0
        time.sleep(max(0.0, next_at - time.monotonic()))
        numbers = [int(x) for x in lines[-3:] if x.strip().isdigit()]
        sent = max(numbers, default=sent)
        consumed = _consumed() - base
        samples.append([round(time.monotonic() - started, 2), sent, int(consumed),
                        int(sent - consumed), round(_rss_mb(), 1)])
    return samples


def run_load(data: str, rate: float | None, duration: float, burst_factor: float,
             burst_seconds: float, max_drain: float, load_share: float,
             calibrate_events: int) -> dict[str, object]:
    """Run the three phases; the figures and per-second samples."""
    from pipelines.bench import untrained_run
    from pipelines.pipeline import PipelineConfig, run_pipeline
    from pipelines.sources import StopFlag
    from streaming.broker import Broker
    from streaming.kafka_io import create_topics

    log_path = str(Path(data) / "events.parquet")
    with Broker() as broker, tempfile.TemporaryDirectory() as tmp:
        run_dir = untrained_run(data, Path(tmp))
        create_topics(broker.bootstrap_servers, [TOPIC], partitions=2)
        stop = StopFlag()
        config = PipelineConfig(run_dir=run_dir, state_dir=str(Path(tmp) / "state"),
                                bootstrap_servers=broker.bootstrap_servers,
                                request_profiles=False)
        _fill_backlog(broker.bootstrap_servers, log_path, calibrate_events)
        pipeline = threading.Thread(target=run_pipeline, args=(config, stop), daemon=True)
        pipeline.start()
        capacity = _capacity(calibrate_events)
        rate = rate or round(load_share * capacity, -1)
        print(f"capacity {capacity:,.0f} events/s; steady rate {rate:,.0f}/s", flush=True)
        schedule = f"{rate}:{duration},{burst_factor * rate}:{burst_seconds},{rate}:{max_drain}"
        child = subprocess.Popen([sys.executable, "-m", "pipelines.load_bench", "produce",
                                  broker.bootstrap_servers, log_path, schedule],
                                 stdout=subprocess.PIPE, text=True)
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        base, started, rss0 = _consumed(), time.monotonic(), _rss_mb()
        steady_end, burst_end = duration, duration + burst_seconds

        def drained(samples: list[list]) -> bool:
            if not samples or samples[-1][0] < burst_end + 5:
                return False
            steady = [s[3] for s in samples if 10 <= s[0] < steady_end]
            return samples[-1][3] <= max(np.percentile(steady, 95), 2 * rate)

        samples = _sample_while(child, base, started, drained)
        child.terminate()
        child.wait()
        stop.set()
        pipeline.join(120)
    return _summary(samples, capacity, rate, duration, burst_factor, burst_seconds, rss0)


def _summary(samples: list[list], capacity: float, rate: float, duration: float,
             burst_factor: float, burst_seconds: float, rss0: float) -> dict[str, object]:
    s = np.asarray(samples, dtype=float)
    t, sent, consumed, lag, rss = s.T
    steady = (t >= 10) & (t < duration)
    half = steady & (t >= duration / 2)
    burst_end = duration + burst_seconds
    after = t >= burst_end
    drained_at = float(t[-1]) if len(t) else float("nan")

    def rate_between(a: float, b: float, counts: np.ndarray) -> float:
        inside = (t >= a) & (t <= b)
        ti, ci = t[inside], counts[inside]
        return float((ci[-1] - ci[0]) / (ti[-1] - ti[0])) if len(ti) > 1 else float("nan")

    slope = np.polyfit(t[half], rss[half], 1)[0] * 60 if half.sum() > 2 else float("nan")
    return {
        "capacity_events_per_s": capacity, "rate": rate, "duration_s": duration,
        "burst_factor": burst_factor, "burst_seconds": burst_seconds,
        "steady_sent_rate": rate_between(10, duration, sent),
        "steady_consumed_rate": rate_between(10, duration, consumed),
        "burst_sent_rate": rate_between(duration, burst_end, sent),
        "steady_lag_median": float(np.median(lag[steady])),
        "steady_lag_p95": float(np.percentile(lag[steady], 95)),
        "steady_lag_max": float(lag[steady].max()),
        "steady_lag_first_half_median": float(np.median(lag[steady & ~half])),
        "steady_lag_second_half_median": float(np.median(lag[half])),
        "burst_lag_peak": float(lag.max()), "burst_lag_peak_at_s": float(t[np.argmax(lag)]),
        "drained_after_burst_s": drained_at - burst_end if after.any() else float("nan"),
        "rss_start_mb": rss0, "rss_steady_max_mb": float(rss[steady].max()),
        "rss_max_mb": float(rss.max()), "rss_second_half_slope_mb_per_min": float(slope),
        "events_consumed": int(consumed[-1]),
        "samples": samples,
    }


def plot(report: dict[str, object], path: Path) -> None:
    """Lag and RSS over time, with the burst shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t, sent, _consumed_, lag, rss = np.asarray(report["samples"], dtype=float).T
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    start = report["duration_s"]
    for ax in (top, bottom):
        ax.axvspan(start, start + report["burst_seconds"], color="tab:red", alpha=0.15,
                   label=f"{report['burst_factor']:g}× burst")
    top.plot(t, lag, color="tab:blue")
    top.set_ylabel("lag (records acked − read)")
    top.set_title(f"dynllm bench load: {report['rate']:,.0f} events/s steady "
                  f"(capacity {report['capacity_events_per_s']:,.0f}/s)")
    top.legend(loc="upper left")
    bottom.plot(t, rss, color="tab:green")
    bottom.set_ylabel("pipeline RSS (MiB)")
    bottom.set_xlabel("seconds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _bench(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    report = run_load(args.data, args.rate, args.duration, args.burst_factor, args.burst_seconds,
                      args.max_drain, args.load_share, args.calibrate_events)
    report["load_average_1_5_15_before"] = load_before
    report["load_average_1_5_15"] = os.getloadavg()
    report["threads"] = args.threads
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "load.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, out / "load.png")
    keys = [k for k, v in report.items() if k != "samples" and not isinstance(v, list)]
    print("\n".join(f"{k}: {report[k]:,.2f}" if isinstance(report[k], float) else
                    f"{k}: {report[k]}" for k in keys))
    print(f"wrote {out / 'load.json'} and {out / 'load.png'}")
    return 0


def add_bench_arguments(bench_targets: argparse._SubParsersAction) -> None:
    """Add ``bench load``."""
    bench = bench_targets.add_parser("load", help="sustained rate with RSS and lag, then a 10× "
                                                  "burst that must drain")
    bench.add_argument("--data", default="data/cj26", help="dataset directory (data/cj26)")
    bench.add_argument("--rate", type=float, help="steady events/s (default: --load-share × "
                                                  "measured capacity)")
    bench.add_argument("--load-share", type=float, default=0.5,
                       help="steady rate as a share of the measured capacity (0.5)")
    bench.add_argument("--calibrate-events", type=int, default=30_000,
                       help="backlog drained to measure capacity (30000)")
    bench.add_argument("--duration", type=float, default=600.0, help="steady seconds (600)")
    bench.add_argument("--burst-factor", type=float, default=10.0, help="burst rate factor (10)")
    bench.add_argument("--burst-seconds", type=float, default=30.0, help="burst seconds (30)")
    bench.add_argument("--max-drain", type=float, default=600.0,
                       help="longest wait for the lag to drain after the burst (600)")
    bench.add_argument("--threads", type=int, default=1, help="torch threads (1)")
    bench.add_argument("--out", default="benchmarks/load", help="JSON + PNG folder")
    bench.set_defaults(func=_bench)


if __name__ == "__main__" and sys.argv[1:2] == ["produce"]:
    _produce_main(sys.argv[2:])
