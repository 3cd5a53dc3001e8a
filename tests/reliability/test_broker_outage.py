"""The broker stops for 30 s under a running ``dynllm run`` and comes back empty.

The local broker keeps everything in memory, so the restarted one has no topics, no messages and
no offsets: the pipeline's checkpointed offset (phase A's last) points past the end of the new
log. Policy under test (pipelines/outages.py): while the broker is down the pipeline waits and
reconnects without crashing, and says so in its metrics; when the input topic comes back with a
new id, it checkpoints, moves its positions to the start of the new log and applies the new
events. Every event of both phases must be applied exactly once.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from pipelines.outputs import load_store
from pipelines.state import checkpoint_path
from streaming.broker import Broker, free_port

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

PHASE_A, PHASE_B = 120, 80
OUTAGE_S = 30.0



def test_broker_down_30s_then_back_empty(run_dir, cj_small, tmp_path, tools):
    from tgn.model import TGNRecommender

    values, per_user = tools.first_events(cj_small, PHASE_A + PHASE_B)
    broker = Broker(port=free_port()).start()
    try:
        tools.produce_purchases(broker.bootstrap_servers, values[:PHASE_A])
        pipeline = tools.PipelineProcess(broker.bootstrap_servers, run_dir, tmp_path,
                                         PHASE_A + PHASE_B)
        pipeline.wait_consumed(PHASE_A)
        port = pipeline.port
        assert tools.metric(port, "dynllm_kafka_up") == 1

        broker.stop()
        down_at = time.monotonic()
        tools.wait_until(lambda: tools.metric(port, "dynllm_kafka_outages_total") == 1, 10,
                         "the outage showing in the metrics", pipeline.process)
        assert tools.metric(port, "dynllm_kafka_up") == 0
        while time.monotonic() - down_at < OUTAGE_S:  # the pipeline must live through it
            assert pipeline.process.poll() is None, "the pipeline died while the broker was down"
            time.sleep(0.5)

        broker.start()  # same port, empty: no topics, no offsets
        tools.produce_purchases(broker.bootstrap_servers, values[PHASE_A:])
        pipeline.wait_consumed(PHASE_A + PHASE_B, timeout_s=120)
        tools.wait_until(lambda: tools.metric(port, "dynllm_kafka_up") == 1, 10,
                         "the broker counted as back", pipeline.process)
        assert tools.metric(port, "dynllm_source_log_resets_total") == 1
        assert tools.metric(port, "dynllm_kafka_outages_total") == 1
        pipeline.wait_sealed()
        pipeline.stop()
    finally:
        broker.stop()

    log = (tmp_path / "pipeline.log").read_text()
    assert "unreachable" in log and "was recreated" in log, log[-3000:]
    assert not (tmp_path / "log-reset.json").exists()
    model = TGNRecommender.load(checkpoint_path(tmp_path, 0, 1))
    positions = model.checkpoint_extra["positions"]
    assert sum(positions.values()) == PHASE_B  # offsets of the new log
    counts = model.neighbors.count[model.user_node].tolist()  # exactly once, both phases
    assert {u: n for u, n in zip(model.users.to_list(), counts, strict=True) if n} == per_user
    user_ids, _ts, versions, vectors, _weights = load_store(
        tmp_path / "embeddings-shard-0-of-1.npz")
    assert dict(zip(user_ids.tolist(), versions.tolist(), strict=True)) == per_user
    assert np.isfinite(vectors).all()


def test_a_marked_reset_moves_positions_to_the_log_start_and_keeps_the_memory(run_dir, tmp_path):
    """The reset a crash interrupted is finished on the next start, state untouched."""
    import torch

    from pipelines.outages import RESET_MARKER, finish_log_reset, mark_log_reset
    from tgn.model import TGNRecommender
    from tgn.run import Run

    model = Run.open(run_dir).model()
    for shard in range(2):
        model.save(checkpoint_path(tmp_path, shard, 2), extra={"positions": {0: 7, 1: 3}})
    assert not finish_log_reset(tmp_path, 2)  # nothing marked: nothing changes
    assert TGNRecommender.load(checkpoint_path(tmp_path, 1, 2)).checkpoint_extra[
        "positions"] == {0: 7, 1: 3}
    mark_log_reset(tmp_path, "purchases")
    assert (tmp_path / RESET_MARKER).exists()
    assert finish_log_reset(tmp_path, 2)
    assert not (tmp_path / RESET_MARKER).exists()
    for shard in range(2):
        loaded = TGNRecommender.load(checkpoint_path(tmp_path, shard, 2))
        assert loaded.checkpoint_extra["positions"] == {}
        torch.testing.assert_close(loaded.memory.memory, model.memory.memory)


def test_a_pipeline_started_after_an_empty_restart_reads_the_new_log_from_its_start(
        run_dir, cj_small, tmp_path, tools):
    """Stopped on phase A's log, the broker restarts empty while it is down, phase B (shorter)
    is produced, the pipeline starts again: its checkpoint (offset 120) names the old topic id,
    so it reads the new log from offset 0 (reading on from 120 would wait forever)."""
    from pipelines.outages import checkpoint_topic_ids, current_topic_id
    from tgn.model import TGNRecommender

    values, per_user = tools.first_events(cj_small, PHASE_A + PHASE_B)
    broker = Broker(port=free_port()).start()
    try:
        tools.produce_purchases(broker.bootstrap_servers, values[:PHASE_A])
        old_id = current_topic_id(broker.bootstrap_servers, "purchases")
        tools.PipelineProcess(broker.bootstrap_servers, run_dir, tmp_path, PHASE_A).finish()
        assert checkpoint_topic_ids(tmp_path, 1) == {old_id}

        broker.stop()
        broker.start()  # empty, while no pipeline runs
        tools.produce_purchases(broker.bootstrap_servers, values[PHASE_A:])
        new_id = current_topic_id(broker.bootstrap_servers, "purchases")
        assert new_id != old_id
        pipeline = tools.PipelineProcess(broker.bootstrap_servers, run_dir, tmp_path, PHASE_B)
        pipeline.wait_consumed(PHASE_B, timeout_s=60)
        assert tools.metric(pipeline.port, "dynllm_source_log_resets_total") == 1
        pipeline.wait_sealed()
        pipeline.stop()
    finally:
        broker.stop()

    assert "recreated while the pipeline was down" in (tmp_path / "pipeline.log").read_text()
    assert checkpoint_topic_ids(tmp_path, 1) == {new_id}
    model = TGNRecommender.load(checkpoint_path(tmp_path, 0, 1))
    assert sum(model.checkpoint_extra["positions"].values()) == PHASE_B
    counts = model.neighbors.count[model.user_node].tolist()  # exactly once, both phases
    assert {u: n for u, n in zip(model.users.to_list(), counts, strict=True) if n} == per_user


def test_checkpoints_keep_the_topic_id_and_a_reset_stores_the_new_one(run_dir, tmp_path):
    from pipelines.outages import checkpoint_topic_ids, finish_log_reset, mark_log_reset
    from pipelines.state import ShardState
    from tgn.run import Run

    assert checkpoint_topic_ids(tmp_path, 2) == set()
    Run.open(run_dir).model().save(checkpoint_path(tmp_path, 0, 2), extra={"positions": {0: 5}})
    assert checkpoint_topic_ids(tmp_path, 2) == set()  # an old checkpoint: no id, trusted
    state = ShardState.open(run_dir, tmp_path, 1, 2, topic_id="A")
    state.positions = {0: 9}
    state.save()
    state.wait()
    assert checkpoint_topic_ids(tmp_path, 2) == {"A"}
    assert ShardState.open(run_dir, tmp_path, 1, 2).topic_id == "A"  # kept when not given
    mark_log_reset(tmp_path, "purchases")
    assert finish_log_reset(tmp_path, 2, topic_id="B")
    assert checkpoint_topic_ids(tmp_path, 2) == {"B"}
