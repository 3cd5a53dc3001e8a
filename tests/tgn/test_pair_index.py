"""The cached pair index gives the KNN terms of the uncached, dense arithmetic."""

from __future__ import annotations

import numpy as np
import torch

from tgn.signals import RECENT_DECAY, PurchaseSignals


def _dense(s: PurchaseSignals, num_items: int) -> np.ndarray:
    """``[U, num_items]`` log1p(count) of every pair, from scratch."""
    n = s.size
    users, items = s.pair_user[:n].numpy(), s.pair_item[:n].numpy()
    out = np.zeros((int(users.max()) + 1, num_items))
    out[users, items] = np.log1p(s.count[:n].numpy())
    return out


def _user_knn(s: PurchaseSignals, users: np.ndarray, num_items: int,
              k: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean vector of the ``k`` most cosine-similar other users (similarity > 0), and whether
    each row's neighbours are unambiguous (no tie at the k-th similarity)."""
    matrix = _dense(s, num_items)
    unit = matrix / np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12)
    known = users < len(matrix)
    sims = np.where(known[:, None], unit[np.minimum(users, len(matrix) - 1)] @ unit.T, 0.0)
    sims[np.flatnonzero(known), users[known]] = -1.0
    top = torch.from_numpy(sims).topk(min(k, len(matrix)), dim=1)
    weights = np.zeros_like(sims)
    np.put_along_axis(weights, top.indices.numpy(), (top.values > 0).double().numpy(), 1)
    ranked = -np.sort(-sims, 1)
    clear = (k >= len(matrix)) | (ranked[:, min(k, len(matrix)) - 1]
                                  > ranked[:, min(k, len(matrix) - 1)] + 1e-9)
    return weights / np.maximum(weights.sum(1, keepdims=True), 1) @ matrix, clear


def _item_knn(s: PurchaseSignals, users: torch.Tensor, num_items: int) -> np.ndarray:
    """Cosine of every item's buyer set with the user's rank-decayed newest items."""
    bought = _dense(s, num_items) > 0
    cosine = bought / np.sqrt(np.maximum(bought.sum(0), 1))  # [U, N]
    rows, items, rank = (x.numpy() for x in s.recent_items(users))
    query = np.zeros((users.numel(), num_items))
    query[rows, items] = RECENT_DECAY ** rank.astype(np.float64)
    out = query @ cosine.T @ cosine
    return out / np.maximum(out.max(1, keepdims=True), 1e-12)


def test_knn_scores_equal_the_dense_computation_as_the_log_grows():
    gen = torch.Generator().manual_seed(0)
    s, num_items = PurchaseSignals(), 45
    queries = torch.tensor([*range(30), 99])  # + one user without history
    for step in range(4):  # the index is cached per generation, its sort kept across updates
        users = torch.randint(0, 30, (300,), generator=gen)
        items = torch.randint(0, 40, (300,), generator=gen)
        s.update(users, items, torch.full((300,), 1e9 + step * 86_400.0))
        index = s.pair_index()
        assert s.pair_index() is index and index.generation == s.generation
        for k in (3, 300):
            want, clear = _user_knn(s, queries.numpy(), num_items, k)
            assert clear.mean() > 0.7  # rows with a tie at the k-th neighbour: either is right
            np.testing.assert_allclose(
                s.neighbor_scores(queries, 0.0, num_items, k).numpy()[clear], want[clear],
                rtol=1e-6, atol=1e-6)
            one = s.neighbor_scores(queries[:1], 0.0, num_items, k)  # a request
            assert torch.equal(one, s.neighbor_scores(queries, 0.0, num_items, k)[:1])
        np.testing.assert_allclose(s.item_scores(queries, num_items).numpy(),
                                   _item_knn(s, queries, num_items), rtol=1e-6, atol=1e-6)
    assert s.pair_index() is index
    s.update(torch.tensor([0]), torch.tensor([44]), torch.tensor([2e9]))
    assert s.pair_index() is not index and s.neighbor_scores(queries, 0.0, 45)[1:, 44].any()
