"""Replay through the Beam pipeline: evaluation parity, sharding, exact recovery."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.commands import register
from pipelines.outputs import load_store
from pipelines.state import checkpoint_path, resume_positions, shard_of
from tgn.model import TGNRecommender


def _load(state: Path, shard: int, shards: int) -> TGNRecommender:
    return TGNRecommender.load(checkpoint_path(state, shard, shards))


def test_replay_evaluate_matches_dynllm_evaluate(run_dir, cj_small, tmp_path):
    import argparse

    from tgn.experiment import evaluate_run

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    out = tmp_path / "replay.json"
    args = parser.parse_args(["replay", "--data", str(cj_small), "--run", str(run_dir),
                              "--evaluate", "--json", str(out)])
    assert args.func(args) == 0
    ours = json.loads(out.read_text())
    theirs = evaluate_run(cj_small, run_dir, batch_size=2000, progress=False)["TGN"]
    assert ours["events"] == theirs["events"] > 0
    for key in ("recall@10", "recall@20", "ndcg@20", "mrr", "explore/recall@20"):
        assert ours[key] == pytest.approx(theirs[key], abs=1e-9), key


def test_every_event_applied_once_and_one_shard_state_is_complete(one_shard_state, cj_small):
    model = _load(one_shard_state, 0, 1)
    events = json.loads((cj_small / "meta.json").read_text())["counts"]["events"]
    assert model.checkpoint_extra["positions"] == {0: events}
    # each event inserts one neighbour for its user and one for its item
    assert int(model.neighbors.count[model.user_node].sum()) == events
    assert int(model.neighbors.count[model.item_node].sum()) == events
    users, _, version, embedding, _ = load_store(one_shard_state / "embeddings-shard-0-of-1.npz")
    assert int(version.sum()) == events and np.isfinite(embedding).all()
    assert len(set(users.tolist())) == len(users)


def _neighbor_items(model: TGNRecommender, nodes: torch.Tensor) -> list[list[str]]:
    item_of_node = torch.full((model.num_nodes,), -1, dtype=torch.long)
    item_of_node[model.item_node] = torch.arange(model.item_node.numel())
    return [[model.items.decode([int(item_of_node[n])])[0] for n in row if n >= 0]
            for row in model.neighbors.neighbor[nodes]]


def test_two_shards_agree_with_one_on_user_state(run_dir, cj_small, one_shard_state, tmp_path,
                                                 replay):
    replay(run_dir, cj_small, tmp_path, shards=2)
    one = _load(one_shard_state, 0, 1)
    shards = [_load(tmp_path, s, 2) for s in range(2)]
    stores = [load_store(tmp_path / f"embeddings-shard-{s}-of-2.npz") for s in range(2)]
    users_one = set(load_store(one_shard_state / "embeddings-shard-0-of-1.npz")[0].tolist())
    assert set(stores[0][0].tolist()) | set(stores[1][0].tolist()) == users_one
    assert not set(stores[0][0].tolist()) & set(stores[1][0].tolist())
    # item events are split between shards, never duplicated or lost
    item_events = sum(int(m.neighbors.count[m.item_node].sum()) for m in shards)
    assert item_events == int(one.neighbors.count[one.item_node].sum())
    for shard, model in enumerate(shards):
        users = stores[shard][0].tolist()
        assert (shard_of(users, 2) == shard).all()
        # a user's neighbour list and last update depend only on the user's own events: exact
        mine = model.user_node[torch.from_numpy(model.users.encode(users, grow=False))]
        ref = one.user_node[torch.from_numpy(one.users.encode(users, grow=False))]
        assert torch.equal(model.neighbors.count[mine], one.neighbors.count[ref])
        assert torch.equal(model.memory.last_update[mine], one.memory.last_update[ref])
        assert _neighbor_items(model, mine) == _neighbor_items(one, ref)


def test_restart_resumes_exactly(run_dir, cj_small, one_shard_state, tmp_path, replay):
    replay(run_dir, cj_small, tmp_path, stop_row=7000)  # a "crash" after 7 batches
    assert 6800 <= resume_positions(tmp_path, 1)[0] <= 7000  # its open micro-batch: again
    replay(run_dir, cj_small, tmp_path)  # resumes at its first unsealed row
    resumed, full = _load(tmp_path, 0, 1), _load(one_shard_state, 0, 1)
    assert resumed.users.to_list() == full.users.to_list()
    for name in ("memory.memory", "memory.last_update", "neighbors.neighbor",
                 "neighbors.count"):
        assert torch.equal(resumed.state_dict()[name], full.state_dict()[name]), name


def test_restart_with_shards_checkpointed_at_different_places(run_dir, cj_small, tmp_path, replay):
    """Shard 0 lost its later checkpoint: it re-applies, shard 1 skips what it has."""
    full, torn = tmp_path / "full", tmp_path / "torn"
    replay(run_dir, cj_small, full, shards=2)
    replay(run_dir, cj_small, torn, shards=2, stop_row=5000)
    early = torn / "shard-0-early.pt"
    shutil.copy(checkpoint_path(torn, 0, 2), early)
    replay(run_dir, cj_small, torn, shards=2, stop_row=9000)
    shutil.move(early, checkpoint_path(torn, 0, 2))  # shard 0 at 5000, shard 1 at 9000
    assert 4800 <= resume_positions(torn, 2)[0] <= 5000
    replay(run_dir, cj_small, torn, shards=2)
    for shard in range(2):
        a, b = _load(torn, shard, 2), _load(full, shard, 2)
        assert torch.equal(a.neighbors.count, b.neighbors.count)
        assert torch.equal(a.memory.memory, b.memory.memory)


def test_the_threads_setting_travels_with_the_pipeline_to_its_workers(run_dir):
    """``PipelineConfig.threads`` is data of the memory DoFn: a worker that unpickles it (any
    runner's SDK worker) runs torch on that many threads."""
    import pickle

    from pipelines.memory import UpdateGraphMemory

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        shipped = pickle.loads(pickle.dumps(UpdateGraphMemory(run_dir, threads=1).apply_fn))
        shipped.setup()
        assert torch.get_num_threads() == 1
        torch.set_num_threads(2)
        pickle.loads(pickle.dumps(UpdateGraphMemory(run_dir).apply_fn)).setup()
        assert torch.get_num_threads() == 2  # None: left as the worker has them
    finally:
        torch.set_num_threads(threads)
