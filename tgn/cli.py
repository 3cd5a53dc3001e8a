"""Subcommands of the ``tgn`` room: ``train``, ``evaluate`` and ``bench memory``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from streaming.arg_types import positive_int, share
from streaming.errors import UsageError

MODELS = ("tgn", "dynllm")


def _set_threads(threads: int | None) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)


def _train(args: argparse.Namespace) -> int:
    if args.model not in MODELS:
        raise UsageError(f"unknown model {args.model!r}; available: {', '.join(MODELS)}")
    _set_threads(args.threads)
    from tgn.experiment import fit
    from tgn.model import TGNConfig
    from tgn.train import TrainConfig

    model_config = TGNConfig(repeat=not args.no_repeat)
    sampling = {k: getattr(args, k) for k in ("loss", "negatives", "history_negatives",
                                               "history_steps")
                if getattr(args, k) is not None}  # unset: TrainConfig's defaults
    train_config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                               seed=args.seed, patience=args.patience,
                               max_val_events=args.max_val_events, **sampling)
    if args.model == "dynllm":  # TGN + DynLLM fusion head, trained jointly
        from tgn.dynllm_experiment import fit_dynllm

        if not args.profiles:
            raise UsageError("--model dynllm needs --profiles STORE (dynllm profiles build)")
        summary = fit_dynllm(args.data, args.out, args.profiles, args.hops, not args.no_gate,
                             model_config, train_config, progress=not args.quiet)
    else:
        summary = fit(args.data, args.out, model_config, train_config, progress=not args.quiet)
    print(f"best epoch {summary['best_epoch']} (val recall@10 "
          f"{summary['best_val_recall@10']:.4f}), {summary['train_seconds']:.0f} s; "
          f"wrote {Path(args.out) / 'model.pt'}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    _set_threads(args.threads)
    from tgn import snapshot

    if args.baselines in ("snapshot", "all") and not snapshot.available():
        raise UsageError(snapshot.EXTRA_HINT)  # before loading anything
    from tgn.experiment import evaluate_run, markdown_table

    results = evaluate_run(args.data, args.run, args.baselines, args.batch_size,
                           progress=not args.quiet)
    print(markdown_table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


def _bench_memory(args: argparse.Namespace) -> int:
    from tgn.bench import bench_memory

    report = bench_memory(num_nodes=args.nodes, num_events=args.events, repeats=args.repeats,
                          threads=args.threads)
    print("| batch | ours events/s | PyG events/s | GRU limit events/s | vs PyG | of GRU limit |")
    print("|---:|---:|---:|---:|---:|---:|")
    for key in (k for k in report if k.startswith("batch_") and k != "batch_size"):
        r = report[key]
        print(f"| {key[6:]} | {r['events_per_s']:,.0f} | {r['pyg_events_per_s']:,.0f} | "
              f"{r['gru_limit_events_per_s']:,.0f} | {r['speedup_vs_pyg']:.1f}x | "
              f"{r['fraction_of_gru_limit']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def _bench_repeat(args: argparse.Namespace) -> int:
    from tgn.bench_repeat import bench_repeat

    report = bench_repeat(args.data, events=args.events, batch_size=args.batch_size,
                          repeats=args.repeats, threads=args.threads)
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``train`` and ``evaluate``."""
    train = commands.add_parser("train", help="train a temporal graph model on a dataset")
    train.add_argument("--data", required=True, help="dataset directory")
    train.add_argument("--model", default="tgn", help="tgn or dynllm")
    train.add_argument("--profiles", help="dynllm: profile store file (dynllm profiles build)")
    train.add_argument("--hops", type=int, choices=(1, 2), default=2,
                       help="dynllm: read graph-aware (2) or own-history (1) profiles")
    train.add_argument("--no-gate", action="store_true",
                       help="dynllm: drop the distillation gate (ablation)")
    train.add_argument("--no-repeat", action="store_true",
                       help="leave out the repeat/explore mixture (dot product only)")
    train.add_argument("--out", required=True, help="run directory to write")
    train.add_argument("--epochs", type=positive_int, default=10)
    train.add_argument("--batch-size", type=positive_int, default=200)
    train.add_argument("--lr", type=float, default=1e-3)
    train.add_argument("--patience", type=positive_int, default=2)
    train.add_argument("--loss", choices=("bpr", "softmax"),  # tgn.train.LOSSES (no torch here)
                       help="stage 1: BPR, or a sampled softmax over 1,000 shared negatives "
                            "(default: TrainConfig's)")
    train.add_argument("--negatives", type=positive_int,
                       help="BPR negatives per purchase (default: TrainConfig's)")
    train.add_argument("--history-negatives", type=share, metavar="SHARE",
                       help="share of the negatives drawn from the user's own earlier purchases, "
                            "the rest uniform over the items seen so far (0-1; default: "
                            "TrainConfig's)")
    train.add_argument("--history-steps", type=positive_int,
                       help="optimiser steps of stage 2, the history mixture's fit "
                            "(default: TrainConfig's)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--max-val-events", type=positive_int,
                       help="validate on the first N validation events only (smoke runs)")
    train.add_argument("--threads", type=positive_int, help="torch threads (default: torch's)")
    train.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    train.set_defaults(func=_train)
    ev = commands.add_parser("evaluate", help="rank the test split: full catalog, "
                                              "test-then-update")
    ev.add_argument("--data", required=True, help="dataset directory")
    ev.add_argument("--run", required=True, help="run directory written by `dynllm train`")
    ev.add_argument("--json", help="write all metrics to this JSON file")
    ev.add_argument("--baselines", nargs="?", const="heuristics",
                    choices=("heuristics", "snapshot", "all"),
                    help="also evaluate popularity, recent popularity and buy-again (no value or "
                         "'heuristics'), the weekly GConvGRU snapshot baseline ('snapshot'; "
                         "needs the snapshot extra) or both ('all')")
    ev.add_argument("--batch-size", type=positive_int, default=200,
                    help="events scored from one state (default %(default)s)")
    ev.add_argument("--threads", type=positive_int, help="torch threads (default: torch's)")
    ev.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    ev.set_defaults(func=_evaluate)


def register_bench(bench_targets: argparse._SubParsersAction) -> None:
    """Add ``bench memory`` and ``bench repeat``."""
    mem = bench_targets.add_parser("memory", help="memory updates/s vs PyG TGNMemory and a GRU")
    mem.add_argument("--json", help="write the figures to this JSON file")
    mem.add_argument("--nodes", type=positive_int, default=10_000)
    mem.add_argument("--events", type=positive_int, default=20_000)
    mem.add_argument("--repeats", type=positive_int, default=5)
    mem.add_argument("--threads", type=positive_int, default=2)
    mem.set_defaults(func=_bench_memory)

    rep = bench_targets.add_parser("repeat", help="per-event cost of the repeat term vs a TGN step")
    rep.add_argument("--data", default="data/cj26", help="dataset directory")
    rep.add_argument("--events", type=positive_int, default=20_000,
                     help="validation events timed (after warming on the training split)")
    rep.add_argument("--batch-size", type=positive_int, default=200)
    rep.add_argument("--repeats", type=positive_int, default=5)
    rep.add_argument("--threads", type=positive_int, default=1)
    rep.add_argument("--json", help="write the figures to this JSON file")
    rep.set_defaults(func=_bench_repeat)
