"""Stage 1's sampled softmax: cross-entropy of each purchase against shared negatives."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tgn.model import TGNRecommender
from tgn.train import TrainConfig, softmax_loss, train


def test_softmax_loss_is_cross_entropy_with_hits_masked(tiny_config, tiny_table):
    torch.manual_seed(0)
    model = TGNRecommender(tiny_config)
    events = model.encode(tiny_table)
    model.apply_events(events[:100])
    batch = events[100:110]
    negatives = torch.tensor([3, 5, int(batch.items[0]), 7])  # row 0's positive among them
    got = softmax_loss(model, batch, negatives)
    with torch.no_grad():
        users = model.user_embeddings(batch.users, batch.t)
        z = model.item_embeddings(float(batch.t[0]))
    logits = torch.cat([(users * z[batch.items]).sum(1, keepdim=True), users @ z[negatives].T], 1)
    hits = torch.cat([torch.zeros(10, 1, dtype=torch.bool),
                      negatives == batch.items.unsqueeze(1)], 1)
    assert hits[0, 3]
    logits = logits.masked_fill(hits, -torch.inf)  # an accidental hit is not a negative
    assert float(got) == pytest.approx(float(F.cross_entropy(logits, torch.zeros(10).long())),
                                       rel=1e-5)


def test_training_with_the_softmax_loss_lowers_it(tiny_config, tiny_table):
    model = TGNRecommender(tiny_config)
    events = model.encode(tiny_table)
    config = TrainConfig(epochs=2, batch_size=40, loss="softmax", softmax_negatives=10,
                         patience=2, history_steps=1, lr=1e-2, max_val_events=40)
    result = train(model, events[:240], events[240:], config, progress=False)
    losses = [h["loss"] for h in result.history]
    assert losses[-1] < losses[0]


def test_unknown_loss_is_refused():
    with pytest.raises(ValueError, match="loss must be one of"):
        TrainConfig(loss="hinge")
