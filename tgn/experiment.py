"""Runs on a dataset directory: fit a model into a run directory, evaluate a run.

The run directory's layout is :class:`tgn.run.Run`'s.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from streaming.dataset import Dataset
from streaming.errors import UsageError
from tgn.baselines import BuyAgain, GlobalPopularity, RecentPopularity
from tgn.data import EventBatch
from tgn.evaluate import Evaluator, Recommender
from tgn.ids import IdMap
from tgn.model import TGNConfig, TGNRecommender
from tgn.nbr import TIFUKNN, UPCF
from tgn.run import Run
from tgn.train import TrainConfig, TrainResult, train

#: Columns of the printed table.
TABLE_METRICS = ("recall@10", "recall@20", "recall@50", "ndcg@20", "mrr", "repeat/recall@20",
                 "explore/recall@20", "explore/ndcg@20")


def build_model(data: Dataset, config: TGNConfig,
                seed: int) -> tuple[TGNRecommender, list[EventBatch]]:
    """A fresh model (weights drawn from ``seed``: no default, so a caller cannot silently
    share one initialisation across "seeds") whose id maps cover the dataset, and the encoded
    train/val/test splits."""
    torch.manual_seed(seed)
    items = IdMap(data.items.column("item_id").to_pylist())
    model = TGNRecommender(config, IdMap(), items)
    return model, [model.encode(data.split(name)) for name in ("train", "val", "test")]


def fit(data_dir: str | Path, out_dir: str | Path, model_config: TGNConfig,
        train_config: TrainConfig, progress: bool = True) -> dict[str, Any]:
    """Train on ``data_dir`` and write a run directory; returns the saved ``config.json``."""
    data = Dataset.load(data_dir)
    model, (train_events, val_events, _) = build_model(data, model_config, train_config.seed)
    if len(train_events) == 0 or len(val_events) == 0:
        raise UsageError(f"{data_dir}: the training and validation splits must not be empty")
    started = time.perf_counter()
    result: TrainResult = train(model, train_events, val_events, train_config, progress)
    seconds = time.perf_counter() - started
    model.eval()
    model.reset_state()  # checkpoint state = all train + val events, ready to stream on
    model.apply_events(EventBatch.cat([train_events, val_events]), train_config.eval_batch_size)
    summary = {
        "model": "tgn", "model_config": asdict(model_config), "train_config": asdict(train_config),
        "data": str(Path(data_dir).resolve()), "counts": data.meta["counts"],
        "events": {"train": len(train_events), "val": len(val_events)},
        "best_epoch": result.best_epoch, "best_val_recall@10": result.best_recall,
        "epochs_run": len(result.history), "train_seconds": seconds,
        "threads": torch.get_num_threads(),
    }
    Run(out_dir).write(model, summary, result.history, extra={"best_epoch": result.best_epoch})
    return summary


def baselines() -> dict[str, Recommender]:
    """The heuristic references, by table name."""
    return {
        "global popularity": GlobalPopularity(),
        "recent popularity (7 days)": RecentPopularity(7.0),
        "buy-again (frequency)": BuyAgain("frequency"),
        "buy-again (recency)": BuyAgain("recency"),
        "buy-again + popularity": BuyAgain("frequency", fallback_popularity=True),
        "tifu_knn": TIFUKNN(),
        "up_cf": UPCF(),
    }


def snapshot_baseline(splits: list[EventBatch], progress: bool = True) -> Recommender:
    """The GConvGRU weekly-snapshot baseline (``snapshot`` extra), fitted on ``splits[0]``
    (train); its node table covers every user and item index in ``splits``."""
    from tgn.snapshot import EXTRA_HINT, available, fit_snapshot

    if not available():
        raise UsageError(EXTRA_HINT)
    num_users = max(int(s.users.max()) + 1 for s in splits if len(s))
    num_items = max(int(s.items.max()) + 1 for s in splits if len(s))
    recommender, _ = fit_snapshot(splits[0], num_users, num_items, progress=progress)
    return recommender


def evaluate_run(data_dir: str | Path, run_dir: str | Path, with_baselines: bool | str = False,
                 batch_size: int = 2000, progress: bool = True) -> dict[str, dict[str, float]]:
    """Test-then-update metrics of a run's model (and optionally the baselines) on ``test``.

    Every recommender first replays train + val (state only), then ranks the test split in
    batches of ``batch_size`` against the full catalog seen so far. ``with_baselines``: ``True``
    or ``"heuristics"`` adds the heuristics, ``"snapshot"`` the weekly GConvGRU baseline (trained
    here on the train split; needs the ``snapshot`` extra), ``"all"`` both.
    """
    if with_baselines is True:
        with_baselines = "heuristics"
    run = Run.open(run_dir)
    data = Dataset.load(data_dir)
    model, model_name = run.model().eval(), run.name  # a DynLLM run carries its fusion head
    train_events, val_events, test = (model.encode(data.split(name))
                                      for name in ("train", "val", "test"))
    history = EventBatch.cat([train_events, val_events])
    recommenders: dict[str, Recommender] = (baselines() if with_baselines in ("heuristics", "all")
                                            else {})
    if with_baselines in ("snapshot", "all"):
        recommenders["snapshot GConvGRU (weekly)"] = snapshot_baseline(
            [train_events, val_events, test], progress)
    recommenders[model_name] = model
    results: dict[str, dict[str, float]] = {}
    for name, recommender in recommenders.items():
        if recommender is model:
            model.reset_state()
        started = time.perf_counter()
        results[name] = Evaluator().run(recommender, test, history, batch_size, progress)
        results[name]["seconds"] = time.perf_counter() - started
    return results


def markdown_table(results: dict[str, dict[str, float]],
                   metrics: tuple[str, ...] = TABLE_METRICS) -> str:
    """Results as a markdown table, one row per recommender."""
    lines = ["| recommender | " + " | ".join(metrics) + " |",
             "|---|" + "---:|" * len(metrics)]
    for name, values in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{values[m]:.4f}" for m in metrics) + " |")
    return "\n".join(lines)
