"""``dynllm bench fusion``: what the DynLLM head adds to the cost of a user embedding.

One model is warmed up on a dataset's training events (so memories and neighbour buffers are
full), then the validation events are streamed batch by batch the way the live pipeline does
it: each batch's distinct users are embedded once, at their latest event time in the batch
(``pipelines.state.ShardState`` emits one temporal embedding per touched user and the fusion
stage fuses those), with the identity head (TGN only) and with the DynLLM head (profile lookup +
distilled attention), in alternating repeats within the same run. The profile table holds
``versions`` random facet vectors per user: the cost does not depend on the vector values, only
on the table's size.

Reported: median microseconds per event of ``user_embeddings`` (producing the batch's user
embeddings) and of the whole streaming step ``update + user_embeddings``, and the added share
of the fusion head for both. (Until 2026-12-03 the bench embedded every event's user, a
basket's lines repeating it: not the path the stream runs, and kinder to the head, which
de-duplicates its input while the temporal embedding did not.)
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from streaming.dataset import Dataset
from tgn.data import EventBatch, latest_per_user
from tgn.dynllm_head import DynLLMHead
from tgn.embedding import IdentityHead
from tgn.fusion import FusionConfig
from tgn.model import TGNConfig, TGNRecommender
from tgn.profile_features import ProfileTable


def _random_profiles(num_users: int, versions: int, t0: float, t1: float) -> ProfileTable:
    gen = torch.Generator().manual_seed(0)
    users = torch.arange(num_users).repeat_interleave(versions)
    ts = t0 + (t1 - t0) * torch.rand(users.numel(), generator=gen, dtype=torch.float64)
    return ProfileTable(users, ts, torch.randn(users.numel(), 4, 384, generator=gen))


def live_queries(batch: EventBatch) -> tuple[Tensor, Tensor]:
    """What a streaming step embeds (:func:`tgn.data.latest_per_user`, as ``ShardState``
    emits them): users ``[U]`` sorted, times ``[U]``."""
    users, latest, _, _ = latest_per_user(batch.users.numpy(), batch.t.numpy())
    return torch.from_numpy(users), torch.from_numpy(latest)


def _time_pass(model: TGNRecommender, batches: list[EventBatch],
               queries: list[tuple[Tensor, Tensor]], update: bool) -> float:
    """Seconds for one pass over ``batches``: ``update`` (if asked) then the batch's
    ``user_embeddings`` for its ``queries``."""
    state = {k: v.clone() for k, v in model.state_dict().items()} if update else None
    start = time.perf_counter()
    with torch.no_grad():
        for batch, (users, t) in zip(batches, queries, strict=True):
            if update:
                model.update(batch)
            model.user_embeddings(users, t)
    elapsed = time.perf_counter() - start
    if state is not None:
        model.load_state_dict(state)
    return elapsed


def bench_fusion(dataset_dir: str | Path, batch_size: int = 200, repeats: int = 7,
                 versions: int = 3, threads: int = 1, max_events: int = 20_000) -> dict[str, Any]:
    """Measure the fusion head's added per-event cost; returns a JSON-ready dict."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    data = Dataset.load(dataset_dir)
    model = TGNRecommender(TGNConfig()).eval()
    train = model.encode(data.split("train"))
    probe = model.encode(data.split("val"))[:max_events]
    model.apply_events(train)
    heads = {
        "tgn": IdentityHead(),
        "dynllm": DynLLMHead(FusionConfig(dim=model.config.embed_dim),
                             _random_profiles(len(model.users), versions,
                                              float(train.t[0]), float(train.t[-1]))).eval(),
    }
    batches = list(probe.batches(batch_size))
    queries = [live_queries(b) for b in batches]
    seconds: dict[str, list[float]] = {f"{h}/{m}": [] for h in heads for m in ("embed", "step")}
    for _ in range(repeats + 1):  # first round is warm-up
        for name, head in heads.items():
            model.user_head = head
            seconds[f"{name}/embed"].append(_time_pass(model, batches, queries, update=False))
            seconds[f"{name}/step"].append(_time_pass(model, batches, queries, update=True))
    us = {k: 1e6 * statistics.median(v[1:]) / len(probe) for k, v in seconds.items()}
    return {
        "dataset": str(dataset_dir), "events": len(probe), "batch_size": batch_size,
        "embedded_users": sum(len(u) for u, _ in queries),
        "repeats": repeats, "threads": threads, "users": len(model.users),
        "profiles": len(heads["dynllm"].profiles),
        "us_per_event": us,
        "added_embed": us["dynllm/embed"] / us["tgn/embed"] - 1,
        "added_step": us["dynllm/step"] / us["tgn/step"] - 1,
    }
