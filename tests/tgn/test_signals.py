"""The decayed item popularity of :class:`~tgn.signals.PurchaseSignals`: kept scaled to an
origin (an update costs O(batch), not O(items)), equal to the plain sum of decayed purchases;
checkpoints round-trip, and those from before the origin load as the same state."""

from __future__ import annotations

import math

import torch

from tgn.signals import ITEM_HALF_LIVES, PAIR_HALF_LIVES, SECONDS_PER_DAY, PurchaseSignals

DAY = SECONDS_PER_DAY
NUM_ITEMS = 6


def _stream(seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Batches ``(users, items, t)`` over 1,500 days (past the 600 days after which the 3-day
    half-life rescales the table), one batch that goes back in time, ties within batches."""
    g = torch.Generator().manual_seed(seed)
    batches, t = [], 1_500_000_000.0
    for step in range(60):
        t += (-3 if step == 30 else 25 + step % 7) * DAY
        size = 1 + step % 5
        times = t + torch.randint(0, 3, (size,), generator=g).double().sort().values * 3600.0
        batches.append((torch.randint(0, 4, (size,), generator=g),
                        torch.randint(0, NUM_ITEMS, (size,), generator=g), times))
    return batches


def _reference(batches: list, t: float) -> torch.Tensor:
    """``[NUM_ITEMS, 2H]``: Σ exp(−rate·(max(t, clock) − t_e)) over every purchase and over the
    first purchase of each (user, item) pair, event by event; clock = last batch's newest."""
    rates = [math.log(2) / (d * DAY) for d in ITEM_HALF_LIVES]
    at = max(t, float(batches[-1][2].max()))
    pop = torch.zeros(NUM_ITEMS, 2 * len(rates), dtype=torch.float64)
    seen = set()
    for users, items, times in batches:
        for u, i, te in zip(users.tolist(), items.tolist(), times.tolist(), strict=True):
            for h, rate in enumerate(rates):
                pop[i, h] += math.exp(-rate * (at - te))
                if (u, i) not in seen:
                    pop[i, len(rates) + h] += math.exp(-rate * (at - te))
            seen.add((u, i))
    return pop


def test_popularity_equals_the_sum_of_decayed_purchases():
    s = PurchaseSignals()
    batches = _stream()
    origins = set()
    for k, batch in enumerate(batches):
        s.update(*batch)
        origins.add(s.origin)
        if k in (0, 29, 30, 59):  # right after the first, before/after going back, the last
            now = float(batch[2].max())
            for t in (now - DAY, now, now + 2.5 * DAY):  # before the clock: no decay
                torch.testing.assert_close(s.item_popularity(t, NUM_ITEMS),
                                           _reference(batches[:k + 1], t), rtol=1e-9, atol=0)
    assert len(origins) > 1  # the table was rescaled on the way
    features = s.item_features(float(batches[-1][2].max()) + DAY, NUM_ITEMS + 2)
    assert features.shape == (NUM_ITEMS + 2, 7) and torch.isfinite(features).all()
    assert features[NUM_ITEMS:].abs().sum() == 0  # items never bought


def test_packed_round_trip_continues_as_the_uninterrupted_state():
    batches = _stream(1)
    whole, resumed = PurchaseSignals(), PurchaseSignals()
    for batch in batches[:40]:
        whole.update(*batch)
    resumed.load_packed(whole.packed())
    for batch in batches[40:]:
        whole.update(*batch)
        resumed.update(*batch)
    assert torch.equal(whole.packed(), resumed.packed())


def test_a_checkpoint_from_before_the_origin_loads_as_the_same_state():
    s = PurchaseSignals()
    for batch in _stream(2):
        s.update(*batch)
    # the old layout: a 4-value head (no origin) and the popularity at the clock
    n, users, items = s.size, s.user_stats.size(0), s.item_stats.size(0)
    packed = s.packed()
    w_pair = 4 + len(PAIR_HALF_LIVES)
    body = packed[5:5 + n * w_pair + users * 4]
    old_items = torch.cat([s.item_stats, s.item_popularity(s.clock, items)], 1)
    old = torch.cat([packed[:4], body, old_items.flatten()])
    loaded = PurchaseSignals()
    loaded.load_packed(old)
    assert loaded.origin == loaded.clock == s.clock
    t = s.clock + 4 * DAY
    torch.testing.assert_close(loaded.item_popularity(t, items), s.item_popularity(t, items),
                               rtol=1e-12, atol=0)
    assert torch.equal(loaded.pair_features(torch.arange(n), torch.full((n,), t)),
                       s.pair_features(torch.arange(n), torch.full((n,), t)))


def test_per_generation_caches_follow_every_update():
    """What is cached per generation (the bought mask, the global repurchase interval inside
    the pair features), read between updates, is what statistics built from scratch give
    after each update."""
    live = PurchaseSignals()
    for step, (users, items, t) in enumerate(_stream(1)):
        live.update(users, items, t)
        fresh = PurchaseSignals()
        for batch in _stream(1)[:step + 1]:
            fresh.update(*batch)
        assert torch.equal(live.bought(NUM_ITEMS + 2), fresh.bought(NUM_ITEMS + 2))
        slots = torch.arange(live.size)
        now = torch.full((live.size,), float(t.max()) + DAY, dtype=torch.float64)
        assert torch.equal(live.pair_features(slots, now), fresh.pair_features(slots, now))
    live.reset_state()
    assert not live.bought(NUM_ITEMS).any()
