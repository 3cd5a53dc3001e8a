"""``dynllm bench fusion``: what the DynLLM head adds to the cost of a user embedding.

One model is warmed up on a dataset's training events (so memories and neighbour buffers are
full), then user embeddings are produced for the validation events, batch by batch, with the
identity head (TGN only) and with the DynLLM head (profile lookup + distilled attention), in
alternating repeats within the same run. The profile table holds ``versions`` random facet
vectors per user: the cost does not depend on the vector values, only on the table's size.

Reported: median microseconds per event of ``user_embeddings`` (the per-event cost of producing
a user embedding) and of the whole streaming step ``user_embeddings + update``, and the added
share of the fusion head for both.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch

from streaming.dataset import Dataset
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


def _time_pass(model: TGNRecommender, batches: list, update: bool) -> float:
    """Seconds for one pass of ``user_embeddings`` (+ ``update``) over ``batches``."""
    state = {k: v.clone() for k, v in model.state_dict().items()} if update else None
    start = time.perf_counter()
    with torch.no_grad():
        for batch in batches:
            model.user_embeddings(batch.users, batch.t)
            if update:
                model.update(batch)
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
    seconds: dict[str, list[float]] = {f"{h}/{m}": [] for h in heads for m in ("embed", "step")}
    for _ in range(repeats + 1):  # first round is warm-up
        for name, head in heads.items():
            model.user_head = head
            seconds[f"{name}/embed"].append(_time_pass(model, batches, update=False))
            seconds[f"{name}/step"].append(_time_pass(model, batches, update=True))
    us = {k: 1e6 * statistics.median(v[1:]) / len(probe) for k, v in seconds.items()}
    return {
        "dataset": str(dataset_dir), "events": len(probe), "batch_size": batch_size,
        "repeats": repeats, "threads": threads, "users": len(model.users),
        "profiles": len(heads["dynllm"].profiles),
        "us_per_event": us,
        "added_embed": us["dynllm/embed"] / us["tgn/embed"] - 1,
        "added_step": us["dynllm/step"] / us["tgn/step"] - 1,
    }
