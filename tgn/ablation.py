"""``dynllm bench ablation``: DynLLM against its ablations and the heuristics, over seeds.

Models (same dataset, same chronological split, same evaluator — full catalog, tie-aware,
test-then-update after replaying train + val):

* ``popularity`` — global purchase counts; ``buy_again`` — the user's own items by frequency,
  others by popularity (both deterministic: their std over seeds is 0);
* ``tgn`` — the temporal graph model alone (with its learned repeat-purchase term,
  :mod:`tgn.repeat`, like every neural model here); ``tgn_no_repeat`` — the same without it;
* ``dynllm`` — TGN + distilled attention over graph-aware (2-hop) profiles;
* ``dynllm_no_gate`` — the same without the top-k distillation gate;
* ``dynllm_1hop`` — the same with profiles written from the user's own history only;
* ``dynllm_stats`` — the same fusion over rule-based facets from history statistics (no LLM),
  for every user: the fusion at full profile coverage;
* ``dynllm_shuffled`` — DynLLM with every user reading another user's profiles (a control: the
  same head and the same texts, but no longer about the user).

Besides all test purchases, every model is also scored on the purchases of the users that have
an LLM profile (``profiled/`` metrics), where the LLM variants can differ from TGN at all, and
on the evaluator's history-length slices (``cold/``, ``light/``, ``heavy/``).

Profiles are expensive (an LLM on a 2-core CPU), so the ablation runs on a documented subset:
:func:`top_users_subset` keeps the most active users of a dataset with all their events.

Output: ``{model: {metric: {"mean", "std", "values"}}}`` plus a ``_meta`` entry, a markdown table
and a bar chart of Recall@20.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import torch
from torch import Tensor
from tqdm import tqdm

from streaming.dataset import Dataset, write_dataset
from tgn.baselines import BuyAgain, GlobalPopularity
from tgn.data import EventBatch
from tgn.dynllm_experiment import build_dynllm, profile_summary, profile_table
from tgn.evaluate import HISTORY_SLICES, Evaluator, Recommender, UserSet
from tgn.experiment import build_model
from tgn.model import TGNConfig, TGNRecommender
from tgn.train import TrainConfig, train

MODELS = ("popularity", "buy_again", "tgn_no_repeat", "tgn", "dynllm", "dynllm_no_gate",
          "dynllm_1hop", "dynllm_stats", "dynllm_shuffled")
SPLITS = ("test", "val")
TABLE_METRICS = ("recall@10", "recall@20", "recall@50", "ndcg@10", "ndcg@20", "ndcg@50", "mrr",
                 "explore/recall@20", "explore/ndcg@20", "profiled/recall@20", "profiled/ndcg@20")
#: (profile store, hops, gate, profiles handed to other users) of each DynLLM variant
VARIANTS = {"dynllm": ("llm", 2, True, False), "dynllm_no_gate": ("llm", 2, False, False),
            "dynllm_1hop": ("llm", 1, True, False), "dynllm_stats": ("stats", 2, True, False),
            "dynllm_shuffled": ("llm", 2, True, True)}


def top_users_subset(source: str | Path, out: str | Path, top_users: int,
                     skip: int = 0) -> dict[str, Any]:
    """Write a dataset with the ``top_users`` most active users of ``source`` (all their events),
    after the ``skip`` most active (``skip=150``: a second, disjoint set of households to choose
    settings on before reading the first).

    Ties in activity are broken by user id, so the subset is deterministic. The split is
    recomputed on the subset (chronological 70/15/15 of its events).
    """
    data = Dataset.load(source)
    counts = data.events.group_by("user_id").aggregate([("user_id", "count")])
    counts = counts.sort_by([("user_id_count", "descending"), ("user_id", "ascending")])
    keep = counts.column("user_id").slice(skip, top_users)
    events = data.events.filter(pc.is_in(data.events.column("user_id"), keep))
    items = data.items.filter(pc.is_in(data.items.column("item_id"),
                                       pc.unique(events.column("item_id"))))
    users = data.users.filter(pc.is_in(data.users.column("user_id"), keep)) \
        if data.users.num_rows else None
    name = f"{data.meta.get('name', 'custom')}-top{top_users}" + (f"-after{skip}" if skip else "")
    subset = {"source": str(source), "top_users": top_users} | ({"skip": skip} if skip else {})
    return write_dataset(out, events, items, users, name=name, extra_meta={"subset": subset})


def build_variant(name: str, data: Dataset, stores: Mapping[str, str | Path | None],
                  config: TGNConfig, seed: int) -> tuple[TGNRecommender, list[EventBatch]]:
    """A fresh neural model ``name`` (one of :data:`MODELS` but the heuristics) over ``data``,
    initialised from ``seed``, and the encoded splits."""
    if name == "tgn":
        return build_model(data, config, seed)
    if name == "tgn_no_repeat":
        return build_model(data, replace(config, repeat=False), seed)
    kind, hops, gate, shuffled = VARIANTS[name]
    if stores.get(kind) is None:
        raise ValueError(f"model {name} needs the {kind} profile store")
    model, splits = build_dynllm(data, stores[kind], hops, gate, config, seed)
    if shuffled:
        head = model.user_head
        head.set_profiles(head.profiles.with_users_shuffled())
    return model, splits


def fit_variant(name: str, data: Dataset, stores: Mapping[str, str | Path | None],
                model_config: TGNConfig, train_config: TrainConfig, seed: int,
                progress: bool = False) -> tuple[TGNRecommender, list[EventBatch],
                                                 dict[str, float]]:
    """:func:`build_variant` trained with ``seed`` (its ``train_config`` seed replaced), in
    eval mode with its state reset; also returns ``best_epoch`` and ``epochs_run``."""
    model, splits = build_variant(name, data, stores, model_config, seed)
    result = train(model, splits[0], splits[1], replace(train_config, seed=seed), progress)
    model.eval()
    model.reset_state()
    return model, splits, {"best_epoch": float(result.best_epoch),
                           "epochs_run": float(len(result.history))}


def profiled_users(data: Dataset, store: str | Path | None, config: TGNConfig) -> Tensor:
    """[num_users] bool: users with at least one hops=2 profile in ``store``."""
    model, _ = build_model(data, config, seed=0)  # only the id maps are read
    mask = torch.zeros(len(model.users), dtype=torch.bool)
    if store is not None:
        mask[profile_table(store, model, 2).user_index] = True
    return mask


def run_one(name: str, data: Dataset, stores: Mapping[str, str | Path | None], seed: int,
            train_config: TrainConfig, model_config: TGNConfig, progress: bool = False,
            split: str = "test") -> dict[str, float]:
    """Train (if neural) and evaluate one model with one seed; metrics plus timings.

    Args:
        name: one of :data:`MODELS`.
        data: the dataset.
        stores: profile store files by kind: ``{"llm": …, "stats": …}``.
        seed: seed of initialisation, negatives and dropout.
        train_config: optimisation settings (its seed is replaced).
        model_config: temporal model sizes.
        progress: tqdm bars while training.
        split: ``"test"`` (replay train + val, score test) or ``"val"`` (replay train, score
            validation: for choosing settings without looking at the test split; early
            stopping also reads validation, so these figures are optimistic for every model).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    started = time.perf_counter()
    extra: dict[str, float] = {}
    if name in ("popularity", "buy_again"):
        _, (tr, va, test) = build_model(data, model_config, seed)
        recommender: Recommender = GlobalPopularity() if name == "popularity" else \
            BuyAgain("frequency", fallback_popularity=True)
    else:
        recommender, (tr, va, test), extra = fit_variant(name, data, stores, model_config,
                                                         train_config, seed, progress)
    trained = time.perf_counter()
    profiled = UserSet(profiled_users(data, stores.get("llm"), model_config))
    evaluator = Evaluator(slices={**HISTORY_SLICES, "profiled": profiled})
    scored, history = (test, EventBatch.cat([tr, va])) if split == "test" else (va, tr)
    metrics = evaluator.run(recommender, scored, history, train_config.eval_batch_size)
    return {**metrics, **extra, "train_seconds": trained - started,
            "eval_seconds": time.perf_counter() - trained}


def aggregate(runs: Sequence[dict[str, float]]) -> dict[str, dict[str, Any]]:
    """``{metric: {"mean", "std", "values"}}`` over runs (sample std; 0 for one run)."""
    out = {}
    for key in runs[0]:
        values = [float(r[key]) for r in runs]
        std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
        out[key] = {"mean": float(np.mean(values)), "std": std, "values": values}
    return out


def run_ablation(data_dir: str | Path, stores: Mapping[str, str | Path | None],
                 seeds: Sequence[int],
                 train_config: TrainConfig, model_config: TGNConfig | None = None,
                 models: Sequence[str] = MODELS, progress: bool = True,
                 on_result: Callable[[dict[str, Any]], None] | None = None,
                 split: str = "test") -> dict[str, Any]:
    """Every model × seed; heuristics run once (they are deterministic).

    Args:
        data_dir: dataset directory (e.g. from :func:`top_users_subset`).
        stores: profile store files by kind: ``{"llm": hops=2 and hops=1 LLM profiles,
            "stats": rule-based profiles}``.
        seeds: seeds of the neural models.
        train_config: optimisation settings (the seed is replaced per run).
        model_config: temporal model sizes.
        models: which of :data:`MODELS` to run.
        progress: tqdm bar over runs.
        on_result: called with the partial result after every run (to save progress).
        split: which split is scored (see :func:`run_one`).
    """
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        raise ValueError(f"unknown models {unknown}; expected some of {MODELS}")
    data, model_config = Dataset.load(data_dir), model_config or TGNConfig()
    jobs = [(m, s) for m in models for s in (seeds[:1] if m in ("popularity", "buy_again")
                                             else seeds)]
    runs: dict[str, list[dict[str, float]]] = {}
    result: dict[str, Any] = {}
    for name, seed in tqdm(jobs, desc="ablation", disable=not progress):
        runs.setdefault(name, []).append(run_one(name, data, stores, seed, train_config,
                                                 model_config, split=split))
        result = {m: aggregate(r) for m, r in runs.items()}
        result["_meta"] = {**_meta(data, data_dir, stores, seeds, train_config, model_config),
                           "scored_split": split}
        if on_result is not None:
            on_result(result)
    return result


def _meta(data: Dataset, data_dir: str | Path, stores: Mapping[str, str | Path | None],
          seeds: Sequence[int], train_config: TrainConfig, model_config: TGNConfig
          ) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "data": str(data_dir), "counts": data.meta["counts"], "split": data.meta["split"],
        "subset": data.meta.get("subset"), "seeds": list(seeds),
        "train_config": asdict(train_config), "model_config": asdict(model_config),
        "threads": torch.get_num_threads(),
    }
    model, _ = build_model(data, model_config, seed=0)
    meta["profiles"] = {f"{kind}_hops{h}": profile_summary(profile_table(path, model, h),
                                                          len(model.users))
                        for kind, path in stores.items() if path is not None for h in (1, 2)}
    meta["stores"] = {kind: str(path) for kind, path in stores.items()}
    return meta


def markdown_table(result: dict[str, Any], metrics: Sequence[str] = TABLE_METRICS) -> str:
    """``mean ± std`` per model and metric, one row per model."""
    lines = ["| model | " + " | ".join(metrics) + " |", "|---|" + "---:|" * len(metrics)]
    for name in (m for m in MODELS if m in result):
        row = result[name]
        lines.append(f"| {name} | " + " | ".join(
            f"{row[m]['mean']:.4f} ± {row[m]['std']:.4f}" for m in metrics) + " |")
    return "\n".join(lines)


def plot_recall(result: dict[str, Any], path: str | Path, metric: str = "recall@20") -> None:
    """Bar chart of ``metric`` per model with ±std error bars (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [m for m in MODELS if m in result]
    means = [result[m][metric]["mean"] for m in names]
    stds = [result[m][metric]["std"] for m in names]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(names, means, yerr=stds, capsize=4, color="tab:blue")
    ax.set(ylabel=metric, title=f"{metric} on the test split (mean ± std over seeds)")
    ax.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save(result: dict[str, Any], path: str | Path) -> None:
    """Write the JSON (atomically enough for a partial-progress file)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(path)


__all__ = ["MODELS", "aggregate", "markdown_table", "plot_recall", "run_ablation", "run_one",
           "save", "top_users_subset"]
