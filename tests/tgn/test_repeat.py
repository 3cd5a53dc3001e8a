"""The repeat-purchase term: history, score, save→load→continue, off switch, gradients."""

from __future__ import annotations

import math

import torch

from tgn.data import EventBatch
from tgn.model import TGNConfig, TGNRecommender
from tgn.repeat import RepeatScore
from tgn.train import bpr_loss

DAY = 86_400.0


def _batch(users: list[int], items: list[int], t: list[float]) -> EventBatch:
    return EventBatch(torch.tensor(users), torch.tensor(items),
                      torch.tensor(t, dtype=torch.float64), torch.zeros(len(users), 2))


def _readable_g(repeat: RepeatScore, a: float, b: float, c: float) -> None:
    """Make ``g(x) = a·log1p(count) + b·log1p(days) + c`` (hidden units 0 and 1 pass x on)."""
    with torch.no_grad():
        first, last = repeat.g[0], repeat.g[2]
        first.weight.zero_()
        first.bias.zero_()
        first.weight[0, 0] = first.weight[1, 1] = 1.0
        last.weight.zero_()
        last.weight[0, 0], last.weight[0, 1] = a, b
        last.bias.fill_(c)


def test_counts_last_times_and_the_score_term_of_a_hand_built_stream():
    repeat = RepeatScore()
    repeat.update(torch.tensor([0, 0, 1]), torch.tensor([3, 3, 5]),
                  torch.tensor([10.0, 100.0, 200.0], dtype=torch.float64))
    repeat.update(torch.tensor([0]), torch.tensor([7]), torch.tensor([2 * DAY + 100],
                                                                     dtype=torch.float64))
    count, last = repeat.history(torch.tensor([0, 1, 0, 1]), torch.tensor([3, 5, 7, 3]))
    assert count.tolist() == [2.0, 1.0, 1.0, 0.0]
    assert last.tolist() == [100.0, 200.0, 2 * DAY + 100, -math.inf]
    assert repeat.size == 3  # three distinct pairs, one slot each

    _readable_g(repeat, a=2.0, b=-1.0, c=0.5)
    # rows: user 0 at day 3 (+100 s), user 0 again at day 9, user 1 at day 1, user 2 (no history)
    t = torch.tensor([3 * DAY + 100, 9 * DAY + 100, DAY + 200, DAY], dtype=torch.float64)
    dense = repeat.dense(torch.tensor([0, 0, 1, 2]), t, num_items=8)
    expected = torch.zeros(4, 8)
    expected[0, 3] = 2 * math.log1p(2) - math.log1p(3.0) + 0.5  # bought twice, 3 days ago
    expected[0, 7] = 2 * math.log1p(1) - math.log1p(1.0) + 0.5  # once, 1 day ago
    expected[1, 3] = 2 * math.log1p(2) - math.log1p(9.0) + 0.5
    expected[1, 7] = 2 * math.log1p(1) - math.log1p(7.0) + 0.5
    expected[2, 5] = 2 * math.log1p(1) - math.log1p(1.0) + 0.5
    torch.testing.assert_close(dense, expected)
    pairs = repeat.pair_scores(torch.tensor([0, 1, 2]), torch.tensor([3, 5, 3]), t[[0, 2, 3]])
    torch.testing.assert_close(pairs, torch.stack([expected[0, 3], expected[2, 5],
                                                   torch.tensor(0.0)]))


def test_extra_state_is_a_copy_that_restores_exactly():
    repeat = RepeatScore()
    repeat.update(torch.tensor([4, 2, 4]), torch.tensor([1, 1, 1]),
                  torch.tensor([5.0, 6.0, 7.0], dtype=torch.float64))
    saved = repeat.state_dict()
    repeat.update(torch.tensor([9]), torch.tensor([9]), torch.tensor([8.0], dtype=torch.float64))
    # user, item, count, last time; untouched by the later event
    assert saved["_extra_state"].tolist() == [[4, 1, 2, 7], [2, 1, 1, 6]]
    other = RepeatScore()
    other.load_state_dict(saved)
    assert other.history(torch.tensor([4, 2, 9]), torch.tensor([1, 1, 9]))[0].tolist() == [2, 1, 0]
    other.reset_state()
    assert other.size == 0 and other.get_extra_state().shape == (0, 4)


def test_save_load_continue_equals_uninterrupted_with_the_term(tmp_path, tiny_config, tiny_table):
    torch.manual_seed(0)
    model = TGNRecommender(tiny_config).eval()
    _readable_g(model.repeat, a=1.0, b=-0.5, c=0.2)
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
    scores = model.score(probe)
    assert torch.equal(scores, restored.score(probe))
    assert model.repeat.dense(probe.users, probe.t, scores.size(1)).abs().sum() > 0


def test_repeat_off_gives_the_dot_product_and_on_adds_exactly_the_term(tiny_config, tiny_table):
    configs = {on: TGNConfig(**{**tiny_config.__dict__, "repeat": on}) for on in (False, True)}
    models = {}
    for on, config in configs.items():
        torch.manual_seed(3)
        models[on] = TGNRecommender(config).eval()
    off, on = models[False], models[True]
    assert off.repeat is None and "repeat._extra_state" not in off.state_dict()
    _readable_g(on.repeat, a=1.5, b=-0.3, c=0.1)
    events = off.encode(tiny_table)
    on.encode(tiny_table)
    off.apply_events(events[:300], 50)
    on.apply_events(events[:300], 50)
    probe = events[300:320]
    with torch.no_grad():
        dot = off.user_embeddings(probe.users, probe.t) @ off.item_embeddings(probe.t[0]).T
    assert torch.equal(off.score(probe), dot)  # the old score, untouched
    term = on.repeat.dense(probe.users, probe.t, dot.size(1))
    assert term.abs().sum() > 0
    torch.testing.assert_close(on.score(probe), dot + term)


def test_checkpoint_without_the_field_loads_with_the_term_off(tmp_path, tiny_config, tiny_table):
    old = TGNRecommender(TGNConfig(**{**tiny_config.__dict__, "repeat": False}))
    old.encode(tiny_table)
    payload = old.checkpoint_payload()
    del payload["config"]["repeat"]  # as written before the field existed
    torch.save(payload, tmp_path / "old.pt")
    loaded = TGNRecommender.load(tmp_path / "old.pt")
    assert loaded.config.repeat is False and loaded.repeat is None


def test_bpr_gradient_reaches_the_repeat_weights(tiny_config, tiny_table):
    torch.manual_seed(0)
    model = TGNRecommender(tiny_config)
    events = model.encode(tiny_table)
    model.apply_events(events[:300], 50)  # history: the users' favourites repeat
    batch = events[300:340]
    negatives = torch.randint(20, (len(batch), 2), generator=torch.Generator().manual_seed(0))
    model.train()
    bpr_loss(model, batch, negatives).backward()
    last = model.repeat.g[2]
    assert last.weight.grad.abs().sum() > 0 and last.bias.grad is not None
    # the positives all have history, so a larger repeat bias lowers the loss
    assert float(last.bias.grad) < 0
