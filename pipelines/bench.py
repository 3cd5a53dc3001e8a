"""``dynllm bench pipeline``: replay throughput and live event→embedding latency.

* **Replay**: the whole pipeline (read → parse → memory → fusion → write) over the first
  ``--events`` rows of a dataset, on the in-process runner. Throughput is
  ``events / (wall(N rows) - wall(1 row))``, so Beam and model start-up cost is not counted as
  throughput (it is reported as ``replay_startup_s``). Reference, same run: the bare model loop
  (encode → update → temporal user embeddings per batch, no Beam, parsing or writing).
* **Live**: the pipeline reads a fresh local broker while a separate producer process sends
  events at ``--rate`` for ``--seconds``; latency per event is emit time minus the Kafka record
  timestamp (set at produce). Lag is produced minus consumed, sampled every second. Reference,
  same run: a bare ``TopicReader`` consuming the same stream (produce→consume latency).
  Where the time goes (:func:`latency_breakdown`): per event, the wait before the poll that
  returned it, the poll, and each stage, from the marks every batch collects on its way.

Use ``flock /tmp/dynllm-bench.lock dynllm bench pipeline ...`` so benchmarks never overlap.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.elements import BATCH_EVENTS
from tgn.run import Run

LIVE_TOPIC = "purchases"


def _consumed() -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("dynllm_events_consumed_total") or 0.0


def _outcomes() -> dict[str, float]:
    """This process's counts of what became of the events read so far: dead-lettered by
    reason, and the watermark stage's outcomes (sealed, late, already applied)."""
    from streaming.metrics import EVENTS_DEAD_LETTERED, EVENTS_SEALED

    counts: dict[str, float] = {}
    for prefix, metric, label in (("dead_lettered", EVENTS_DEAD_LETTERED, "reason"),
                                  ("watermark", EVENTS_SEALED, "outcome")):
        for sample in next(iter(metric.collect())).samples:
            if sample.name.endswith("_total"):
                counts[f"{prefix}:{sample.labels[label]}"] = sample.value
    return counts


def untrained_run(data_dir: str, out: Path) -> str:
    """A run directory with an untrained TGN whose id maps cover the dataset (timing only)."""
    import pyarrow.compute as pc

    from streaming.dataset import Dataset
    from tgn.ids import IdMap
    from tgn.model import TGNRecommender

    data = Dataset.load(data_dir)
    model = TGNRecommender(None, IdMap(pc.unique(data.events.column("user_id")).to_pylist()),
                           IdMap(data.items.column("item_id").to_pylist()))
    Run(out).write(model, {"model": "tgn", "data": str(Path(data_dir).resolve())}, [])
    return str(out)


def _bare_loop(run_dir: str, log_path: str, events: int, batch: int) -> float:
    """Seconds for the model alone over the same batches (encode, update, user embeddings)."""
    import pyarrow.parquet as pq
    import torch

    model = Run.open(run_dir).model().eval()
    model.reset_state()
    table = pq.read_table(log_path).slice(0, events)
    started = time.perf_counter()
    with torch.no_grad():
        for lo in range(0, table.num_rows, batch):
            encoded = model.encode(table.slice(lo, batch))
            model.update(encoded)
            users = torch.unique(encoded.users)
            nodes = model.user_node[users]
            t = model.memory.last_update[nodes]
            model.projection(model.embed_nodes(nodes, t), torch.zeros_like(t))
    return time.perf_counter() - started


def bench_replay(run_dir: str, log_path: str, events: int, batch: int, repeats: int,
                 batch_events: int = BATCH_EVENTS) -> dict[str, float]:
    """Replay figures (medians over ``repeats``); the reference model loop runs micro-batches
    of ``batch_events`` rows (the pipeline's are at most that, cut by event-time windows)."""
    from pipelines.pipeline import PipelineConfig, run_pipeline

    def wall(rows: int) -> float:
        started = time.perf_counter()
        run_pipeline(PipelineConfig(run_dir=run_dir, log_path=log_path, stop_row=rows,
                                    fresh_state=True, max_batch=batch,
                                    batch_events=batch_events))
        return time.perf_counter() - started

    rates, startups, refs = [], [], []
    for _ in range(repeats):
        startup, full = wall(1), wall(events)
        rates.append(events / max(full - startup, 1e-9))
        startups.append(startup)
        refs.append(events / _bare_loop(run_dir, log_path, events, batch_events))
    rate, ref = statistics.median(rates), statistics.median(refs)
    return {"replay_events_per_s": rate, "replay_events_per_s_runs": rates,
            "replay_startup_s": statistics.median(startups),
            "reference_model_events_per_s": ref, "replay_vs_reference": rate / ref,
            "replay_events": events, "batch_size": batch, "batch_events": batch_events}


def _produce_main(argv: list[str]) -> None:
    """Child process: send the first ``limit`` events at ``rate``/s, keyed by user, printing
    counts. The values are encoded before the first send and sent by librdkafka
    (:func:`~pipelines.load_bench.fast_producer`): kafka-python took ~25% of a core at 2,000/s,
    taken from the pipeline it loads on these 2 cores."""
    import pyarrow.parquet as pq

    from pipelines.load_bench import fast_producer
    from streaming.producer import event_messages

    bootstrap, topic, log_path, limit, rate = argv[0], argv[1], argv[2], int(argv[3]), float(
        argv[4])
    messages = list(event_messages(pq.read_table(log_path).slice(0, limit)))
    producer = fast_producer(bootstrap)
    _wait_for_leaders(producer, topic)
    print("ready", flush=True)
    started, reported = time.monotonic(), 0.0
    for i, (key, value, _ts) in enumerate(messages):
        delay = started + i / rate - time.monotonic()
        if delay > 0.001:
            time.sleep(delay)
        producer.produce(topic, value, key=key)
        producer.poll(0)
        if time.monotonic() - reported >= 0.5:
            print(i + 1, flush=True)
            reported = time.monotonic()
    producer.flush(60)
    print(len(messages), flush=True)
    print("done", flush=True)


def _wait_for_leaders(producer: Any, topic: str, timeout_s: float = 10.0) -> None:
    """Wait until librdkafka knows a leader for every partition of ``topic``: a topic created
    just before held the first ~0.5 s of sends back otherwise (3 of 4 bare-consumer runs, max
    ~520 ms), where kafka-python's first send blocked until then."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        partitions = producer.list_topics(topic, timeout=timeout_s).topics[topic].partitions
        if partitions and all(p.leader >= 0 and p.error is None for p in partitions.values()):
            return
        time.sleep(0.05)


def _start_producer(bootstrap: str, topic: str, log_path: str, limit: int, rate: float):
    """The producer child process, after it said ``ready``."""
    child = subprocess.Popen([sys.executable, "-m", "pipelines.bench", "produce", bootstrap,
                              topic, log_path, str(limit), str(rate)],
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    child.stdout.readline()  # "ready"
    return child


def bare_consume_latency(bootstrap: str, log_path: str, rate: float,
                         seconds: float) -> dict[str, float]:
    """Reference: produce→consume latency of a bare ``TopicReader`` at the same rate (on a broker
    of its own: one that holds a live run's records answers slower), with the
    live reader's fetch settings (no CRC check, fetches of at most ``FETCH_MAX_WAIT_MS``)."""
    from pipelines.sources import FETCH_MAX_WAIT_MS
    from streaming.kafka_io import TopicReader, create_topics

    topic, limit = "bench-reference", int(rate * seconds)
    create_topics(bootstrap, [topic], partitions=4)
    latencies: list[float] = []
    with TopicReader(bootstrap, topic, max_batch=2000, check_crcs=False,
                     fetch_max_wait_ms=FETCH_MAX_WAIT_MS) as reader:
        reader.poll(0.1)  # connected before the first send
        child = _start_producer(bootstrap, topic, log_path, limit, rate)
        for batch in reader.batches(limit=limit, idle_timeout_s=30.0, poll_timeout_s=0.05):
            now = time.time()
            latencies.extend(now - r.timestamp_ms / 1000.0 for r in batch)
    child.wait()
    lat_ms = np.asarray(latencies) * 1000.0
    return {"reference_consume_p50_ms": float(np.percentile(lat_ms, 50)),
            "reference_consume_p99_ms": float(np.percentile(lat_ms, 99))}


#: Latency parts of :func:`latency_breakdown`, in passing order.
PARTS = ("before_poll", "poll", "parse", "seal", "memory", "fuse", "write")


def latency_breakdown(log: list) -> tuple[np.ndarray, dict[str, dict[str, float]]]:
    """Per-event latency (ms) and where it went, from the pipeline's latency records
    (:func:`pipelines.outputs.read_latency_log`).

    Parts of one event's latency (they add up to it):

    * ``before_poll``: produce → start of the poll whose records sealed the event's
      micro-batch (producer batching, broker, the wait for the watermark — the rest of its
      micro-batch and every partition's clock passing it — and the pipeline busy with earlier
      batches or between bundles);
    * ``poll``: start of that poll (or produce, if later) → records decoded;
    * ``parse``, ``seal``, ``memory``, ``fuse``: each stage's compute for that poll's batch
      (``seal``: the watermark stage);
    * ``write``: fusion done → embeddings handed to the producer and the store.

    Args:
        log: ``(produced_at [B], span trace, emit time)`` per emitted batch.

    Returns:
        ``(latency_ms [N], {"mean_ms": {part: ms}, "p99_tail_mean_ms": {part: ms}})``: the
        mean of each part over all events, and over the slowest 1% (what makes the p99).
    """
    parts: dict[str, list[np.ndarray]] = {name: [] for name in PARTS}
    totals = []
    for produced, trace, emitted in log:
        marks = dict(trace)
        if "poll" not in marks:  # the warm-up or a batch without the live reader's marks
            continue
        started = np.maximum(produced, marks["poll"])
        parts["before_poll"].append(started - produced)
        parts["poll"].append(marks["fetch"] - started)
        previous = marks["fetch"]
        for stage, end in (("parse", marks["parse"]), ("seal", marks.get("seal", marks["parse"])),
                           ("memory", marks["memory"]), ("fuse", marks["fuse"]),
                           ("write", emitted)):
            parts[stage].append(np.full(len(produced), end - previous))
            previous = end
        totals.append(emitted - produced)
    if not totals:
        return np.zeros(0), {}
    total = np.concatenate(totals) * 1000.0
    tail = total >= np.percentile(total, 99)
    columns = {name: np.concatenate(chunks) * 1000.0 for name, chunks in parts.items()}
    return total, {"mean_ms": {k: float(v.mean()) for k, v in columns.items()},
                   "p99_tail_mean_ms": {k: float(v[tail].mean()) for k, v in columns.items()}}


def bench_live(run_dir: str, log_path: str, rate: float, seconds: float, batch: int,
               call_s: float = 0.25, batch_events: int = BATCH_EVENTS,
               idle_s: float = 1.0) -> dict[str, object]:
    """Live figures: latency percentiles and lag over a run at ``rate`` events/s (every event
    counted, the last ones sealed by the idle bound after the stream stops)."""
    from pipelines.outputs import read_latency_log
    from pipelines.pipeline import PipelineConfig, run_pipeline
    from pipelines.sources import StopFlag
    from streaming.broker import Broker
    from streaming.kafka_io import create_topics, json_producer

    limit = int(rate * seconds)
    with Broker() as broker, tempfile.TemporaryDirectory() as state:
        create_topics(broker.bootstrap_servers, [LIVE_TOPIC], partitions=4)
        stop = StopFlag()
        latency_log = str(Path(state) / "latency.jsonl")
        config = PipelineConfig(run_dir=run_dir, state_dir=state,
                                bootstrap_servers=broker.bootstrap_servers, max_batch=batch,
                                request_profiles=False, call_seconds=call_s,
                                batch_events=batch_events, idle_seconds=idle_s,
                                latency_log=latency_log)
        pipeline = threading.Thread(target=run_pipeline, args=(config, stop), daemon=True)
        pipeline.start()
        warm = json_producer(broker.bootstrap_servers)  # one event to know the pipeline is up
        warm.send(LIVE_TOPIC, value={"event_id": "warm-up", "user_id": "warm", "item_id": "w",
                                     "ts": 0.0, "quantity": 1.0, "price": 0.0})
        warm.flush()
        warm.close()
        while not any(len(r[0]) for r in read_latency_log(latency_log)):
            time.sleep(0.1)
        warm_records = len(read_latency_log(latency_log))  # not counted

        def emitted() -> list:
            return read_latency_log(latency_log)[warm_records:]

        base, outcomes_before = _consumed(), _outcomes()
        child = _start_producer(broker.bootstrap_servers, LIVE_TOPIC, log_path, limit, rate)
        samples, started = [], time.monotonic()
        for line in child.stdout:
            if line.strip().isdigit():
                sent = int(line)
                samples.append((time.monotonic() - started, sent, _consumed() - base))
        child.wait()
        deadline = time.monotonic() + 60
        while _consumed() - base < limit and time.monotonic() < deadline:
            time.sleep(0.1)
        drain_s = time.monotonic() - started - samples[-1][0]
        while sum(len(e[0]) for e in emitted()) < limit and time.monotonic() < deadline:
            time.sleep(0.1)  # the last micro-batches: sealed once the partitions are idle
        stop.set()
        pipeline.join(60)
        records = emitted()
        consumed = int(_consumed() - base)
        outcomes = {k: v - outcomes_before.get(k, 0.0) for k, v in _outcomes().items()}
    with Broker() as fresh:  # a broker holding the run's records answers slower (p99 ~200 ms)
        reference = bare_consume_latency(fresh.bootstrap_servers, log_path, rate,
                                         min(seconds, 30.0))
    lat_ms, breakdown = latency_breakdown(records)
    lags = np.array([s[1] - s[2] for s in samples])
    half = len(lags) // 2
    return {"live_rate": rate, "live_seconds": seconds, "live_events": limit,
            "live_call_s": call_s,
            "live_events_emitted": int(lat_ms.size),
            "live_events_consumed": consumed,
            "live_event_outcomes": {k: int(v) for k, v in sorted(outcomes.items()) if v},
            "live_p50_ms": float(np.percentile(lat_ms, 50)),
            "live_p90_ms": float(np.percentile(lat_ms, 90)),
            "live_p99_ms": float(np.percentile(lat_ms, 99)), **reference,
            "live_p99_vs_reference": float(np.percentile(lat_ms, 99))
            / reference["reference_consume_p99_ms"],
            "live_max_ms": float(lat_ms.max()), "live_breakdown": breakdown,
            "live_achieved_produce_rate": samples[-1][1] / max(samples[-1][0], 1e-9),
            "lag_max": int(lags.max()), "lag_median": float(np.median(lags)),
            "lag_median_first_half": float(np.median(lags[:half])) if half else 0.0,
            "lag_median_second_half": float(np.median(lags[half:])) if half else 0.0,
            "drain_after_last_send_s": drain_s,
            "lag_samples": [[round(t, 2), int(p), int(c)] for t, p, c in samples]}


def _bench(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(args.threads)
    log_path = str(Path(args.data) / "events.parquet")
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = args.run or untrained_run(args.data, Path(tmp))
        report: dict[str, object] = {"data": args.data, "run": args.run or "untrained",
                                     "threads": args.threads}
        if not args.skip_replay:
            report.update(bench_replay(run_dir, log_path, args.events, args.batch_size,
                                       args.repeats, args.batch_events))
            print(f"replay: {report['replay_events_per_s']:,.0f} events/s (model alone "
                  f"{report['reference_model_events_per_s']:,.0f}/s, ratio "
                  f"{report['replay_vs_reference']:.2f})", flush=True)
        if not args.skip_live:
            report.update(bench_live(run_dir, log_path, args.rate, args.seconds,
                                     args.live_batch, args.call_seconds, args.batch_events,
                                     args.idle_seconds))
            print(f"live @ {args.rate:,.0f}/s for {args.seconds:.0f}s: p50 "
                  f"{report['live_p50_ms']:.0f} ms, p99 {report['live_p99_ms']:.0f} ms "
                  f"(bare consumer p99 {report['reference_consume_p99_ms']:.0f} ms), "
                  f"lag max {report['lag_max']} (median first/second half "
                  f"{report['lag_median_first_half']:.0f}/{report['lag_median_second_half']:.0f})")
            print(f"  {report['live_events_emitted']:,} of {report['live_events']:,} events "
                  f"emitted; outcomes: {report['live_event_outcomes']}")
            for name, parts in report["live_breakdown"].items():
                print(f"  {name}: " + ", ".join(f"{k} {v:.1f}" for k, v in parts.items()))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def add_bench_arguments(bench_targets: argparse._SubParsersAction) -> None:
    """Add ``bench pipeline``."""
    bench = bench_targets.add_parser("pipeline", help="replay events/s and live latency/lag "
                                                      "of the streaming pipeline")
    bench.add_argument("--data", default="data/cj26", help="dataset directory (data/cj26)")
    bench.add_argument("--run", help="run directory (default: an untrained model; timing only)")
    bench.add_argument("--events", type=int, default=100_000, help="replayed events (100000)")
    bench.add_argument("--batch-size", type=int, default=2000, help="replay rows per read (2000)")
    bench.add_argument("--batch-events", type=int, default=BATCH_EVENTS,
                       help=f"events per micro-batch, live and replay ({BATCH_EVENTS})")
    bench.add_argument("--idle-seconds", type=float, default=1.0,
                       help="live: idle bound of a quiet partition (1)")
    bench.add_argument("--repeats", type=int, default=3, help="replay repeats (3)")
    bench.add_argument("--rate", type=float, default=2000.0, help="live events/s (2000)")
    bench.add_argument("--seconds", type=float, default=60.0, help="live duration (60)")
    bench.add_argument("--live-batch", type=int, default=2000, help="live max batch (2000)")
    bench.add_argument("--call-seconds", type=float, default=0.25,
                       help="live reader: polling per runner call (0.25)")
    bench.add_argument("--threads", type=int, default=1, help="torch threads (1)")
    bench.add_argument("--skip-replay", action="store_true")
    bench.add_argument("--skip-live", action="store_true")
    bench.add_argument("--json", help="write the figures to this JSON file")
    bench.set_defaults(func=_bench)


if __name__ == "__main__" and sys.argv[1:2] == ["produce"]:
    _produce_main(sys.argv[2:])
