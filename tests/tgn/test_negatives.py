"""History negatives: BPR negatives drawn from the user's own earlier purchases."""

from __future__ import annotations

from dataclasses import asdict

import pytest
import torch

from pipelines.cli import main
from streaming.dataset import Dataset
from tgn.data import EventBatch
from tgn.experiment import build_model
from tgn.ids import IdMap
from tgn.model import TGNConfig, TGNRecommender
from tgn.repeat import RepeatScore
from tgn.train import TrainConfig, draw_negatives, train

#: Uniform candidates disjoint from every purchased item, so a draw's origin is visible.
UNIFORM = torch.arange(1000, 1100)


def _batch(users: list[int], items: list[int], t: list[float]) -> EventBatch:
    return EventBatch(torch.tensor(users), torch.tensor(items),
                      torch.tensor(t, dtype=torch.float64), torch.zeros(len(users), 2))


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_sample_history_draws_the_users_other_items_uniformly():
    repeat = RepeatScore()
    repeat.update(torch.tensor([0, 0, 0, 1, 0]), torch.tensor([1, 2, 3, 4, 2]),
                  torch.arange(5, dtype=torch.float64))
    n = 3000
    users = torch.tensor([0] * n + [1, 1, 2])
    exclude = torch.tensor([2] * n + [4, 9, 1])
    drawn = repeat.sample_history(users, exclude, _gen())
    counts = torch.bincount(drawn[:n], minlength=5)
    assert counts[[0, 2, 4]].sum() == 0  # only user 0's items, never the excluded positive
    assert abs(counts[1].item() / n - 0.5) < 0.05 and abs(counts[3].item() / n - 0.5) < 0.05
    # user 1's only item is the positive: nothing to draw; otherwise it; user 2: no history
    assert drawn[n:].tolist() == [-1, 4, -1]
    assert torch.equal(drawn, repeat.sample_history(users, exclude, _gen()))
    assert not torch.equal(drawn, repeat.sample_history(users, exclude, _gen(1)))
    assert RepeatScore().sample_history(users, exclude, _gen()).eq(-1).all()
    assert repeat.sample_history(users[:0], exclude[:0], _gen()).numel() == 0


def _model(config: TGNConfig) -> TGNRecommender:
    """A model whose id maps hold 4 users and 1100 items (indices = ids)."""
    return TGNRecommender(config, IdMap(str(u) for u in range(4)),
                          IdMap(str(i) for i in range(1100)))


def _walk(model: TGNRecommender, config: TrainConfig, seed: int = 0) -> list[tuple[
        EventBatch, torch.Tensor, dict[int, set[int]]]]:
    """Stream a hand-built stream as training does (draw, then apply the batch); returns each
    batch, its negatives and the items each user bought in the batches before it.

    Four users, six batches of one purchase each: user ``u`` buys item ``10u + k`` in batch
    ``k`` and, in batches 4 and 5, item ``10u`` (bought in batch 0) again.
    """
    generator, bought, out = _gen(seed), {u: set() for u in range(4)}, []
    for k in range(6):
        items = [10 * u + (k if k < 4 else 0) for u in range(4)]
        batch = _batch([0, 1, 2, 3], items, [float(k)] * 4)
        out.append((batch, draw_negatives(model, batch, UNIFORM, config, generator),
                    {u: set(s) for u, s in bought.items()}))
        with torch.no_grad():
            model.update(batch)
        for u, i in enumerate(items):
            bought[u].add(i)
    return out


def test_history_negatives_come_only_from_earlier_purchases(tiny_config):
    model = _model(tiny_config)
    config = TrainConfig(negatives=3, history_negatives=1.0)
    for k, (batch, negatives, before) in enumerate(_walk(model, config)):
        for row, user in enumerate(batch.users.tolist()):
            past = set(negatives[row].tolist()) - set(UNIFORM.tolist())
            assert past <= before[user], (k, user)  # never the future, never another user's
            assert int(batch.items[row]) not in past  # never the positive (k = 4, 5 repeats)
            if k == 0:  # no history yet: all uniform
                assert not past
            elif len(before[user] - {int(batch.items[row])}) > 0:  # all from history
                assert set(negatives[row].tolist()) <= before[user]


def test_the_share_of_history_negatives_is_respected(tiny_config):
    def draws(share: float, negatives: int, seed: int = 0) -> torch.Tensor:
        model = _model(tiny_config)
        walked = _walk(model, TrainConfig(negatives=negatives, history_negatives=share), seed)
        return torch.stack([n for _, n, _ in walked])  # [6 batches, 4 users, negatives]

    uniform = draws(0.0, 4)
    assert torch.isin(uniform, UNIFORM).all()
    half = draws(0.5, 4)
    # no history in batch 0: the uniform draws stay, the same as without history negatives
    assert torch.equal(half[0], uniform[0])
    # batches 1-3 (history, no repeats): exactly 2 history + 2 uniform columns per row
    assert not torch.isin(half[1:4, :, :2], UNIFORM).any()
    assert torch.isin(half[1:4, :, 2:], UNIFORM).all()
    assert torch.equal(half, draws(0.5, 4)) and not torch.equal(half, draws(0.5, 4, seed=1))
    many = torch.cat([draws(0.25, 1, seed)[1:] for seed in range(30)])  # 600 draws
    assert abs((~torch.isin(many, UNIFORM)).double().mean().item() - 0.25) < 0.06
    no_term = _model(TGNConfig(**{**asdict(tiny_config), "repeat": False}))
    walked = _walk(no_term, TrainConfig(negatives=4, history_negatives=0.5))
    assert torch.isin(torch.cat([n for _, n, _ in walked]), UNIFORM).all()  # falls back


def test_the_settings_are_checked_and_training_runs_with_them(tiny_dataset, tiny_config,
                                                              tmp_path, capsys):
    for bad in ({"history_negatives": 1.5}, {"history_negatives": -0.1}, {"negatives": 0}):
        with pytest.raises(ValueError):
            TrainConfig(**bad)
    with pytest.raises(SystemExit):
        main(["train", "--data", str(tiny_dataset), "--out", str(tmp_path / "x"),
              "--history-negatives", "2"])
    assert "between 0 and 1" in capsys.readouterr().err
    model, (tr, va, _) = build_model(Dataset.load(tiny_dataset), tiny_config, seed=0)
    result = train(model, tr, va, TrainConfig(epochs=1, batch_size=25, negatives=2,
                                              history_negatives=0.5, history_steps=100),
                   progress=False)
    assert 0 < result.history[0]["loss"] < 10
    assert "val_explore/recall@20" in result.history[0]  # NaN here: no explore purchase
