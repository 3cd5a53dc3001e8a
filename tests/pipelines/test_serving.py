"""The served top-k (``Mixture.top``, ``ServingShard.top``) is the model's: the best items of
``RepeatScore.log_probs`` / ``TGNRecommender.mix_history`` with their scores (≤ 1e-5)."""

from __future__ import annotations

import threading

import numpy as np
import torch

from pipelines.outputs import load_store, store_path
from pipelines.serving import ServingShard
from pipelines.state import checkpoint_path
from tgn.model import TGNRecommender
from tgn.repeat import RepeatScore

DAY = 86_400.0


def _randomise(repeat: RepeatScore, seed: int) -> None:
    """Every mixture weight drawn at random (an untrained run's are zero: all ties)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in repeat.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.5)


def _assert_top_is_dense_top(top: tuple[torch.Tensor, torch.Tensor], dense: torch.Tensor,
                             k: int) -> None:
    """``top`` (values, items ``[Q, k]``) holds ``dense``'s ``k`` best values, best first,
    each the dense value of its item; ties by item."""
    values, items = top
    best = torch.topk(dense, k, dim=1).values
    torch.testing.assert_close(values, best, atol=1e-5, rtol=0)  # -inf where dense has -inf
    finite = torch.isfinite(values)
    torch.testing.assert_close(dense.gather(1, items)[finite], values[finite], atol=1e-5,
                               rtol=0)
    for row_items, row_values, row_finite in zip(items, values, finite, strict=True):
        chosen = row_items[row_finite].tolist()
        assert len(set(chosen)) == len(chosen)
        assert (row_values[1:] <= row_values[:-1]).all()


def test_mixture_top_is_the_top_of_log_probs():
    """Hand-built statistics: users with history, one without, items nobody bought, a
    history longer than ``k``; ``k`` up to the whole catalogue."""
    repeat = RepeatScore()
    _randomise(repeat, 0)
    users = torch.tensor([0, 0, 0, 1, 2, 2, 0, 3, 3, 3, 3, 3, 3])
    items = torch.tensor([1, 2, 3, 3, 4, 6, 9, 1, 2, 3, 4, 5, 6])
    repeat.update(users, items, torch.arange(13, dtype=torch.float64) * 3600)
    queries = torch.tensor([0, 1, 2, 3, 7, 0])  # 7: no history; 0 twice
    t = torch.full((6,), 2 * DAY, dtype=torch.float64)
    explore = torch.randn(6, 12, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        dense = repeat.log_probs(explore, queries, t)
        mixture = repeat.mixture(explore, queries, t)
        for k in (1, 3, 5, 12):
            _assert_top_is_dense_top(mixture.top(k), dense, k)
    assert torch.isinf(dense[:, [0, 7, 8, 10, 11]]).all()  # never bought: never served
    values, items = mixture.top(12)
    assert torch.isinf(values[:, -5:]).all() and torch.isfinite(values[:, :7]).all()


def test_mixture_top_when_nothing_is_left_to_explore():
    """A user who bought every item anyone bought: only his history has probability > 0."""
    repeat = RepeatScore()
    _randomise(repeat, 2)
    repeat.update(torch.tensor([0, 0, 0]), torch.tensor([0, 1, 2]),
                  torch.zeros(3, dtype=torch.float64))
    explore, queries = torch.randn(1, 5), torch.tensor([0])
    t = torch.full((1,), DAY, dtype=torch.float64)
    with torch.no_grad():
        dense = repeat.log_probs(explore, queries, t)
        _assert_top_is_dense_top(repeat.mixture(explore, queries, t).top(5), dense, 5)
    assert torch.isfinite(dense[0, :3]).all() and torch.isinf(dense[0, 3:]).all()


def test_served_top_k_is_the_models(run_dir, one_shard_state):
    """On a replayed cj_small state with random mixture weights: the shard's top-k equals the
    top-k of the model's full score (``mix_history`` of the dot products at the shard's time),
    for a batch and for each request alone."""
    checkpoint = checkpoint_path(one_shard_state, 0, 1)
    model = TGNRecommender.load(checkpoint).eval()
    _randomise(model.repeat, 3)
    reference = TGNRecommender.load(checkpoint).eval()
    reference.repeat.load_state_dict(model.repeat.state_dict())
    shard = ServingShard(model)
    shard.refresh(threading.Lock())
    ids, _ts, _versions, vectors, _weights = load_store(store_path(one_shard_state, 0, 1))
    users, embeddings = [str(u) for u in ids[:12]], np.stack(vectors[:12])
    index = torch.from_numpy(reference.users.encode(users, grow=False))
    with torch.no_grad():
        dot = torch.from_numpy(embeddings) @ shard.item_vectors.T
        dense = reference.mix_history(dot, index, torch.full((12,), shard.t,
                                                             dtype=torch.float64))
    for k in (1, 10, 50):
        batch = shard.top(embeddings, users, k)
        _assert_top_is_dense_top(batch, dense, k)
        for b in (0, 5):
            alone = shard.top(embeddings[b:b + 1], users[b:b + 1], k)
            assert torch.equal(alone[1][0], batch[1][b])
            torch.testing.assert_close(alone[0][0], batch[0][b], atol=1e-5, rtol=0)
