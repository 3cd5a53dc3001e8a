"""The DynLLM head inside the temporal graph model: profiles used strictly before t, checkpoints."""

from __future__ import annotations

import torch

from streaming.schema import PurchaseEvent, events_to_table
from tgn.dynllm_head import DynLLMHead, head_extra
from tgn.fusion import FusionConfig
from tgn.model import TGNConfig, TGNRecommender
from tgn.profile_features import ProfileTable
from tgn.run import Run


def _model() -> tuple[TGNRecommender, object]:
    torch.manual_seed(0)
    cfg = TGNConfig(memory_dim=8, time_dim=8, embed_dim=8, heads=2, neighbors=3)
    head = DynLLMHead(FusionConfig(dim=8, text_dim=6, top_k=4, dropout=0.0))
    model = TGNRecommender(cfg, user_head=head)
    events = [PurchaseEvent(f"e{i}", f"u{i % 2}", f"i{i % 3}", 100.0 + i) for i in range(6)]
    batch = model.encode(events_to_table(events))
    model.update(batch)
    # user u0 (index 0) has a profile written after its event at t=104
    head.set_profiles(ProfileTable(torch.tensor([0]), torch.tensor([104.0]),
                                   torch.randn(1, 4, 6)))
    head.fusion.merge[-1].weight.data.normal_()  # residual init is the identity; make it matter
    return model.eval(), head


def test_head_uses_profile_only_after_its_time():
    model, head = _model()
    users = torch.tensor([0, 0, 1])
    t = torch.tensor([104.0, 104.5, 104.5], dtype=torch.float64)
    with torch.no_grad():
        model.user_embeddings(users, t)
    assert head.last.has_profile.tolist() == [False, True, False]
    assert head.last.relevance.shape == (3, 4)
    torch.testing.assert_close(head.last.relevance.sum(1), torch.ones(3))


def test_checkpoint_round_trip_keeps_profiles_and_outputs(tmp_path):
    model, head = _model()
    users, t = torch.tensor([0, 1]), torch.tensor([200.0, 200.0], dtype=torch.float64)
    with torch.no_grad():
        before = model.user_embeddings(users, t)
    model.save(tmp_path / "model.pt", extra=head_extra(head))
    run = Run.open(tmp_path)
    assert run.is_dynllm and run.name == "DynLLM"
    loaded = run.model().eval()
    with torch.no_grad():
        after = loaded.user_embeddings(users, t)
    torch.testing.assert_close(before, after)
    assert len(loaded.user_head.profiles) == 1


def test_eval_cache_matches_uncached_and_is_dropped_in_training():
    model, head = _model()
    users = torch.tensor([0, 0, 1])
    t = torch.tensor([104.0, 105.0, 105.0], dtype=torch.float64)
    with torch.no_grad():
        cached = model.user_embeddings(users, t)
        head.train()  # dropout is 0: training mode differs only by not caching
        uncached = model.user_embeddings(users, t)
    torch.testing.assert_close(cached, uncached)
    assert head._keys is None


def test_eval_path_with_repeated_user_time_pairs_matches_training_path():
    model, head = _model()
    users = torch.tensor([1, 0, 0, 1, 0])  # a basket: the same user at the same time, repeated
    t = torch.tensor([104.5, 104.5, 104.5, 104.5, 100.0], dtype=torch.float64)
    with torch.no_grad():
        fast = model.user_embeddings(users, t)
        fast_rows, fast_relevance = head.last_rows.clone(), head.last.relevance.clone()
        head.train()
        slow = model.user_embeddings(users, t)
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-5)
    assert fast_rows.tolist() == head.last_rows.tolist() == [-1, 0, 0, -1, -1]
    torch.testing.assert_close(fast_relevance, head.last.relevance, rtol=1e-4, atol=1e-6)


def test_appended_profiles_fold_only_the_new_versions_and_match_a_fresh_fold():
    model, head = _model()
    users = torch.tensor([0, 1, 1])
    t = torch.tensor([300.0, 300.0, 100.5], dtype=torch.float64)
    # input order (user 1 at 200, user 0 at 150) differs from the table's sorted order
    first = (torch.tensor([1, 0]), torch.tensor([200.0, 150.0], dtype=torch.float64),
             torch.randn(2, 4, 6))
    more = (torch.tensor([0, 1]), torch.tensor([250.0, 100.0], dtype=torch.float64),
            torch.randn(2, 4, 6))
    grown = ProfileTable(*(torch.cat([a, b]) for a, b in zip(first, more, strict=True)))
    with torch.no_grad():
        head.set_profiles(ProfileTable(*first))
        model.user_embeddings(users, t)  # folds the first two versions
        head.set_profiles(grown, appended=True)
        incremental = model.user_embeddings(users, t)
        assert len(head._keys) == len(grown) + 1  # both old, both new, "no profile"
        head.set_profiles(grown)  # from scratch
        fresh = model.user_embeddings(users, t)
    torch.testing.assert_close(incremental, fresh)
    assert head.last_rows.tolist() == [1, 3, 2]  # sorted rows: (0,150) (0,250) (1,100) (1,200)
