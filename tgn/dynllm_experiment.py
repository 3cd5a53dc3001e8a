"""DynLLM runs: the temporal graph model and the fusion head trained jointly, and evaluated.

The run directory is a :class:`tgn.run.Run` like any other; the checkpoint's ``extra`` also
carries the fusion config and the profile table, so a run is self-contained
(:func:`tgn.dynllm_head.head_from_extra`).

Profiles come from a profile store file (``dynllm profiles build``) and are looked up
time-correctly everywhere: in training, in validation and in the test replay an event at ``t``
only sees profiles written from events strictly before ``t``.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from streaming.dataset import Dataset
from streaming.errors import UsageError
from tgn.data import EventBatch
from tgn.dynllm_head import DynLLMHead, head_extra
from tgn.experiment import build_model
from tgn.fusion import FusionConfig
from tgn.model import TGNConfig, TGNRecommender
from tgn.profile_features import ProfileTable, read_profile_store
from tgn.run import Run
from tgn.train import TrainConfig, TrainResult, train


def profile_table(store: str | Path, model: TGNRecommender, hops: int | None) -> ProfileTable:
    """The store's profiles (one prompt kind) for the users the model knows."""
    user_ids, ts, vectors, fallback = read_profile_store(store, hops)
    index = {u: i for i, u in enumerate(model.users.to_list())}
    return ProfileTable.from_export(user_ids, ts, vectors, fallback, index)


def build_dynllm(data: Dataset, store: str | Path, hops: int | None = 2, gate: bool = True,
                 config: TGNConfig | None = None, seed: int = 0
                 ) -> tuple[TGNRecommender, list[EventBatch]]:
    """A fresh TGN + DynLLM head over ``data`` with the store's profiles, and the encoded splits.

    Args:
        data: the dataset.
        store: profile store file.
        hops: which profiles to read (2: graph-aware prompts, 1: own history only, None: all).
        gate: keep the distillation gate (False: the "without gate" ablation).
        config: temporal model sizes.
        seed: seed of the initialisation (temporal model and fusion head).
    """
    config = config or TGNConfig()
    model, splits = build_model(data, config, seed)  # id maps now cover every split
    head = DynLLMHead(FusionConfig(dim=config.embed_dim, gate=gate))
    head.set_profiles(profile_table(store, model, hops))
    if len(head.profiles) == 0:
        raise UsageError(f"{store} holds no profiles (hops={hops}) for this dataset's users")
    model.user_head = head
    return model, splits


def profile_summary(table: ProfileTable, num_users: int) -> dict[str, Any]:
    """Counts worth recording beside a run: versions, users covered, fallback share."""
    return {"profiles": len(table), "users_with_profile": int(table.user_index.unique().numel()),
            "users": num_users, "fallback_share": float(table.fallback.float().mean())
            if len(table) else 0.0}


def fit_dynllm(data_dir: str | Path, out_dir: str | Path, store: str | Path, hops: int = 2,
               gate: bool = True, model_config: TGNConfig | None = None,
               train_config: TrainConfig | None = None, progress: bool = True) -> dict[str, Any]:
    """Train TGN + fusion jointly (BPR) and write a run directory; returns ``config.json``."""
    data = Dataset.load(data_dir)
    model_config, train_config = model_config or TGNConfig(), train_config or TrainConfig()
    model, (train_events, val_events, _) = build_dynllm(data, store, hops, gate, model_config,
                                                         train_config.seed)
    started = time.perf_counter()
    result: TrainResult = train(model, train_events, val_events, train_config, progress)
    seconds = time.perf_counter() - started
    model.eval()
    model.reset_state()  # checkpoint state = all train + val events, ready to stream on
    model.apply_events(EventBatch.cat([train_events, val_events]), train_config.eval_batch_size)
    head: DynLLMHead = model.user_head  # type: ignore[assignment]
    summary = {
        "model": "dynllm", "model_config": asdict(model_config),
        "fusion_config": asdict(head.config), "train_config": asdict(train_config),
        "data": str(Path(data_dir).resolve()), "profiles": str(Path(store).resolve()),
        "hops": hops, "profile_counts": profile_summary(head.profiles, len(model.users)),
        "best_epoch": result.best_epoch, "best_val_recall@10": result.best_recall,
        "epochs_run": len(result.history), "train_seconds": seconds,
        "threads": torch.get_num_threads(),
    }
    Run(out_dir).write(model, summary, result.history,
                       extra={"best_epoch": result.best_epoch, **head_extra(head)})
    return summary
