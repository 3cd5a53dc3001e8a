"""Batch mode: the time series of profiles a replay or a training run needs.

For every user, a profile is written at the end of the chosen split (from all their events before
it) and, with ``refresh_every=N``, also after every N-th purchase line before that, so training
can use the profile a live system would have had at each moment. Work already in the store is
skipped, so an interrupted build continues where it stopped.

Cost, measured on 2 CPU cores: a profile from the default 0.5B model costs seconds (see
BENCHMARKS.md), so ``max_users`` / ``limit`` cap a run; cached prompts cost nothing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from profiles.graph import PurchaseGraph
from profiles.store import ProfileStore
from profiles.writer import ProfileWriter
from streaming.dataset import Dataset

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Task:
    """Write ``user_id``'s profile from their events with ``ts <= ts``."""

    user_id: str
    ts: float


def cutoff(dataset: Dataset, until_split: str) -> float:
    """Events strictly before this time feed the profiles (``inf`` for ``all``)."""
    split = dataset.meta["split"]
    cuts = {"train": split["train_end"], "val": split["val_end"], "test": np.inf, "all": np.inf}
    if until_split not in cuts:
        raise ValueError(f"unknown split {until_split!r}; expected one of {sorted(cuts)}")
    return float(cuts[until_split])


def plan(graph: PurchaseGraph, until: float, refresh_every: int = 0,
         max_users: int | None = None, users: list[str] | None = None) -> list[Task]:
    """The profiles to write, in event-time order.

    Args:
        graph: The purchase graph.
        until: Only events with ``ts < until`` are used.
        refresh_every: Also write a profile after every N-th purchase line (0: final only).
        max_users: Keep the first N users (sorted by id) to cap the cost.
        users: Only these users (before ``max_users`` applies); unknown ids are skipped.

    Returns:
        One task per distinct (user, profile time).
    """
    tasks = []
    wanted = None if users is None else set(users)
    chosen = graph.users if wanted is None else [u for u in graph.users if u in wanted]
    for user in chosen[:max_users]:
        ts = graph.user_event_times(user)
        ts = ts[ts < until]
        if len(ts) == 0:
            continue
        points = set(ts[refresh_every - 1::refresh_every]) if refresh_every > 0 else set()
        points.add(ts[-1])
        tasks += [Task(user, float(t)) for t in points]
    return sorted(tasks, key=lambda task: (task.ts, task.user_id))


def build(dataset: Dataset, writer: ProfileWriter, store: ProfileStore, until_split: str = "train",
          refresh_every: int = 0, hops: int = 2, max_users: int | None = None,
          limit: int | None = None, batch_size: int = 8, progress: bool = True,
          users: list[str] | None = None) -> int:
    """Write the planned profiles that the store does not hold yet.

    Args:
        dataset: The dataset.
        writer: The profile writer (model, embedder, store).
        store: The store to resume from.
        until_split: ``train``, ``val``, ``test`` or ``all``: the last split whose events count.
        refresh_every: See :func:`plan`.
        hops: 2 for graph-aware prompts, 1 for own history only (the ablation).
        max_users: See :func:`plan`.
        limit: Write at most this many profiles in this run.
        batch_size: Contexts per writer call.
        progress: Show a tqdm bar with ETA.
        users: See :func:`plan`.

    Returns:
        Profiles written in this run.
    """
    from tqdm import tqdm

    graph = PurchaseGraph(dataset)
    tasks = plan(graph, cutoff(dataset, until_split), refresh_every, max_users, users)
    model_id = writer.backend.model_id
    todo = [t for t in tasks if not store.has(t.user_id, t.ts, model_id, hops)][:limit]
    log.info("%d profiles planned, %d to write in this run", len(tasks), len(todo))
    bar = tqdm(total=len(todo), unit="profile", disable=not progress)
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        writer.write([graph.context(t.user_id, t.ts, hops) for t in chunk], hops)
        bar.update(len(chunk))
    bar.close()
    return len(todo)
