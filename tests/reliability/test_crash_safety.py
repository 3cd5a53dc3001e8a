"""``kill -9`` of the live pipeline at seeded random points while events arrive, one of them
inside a checkpoint write; the state must equal an uninterrupted run's and a replay's exactly.

``dynllm run`` runs as a real subprocess against the real local broker, reading a 4-partition
topic that a producer fills while it runs (keyed by user, 3 bad records mixed in). It is killed
five times at random numbers of consumed records and once while a checkpoint file is half
written, restarted each time on the same state directory, and finally stopped with SIGTERM once
the input went idle. An uninterrupted run reads the same stream, produced live at the same time
on a second broker. Micro-batches are cut in event time and sealed by the watermark
(:mod:`pipelines.watermark`), so both runs and a replay of the same events (the log as one
sorted partition) must hold the same graph memory, neighbour buffers and embedding store,
tensor for tensor, with every event applied exactly once.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipelines.outputs import load_store
from pipelines.state import checkpoint_path
from streaming.broker import Broker

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

N_EVENTS = 900
RATE = 60.0  # events/s: the stream lasts ~15 s, through the kills and restarts
CHECKPOINT_EVERY = 40
#: Small micro-batches, read in small polls; a 3 s idle bound so a slow test machine does not
#: count a partition as idle while events still come.
EXTRA = ("--max-batch", "25", "--batch-events", "30", "--idle-seconds", "3")
BUFFERS = ("memory.memory", "memory.last_update", "neighbors.neighbor", "neighbors.time",
           "neighbors.count")
BAD = [b"\x00\xffjunk", b'{"event_id": "x1"}',
       b'{"event_id":"x2","user_id":"u","item_id":"i","ts":1,"quantity":1,"price":-3}']

#: ``dynllm`` with a hook that, when ``PAUSE_CHECKPOINT=K`` is set, writes half of the K-th
#: checkpoint's temp file, touches ``PAUSE_MARKER`` and sleeps: the test kills it right there.
PAUSING_DYNLLM = """
import io, os, pathlib, sys, time
import torch
_save, _calls = torch.save, [0]
def _pausing_save(obj, f, *args, **kwargs):
    if isinstance(f, (str, os.PathLike)) and str(f).endswith(".pt.tmp"):
        _calls[0] += 1
        if _calls[0] == int(os.environ["PAUSE_CHECKPOINT"]):
            buffer = io.BytesIO()
            _save(obj, buffer)
            with open(f, "wb") as out:
                out.write(buffer.getvalue()[: buffer.tell() // 2])
                out.flush()
                os.fsync(out.fileno())
            pathlib.Path(os.environ["PAUSE_MARKER"]).touch()
            time.sleep(3600)
    return _save(obj, f, *args, **kwargs)
torch.save = _pausing_save
""" + "import sys; from pipelines.cli import main; sys.exit(main())"


def _stream(tools, cj_small: Path) -> tuple[list[bytes], dict[str, int]]:
    """The fixed record stream (valid events with 3 bad records mixed in) and events per user."""
    records, per_user = tools.first_events(cj_small, N_EVENTS)
    for i, bad in enumerate(BAD):
        records.insert(50 + 97 * i, bad)
    return records, per_user


def _process(tools, bootstrap, run_dir, state, total, code=None, env=None):
    code = code or tools.DYNLLM
    return tools.PipelineProcess(bootstrap, run_dir, state, total, code, env,
                                 checkpoint_events=CHECKPOINT_EVERY, extra=EXTRA)


def _crashing_run(tools, bootstrap, run_dir, state, total, rng) -> list[str]:
    """Kill at 5 random consumed counts and once mid-checkpoint; return what happened."""
    kills = [("consumed", rng.randint(20, 140)) for _ in range(5)]
    kills.insert(rng.randint(1, 4), ("checkpoint", rng.randint(1, 2)))
    history = []
    for kind, value in kills:
        if kind == "consumed":
            incarnation = _process(tools, bootstrap, run_dir, state, total)
            incarnation.wait_consumed(min(value, incarnation.remaining))
        else:
            marker = state / "paused"
            marker.unlink(missing_ok=True)
            incarnation = _process(tools, bootstrap, run_dir, state, total, PAUSING_DYNLLM,
                                   {"PAUSE_CHECKPOINT": str(value), "PAUSE_MARKER": str(marker)})
            tools.wait_until(marker.exists, 180, "reaching the paused checkpoint write",
                             incarnation.process)
        incarnation.kill()
        history.append(f"{kind}={value} from offset {incarnation.start_at}")
        if kind == "checkpoint":  # the half-written temp file is there, the checkpoint intact
            assert (state / ".shard-0-of-1.pt.tmp").stat().st_size > 0
            if value > 1:
                torch.load(checkpoint_path(state, 0, 1), weights_only=True)
    _process(tools, bootstrap, run_dir, state, total).finish()
    return history


def _embeddings(tools, bootstrap: str) -> dict[tuple[str, int], list[float]]:
    """``(user, version) → embedding`` from the topic; a re-emitted pair must repeat itself."""
    out: dict[tuple[str, int], list[float]] = {}
    for message in tools.read_json_topic(bootstrap, "user-embeddings"):
        key = (message["user_id"], message["version"])
        if key in out:
            assert message["embedding"] == out[key], key
        out[key] = message["embedding"]
    return out


def _replayed(run_dir: Path, cj_small: Path, state: Path) -> None:
    """``dynllm replay`` of the same valid events: the log as one sorted partition."""
    from pipelines.pipeline import PipelineConfig, run_pipeline

    log = state / "events.parquet"
    pq.write_table(pq.read_table(cj_small / "events.parquet").slice(0, N_EVENTS), log)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as `dynllm run`/`replay` (--threads 1): the same float sums
    try:
        run_pipeline(PipelineConfig(run_dir=str(run_dir), state_dir=str(state),
                                    log_path=str(log), fresh_state=True, batch_events=30))
    finally:
        torch.set_num_threads(threads)


def _assert_same_state(got, want, what: str) -> None:
    cuts = [m.checkpoint_extra["frontier"]["cuts"] for m in (got, want)]
    assert cuts[0] == cuts[1], f"{what}: other micro-batches sealed"  # then the same tensors
    assert got.users.to_list() == want.users.to_list(), what
    assert got.items.to_list() == want.items.to_list(), what
    for name in BUFFERS:
        assert torch.equal(got.get_buffer(name), want.get_buffer(name)), f"{what}: {name}"


def _store(state: Path):
    users, _, versions, embeddings, _ = load_store(state / "embeddings-shard-0-of-1.npz")
    order = np.argsort(users)
    return users[order].tolist(), versions[order].tolist(), embeddings[order]


def test_kill_9_at_random_points_equals_uninterrupted_run_and_replay(run_dir, cj_small,
                                                                     tmp_path, tools):
    from tgn.model import TGNRecommender

    records, per_user = _stream(tools, cj_small)
    total = len(records)
    crashed, clean, replayed = (tmp_path / d for d in ("crashed", "clean", "replayed"))
    for d in (crashed, clean, replayed):
        d.mkdir()
    with Broker() as broker, Broker() as other:
        # both streams arrive live, at the same time: the uninterrupted run reads the second
        streams = [tools.produce_live(b.bootstrap_servers, records, RATE)
                   for b in (broker, other)]
        uninterrupted = _process(tools, other.bootstrap_servers, run_dir, clean, total)
        history = _crashing_run(tools, broker.bootstrap_servers, run_dir, crashed, total,
                                random.Random(8))
        assert len(history) == 6, history
        uninterrupted.finish()
        for stream in streams:
            stream.join(60)
        emitted = _embeddings(tools, broker.bootstrap_servers)
        expected_emitted = _embeddings(tools, other.bootstrap_servers)
        letters = {json.dumps(d["raw"])
                   for d in tools.read_json_topic(broker.bootstrap_servers, "purchases.dlq")}
    _replayed(run_dir, cj_small, replayed)

    got, want, again = (TGNRecommender.load(checkpoint_path(d, 0, 1))
                        for d in (crashed, clean, replayed))
    assert sum(got.checkpoint_extra["positions"].values()) == total
    _assert_same_state(got, want, f"crashed vs uninterrupted ({history})")
    _assert_same_state(got, again, "live vs replay")
    # exactly once: every user's neighbour count is its number of events in the stream
    counts = got.neighbors.count[got.user_node].tolist()
    assert {u: n for u, n in zip(got.users.to_list(), counts, strict=True) if n} == per_user

    stores = [_store(d) for d in (crashed, clean, replayed)]
    for other_store in stores[1:]:
        assert stores[0][:2] == other_store[:2]  # users, versions
        np.testing.assert_array_equal(stores[0][2], other_store[2])

    # at-least-once on the topic: repeats allowed (equal), nothing missing; one message per
    # user and micro-batch, so the versions are those at the ends of the same micro-batches
    assert set(emitted) == set(expected_emitted)
    newest: dict[str, int] = {}
    for user, version in emitted:
        newest[user] = max(newest.get(user, 0), version)
    assert newest == per_user
    for key, vector in emitted.items():
        assert vector == expected_emitted[key], key
    assert len(letters) == len(BAD)
