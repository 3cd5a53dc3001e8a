"""The purchase statistics and the repeat/explore mixture: state, probabilities, save→load→
continue, off switch, stage-2 fitting."""

from __future__ import annotations

import math

import numpy as np
import torch

from tgn.model import TGNConfig, TGNRecommender
from tgn.repeat import RepeatScore
from tgn.signals import PAIR_FEATURES, PurchaseSignals
from tgn.train import TrainConfig, fit_history

DAY = 86_400.0


def _t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def test_statistics_of_a_hand_built_stream():
    s = PurchaseSignals()
    s.update(torch.tensor([0, 0, 1]), torch.tensor([3, 3, 5]), _t(0.0, 0.0, DAY))
    s.update(torch.tensor([0, 0]), torch.tensor([3, 7]), _t(7 * DAY, 7 * DAY))
    assert s.size == 3  # pairs (0, 3), (1, 5), (0, 7)
    slot = s.slots(torch.tensor([0, 1, 0, 1]), torch.tensor([3, 5, 7, 3]))
    assert slot[3] == -1
    assert s.count[slot[:3]].tolist() == [3.0, 1.0, 1.0]
    assert s.last[slot[:3]].tolist() == [7 * DAY, DAY, 7 * DAY]
    # decayed count of (0, 3) at day 7, 7-day half-life: two lines a week ago count half each
    assert math.isclose(float(s.decayed[slot[0], 0]), 1 + 2 * 0.5)
    # users: lines, baskets (distinct times), repeat lines (pair seen in an earlier batch)
    assert s.user_stats[0, :3].tolist() == [4.0, 2.0, 1.0]
    assert s.user_stats[1, :3].tolist() == [1.0, 1.0, 0.0]
    # items: purchases, first-time purchases, repeats; item 3 re-bought after 7 days
    assert s.item_stats[3, :3].tolist() == [3.0, 1.0, 2.0]
    assert s.item_stats[3, 4] == 1 and math.isclose(float(s.item_stats[3, 3]), math.log(7))
    features = s.pair_features(slot[:3], _t(8 * DAY, 8 * DAY, 8 * DAY))
    assert features.shape == (3, 10) and torch.isfinite(features).all()
    assert math.isclose(float(features[0, 0]), math.log1p(3), rel_tol=1e-6)
    assert math.isclose(float(features[1, 1]), math.log1p(7), rel_tol=1e-6)  # days since last
    assert s.bought(9).tolist() == [i in (3, 5, 7) for i in range(9)]


def test_mixture_is_a_distribution_over_bought_items():
    repeat = RepeatScore()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in repeat.parameters():
            p.normal_(0, 0.5)
    repeat.update(torch.tensor([0, 0, 1, 2]), torch.tensor([1, 2, 3, 4]), _t(0, 0, 0, 0))
    explore = torch.randn(3, 8)
    logp = repeat.log_probs(explore, torch.tensor([0, 1, 9]), _t(DAY, DAY, DAY))
    assert logp.shape == (3, 8)
    assert torch.isinf(logp[:, [0, 5, 6, 7]]).all()  # nobody bought them: not recommendable
    torch.testing.assert_close(torch.logsumexp(logp, 1), torch.zeros(3), atol=1e-5, rtol=0)
    # a user without history (9) explores only: his scores follow prior + w·explore
    with torch.no_grad():
        repeat.gate[-1].bias.fill_(50.0)  # P(repeat) ≈ 1 for users with history
    logp = repeat.log_probs(explore[[0, 2]], torch.tensor([0, 9]), _t(DAY, DAY))
    logp = logp.detach()
    assert math.isclose(float(torch.logsumexp(logp[0, [1, 2]], 0)), 0.0, abs_tol=1e-5)
    assert math.isclose(float(torch.logsumexp(logp[1, [1, 2, 3, 4]], 0)), 0.0, abs_tol=1e-5)


def test_save_load_continue_equals_uninterrupted(tmp_path, tiny_config, tiny_table):
    torch.manual_seed(0)
    model = TGNRecommender(tiny_config).eval()
    with torch.no_grad():
        model.repeat.g[-1].weight.normal_()
        model.repeat.gate[-1].bias.fill_(1.0)
    events = model.encode(tiny_table)
    model.apply_events(events[:200], 50)
    payload = model.checkpoint_payload()
    kept = payload["state"]["repeat._extra_state"].clone()
    model.save(tmp_path / "model.pt")
    restored = TGNRecommender.load(tmp_path / "model.pt").eval()
    assert restored.config.repeat
    model.apply_events(events[200:], 50)
    restored.apply_events(events[200:], 50)
    assert torch.equal(payload["state"]["repeat._extra_state"], kept)  # a copy, not live
    assert not torch.equal(kept, model.repeat.get_extra_state())
    for name, value in model.state_dict().items():
        assert torch.equal(value, restored.state_dict()[name]), name
    probe = events[-20:]
    assert torch.equal(model.score(probe), restored.score(probe))


def test_load_without_statistics_keeps_everything_else(tmp_path, tiny_config, tiny_table):
    """``statistics=False`` (the changelog server's checkpoint reload): the same weights,
    memory and item embeddings, empty purchase statistics."""
    model = TGNRecommender(tiny_config).eval()
    model.apply_events(model.encode(tiny_table)[:200], 50)
    model.save(tmp_path / "model.pt")
    light = TGNRecommender.load(tmp_path / "model.pt", statistics=False).eval()
    assert model.repeat.size > 0 and light.repeat.size == 0
    full = model.state_dict()
    for name, value in light.state_dict().items():
        if name != "repeat._extra_state":
            assert torch.equal(value, full[name]), name
    t = float(model.memory.last_update.max())
    with torch.no_grad():
        assert torch.equal(light.item_embeddings(t), model.item_embeddings(t))


def test_repeat_off_gives_the_dot_product_and_on_mixes_it(tiny_config, tiny_table):
    models = {}
    for on in (False, True):
        torch.manual_seed(3)
        models[on] = TGNRecommender(TGNConfig(**{**tiny_config.__dict__, "repeat": on})).eval()
    off, on = models[False], models[True]
    assert off.repeat is None and "repeat._extra_state" not in off.state_dict()
    events = off.encode(tiny_table)
    on.encode(tiny_table)
    off.apply_events(events[:300], 50)
    on.apply_events(events[:300], 50)
    probe = events[300:320]
    with torch.no_grad():
        dot = off.user_embeddings(probe.users, probe.t) @ off.item_embeddings(probe.t[0]).T
    assert torch.equal(off.score(probe), dot)  # the plain dot product, untouched
    torch.testing.assert_close(on.score(probe), on.repeat.mix(dot.clone(), probe.users, probe.t))
    torch.testing.assert_close(on.score_users(probe.users, probe.t, mix=False), dot)


def test_checkpoint_without_the_field_loads_with_the_term_off(tmp_path, tiny_config, tiny_table):
    old = TGNRecommender(TGNConfig(**{**tiny_config.__dict__, "repeat": False}))
    old.encode(tiny_table)
    payload = old.checkpoint_payload()
    del payload["config"]["repeat"]  # as written before the field existed
    torch.save(payload, tmp_path / "old.pt")
    loaded = TGNRecommender.load(tmp_path / "old.pt")
    assert loaded.config.repeat is False and loaded.repeat is None


def test_fit_history_learns_that_favourites_repeat(tiny_config, tiny_table):
    """Each tiny user cycles through 4 favourites: after stage 2 the next purchase is far more
    likely than under the untrained mixture (uniform over history, gate at 1/2)."""
    torch.manual_seed(0)
    model = TGNRecommender(tiny_config)
    events = model.encode(tiny_table)
    train, probe = events[:300], events[300:]

    def nll() -> float:  # test-then-update over the probe events
        model.eval()
        model.reset_state()
        model.apply_events(train, 50)
        losses = []
        for b in probe.batches(12):
            losses.append(-float(model.score(b)[torch.arange(len(b)), b.items].mean()))
            model.update(b)
        return float(np.mean(losses))

    before = nll()
    losses = fit_history(model, train, TrainConfig(history_steps=30, history_batch_size=24,
                                                   history_warmup=0.2, history_lr=3e-2),
                         progress=False)
    assert len(losses) == 30  # exactly the steps asked for (three passes of ~10 batches)
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    assert nll() < before - 0.5


def test_fit_history_stops_mid_pass_at_its_steps(tiny_config, tiny_table):
    """Fewer steps than one pass has batches: exactly that many steps, one pass."""
    torch.manual_seed(0)
    model = TGNRecommender(tiny_config)
    events = model.encode(tiny_table)[:300]
    losses = fit_history(model, events, TrainConfig(history_steps=4, history_batch_size=24,
                                                    history_warmup=0.2), progress=False)
    assert len(losses) == 4


def test_neighbor_scores_come_from_similar_users_only():
    s = PurchaseSignals()
    s.update(torch.tensor([0, 0, 1, 1, 1, 2]), torch.tensor([1, 2, 1, 2, 3, 7]),
             _t(0, 0, 0, 0, 0, 0))
    near = s.neighbor_scores(torch.tensor([0, 2, 5]), DAY, 9, k=2)
    assert near.shape == (3, 9)
    assert near[0, 3] > 0 and near[0, 7] == 0  # user 1 is like user 0, user 2 is not
    assert near[1].sum() == 0  # nobody shares an item with user 2
    assert near[2].sum() == 0  # an unknown user has no neighbours
    # user 0's neighbour (user 1) holds log1p(1) of each of his items
    assert math.isclose(float(near[0, 3]), math.log1p(1), rel_tol=1e-6)


def test_recent_items_rank_by_last_purchase():
    s = PurchaseSignals()
    s.update(torch.tensor([0, 0, 0]), torch.tensor([4, 5, 6]), _t(0, DAY, 2 * DAY))
    s.update(torch.tensor([0]), torch.tensor([4]), _t(3 * DAY))  # 4 is the newest again
    rows, items, rank = s.recent_items(torch.tensor([9, 0]), recent=2)
    assert rows.tolist() == [1, 1]  # user 9 has no history
    assert items.tolist() == [4, 6] and rank.tolist() == [0, 1]


def test_item_scores_follow_the_newest_items_co_buyers():
    """User 0 last bought item 2, earlier item 1. Users 1–2 bought 2 with 8, user 3 bought 1
    with 9: 8 is nearer than 9, items nobody co-bought score 0, a user without history too."""
    s = PurchaseSignals()
    s.update(torch.tensor([0, 1, 1, 2, 2, 3, 3]), torch.tensor([1, 2, 8, 2, 8, 1, 9]),
             _t(0, 0, 0, 0, 0, 0, 0))
    s.update(torch.tensor([0]), torch.tensor([2]), _t(DAY))
    near = s.item_scores(torch.tensor([0, 7]), 12)
    assert near.shape == (2, 12)
    assert near[0, 8] > near[0, 9] > 0
    assert near[0, 5] == 0 and near[0, 11] == 0
    assert near[1].sum() == 0
    assert float(near[0].max()) == 1.0
    # only the newest item counts with recent=1: 9 (a co-buy of the older item 1) drops out
    assert s.item_scores(torch.tensor([0]), 12, recent=1)[0, 9] == 0


def test_a_checkpoint_from_before_the_added_terms_loads_as_the_model_it_saved():
    torch.manual_seed(0)
    saved = RepeatScore()
    with torch.no_grad():
        for p in saved.parameters():
            p.normal_(0, 0.5)
        # the model an old checkpoint describes: the added terms at zero
        saved.g[0].weight[:, PAIR_FEATURES:] = 0.0
        saved.item_weight.zero_()
        saved.repeat_dot_weight.zero_()
        saved.explore_terms[-1].weight.zero_()
        saved.explore_terms[-1].bias.zero_()
    saved.update(torch.tensor([0, 0, 1, 2]), torch.tensor([1, 2, 3, 2]), _t(0, 0, 0, DAY))
    old = {k: v for k, v in saved.state_dict().items()
           if not k.startswith(("item_weight", "repeat_dot_weight", "explore_terms."))}
    old["g.0.weight"] = old["g.0.weight"][:, :PAIR_FEATURES].clone()
    fresh = RepeatScore()
    fresh.load_state_dict(old)  # strict: nothing else missing
    explore, users = torch.randn(3, 6), torch.tensor([0, 1, 5])
    with torch.no_grad():
        torch.testing.assert_close(fresh.log_probs(explore, users, _t(2 * DAY, 2 * DAY, 2 * DAY)),
                                   saved.log_probs(explore, users, _t(2 * DAY, 2 * DAY, 2 * DAY)))


def test_g_reads_the_items_popularity_and_explore_weights_the_users_history():
    repeat = RepeatScore()
    # user 0 bought items 1 and 2 once each; users 1..4 bought item 2 since; user 5 3 and 4
    repeat.update(torch.tensor([0, 0]), torch.tensor([1, 2]), _t(0, 0))
    repeat.update(torch.tensor([1, 2, 3, 4, 5, 5]), torch.tensor([2, 2, 2, 2, 3, 4]),
                  _t(*[DAY] * 6))
    with torch.no_grad():
        # g = the item's log purchases (first item-feature column), through its ReLU layers
        repeat.g[0].weight.zero_()
        repeat.g[0].bias.zero_()
        repeat.g[0].weight[0, PAIR_FEATURES] = 1.0
        repeat.g[2].weight.zero_()
        repeat.g[2].weight[0, 0] = 1.0
        repeat.g[-1].weight[0, 0] = 1.0
    logp = repeat.log_probs(torch.zeros(1, 5), torch.tensor([0]), _t(2 * DAY)).detach()
    assert logp[0, 2] > logp[0, 1]  # same pair history; item 2 is what everyone buys now
    # explore: the dot product's weight grows with the user's lines (first user feature)
    explore = torch.tensor([[0.0, 0.0, 0.0, 5.0, 0.0]]).expand(2, 5)
    users, t = torch.tensor([0, 9]), _t(2 * DAY, 2 * DAY)
    before = repeat.log_probs(explore, users, t).detach()
    with torch.no_grad():
        repeat.explore_terms[0].weight.zero_()
        repeat.explore_terms[0].bias.zero_()
        repeat.explore_terms[0].weight[0, 0] = 1.0
        repeat.explore_terms[-1].weight[0, 0] = 1.0
    after = repeat.log_probs(explore, users, t).detach()
    gain = (after - before)[:, 3]  # item 3: the one of the unbought 3, 4 with a dot product
    assert gain[0] > 0.1 and abs(float(gain[1])) < 1e-6  # user 9 has no history: unchanged
