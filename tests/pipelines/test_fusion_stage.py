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
