"""Distilled attention fusion and time-correct profile lookup, on small hand-checked tensors."""

from __future__ import annotations

import math

import pytest
import torch

from tgn.fusion import DistilledFusion, FusionConfig, TopKGate
from tgn.profile_features import ProfileTable


def _gate(p: list[list[float]], k: int) -> TopKGate:
    gate = TopKGate(num_facets=len(p), dim=len(p[0]), k=k)
    with torch.no_grad():
        gate.p.copy_(torch.tensor(p))
    return gate


def test_gate_keeps_top_k_scaled_by_tanh():
    # p = (3, 4, 0, 0) / 5 = (0.6, 0.8, 0, 0); e = (1, -2, 5, 0.5)
    # s = e * p/|p| = (0.6, -1.6, 0, 0): the 2 largest are dims 0 (0.6) and 2 (0.0)
    gate = _gate([[3.0, 4.0, 0.0, 0.0]], k=2)
    e = torch.tensor([[[1.0, -2.0, 5.0, 0.5]]])  # [B=1, F=1, D=4]
    out = gate(e)
    expected = torch.tensor([[[1.0 * math.tanh(0.6), 0.0, 5.0 * math.tanh(0.0), 0.0]]])
    torch.testing.assert_close(out, expected)


def test_gate_keeps_exactly_k_dims_per_facet():
    torch.manual_seed(0)
    gate = TopKGate(num_facets=4, dim=16, k=5)
    out = gate(torch.randn(3, 4, 16))
    assert ((out != 0).sum(-1) == 5).all()


def test_gate_rejects_bad_k():
    with pytest.raises(ValueError, match="top_k"):
        TopKGate(num_facets=4, dim=8, k=9)


def _fusion(**kw) -> DistilledFusion:
    torch.manual_seed(0)
    cfg = FusionConfig(dim=8, text_dim=12, top_k=5, heads=2, dropout=0.0, **kw)
    return DistilledFusion(cfg).eval()


def test_relevance_sums_to_one_and_shapes():
    fusion = _fusion()
    z, facets = torch.randn(3, 8), torch.randn(3, 4, 12)
    out = fusion(z, facets, torch.tensor([True, False, True]))
    assert out.embedding.shape == (3, 8) and out.relevance.shape == (3, 4)
    torch.testing.assert_close(out.relevance.sum(-1), torch.ones(3))
    assert (out.relevance >= 0).all()


def test_no_profile_ignores_facet_values_and_uses_learned_set():
    fusion = _fusion()
    z = torch.randn(2, 8)
    none = torch.zeros(2, dtype=torch.bool)
    a = fusion(z, torch.randn(2, 4, 12), none)
    b = fusion(z, torch.full((2, 4, 12), float("nan")), none)  # garbage must not leak through
    torch.testing.assert_close(a.embedding, b.embedding)
    assert torch.isfinite(b.embedding).all()
    with torch.no_grad():
        fusion.no_profile.add_(1.0)
    fusion.merge[-1].weight.data.normal_()  # residual init zeroes it; make the merge matter
    assert not torch.allclose(fusion(z, torch.randn(2, 4, 12), none).embedding, a.embedding)


def test_profile_changes_embedding_once_trained_weights_are_nonzero():
    fusion = _fusion()
    fusion.merge[-1].weight.data.normal_()
    z = torch.randn(1, 8)
    has = torch.ones(1, dtype=torch.bool)
    a = fusion(z, torch.randn(1, 4, 12), has).embedding
    b = fusion(z, torch.randn(1, 4, 12), has).embedding
    assert not torch.allclose(a, b)


def test_residual_init_is_identity_on_temporal_embedding():
    fusion = _fusion()
    z = torch.randn(4, 8)
    out = fusion(z, torch.randn(4, 4, 12), torch.ones(4, dtype=torch.bool))
    torch.testing.assert_close(out.embedding, z)


@pytest.mark.parametrize("gate", [True, False])
def test_gradients_reach_every_parameter(gate):
    fusion = _fusion(gate=gate)
    fusion.merge[-1].weight.data.normal_()
    z = torch.randn(4, 8, requires_grad=True)
    has = torch.tensor([True, True, False, True])
    fusion(z, torch.randn(4, 4, 12), has).embedding.pow(2).sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    for name, param in fusion.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert (fusion.gate is None) == (not gate)


def test_bad_facet_shape_is_a_clear_error():
    with pytest.raises(ValueError, match="facets must be"):
        _fusion()(torch.randn(2, 8), torch.randn(2, 3, 12), torch.ones(2, dtype=torch.bool))


def _table() -> ProfileTable:
    # user 0: profiles at t=10 (vec 1) and t=20 (vec 2); user 2: profile at t=20 (vec 3)
    # given out of order on purpose
    user = torch.tensor([2, 0, 0])
    ts = torch.tensor([20.0, 20.0, 10.0])
    vectors = torch.tensor([3.0, 2.0, 1.0]).view(3, 1, 1).expand(3, 4, 2).clone()
    return ProfileTable(user, ts, vectors, torch.tensor([False, True, False]))


@pytest.mark.parametrize(
    ("user", "t", "value"),
    [
        (0, 5.0, None),  # before any profile
        (0, 10.0, None),  # a profile at exactly t must NOT be used
        (0, 10.5, 1.0),
        (0, 20.0, 1.0),  # the t=20 profile is not yet valid at t=20
        (0, 20.0001, 2.0),
        (0, 1e12, 2.0),  # latest one wins
        (1, 100.0, None),  # user without profiles, between two users that have some
        (2, 20.0, None),
        (2, 21.0, 3.0),
        (7, 100.0, None),  # user index beyond every profile
    ],
)
def test_lookup_is_strictly_before_t(user, t, value):
    found = _table().lookup(torch.tensor([user]), torch.tensor([t], dtype=torch.float64))
    assert bool(found.has_profile[0]) == (value is not None)
    expected = 0.0 if value is None else value
    assert torch.all(found.facets[0] == expected)


def test_lookup_batch_matches_brute_force():
    gen = torch.Generator().manual_seed(1)
    user = torch.randint(0, 6, (40,), generator=gen)
    ts = torch.randint(0, 15, (40,), generator=gen).double()
    table = ProfileTable(user, ts, torch.randn(40, 4, 3, generator=gen))
    q_user = torch.randint(0, 7, (200,), generator=gen)
    q_t = torch.randint(0, 16, (200,), generator=gen).double()
    rows = table.latest_rows(q_user, q_t)
    for u, t, r in zip(q_user.tolist(), q_t.tolist(), rows.tolist(), strict=True):
        ok = [i for i in range(len(table)) if table.user_index[i] == u and table.ts[i] < t]
        assert r == (ok[-1] if ok else -1)


def test_fallback_flags_and_source_rows_follow_sorting():
    table = _table()
    assert table.ts.tolist() == [10.0, 20.0, 20.0]
    assert table.fallback.tolist() == [False, True, False]
    assert table.source_row.tolist() == [2, 1, 0]


def test_empty_table_and_export_filtering():
    empty = ProfileTable.empty(num_facets=4, text_dim=5)
    found = empty.lookup(torch.tensor([0, 1]), torch.tensor([1.0, 2.0]))
    assert found.facets.shape == (2, 4, 5) and not found.has_profile.any()
    table = ProfileTable.from_export(["a", "zz", "b"], [1.0, 2.0, 3.0],
                                     torch.ones(3, 4, 5).numpy(), None, {"a": 0, "b": 1})
    assert len(table) == 2 and table.user_index.tolist() == [0, 1]
    restored = ProfileTable.from_state(table.to_state())
    assert restored.ts.tolist() == table.ts.tolist()


@pytest.mark.parametrize("gate", [True, False])
def test_folded_inference_path_matches_attend(gate):
    fusion = _fusion(gate=gate)
    for layer in (fusion.merge[-1], fusion.out, fusion.query):
        layer.bias.data.normal_()
    fusion.merge[-1].weight.data.normal_()
    z, facets = torch.randn(5, 8), torch.randn(5, 4, 12)
    has = torch.tensor([True, False, True, True, False])
    keys = fusion.facet_keys(facets)
    expected = fusion.attend(z, keys, has)
    folded = fusion.fold(torch.cat([keys, fusion.no_profile_keys().unsqueeze(0)]))
    rows = torch.where(has, torch.arange(5), torch.tensor(5))
    got = fusion.attend_folded(z, folded, rows, has)
    assert len(folded) == 6
    torch.testing.assert_close(got.embedding, expected.embedding, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.relevance, expected.relevance, rtol=1e-4, atol=1e-6)
