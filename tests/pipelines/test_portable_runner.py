"""The pipeline beyond one process: on Beam's PortableRunner, against Beam's Python job service
and an external SDK worker pool (each its own OS process), a replay and a live run (stopped by
its :class:`~pipelines.sources.StopFlag`) end in the in-process run's state, tensor for tensor."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.outputs import latency_line, load_store, read_latency_log
from pipelines.state import checkpoint_path
from streaming.broker import accepts_connections, free_port


def _start(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    """``python -m args...`` in a process group of its own (its children go with it)."""
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, "-m", *args], stdout=out,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _stop(process: subprocess.Popen) -> None:
    """End ``process`` and everything in its process group (the pool's SDK workers)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(10)
            return
        except subprocess.TimeoutExpired:
            continue


def _wait_for(ready, what: str, logs: list[Path], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        if time.monotonic() > deadline:
            tails = "\n".join(p.read_text(errors="replace")[-2000:] for p in logs)
            raise AssertionError(f"{what} did not start in {timeout_s:.0f} s:\n{tails}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def portable_runner(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    """Beam's Python job service and an external SDK worker pool on free loopback ports.

    Yields ``args`` (the Beam options that submit a pipeline to them) and ``pool_log`` (the
    pool's output). The pool starts each SDK worker as ``python -c ...``, so the venv's ``bin``
    goes first on its ``PATH``. Both processes, and the workers the pool started, are ended at
    teardown.
    """
    work = tmp_path_factory.mktemp("portable")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    port_file = work / "job.port"
    job_log, pool_log = work / "job-service.log", work / "worker-pool.log"
    job = _start(["apache_beam.runners.portability.local_job_service_main", "--port", "0",
                  "--port_file", str(port_file), "--staging_dir", str(work / "staging")],
                 job_log, env)
    pool_port = free_port()
    pool = _start(["apache_beam.runners.worker.worker_pool_main", "--service_port",
                   str(pool_port)], pool_log, env)
    try:
        _wait_for(port_file.exists, "the job service", [job_log])
        _wait_for(lambda: accepts_connections("127.0.0.1", pool_port), "the worker pool",
                  [pool_log])
        yield {"args": ["--runner", "PortableRunner",
                        "--job_endpoint", f"localhost:{port_file.read_text().strip()}",
                        "--environment_type", "EXTERNAL",
                        "--environment_config", f"localhost:{pool_port}"],
               "pool_log": pool_log}
    finally:
        _stop(pool)
        _stop(job)


@contextmanager
def _one_thread() -> Iterator[None]:
    """Keep this process's torch threads: an in-process run sets them (``threads=1``, as the
    pool's workers are told) and they are put back after it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _consumed() -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("dynllm_events_consumed_total") or 0.0


def _checkpoint(state: Path, shard: int, shards: int) -> dict:
    return torch.load(checkpoint_path(state, shard, shards), weights_only=True)


def _assert_same_checkpoint(ours_dir: Path, theirs_dir: Path, shard: int, shards: int) -> dict:
    """Assert shard ``shard``'s checkpoints in the two state folders hold the same id maps,
    tensors (``torch.equal``), source positions and frontier; returns ``theirs_dir``'s."""
    ours, theirs = (_checkpoint(d, shard, shards) for d in (ours_dir, theirs_dir))
    assert ours["users"] == theirs["users"] and ours["items"] == theirs["items"]
    assert ours["state"].keys() == theirs["state"].keys()
    for key in ("positions", "frontier"):  # the same events sealed, first: then the tensors
        assert ours["extra"][key] == theirs["extra"][key], key
    for name, tensor in theirs["state"].items():
        mine = ours["state"][name]
        if not torch.equal(mine, tensor):
            rows = (mine != tensor).reshape(len(tensor), -1).any(1)
            gap = float((mine.double() - tensor.double()).abs().max())
            batches = [[len(r[0]) for r in read_latency_log(d / "latency.jsonl")]
                       for d in (ours_dir, theirs_dir)]
            raise AssertionError(f"{name}: {int(rows.sum())} of {len(tensor)} rows differ, by "
                                 f"up to {gap:.3g}; events per "
                                 f"emitted batch: {batches[0]} here, {batches[1]} there")
    return theirs


def _replay(run_dir: Path, log: Path, state: Path, shards: int,
            beam_args: list[str] | None = None) -> None:
    """Replay ``log`` from empty memory into ``state`` (latency records in ``latency.jsonl``)."""
    from pipelines.pipeline import PipelineConfig, run_pipeline

    run_pipeline(PipelineConfig(run_dir=str(run_dir), state_dir=str(state), shards=shards,
                                log_path=str(log), fresh_state=True, max_batch=1000,
                                checkpoint_events=10**9, threads=1,
                                latency_log=str(state / "latency.jsonl")),
                 beam_args=beam_args or ())


@pytest.mark.slow
def test_portable_replay_equals_in_process(run_dir, cj_small, tmp_path, portable_runner):
    import pyarrow.parquet as pq

    rows, shards = 3000, 2
    log = tmp_path / f"first-{rows}.parquet"
    pq.write_table(pq.read_table(cj_small / "events.parquet").slice(0, rows), log)
    local, portable = tmp_path / "local", tmp_path / "portable"
    local.mkdir()
    portable.mkdir()
    with _one_thread():
        _replay(run_dir, log, local, shards)
    before = _consumed()
    _replay(run_dir, log, portable, shards, portable_runner["args"])
    # the DoFns ran in an SDK worker the pool started, not here (this process counted nothing)
    assert _consumed() == before
    assert "Starting worker" in portable_runner["pool_log"].read_text(errors="replace")
    for shard in range(shards):
        theirs = _assert_same_checkpoint(portable, local, shard, shards)
        assert theirs["extra"]["positions"] == {0: rows}  # the whole log was applied
        assert torch.equal(_checkpoint(portable, shard, shards)["extra"]["applied_ids"],
                           theirs["extra"]["applied_ids"])
        mine = load_store(portable / f"embeddings-shard-{shard}-of-{shards}.npz")
        ref = load_store(local / f"embeddings-shard-{shard}-of-{shards}.npz")
        # embeddings are computed from that state: equal up to float summation order
        for a, b in zip(mine, ref, strict=True):
            if np.issubdtype(b.dtype, np.floating):
                np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
            else:
                np.testing.assert_array_equal(a, b)
    # the worker's latency records reached this process through the file: every event once
    for state in (local, portable):
        records = read_latency_log(state / "latency.jsonl")
        assert sum(len(produced) for produced, _, _ in records) == rows
        assert all(dict(trace).keys() >= {"fetch", "parse", "memory", "fuse"}
                   for _, trace, _ in records)


def test_latency_log_reads_whole_lines_only(tmp_path):
    from pipelines.elements import Span, UserStates

    path = tmp_path / "latency.jsonl"
    assert read_latency_log(path) == []
    states = UserStates(0, Span.of(0, 0, 2).mark("fetch", 1.5), ["a"], np.zeros(1),
                        np.zeros(1), np.zeros(1), np.zeros(1), np.zeros((1, 1)),
                        np.array([1.25, 1.5]), np.zeros(1))
    line = latency_line(states, 2.0)
    path.write_bytes(line + line[:10])  # a second line half written
    [(produced, trace, emitted)] = read_latency_log(path)
    assert produced.tolist() == [1.25, 1.5] and trace == (("fetch", 1.5),) and emitted == 2.0


def _live(run_dir: Path, bootstrap: str, state: Path, events: int,
          beam_args: list[str] | None = None) -> None:
    """Run the live pipeline on ``bootstrap``'s ``purchases`` until ``events`` events were
    emitted (read from its latency records, written wherever the writer runs), then stop it
    with a :class:`~pipelines.sources.StopFlag` (marker files the worker's copy reads)."""
    from pipelines.pipeline import PipelineConfig, run_pipeline
    from pipelines.sources import StopFlag

    latency = state / "latency.jsonl"
    config = PipelineConfig(run_dir=str(run_dir), state_dir=str(state),
                            bootstrap_servers=bootstrap, request_profiles=False,
                            checkpoint_seconds=1e9, latency_log=str(latency), threads=1)
    stop = StopFlag()
    thread = threading.Thread(target=run_pipeline, args=(config, stop, beam_args or ()),
                              daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while sum(len(r[0]) for r in read_latency_log(latency)) < events:
        assert thread.is_alive() and time.monotonic() < deadline, "not every event emitted"
        time.sleep(0.2)
    stop.set()
    thread.join(60)
    assert not thread.is_alive(), "the pipeline did not stop after the stop flag"


@pytest.mark.slow
@pytest.mark.kafka
def test_portable_live_run_stops_and_equals_in_process(run_dir, cj_small, tmp_path, kafka_broker,
                                                       portable_runner):
    import pyarrow.parquet as pq

    from streaming.kafka_io import create_topics, json_producer
    from streaming.producer import produce_events

    rows = 1000
    create_topics(kafka_broker, ["purchases"], partitions=4)
    producer = json_producer(kafka_broker)
    events = pq.read_table(cj_small / "events.parquet").slice(0, rows)
    produce_events(producer, "purchases", events, progress=False)
    producer.close()
    local, portable = tmp_path / "local", tmp_path / "portable"
    local.mkdir()
    portable.mkdir()
    with _one_thread():
        _live(run_dir, kafka_broker, local, rows)
    before = _consumed()
    _live(run_dir, kafka_broker, portable, rows, portable_runner["args"])
    assert _consumed() == before  # read in the SDK worker
    theirs = _assert_same_checkpoint(portable, local, 0, 1)
    assert sum(theirs["extra"]["positions"].values()) == rows
