"""The recommender: growth, save→load→continue, determinism, training signal."""

from __future__ import annotations

import pyarrow as pa
import torch

from streaming.dataset import Dataset
from tgn.experiment import build_model
from tgn.model import TGNRecommender
from tgn.train import TrainConfig, first_seen_order, train


def test_save_load_continue_equals_uninterrupted(tmp_path, tiny_config, tiny_table):
    torch.manual_seed(0)
    model = TGNRecommender(tiny_config).eval()
    events = model.encode(tiny_table)
    first, second = events[:200], events[200:]
    model.apply_events(first, 50)
    model.save(tmp_path / "model.pt")
    restored = TGNRecommender.load(tmp_path / "model.pt").eval()
    model.apply_events(second, 50)
    restored.apply_events(second, 50)
    for name, value in model.state_dict().items():
        assert torch.equal(value, restored.state_dict()[name]), name
    probe = events[-20:]
    assert torch.equal(model.score(probe), restored.score(probe))
    assert restored.users.to_list() == model.users.to_list()
    assert not (tmp_path / ".model.pt.tmp").exists()  # the temp file was renamed away


def test_unseen_users_and_items_grow_the_state(tiny_config, tiny_table):
    model = TGNRecommender(tiny_config).eval()
    model.apply_events(model.encode(tiny_table), 50)
    nodes, memory = model.num_nodes, model.memory.memory.clone()
    fresh = tiny_table.slice(0, 1).to_pylist()[0]
    fresh |= {"user_id": "new-user", "item_id": "new-item"}
    batch = model.encode(pa.Table.from_pylist([fresh]))
    assert model.num_nodes == nodes + 2 and len(model.items) == 21
    assert model.score(batch).shape == (1, 21)
    model.update(batch)
    torch.testing.assert_close(model.memory.memory[:nodes][model.memory.last_update[:nodes] == 0],
                               memory[model.memory.last_update[:nodes] == 0])
    assert model.memory.last_update[model.user_node[batch.users]] == batch.t


def _fit(path, config, seed: int, epochs: int = 3) -> tuple[TGNRecommender, list[float]]:
    model, (tr, va, _) = build_model(Dataset.load(path), config, seed)
    result = train(model, tr, va, TrainConfig(epochs=epochs, batch_size=25, seed=seed,
                                              patience=epochs, history_steps=100), progress=False)
    return model, [h["loss"] for h in result.history]


def test_training_is_deterministic_and_lowers_the_loss(tiny_dataset, tiny_config):
    a, losses = _fit(tiny_dataset, tiny_config, seed=1)
    b, _ = _fit(tiny_dataset, tiny_config, seed=1)
    c, _ = _fit(tiny_dataset, tiny_config, seed=2, epochs=1)
    for name, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[name]), name
    assert not torch.equal(a.attention.query.weight, c.attention.query.weight)
    assert losses[-1] < losses[0]


def test_first_seen_order_feeds_negative_sampling():
    items, first = first_seen_order(torch.tensor([3, 1, 3, 0, 1]))
    assert items.tolist() == [3, 1, 0] and first.tolist() == [0, 1, 3]
