"""The SQLite profile store: versions, time-correct look-ups, export, offsets, reload."""

from __future__ import annotations

import numpy as np

from profiles.facets import Facets
from profiles.store import Profile, ProfileStore


def _profile(user: str, ts: float, seed: int, fallback: bool = False) -> Profile:
    vectors = np.random.default_rng(seed).normal(size=(4, 384)).astype(np.float32)
    return Profile(user, ts, Facets((f"c{seed}", "i", "cat", "brand"), fallback), vectors,
                   "m", f"h{seed}", hops=2, grounded=1, named=2, new_tokens=10)


def test_versions_lookup_export_and_reload(tmp_path):
    path = tmp_path / "p.sqlite"
    store = ProfileStore(path)
    assert store.put([_profile("b", 20.0, 1), _profile("a", 10.0, 2), _profile("b", 5.0, 3)]) == 3
    assert store.put([_profile("b", 20.0, 9)]) == 0  # same (user, ts, model, hops): skipped
    assert store.latest_before("b", 20.0).ts == 5.0  # strictly before: not the ts=20 one
    assert store.latest_before("b", 20.5).facets.texts[0] == "c1"
    assert store.latest_before("b", 5.0) is None and store.latest_before("zz", 99.0) is None
    assert store.latest("b").version == 1  # versions count insertions, ts orders look-ups
    assert store.cached("h2", "m").user_id == "a" and store.cached("h2", "other") is None
    assert [(p.user_id, p.ts) for p in store.written_since(10.0)] == [("b", 20.0), ("a", 10.0)]
    store.close()

    reopened = ProfileStore(path)
    table = reopened.export()
    assert table.user_ids.tolist() == ["a", "b", "b"]
    assert table.ts.tolist() == [10.0, 5.0, 20.0]
    assert table.vectors.shape == (3, 4, 384) and table.vectors.dtype == np.float32
    np.testing.assert_array_equal(table.vectors[2], _profile("b", 20.0, 1).vectors)
    assert reopened.export(hops=1).vectors.shape == (0, 4, 384)


def test_cache_ignores_fallbacks_and_offsets_persist(tmp_path):
    store = ProfileStore(tmp_path / "p.sqlite")
    store.put([_profile("a", 1.0, 1, fallback=True)])
    assert store.cached("h1", "m") is None  # a fallback is never reused as a model answer
    assert store.offsets("profile-requests") == {}
    store.save_offsets("profile-requests", {0: 5, 1: 7})
    store.save_offsets("profile-requests", {1: 9})
    assert ProfileStore(tmp_path / "p.sqlite").offsets("profile-requests") == {0: 5, 1: 9}
