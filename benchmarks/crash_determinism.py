"""Issue 17's figure at a larger scale: ``kill -9`` a live 4-partition run at random points while
events arrive; its final checkpoint must equal an uninterrupted run's and a replay's, tensor for
tensor (the CI test, ``tests/reliability/test_crash_safety.py``, does the same on 900 events).

Two local brokers get the same first ``--events`` of a dataset at ``--rate`` events/s, keyed by
user, produced live at the same time. ``dynllm run`` reads one of them uninterrupted; on the
other it is killed with SIGKILL ``--kills`` times, each once it has written a checkpoint of its
own and then read a random number (seeded) of further records, and restarted on the same state
directory. When every event is sealed both get SIGTERM;
then the same events are replayed as one sorted log through the same pipeline. An untrained TGN
whose id maps cover the dataset (the state's equality does not depend on the weights).

    flock -x /tmp/dynllm-bench.lock python benchmarks/crash_determinism.py --data data/cj26 \\
        --events 100000 --rate 1000 --kills 6 --json benchmarks/crash_determinism.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import torch

BUFFERS = ("memory.memory", "memory.last_update", "neighbors.neighbor", "neighbors.time",
           "neighbors.count")


def _scrape(port: int, name: str) -> float | None:
    """Sum of a metric's samples on ``127.0.0.1:port``, ``None`` if it does not answer."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as reply:
            lines = reply.read().decode().splitlines()
    except OSError:
        return None
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines
               if line.split("{")[0].split(" ")[0] == name)


class Incarnation:
    """One ``dynllm run`` process on ``state`` (its own metrics port)."""

    def __init__(self, bootstrap: str, run_dir: str, state: Path, extra: list[str]) -> None:
        from streaming.broker import free_port

        self.port = free_port()
        log = (state / "pipeline.log").open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "pipelines.cli", "run", "--bootstrap-servers", bootstrap,
             "--run", run_dir, "--state-dir", str(state), "--metrics-port", str(self.port),
             "--no-profile-requests", *extra], stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})

    def value(self, name: str) -> float:
        return _scrape(self.port, name) or 0.0

    def wait(self, check, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not check():
            if self.process.poll() is not None:
                raise RuntimeError(f"dynllm run exited while {what}")
            if time.monotonic() > deadline:
                raise TimeoutError(what)
            time.sleep(0.05)

    def sealed_all(self) -> bool:
        valid = _scrape(self.port, "dynllm_events_valid_total")
        return (valid is not None and self.value("dynllm_watermark_events_total") == valid
                and self.value("dynllm_events_waiting_for_watermark") == 0)


def _produce(bootstrap: str, values: list[tuple[str, bytes]], rate: float) -> threading.Thread:
    from streaming.kafka_io import create_topics, json_producer

    create_topics(bootstrap, ["purchases"], partitions=4)

    def send() -> None:
        producer, started = json_producer(bootstrap), time.monotonic()
        for i, (key, value) in enumerate(values):
            time.sleep(max(0.0, started + i / rate - time.monotonic()))
            producer.send("purchases", key=key, value=value)
        producer.flush()
        producer.close()

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


def _offsets_total(state: Path) -> int:
    from pipelines.state import resume_positions

    return sum(resume_positions(state, 1).values())


def _compare(a, b) -> dict[str, object]:
    out: dict[str, object] = {"users_equal": a.users.to_list() == b.users.to_list()}
    for name in BUFFERS:
        x, y = a.get_buffer(name), b.get_buffer(name)
        out[name] = {"equal": bool(torch.equal(x, y)),
                     "max_abs_diff": float((x.double() - y.double()).abs().max())}
    return out


def main(argv: list[str] | None = None) -> int:
    from pipelines.bench import untrained_run
    from pipelines.pipeline import PipelineConfig, run_pipeline
    from pipelines.state import checkpoint_path
    from streaming.broker import Broker
    from streaming.producer import event_messages
    from tgn.model import TGNRecommender

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="data/cj26")
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--kills", type=int, default=6)
    parser.add_argument("--checkpoint-events", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=17)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rng = random.Random(args.seed)
    events = pq.read_table(Path(args.data) / "events.parquet").slice(0, args.events)
    values = [(key, value) for key, value, _ts in event_messages(events)]
    extra = ["--checkpoint-events", str(args.checkpoint_events), "--checkpoint-seconds", "3600"]
    report: dict[str, object] = {"data": args.data, "events": args.events, "rate": args.rate,
                                 "kills": [], "load_start": os.getloadavg()}
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp, Broker() as crashing, Broker() as steady:
        tmp_path = Path(tmp)
        run_dir = untrained_run(args.data, tmp_path)
        crashed, clean, replayed = (tmp_path / d for d in ("crashed", "clean", "replayed"))
        for d in (crashed, clean, replayed):
            d.mkdir()
        streams = [_produce(b.bootstrap_servers, values, args.rate) for b in (crashing, steady)]
        uninterrupted = Incarnation(steady.bootstrap_servers, run_dir, clean, extra)
        for _ in range(args.kills):
            start_at, born = _offsets_total(crashed), time.time()
            incarnation = Incarnation(crashing.bootstrap_servers, run_dir, crashed, extra)
            incarnation.wait(lambda i=incarnation, b=born, r=args.events - start_at: i.value(
                "dynllm_checkpoint_timestamp_seconds") > b or i.value(
                "dynllm_events_consumed_total") >= r, 600, "writing a checkpoint")
            more = rng.randint(0, 3000)
            target = min(incarnation.value("dynllm_events_consumed_total") + more,
                         args.events - start_at)
            incarnation.wait(lambda i=incarnation, t=target: i.value(
                "dynllm_events_consumed_total") >= t, 600, f"consuming {target}")
            incarnation.process.send_signal(signal.SIGKILL)
            incarnation.process.wait()
            report["kills"].append({"at_s": round(time.monotonic() - started, 1),
                                    "resumed_from": start_at, "consumed": int(target),
                                    "producing": any(s.is_alive() for s in streams)})
        final = Incarnation(crashing.bootstrap_servers, run_dir, crashed, extra)
        for process, remaining in ((final, args.events - _offsets_total(crashed)),
                                   (uninterrupted, args.events)):
            process.wait(lambda p=process, r=remaining: p.value(
                "dynllm_events_consumed_total") >= r, 600, "consuming the rest")
            process.wait(process.sealed_all, 120, "sealing every event")
            process.process.send_signal(signal.SIGTERM)
            assert process.process.wait(120) == 0
        log = replayed / "events.parquet"
        pq.write_table(events, log)
        replay_started = time.monotonic()
        run_pipeline(PipelineConfig(run_dir=run_dir, state_dir=str(replayed), log_path=str(log),
                                    fresh_state=True))
        report["replay_s"] = round(time.monotonic() - replay_started, 1)
        got, want, again = (TGNRecommender.load(checkpoint_path(d, 0, 1))
                            for d in (crashed, clean, replayed))
        counts = got.neighbors.count[got.user_node]
        report.update({
            "crashed_vs_uninterrupted": _compare(got, want), "crashed_vs_replay": _compare(
                got, again), "events_applied": int(counts.sum()),
            "positions": got.checkpoint_extra["positions"], "wall_s": round(
                time.monotonic() - started, 1), "load_end": os.getloadavg()})
    equal = all(v["equal"] for key in ("crashed_vs_uninterrupted", "crashed_vs_replay")
                for name, v in report[key].items() if name in BUFFERS)
    report["all_equal"] = equal
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0 if equal else 1


if __name__ == "__main__":
    sys.exit(main())
