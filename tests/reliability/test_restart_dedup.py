"""The duplicate-id filter survives a restart: it is saved with the shard checkpoints.

Phase A runs through ``dynllm run`` and stops (SIGTERM: drain and checkpoint). A producer then
re-sends 10 of phase A's events (same ids, same bytes, new offsets) among phase B's. The
restarted pipeline must dead-letter the 10 as ``duplicate_event_id`` and apply every event once;
with a filter that starts empty it applied them a second time.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.applied_ids import AppliedIds, load_applied_ids
from pipelines.state import ShardState, checkpoint_path
from streaming.deadletter import decode_raw
from tgn.run import Run

PHASE_A, PHASE_B, RESENT = 60, 40, 10



@pytest.mark.kafka
@pytest.mark.slow
def test_a_resent_event_after_a_restart_is_a_dead_letter(kafka_broker, run_dir, cj_small,
                                                         tmp_path, tools):
    from tgn.model import TGNRecommender

    values, per_user = tools.first_events(cj_small, PHASE_A + PHASE_B)
    resent = values[5:5 + RESENT]
    tools.produce_purchases(kafka_broker, values[:PHASE_A])
    tools.PipelineProcess(kafka_broker, run_dir, tmp_path, PHASE_A).finish()
    assert len(load_applied_ids(tmp_path, 1)) == PHASE_A

    tools.produce_purchases(kafka_broker,
                            values[PHASE_A:PHASE_A + 20] + resent + values[PHASE_A + 20:])
    tools.PipelineProcess(kafka_broker, run_dir, tmp_path, PHASE_A + PHASE_B + RESENT).finish()

    letters = tools.read_json_topic(kafka_broker, "purchases.dlq")
    assert sorted(decode_raw(d["raw"], d["raw_encoding"]).encode() for d in letters) == sorted(
        resent)  # exactly the re-sent records, byte for byte
    assert {d["reason"] for d in letters} == {"duplicate_event_id"}
    model = TGNRecommender.load(checkpoint_path(tmp_path, 0, 1))
    counts = model.neighbors.count[model.user_node].tolist()  # each event applied once
    assert {u: n for u, n in zip(model.users.to_list(), counts, strict=True) if n} == per_user
    assert len(load_applied_ids(tmp_path, 1)) == PHASE_A + PHASE_B


def test_applied_ids_stay_bounded_and_round_trip():
    ids = AppliedIds(capacity=100)
    for start in range(0, 990, 30):  # 33 batches of 30
        ids.add(pa.chunked_array([[f"é{i}" for i in range(start, start + 30)]]))
    kept = ids.to_list()
    assert 100 <= len(kept) < 130 and kept == [f"é{i}" for i in range(990 - len(kept), 990)]
    assert AppliedIds.from_tensor(ids.to_tensor(), capacity=100).to_list() == kept
    assert AppliedIds.from_tensor(AppliedIds(5).to_tensor(), capacity=5).to_list() == []


def test_shard_checkpoints_carry_their_ids(run_dir, cj_small, tmp_path):
    ids = pq.read_table(cj_small / "events.parquet").slice(0, 30).column("event_id")
    for shard in range(2):
        state = ShardState.open(run_dir, tmp_path, shard, 2)
        assert state.applied_ids.capacity == 500_000  # the filter's 1,000,000 split in two
        state.applied_ids.add(ids.slice(shard * 15, 15))
        state.positions = {0: 30}
        state.save()
        state.wait()
    assert load_applied_ids(tmp_path, 2) == ids.to_pylist()
    assert ShardState.open(run_dir, tmp_path, 1, 2).applied_ids.to_list() == ids.to_pylist()[15:]
    # a worker opens the run once for all its shards (its checkpoint read once): the same states
    run = Run.open(run_dir)
    shards = [ShardState.open(run, tmp_path, shard, 2) for shard in range(2)]
    assert [s.applied_ids.to_list() for s in shards] == [ids.to_pylist()[:15], ids.to_pylist()[15:]]
    assert shards[0].model is not shards[1].model and "payload" in vars(run)
