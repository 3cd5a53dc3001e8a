"""``dynllm bench quality``: the shipped model against every baseline, one evaluator, over seeds.

Every model sees the same chronological split and the same
:class:`~tgn.evaluate.Evaluator` (full catalog, tie-aware, test-then-update; batches never split
a basket): it replays train (+ val when the test split is scored), then ranks the scored split.

Models: ``dynllm`` (the shipped default with LLM profiles), ``dynllm_shuffled`` (the same, every
user reading another user's profiles: a control), ``tgn`` (the default graph model without
profiles), and the heuristics ``popularity``, ``recent_popularity`` (7 days), ``buy_again``,
``buy_again_popularity``, ``tifu_knn``, ``up_cf`` (:mod:`tgn.nbr`). The heuristics are
deterministic: they run once (``seeds: 1``, std 0); each neural model runs once per seed, and a
seed changes its initialisation, its negatives and its dropout.

Output (``--json``)::

    {"<dataset>": {
       "per_event": {"<model>": {"recall@20": {"mean", "std", "seeds"}, "explore/recall@20": …}},
       "basket":    {"<model>": {"recall@10": …, "ndcg@10": …}},      # each user's last basket
       "slices":    {"cold"|"light"|"heavy": {"<model>": {"recall@20": …, …}}},
       "meta":      {split, seeds, settings, load average, …}}}

``basket`` holds each user's last basket of the scored split under the plain names and all
baskets under ``all/``.
"""

from __future__ import annotations

import json
import multiprocessing
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from streaming.dataset import Dataset
from tgn.ablation import fit_variant
from tgn.baselines import BuyAgain, GlobalPopularity, RecentPopularity
from tgn.data import EventBatch
from tgn.evaluate import HISTORY_SLICES, Evaluator, Recommender
from tgn.experiment import build_model
from tgn.model import TGNConfig
from tgn.nbr import TIFUKNN, UPCF
from tgn.train import TrainConfig

#: Heuristic baselines by name (fresh state each call).
HEURISTICS: Mapping[str, Callable[[], Recommender]] = {
    "popularity": GlobalPopularity,
    "recent_popularity": lambda: RecentPopularity(7.0),
    "buy_again": lambda: BuyAgain("frequency"),
    "buy_again_popularity": lambda: BuyAgain("frequency", fallback_popularity=True),
    "tifu_knn": TIFUKNN,
    "up_cf": UPCF,
}
#: Neural models (trained per seed); the two DynLLM ones need an LLM profile store.
NEURAL = ("dynllm", "dynllm_shuffled", "tgn")
MODELS = (*NEURAL, *HEURISTICS)
SPLITS = ("val", "test")
PER_EVENT = ("recall@10", "recall@20", "ndcg@20", "mrr", "explore/recall@20",
             "repeat/recall@20", "repeat_share@20")
BASKET = {"recall@10": "last_basket/recall@10", "ndcg@10": "last_basket/ndcg@10",
          "recall@20": "last_basket/recall@20", "ndcg@20": "last_basket/ndcg@20",
          "all/recall@10": "basket/recall@10", "all/ndcg@10": "basket/ndcg@10"}
SLICE_METRICS = ("recall@20", "explore/recall@20", "repeat/recall@20", "events")


def evaluate_one(name: str, data: Dataset, seed: int, split: str, profiles: str | Path | None,
                 train_config: TrainConfig, model_config: TGNConfig,
                 progress: bool = False) -> dict[str, float]:
    """Train (if neural) and score one model with one seed; the evaluator's flat metrics plus
    ``train_seconds`` and ``eval_seconds``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    started = time.perf_counter()
    extra: dict[str, float] = {}
    if name in HEURISTICS:
        _, (tr, va, test) = build_model(data, model_config, seed)
        recommender = HEURISTICS[name]()
    else:
        recommender, (tr, va, test), extra = fit_variant(name, data, {"llm": profiles},
                                                         model_config, train_config, seed,
                                                         progress)
    trained = time.perf_counter()
    scored, history = (test, EventBatch.cat([tr, va])) if split == "test" else (va, tr)
    metrics = Evaluator().run(recommender, scored, history, train_config.eval_batch_size,
                              progress)
    return {**metrics, **extra, "train_seconds": trained - started,
            "eval_seconds": time.perf_counter() - trained}


def _stat(values: Sequence[float]) -> dict[str, float | None]:
    """Mean, sample std (0 for one run) and run count; ``None`` for a metric with no events
    (strict JSON has no NaN)."""
    arr = np.asarray(values, dtype=np.float64)
    if np.isnan(arr).any():
        return {"mean": None, "std": None, "seeds": int(arr.size)}
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if arr.size > 1 else 0.0,
            "seeds": int(arr.size)}


def summarise(runs: Mapping[str, Sequence[dict[str, float]]]) -> dict[str, Any]:
    """The JSON layout of the module docstring from each model's runs (one per seed)."""
    out: dict[str, Any] = {"per_event": {}, "basket": {}, "slices": {s: {} for s in
                                                                      HISTORY_SLICES}}
    for model, rs in runs.items():
        out["per_event"][model] = {m: _stat([r[m] for r in rs]) for m in PER_EVENT}
        out["per_event"][model]["train_seconds"] = _stat([r["train_seconds"] for r in rs])
        out["basket"][model] = {k: _stat([r[m] for r in rs]) for k, m in BASKET.items()}
        for s in HISTORY_SLICES:
            out["slices"][s][model] = {m: _stat([r[f"{s}/{m}"] for r in rs])
                                       for m in SLICE_METRICS}
    return out


def run_quality(data_dir: str | Path, models: Sequence[str], seeds: Sequence[int], split: str,
                profiles: str | Path | None = None, train_config: TrainConfig | None = None,
                model_config: TGNConfig | None = None, progress: bool = True,
                on_result: Callable[[dict[str, Any]], None] | None = None,
                workers: int = 1) -> dict[str, Any]:
    """Score ``models`` on ``split`` of ``data_dir``; returns the JSON (see the module doc).

    ``on_result`` is called with the partial result after every run (progress files).
    ``workers`` > 1 runs the (model, seed) runs in that many processes at once, each with the
    caller's torch thread count; the result is the same as one after the other.
    """
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        raise ValueError(f"unknown models {unknown}; expected some of {list(MODELS)}")
    needs = [m for m in models if m.startswith("dynllm")]
    if needs and profiles is None:
        raise ValueError(f"models {needs} need an LLM profile store (--profiles)")
    data = Dataset.load(data_dir)
    train_config, model_config = train_config or TrainConfig(), model_config or TGNConfig()
    name = Path(data_dir).resolve().name
    jobs = [(m, s) for m in models for s in (seeds[:1] if m in HEURISTICS else seeds)]
    done: dict[int, dict[str, float]] = {}
    result: dict[str, Any] = {}

    def record(job: int, metrics: dict[str, float]) -> None:
        nonlocal result
        done[job] = metrics
        runs: dict[str, list[dict[str, float]]] = {}
        for j in sorted(done):  # job order, whatever order the runs end in
            runs.setdefault(jobs[j][0], []).append(done[j])
        result = {name: {**summarise(runs), "meta": {
            "data": str(data_dir), "split": split, "seeds": list(seeds),
            "counts": data.meta["counts"], "profiles": str(profiles) if profiles else None,
            "train_config": asdict(train_config), "model_config": asdict(model_config),
            "threads": torch.get_num_threads(), "workers": workers,
            "load_average": Path("/proc/loadavg").read_text().split()[:3]
            if Path("/proc/loadavg").exists() else None}}}
        if on_result is not None:
            on_result(result)

    if workers <= 1:
        for job, (model, seed) in enumerate(tqdm(jobs, desc="quality", disable=not progress)):
            record(job, evaluate_one(model, data, seed, split, profiles, train_config,
                                     model_config))
        return result
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=torch.set_num_threads,
                             initargs=(torch.get_num_threads(),)) as pool:
        futures = {pool.submit(evaluate_one, model, data, seed, split, profiles, train_config,
                               model_config): job for job, (model, seed) in enumerate(jobs)}
        for future in tqdm(as_completed(futures), total=len(jobs), desc="quality",
                           disable=not progress):
            record(futures[future], future.result())
    return result


def markdown_table(result: dict[str, Any]) -> str:
    """Per-event, last-basket and light-slice figures, ``mean ± std``, one row per model, one
    table per dataset."""
    cols = [("per_event", "recall@20"), ("per_event", "explore/recall@20"),
            ("per_event", "repeat/recall@20"), ("per_event", "ndcg@20"),
            ("basket", "recall@10"), ("light", "recall@20"), ("light", "explore/recall@20")]
    lines = []
    for name, part in result.items():
        lines += [f"{name} ({part['meta']['split']})", "",
                  "| model | " + " | ".join(f"{'last basket' if g == 'basket' else g} {m}"
                                            for g, m in cols) + " |",
                  "|---|" + "---:|" * len(cols)]
        for model in (m for m in MODELS if m in part["per_event"]):
            cells = []
            for group, metric in cols:
                table = part["slices"][group] if group in HISTORY_SLICES else part[group]
                s = table[model][metric]
                cells.append("–" if s["mean"] is None else f"{s['mean']:.4f}"
                             + (f" ± {s['std']:.4f}" if s["seeds"] > 1 else ""))
            lines.append(f"| {model} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines).rstrip("\n")


#: README markers around the rows :func:`glance` writes.
README_BEGIN, README_END = "<!-- quality:begin -->", "<!-- quality:end -->"


def glance(result: dict[str, Any]) -> str:
    """README rows ("what | figure"), per dataset: every model's Recall@20 per event, on explore
    purchases (where the log has repeats) and each user's last-basket Recall@10, best first,
    the best marked."""

    def cell(table: Mapping[str, Any], metric: str) -> str:
        scored = [(m, table[m][metric]) for m in MODELS if m in table
                  and table[m][metric]["mean"] is not None]
        scored.sort(key=lambda pair: -pair[1]["mean"])
        parts = [f"{m} {s['mean']:.3f}" + (f" ± {s['std']:.3f}" if s["seeds"] > 1 else "")
                 for m, s in scored]
        return " · ".join([f"**{parts[0]}**", *parts[1:]]) if parts else "–"

    rows = []
    for name, part in result.items():
        meta = part["meta"]
        seeds = len(meta["seeds"])
        batch = meta["train_config"]["eval_batch_size"]
        where = (f"{name} {meta['split']} ({seeds} seed{'s' if seeds > 1 else ''}, batches of "
                 f"{batch})")
        rows.append(f"| Recall@20 per purchase, {where} | {cell(part['per_event'], 'recall@20')} |")
        if any(s["repeat/recall@20"]["mean"] is not None for s in part["per_event"].values()):
            rows.append(f"| Recall@20 on explore purchases, {where} | "
                        f"{cell(part['per_event'], 'explore/recall@20')} |")
        rows.append(f"| Recall@10 of each user's last basket, {where} | "
                    f"{cell(part['basket'], 'recall@10')} |")
    return "\n".join(rows)


def write_readme(result: dict[str, Any], readme: str | Path) -> None:
    """Replace the lines between :data:`README_BEGIN` and :data:`README_END` in ``readme``
    with :func:`glance` of ``result``."""
    path = Path(readme)
    text = path.read_text()
    head, begin, rest = text.partition(README_BEGIN)
    _, end, tail = rest.partition(README_END)
    if not begin or not end:
        raise ValueError(f"{path} has no {README_BEGIN} … {README_END} block")
    path.write_text(f"{head}{README_BEGIN}\n{glance(result)}\n{README_END}{tail}")


def merged(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """``new`` over ``old``: other datasets kept, and within a dataset the other models' entries
    (models run in parts); ``meta`` of the newest part, the others' under ``meta_parts``."""
    out = dict(old)
    for name, part in new.items():
        before = old.get(name)
        if before is None or before.get("meta", {}).get("split") != part["meta"]["split"]:
            out[name] = part
            continue
        both = {"per_event": {**before["per_event"], **part["per_event"]},
                "basket": {**before["basket"], **part["basket"]},
                "slices": {s: {**before["slices"].get(s, {}), **part["slices"][s]}
                           for s in part["slices"]},
                "meta": part["meta"]}
        others = set(before["per_event"]) - set(part["per_event"])  # from another part
        both["meta_parts"] = [*before.get("meta_parts", []), *([before["meta"]] if others
                                                               else [])]
        out[name] = both
    return out


def save(result: dict[str, Any], path: str | Path, merge: bool = False) -> None:
    """Write the JSON atomically; ``merge`` keeps what the file holds for other datasets and
    other models (:func:`merged`)."""
    path = Path(path)
    if merge and path.exists():
        result = merged(json.loads(path.read_text()), result)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(path)


__all__ = ["MODELS", "evaluate_one", "glance", "markdown_table", "run_quality", "save",
           "summarise", "write_readme"]
