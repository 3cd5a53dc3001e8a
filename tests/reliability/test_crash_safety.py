"""``kill -9`` of the live pipeline at seeded random points, one of them inside a checkpoint write.

``dynllm run`` runs as a real subprocess against the real local broker on a fixed stream (one
partition, so the order is fixed; micro-batches of one event, so the state does not depend on
where batches happen to be cut). It is killed five times at random numbers of consumed records
and once while a checkpoint file is half written, restarted each time on the same state
directory, and finally stopped with SIGTERM. Its graph memory, neighbour buffers, embedding store
and emitted embeddings must equal those of an uninterrupted run on a second broker, and every
event must be applied exactly once.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.outputs import load_store
from pipelines.state import checkpoint_path, resume_positions
from streaming.broker import Broker

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

N_EVENTS = 360
CHECKPOINT_EVERY = 40
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


def _crashing_run(tools, bootstrap, run_dir, state, total, rng) -> list[str]:
    """Kill at 5 random consumed counts and once mid-checkpoint; return what happened."""
    kills = [("consumed", rng.randint(15, 130)) for _ in range(5)]
    kills.insert(rng.randint(1, 4), ("checkpoint", rng.randint(1, 2)))
    history = []
    for kind, value in kills:
        if kind == "consumed":
            incarnation = tools.PipelineProcess(bootstrap, run_dir, state, total)
            incarnation.wait_consumed(min(value, incarnation.remaining))
        else:
            marker = state / "paused"
            marker.unlink(missing_ok=True)
            incarnation = tools.PipelineProcess(bootstrap, run_dir, state, total, PAUSING_DYNLLM,
                                          {"PAUSE_CHECKPOINT": str(value),
                                           "PAUSE_MARKER": str(marker)})
            tools.wait_until(marker.exists, 180, "reaching the paused checkpoint write",
                       incarnation.process)
        incarnation.kill()
        history.append(f"{kind}={value} from offset {incarnation.start_at}")
        if kind == "checkpoint":  # the half-written temp file is there, the checkpoint intact
            assert (state / ".shard-0-of-1.pt.tmp").stat().st_size > 0
            assert resume_positions(state, 1).get(0, 0) == incarnation.start_at + (
                value - 1) * CHECKPOINT_EVERY
    tools.PipelineProcess(bootstrap, run_dir, state, total).finish()
    return history


def _embeddings(tools, bootstrap: str) -> dict[tuple[str, int], list[float]]:
    """``(user, version) → embedding`` from the topic; a re-emitted pair must repeat itself."""
    out: dict[tuple[str, int], list[float]] = {}
    for message in tools.read_json_topic(bootstrap, "user-embeddings"):
        key = (message["user_id"], message["version"])
        if key in out:
            np.testing.assert_allclose(message["embedding"], out[key], atol=1e-5)
        out[key] = message["embedding"]
    return out


def test_kill_9_at_random_points_equals_uninterrupted_run(kafka_broker, run_dir, cj_small,
                                                          tmp_path, tools):
    from tgn.model import TGNRecommender

    records, per_user = _stream(tools, cj_small)
    total = len(records)
    crashed, clean = tmp_path / "crashed", tmp_path / "clean"
    crashed.mkdir()
    clean.mkdir()
    tools.produce_purchases(kafka_broker, records)
    history = _crashing_run(tools, kafka_broker, run_dir, crashed, total, random.Random(8))
    assert len(history) == 6, history
    with Broker() as other:
        tools.produce_purchases(other.bootstrap_servers, records)
        tools.PipelineProcess(other.bootstrap_servers, run_dir, clean, total).finish()
        expected_emitted = _embeddings(tools, other.bootstrap_servers)

    got, want = (TGNRecommender.load(checkpoint_path(d, 0, 1)) for d in (crashed, clean))
    assert got.checkpoint_extra["positions"] == want.checkpoint_extra["positions"] == {0: total}
    assert got.users.to_list() == want.users.to_list()
    assert got.items.to_list() == want.items.to_list()
    for name in ("memory.memory", "memory.last_update", "neighbors.neighbor", "neighbors.time",
                 "neighbors.count"):
        torch.testing.assert_close(got.get_buffer(name), want.get_buffer(name), atol=1e-5,
                                   rtol=0, msg=lambda m, n=name: f"{n}: {m} ({history})")
    # exactly once: every user's neighbour count is its number of events in the stream
    counts = got.neighbors.count[got.user_node].tolist()
    assert {u: n for u, n in zip(got.users.to_list(), counts, strict=True) if n} == per_user

    store, clean_store = load_store(crashed / "embeddings-shard-0-of-1.npz"), load_store(
        clean / "embeddings-shard-0-of-1.npz")
    order, clean_order = np.argsort(store[0]), np.argsort(clean_store[0])
    assert store[0][order].tolist() == clean_store[0][clean_order].tolist()
    assert store[2][order].tolist() == clean_store[2][clean_order].tolist()  # versions
    np.testing.assert_allclose(store[3][order], clean_store[3][clean_order], atol=1e-5)

    emitted = _embeddings(tools, kafka_broker)  # at-least-once: repeats allowed, nothing missing
    assert set(emitted) == set(expected_emitted) == {
        (u, v) for u, n in per_user.items() for v in range(1, n + 1)}
    for key, vector in emitted.items():
        np.testing.assert_allclose(vector, expected_emitted[key], atol=1e-5)
    letters = {json.dumps(d["raw"]) for d in tools.read_json_topic(kafka_broker, "purchases.dlq")}
    assert len(letters) == len(BAD)
