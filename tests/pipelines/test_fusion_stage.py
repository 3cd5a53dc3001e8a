"""``FuseEmbeddings`` with a DynLLM run: time-correct profiles, facet weights, live updates."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import torch

from pipelines.outputs import load_store
from pipelines.profiles_io import LiveProfiles, ProfileTrigger
from tgn.dynllm_head import DynLLMHead, head_extra
from tgn.fusion import FusionConfig
from tgn.model import TGNRecommender
from tgn.profile_features import ProfileTable


def test_live_profiles_are_time_correct_and_take_updates():
    profiles = LiveProfiles(["a"], np.array([10.0]), np.ones((1, 4, 3), np.float32))
    found = profiles.lookup(["a", "a", "b"], np.array([10.0, 10.5, 99.0]), 4, 3)
    assert found.has_profile.tolist() == [False, True, False]  # strictly before t only
    profiles.add({"user_id": "b", "ts": 50.0, "vectors": np.full((4, 3), 2.0).tolist()})
    found = profiles.lookup(["b"], np.array([99.0]), 4, 3)
    assert found.has_profile.tolist() == [True] and float(found.facets[0, 0, 0]) == 2.0


def test_trigger_fires_once_per_threshold():
    trigger = ProfileTrigger(first=2, every=3)
    before, after = np.arange(0, 20), np.arange(1, 21)
    assert (np.flatnonzero(trigger.fires(before, after)) + 1).tolist() == [2, 5, 8, 11, 14, 17,
                                                                            20]


def test_replay_with_a_dynllm_run_writes_facet_weights(cj_small, run_dir, tmp_path, replay):
    torch.manual_seed(0)
    base = TGNRecommender.load(run_dir / "model.pt")
    events = pq.read_table(cj_small / "events.parquet")
    users = sorted(set(events.column("user_id").to_pylist()))[:50]
    start = float(events.column("ts")[0].as_py())
    table = ProfileTable(torch.from_numpy(base.users.encode(users, grow=False)),
                         torch.full((len(users),), start, dtype=torch.float64),
                         torch.randn(len(users), 4, 384))
    head = DynLLMHead(FusionConfig(dim=base.config.embed_dim), table)
    model = TGNRecommender(base.config, base.users, base.items, head)
    run = tmp_path / "run"
    run.mkdir()
    model.save(run / "model.pt", extra=head_extra(head))
    replay(run, cj_small, tmp_path / "state", stop_row=4000)
    ids, _, _, embedding, weights = load_store(tmp_path / "state/embeddings-shard-0-of-1.npz")
    assert weights.shape == (len(ids), 4) and np.isfinite(embedding).all()
    assert np.allclose(weights.sum(axis=1), 1.0, atol=1e-5)
    with_profile = np.isin(ids, users)
    assert with_profile.any() and (~with_profile).any()


def test_live_embeddings_equal_the_models_on_the_same_state(cj_small, run_dir, tmp_path, replay):
    """The fusion stage's embeddings are ``model.user_embeddings`` of the state they were
    computed from (users of the last batch: the final checkpoint's state), with and without a
    profile."""
    from pipelines.state import checkpoint_path
    from tgn.run import Run

    torch.manual_seed(1)
    base = TGNRecommender.load(run_dir / "model.pt")
    events = pq.read_table(cj_small / "events.parquet").slice(0, 4000)
    last = events.slice(3500)  # well inside the last batch of 1000
    late = sorted(set(last.column("user_id").to_pylist()))
    users = late[::2] + sorted(set(events.column("user_id").to_pylist()) - set(late))[:30]
    start = float(events.column("ts")[0].as_py())
    table = ProfileTable(torch.from_numpy(base.users.encode(users, grow=False)),
                         torch.full((len(users),), start, dtype=torch.float64),
                         torch.randn(len(users), 4, 384))
    head = DynLLMHead(FusionConfig(dim=base.config.embed_dim), table)
    torch.nn.init.normal_(head.fusion.query.weight, std=0.5)  # weights far from uniform
    torch.nn.init.normal_(head.fusion.merge[-1].weight, std=0.1)  # not the identity on z
    run = tmp_path / "run"
    run.mkdir()
    TGNRecommender(base.config, base.users, base.items, head).save(run / "model.pt",
                                                                   extra=head_extra(head))
    replay(run, cj_small, tmp_path / "state", rows=4000, batch_events=1000)
    ids, ts, _, embedding, weights = load_store(tmp_path / "state/embeddings-shard-0-of-1.npz")
    model = TGNRecommender.load(checkpoint_path(tmp_path / "state", 0, 1),
                                user_head=Run.open(run).user_head()).eval()
    pick = np.isin(ids, late)
    index = torch.from_numpy(model.users.encode(ids[pick].tolist(), grow=False))
    with torch.no_grad():
        expected = model.user_embeddings(index, torch.from_numpy(ts[pick]))
    relevance = model.user_head.last.relevance.numpy()
    has = np.isin(ids[pick], users)
    assert has.any() and (~has).any()
    for rows in (has, ~has):
        assert np.abs(embedding[pick][rows] - expected.numpy()[rows]).max() <= 1e-6
        assert np.abs(weights[pick][rows] - relevance[rows]).max() <= 1e-6
    assert np.abs(weights[pick][has] - 0.25).max() > 0.01  # the profiles do move the weights
    model.user_head.set_profiles(ProfileTable.empty())  # control: the comparison can tell
    with torch.no_grad():
        bare = model.user_embeddings(index, torch.from_numpy(ts[pick])).numpy()
    assert np.abs(embedding[pick][has] - bare[has]).max() > 1e-3
    assert np.abs(embedding[pick][~has] - bare[~has]).max() <= 1e-6
