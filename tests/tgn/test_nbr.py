"""Next-basket baselines (TIFU-KNN, UP-CF@r) and their parts on planted streams."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tgn.data import EventBatch
from tgn.evaluate import Evaluator
from tgn.nbr import TIFUKNN, UPCF, BasketVectors, RecentBaskets, TIFUDecay, UserKNN


def _batch(users: list[int], items: list[int], ts: list[float]) -> EventBatch:
    return EventBatch(torch.tensor(users), torch.tensor(items),
                      torch.tensor(ts, dtype=torch.float64), torch.zeros(len(users), 2))


# user 0 {1, 2}; user 1 {1, 2, 3} (close to 0); user 2 {4, 5} (unrelated)
PLANTED = _batch([0, 0, 1, 1, 1, 2, 2], [1, 2, 1, 2, 3, 4, 5], [0, 0, 0, 0, 0, 1, 1])
PROBE = _batch([0], [0], [2])


@pytest.mark.parametrize("model", [TIFUKNN(k=1), UPCF(r=None, q=1.0)], ids=["tifu", "upcf"])
def test_neighbours_item_outranks_an_unrelated_one(model):
    model.update(PLANTED)
    scores = model.score(PROBE)[0]
    assert scores.shape == (6,)
    assert scores[3] > 0 and scores[5] == 0  # item 3: the neighbour's; item 5: user 2's only
    assert scores[1] > scores[3] and scores[2] > scores[3]  # own items first


def test_tifu_scores_by_hand():
    model = TIFUKNN(k=1, alpha=0.2)
    model.update(PLANTED)
    # one basket each: own = multi-hot; nearest of user 0 is user 1 (cosine 2/sqrt(6))
    np.testing.assert_allclose(model.score(PROBE), [[0, 1.0, 1.0, 0.8, 0, 0]], rtol=1e-6)


def test_upcf_scores_by_hand():
    model = UPCF(r=1, alpha=0.25, q=2.0)
    model.update(PLANTED)
    model.update(_batch([0], [3], [1.5]))  # user 0's newest basket {3}: r=1 keeps only it
    # s(0, 1) = |{1,2,3}| / (3**0.25 * 3**0.75) = 1; s(0, 2) = 0; self 1
    # score = pop_1(0) + 1**2 pop_1(1) = [0, 0, 0, 1] + [0, 1, 1, 1]
    np.testing.assert_allclose(model.score(PROBE), [[0, 1.0, 1.0, 2.0, 0, 0]], rtol=1e-6)


def test_group_decay_lets_a_recent_basket_beat_an_old_habit():
    # baskets (oldest → newest): {0}, {0}, {0}, {1}; m=1 so every basket is its own group
    log = _batch([0, 0, 0, 0], [0, 0, 0, 1], [0, 1, 2, 3])
    flat, steep = BasketVectors(TIFUDecay(1, 1.0, 1.0)), BasketVectors(TIFUDecay(1, 1.0, 0.3))
    for vectors in (flat, steep):
        vectors.update(log)
    np.testing.assert_allclose(flat.matrix.toarray(), [[3 / 4, 1 / 4]])
    np.testing.assert_allclose(steep.matrix.toarray(), [[(0.3 + 0.09 + 0.027) / 4, 1 / 4]])


def test_tifu_weights_groups_from_the_newest():
    # n=5, m=2: groups {p0, p1}, {p2, p3}, {p4} (oldest, size 1); K=3
    w = TIFUDecay(m=2, r_b=0.5, r_g=0.1)(np.arange(5), np.full(5, 5))
    np.testing.assert_allclose(w, np.array([1 / 2, 0.5 / 2, 0.1 / 2, 0.05 / 2, 0.01]) / 3)


def test_score_uses_only_earlier_batches():
    model = TIFUKNN(k=2)
    model.update(PLANTED)
    scored = _batch([0, 2], [6, 0], [3, 3])  # item 6 is new, nobody bought item 0 before
    before = model.score(scored).clone()
    assert model.score(scored).equal(before)  # scoring changes nothing
    assert before.shape == (2, 6) and before[1, 0] == 0  # no column for item 6 yet
    model.update(scored)
    after = model.score(scored)
    assert after[0, 6] > 0 and after[1, 0] > 0  # the batch counts only afterwards


def _naive_vectors(users, items, ts, decay: TIFUDecay) -> dict[int, dict[int, float]]:
    """TIFU vectors by a loop over baskets: the formula read directly."""
    out: dict[int, dict[int, float]] = {}
    for user in sorted(set(users)):
        times = sorted({t for u, t in zip(users, ts, strict=True) if u == user})
        baskets = [{i for u, i, t in zip(users, items, ts, strict=True) if u == user and t == s}
                   for s in times]
        n, vec = len(baskets), out.setdefault(user, {})
        groups = [baskets[max(0, n - (j + 1) * decay.m): n - j * decay.m]  # from the newest
                  for j in range(math.ceil(n / decay.m))]
        for j, group in enumerate(groups):
            for i, basket in enumerate(reversed(group)):
                for item in basket:
                    weight = decay.r_b ** i * decay.r_g ** j / (len(group) * len(groups))
                    vec[item] = vec.get(item, 0.0) + weight
    return out


def test_streaming_update_equals_recomputation_from_scratch():
    gen = torch.Generator().manual_seed(0)
    n = 400
    users = torch.randint(0, 12, (n,), generator=gen)
    items = torch.randint(0, 30, (n,), generator=gen)  # duplicates inside baskets too
    ts = torch.randint(0, 60, (n,), generator=gen).sort().values.double()
    log = EventBatch(users, items, ts, torch.zeros(n, 2))
    decay = TIFUDecay(m=3, r_b=0.8, r_g=0.5)
    streamed, whole = BasketVectors(decay), BasketVectors(decay)
    for batch in log.batches(7):  # baskets cut by batch boundaries, reads in between
        streamed.update(batch)
        streamed.vectors(batch.users)
    whole.update(log)
    np.testing.assert_allclose(streamed.matrix.toarray(), whole.matrix.toarray())
    expected = np.zeros(whole.matrix.shape)
    for user, vec in _naive_vectors(users.tolist(), items.tolist(), ts.tolist(), decay).items():
        for item, value in vec.items():
            expected[user, item] = value
    np.testing.assert_allclose(whole.matrix.toarray(), expected)
    assert whole.counts(torch.tensor([0, 99])).tolist()[1] == 0


def test_recent_baskets_and_binary_vectors():
    log = _batch([0, 0, 0, 0], [1, 1, 2, 3], [0, 1, 2, 2])  # baskets {1}, {1}, {2, 3}
    recent, ever = BasketVectors(RecentBaskets(2)), BasketVectors(RecentBaskets(), binary=True)
    for vectors in (recent, ever):
        vectors.update(log)
    np.testing.assert_allclose(recent.matrix.toarray(), [[0, 0.5, 0.5, 0.5]])
    np.testing.assert_allclose(ever.matrix.toarray(), [[0, 1, 1, 1]])


def test_knn_excludes_self_and_unseen_users_and_checks_arguments():
    vectors = BasketVectors(TIFUDecay())
    vectors.update(PLANTED)
    sims = UserKNN(vectors, k=1).similarities(torch.tensor([0, 7]))
    assert sims.shape == (2, 3) and sims[0, 0] == -math.inf
    assert sims[0, 1] == pytest.approx(2 / math.sqrt(6)) and sims[1, 1] == 0
    cold = UserKNN(vectors, k=1).neighbor_scores(torch.tensor([7]))  # mean of the 3 users
    np.testing.assert_allclose(cold, np.array([[0, 2, 2, 1, 1, 1]]) / 3, rtol=1e-6)
    with pytest.raises(ValueError, match="unknown similarity"):
        UserKNN(vectors, similarity="jaccard")
    with pytest.raises(ValueError, match="unknown aggregate"):
        UserKNN(vectors, aggregate="max")


@pytest.mark.parametrize("model", [TIFUKNN(k=5), UPCF(r=3)], ids=["tifu", "upcf"])
def test_evaluates_on_a_log_without_repeats(model):
    gen = torch.Generator().manual_seed(1)
    users = torch.randint(0, 30, (600,), generator=gen)
    items = torch.randperm(600, generator=gen) % 200  # each user rarely repeats
    log = EventBatch(users, items, torch.arange(600).double(), torch.zeros(600, 2))
    result = Evaluator(ks=(10,)).run(model, log[300:], history=log[:300], batch_size=64)
    assert result["events"] == 300 and 0 < result["recall@10"] <= 1
