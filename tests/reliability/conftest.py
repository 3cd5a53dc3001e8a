"""Fixtures and helpers of the reliability tests: a run, `dynllm run` as a real subprocess,
metrics scraped over HTTP, topics read back in full."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

#: Runs ``dynllm`` in a child process (``python -c`` so tests can add hooks before ``main``).
DYNLLM = "import sys; from pipelines.cli import main; sys.exit(main())"


@pytest.fixture(scope="session")
def run_dir(cj_small: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory with an untrained TGN covering ``cj_small`` (plumbing, not accuracy)."""
    from pipelines.bench import untrained_run

    torch.manual_seed(0)
    return Path(untrained_run(str(cj_small), tmp_path_factory.mktemp("run")))


def start_dynllm(args: list[str], code: str = DYNLLM, env: dict | None = None,
                 log: Path | None = None) -> subprocess.Popen:
    """``dynllm ARGS`` as a child process (output to ``log`` or discarded)."""
    out = log.open("ab") if log else subprocess.DEVNULL
    return subprocess.Popen([sys.executable, "-c", code, *args], stdout=out,
                            stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})


def metric(port: int, name: str) -> float | None:
    """Sum of the samples called ``name`` on ``127.0.0.1:port/metrics``; None if unreachable."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as reply:
            text = reply.read().decode()
    except OSError:
        return None
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.split("{")[0].split(" ")[0] == name)


def wait_until(check, timeout_s: float, what: str, process: subprocess.Popen | None = None,
               every_s: float = 0.05) -> None:
    """Poll ``check()`` until true; fail after ``timeout_s`` or if ``process`` died."""
    deadline = time.monotonic() + timeout_s
    while not check():
        assert process is None or process.poll() is None, f"process exited while {what}"
        assert time.monotonic() < deadline, f"timed out: {what}"
        time.sleep(every_s)


def read_topic(bootstrap: str, topic: str, idle_s: float = 2.0) -> list[bytes]:
    """Every message value of ``topic`` (all partitions), read until ``idle_s`` without news."""
    from streaming.kafka_io import TopicReader

    with TopicReader(bootstrap, topic) as reader:
        return [r.value for batch in reader.batches(idle_timeout_s=idle_s) for r in batch]


def read_json_topic(bootstrap: str, topic: str, idle_s: float = 2.0) -> list[dict]:
    """:func:`read_topic` with every value parsed as JSON."""
    return [json.loads(v) for v in read_topic(bootstrap, topic, idle_s)]


class PipelineProcess:
    """One incarnation of ``dynllm run`` (one shard) on a state directory, own metrics port.

    Args:
        bootstrap: Kafka ``host:port``.
        run_dir: the run.
        state: the ``--state-dir`` (its checkpoint says where this incarnation starts).
        total: records in the input topic (all partitions).
        code: the Python program run (``DYNLLM`` or one with test hooks before ``main``).
        env: extra environment variables.
        checkpoint_events: ``--checkpoint-events``.
        extra: further ``dynllm run`` arguments.
    """

    def __init__(self, bootstrap: str, run_dir: Path, state: Path, total: int,
                 code: str = DYNLLM, env: dict | None = None, checkpoint_events: int = 40,
                 extra: tuple[str, ...] = ("--max-batch", "1")) -> None:
        from pipelines.state import resume_positions
        from streaming.broker import free_port

        self.port = free_port()
        self.start_at = sum(resume_positions(state, 1).values())
        self.remaining = total - self.start_at
        self.process = start_dynllm(
            ["run", "--bootstrap-servers", bootstrap, "--run", str(run_dir), "--state-dir",
             str(state), "--metrics-port", str(self.port), "--checkpoint-events",
             str(checkpoint_events), "--checkpoint-seconds", "3600", "--no-profile-requests",
             *extra], code=code, env=env, log=state / "pipeline.log")

    def consumed(self) -> float:
        return metric(self.port, "dynllm_events_consumed_total") or 0.0

    def wait_consumed(self, count: int, timeout_s: float = 180.0) -> None:
        wait_until(lambda: self.consumed() >= count, timeout_s,
                   f"consuming {count} records", self.process, every_s=0.02)

    def kill(self) -> None:
        assert self.process.poll() is None, "the pipeline was not running when killed"
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        """SIGTERM: the pipeline drains, checkpoints and must exit 0."""
        self.process.send_signal(signal.SIGTERM)
        assert self.process.wait(120) == 0, "pipeline did not stop cleanly after SIGTERM"

    def wait_sealed(self, timeout_s: float = 60.0) -> None:
        """Wait until every valid event read is in a sealed micro-batch (or dead-lettered as
        late): the input went idle and the open micro-batches were sealed."""
        def sealed() -> bool:
            valid = metric(self.port, "dynllm_events_valid_total")
            done = metric(self.port, "dynllm_watermark_events_total")
            return valid is not None and done == valid and metric(
                self.port, "dynllm_events_waiting_for_watermark") == 0

        wait_until(sealed, timeout_s, "sealing every event read", self.process, every_s=0.1)

    def finish(self) -> None:
        """Wait until every remaining record is read and sealed, then :meth:`stop`."""
        self.wait_consumed(self.remaining)
        self.wait_sealed()
        self.stop()


def produce_purchases(bootstrap: str, values: list[bytes]) -> None:
    """Send ``values`` in order to a one-partition ``purchases`` topic (created if missing)."""
    from streaming.kafka_io import create_topics, json_producer

    create_topics(bootstrap, ["purchases"], partitions=1)
    producer = json_producer(bootstrap)
    for value in values:
        producer.send("purchases", value=value)
    producer.flush()
    producer.close()


def produce_live(bootstrap: str, values: list[bytes], rate: float,
                 partitions: int = 4) -> threading.Thread:
    """A started thread sending ``values`` at ``rate``/s to ``purchases`` (``partitions``,
    created if missing), keyed by their ``user_id`` (no key for a record without one)."""
    from streaming.kafka_io import create_topics, json_producer

    create_topics(bootstrap, ["purchases"], partitions=partitions)

    def send() -> None:
        producer = json_producer(bootstrap)
        started = time.monotonic()
        for i, value in enumerate(values):
            time.sleep(max(0.0, started + i / rate - time.monotonic()))
            try:
                key = json.loads(value).get("user_id")
            except (ValueError, AttributeError):
                key = None
            producer.send("purchases", key=key if isinstance(key, str) else None, value=value)
        producer.flush()
        producer.close()

    thread = threading.Thread(target=send, name="produce-live", daemon=True)
    thread.start()
    return thread


def first_events(data: Path, count: int) -> tuple[list[bytes], dict[str, int]]:
    """The JSON values of a dataset's first ``count`` events, and events per user among them."""
    import pyarrow.parquet as pq

    from streaming.producer import event_messages

    events = pq.read_table(data / "events.parquet").slice(0, count)
    users = events.column("user_id").to_pylist()
    return ([value for _key, value, _ts in event_messages(events)],
            {u: users.count(u) for u in set(users)})


@pytest.fixture(scope="session")
def tools() -> SimpleNamespace:
    """This module's helpers (a test module cannot import a conftest under importlib mode)."""
    return SimpleNamespace(DYNLLM=DYNLLM, PipelineProcess=PipelineProcess, metric=metric,
                           first_events=first_events, produce_purchases=produce_purchases,
                           produce_live=produce_live,
                           read_json_topic=read_json_topic, read_topic=read_topic,
                           start_dynllm=start_dynllm, wait_until=wait_until)
