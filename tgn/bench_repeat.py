"""Streaming cost of the repeat term (tgn/repeat.py) on a dataset, next to a full TGN step.

The history is warmed on the training events; then, on the first ``--events`` validation events
in batches of ``--batch-size``, medians over ``--repeats`` rounds (after one warm-up round) of:

* ``update``: :meth:`RepeatScore.update` (the per-event bookkeeping the stream pays),
* ``score``: :meth:`RepeatScore.mix` on a ``[B, num_items]`` score matrix (evaluation-style),
* ``serve``: the term of one user (what ``/recommend`` adds per request),
* ``tgn_step``: ``TGNRecommender.update`` without the term (memory + neighbours), for scale.

Usage: ``flock /tmp/dynllm-bench.lock dynllm bench repeat --data data/cj26 --json
benchmarks/tgn/repeat_cost.json``
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from streaming.dataset import Dataset
from tgn.model import TGNConfig, TGNRecommender


def _median_s(run: Callable[[], Any], repeats: int,
              prepare: Callable[[], Any] = lambda: None) -> float:
    """Median seconds of ``run()`` over ``repeats`` rounds after a warm-up; ``prepare()`` runs
    untimed before each round."""
    times = []
    for _ in range(repeats + 1):
        prepare()
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def bench_repeat(data_dir: str | Path, events: int = 20_000, batch_size: int = 200,
                 repeats: int = 5, threads: int = 1) -> dict[str, Any]:
    """Per-event costs of the repeat term (see the module docstring); returns the figures."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    data = Dataset.load(data_dir)
    model = TGNRecommender(TGNConfig(repeat=True)).eval()
    train = model.encode(data.split("train"))
    probe = model.encode(data.split("val"))[: events]
    model.apply_events(train)
    with torch.no_grad():  # a non-zero g, so scoring does real work (cost does not depend on it)
        model.repeat.g[-1].weight.fill_(0.1)
    repeat, batches = model.repeat, list(probe.batches(batch_size))
    warm = repeat.get_extra_state()

    def updates() -> None:
        for b in batches:
            repeat.update(b.users, b.items, b.t)

    update_us = 1e6 * _median_s(updates, repeats,
                                lambda: repeat.set_extra_state(warm)) / len(probe)
    repeat.set_extra_state(warm)
    num_items = len(model.items)
    big = probe[:2000]
    scores = torch.zeros(len(big), num_items)
    score_s = _median_s(lambda: repeat.mix(scores, big.users, big.t), repeats)
    users = probe.users[:200]
    serve_s = _median_s(lambda: [repeat.mix(scores[:1], u.view(1), big.t[:1]) for u in users],
                        repeats)
    plain = TGNRecommender(TGNConfig(repeat=False), model.users, model.items).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items()
                           if not k.startswith("repeat.")})
    state = copy.deepcopy(plain.state_dict())

    tgn_us = 1e6 * _median_s(lambda: plain.apply_events(probe, batch_size), repeats,
                             lambda: plain.load_state_dict(state)) / len(probe)
    pairs_per_user = repeat.size / max(1, len(repeat.signals.slots_of))
    report = {
        "dataset": str(data_dir), "events": len(probe), "batch_size": batch_size,
        "threads": threads, "pairs": repeat.size, "users": len(repeat.signals.slots_of),
        "pairs_per_user": pairs_per_user, "num_items": num_items,
        "update_us_per_event": update_us,
        "score_us_per_event_batch2000": 1e6 * score_s / len(big),
        "serve_us_per_user": 1e6 * serve_s / users.numel(),
        "tgn_update_us_per_event": tgn_us,
        "added_to_update": update_us / tgn_us,
    }
    return report
