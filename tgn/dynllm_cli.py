"""DynLLM subcommands: ``explain``, ``bench fusion`` and ``bench ablation``.

``dynllm train --model dynllm --profiles STORE`` lives with ``train`` in :mod:`tgn.cli` and calls
:func:`tgn.dynllm_experiment.fit_dynllm`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from streaming.arg_types import positive_int, share
from streaming.errors import UsageError


def _seeds(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") \
            from None


def _explain(args: argparse.Namespace) -> int:
    from tgn.explain import explain_user, render

    print(render(explain_user(args.run, args.user, args.k, args.at)))
    return 0


def _bench_fusion(args: argparse.Namespace) -> int:
    from tgn.bench_fusion import bench_fusion

    report = bench_fusion(args.data, args.batch_size, args.repeats, args.versions, args.threads,
                          args.max_events)
    us = report["us_per_event"]
    print(f"{report['events']:,} validation events of {args.data}, batch {args.batch_size} "
          f"({report['embedded_users']:,} user embeddings: each batch's distinct users, as the "
          f"stream emits them), {args.threads} thread(s), {report['profiles']:,} profile "
          f"versions, median of {args.repeats} repeats")
    print("| per event | TGN µs | DynLLM µs | added by fusion |")
    print("|---|---:|---:|---:|")
    print(f"| user embedding | {us['tgn/embed']:.1f} | {us['dynllm/embed']:.1f} | "
          f"{report['added_embed']:+.1%} |")
    print(f"| embedding + memory update | {us['tgn/step']:.1f} | {us['dynllm/step']:.1f} | "
          f"{report['added_step']:+.1%} |")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def _bench_ablation(args: argparse.Namespace) -> int:
    import torch

    from tgn import ablation
    from tgn.train import TrainConfig

    if args.prepare_from:
        meta = ablation.top_users_subset(args.prepare_from, args.data, args.top_users)
        print(f"wrote {args.data}: {meta['counts']}; next: dynllm profiles build --data "
              f"{args.data} --until-split val --refresh-every N --hops 2 (and --hops 1)")
        return 0
    stores = {"llm": args.profiles, "stats": args.stats_profiles}
    for path in stores.values():
        if path and not Path(path).is_file():
            raise UsageError(f"no profile store at {path}")
    missing = [m for m in args.models if m in ablation.VARIANTS
               and not stores[ablation.VARIANTS[m][0]]]
    if missing:
        raise UsageError(f"models {', '.join(missing)} need --profiles / --stats-profiles")
    torch.set_num_threads(args.threads)
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                         patience=args.patience, negatives=args.negatives,
                         history_negatives=args.history_negatives)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    earlier = json.loads(out.read_text()) if args.merge and out.exists() else {}
    earlier.pop("_meta", None)

    def merged(partial: dict) -> dict:
        return {**earlier, **partial}

    result = merged(ablation.run_ablation(args.data, stores, args.seeds, config,
                                          models=args.models, split=args.split,
                                          on_result=lambda r: ablation.save(merged(r), out)))
    ablation.save(result, out)
    print(ablation.markdown_table(result))
    ablation.plot_recall(result, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``explain``."""
    ex = commands.add_parser("explain", help="facet texts, facet relevance and top-K items "
                                             "of a DynLLM run for one user")
    ex.add_argument("--run", required=True, help="run directory of `dynllm train --model dynllm`")
    ex.add_argument("--user", required=True, help="user id")
    ex.add_argument("--k", type=positive_int, default=10, help="recommendations to show")
    ex.add_argument("--at", type=float, help="epoch seconds (default: after the run's last event)")
    ex.set_defaults(func=_explain)


def _seed_count(text: str) -> list[int]:
    return list(range(positive_int(text)))


def _bench_quality(args: argparse.Namespace) -> int:
    import torch

    from tgn import quality
    from tgn.train import TrainConfig

    out = Path(args.json)
    if args.render:
        if not out.exists():
            raise UsageError(f"--render needs an existing --json file: {out} does not exist")
        result = json.loads(out.read_text())
        print(quality.markdown_table(result))
        if args.readme:
            quality.write_readme(result, args.readme)
        return 0
    if args.data is None:
        raise UsageError("--data is required (unless --render)")
    torch.set_num_threads(args.threads)
    config = TrainConfig(epochs=args.epochs)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        result = quality.run_quality(args.data, args.models, args.seeds, args.split,
                                     args.profiles, config,
                                     on_result=lambda r: quality.save(r, out, merge=True),
                                     workers=args.workers)
    except ValueError as error:
        raise UsageError(str(error)) from None
    quality.save(result, out, merge=True)
    print(quality.markdown_table(result))
    if args.readme:
        quality.write_readme(json.loads(out.read_text()), args.readme)
    return 0


def register_bench(bench_targets: argparse._SubParsersAction) -> None:
    """Add ``bench fusion``, ``bench ablation`` and ``bench quality``."""
    from tgn.ablation import MODELS, SPLITS

    fu = bench_targets.add_parser("fusion", help="per-event cost the DynLLM fusion head adds")
    fu.add_argument("--data", default="data/cj-small", help="dataset directory")
    fu.add_argument("--batch-size", type=positive_int, default=200)
    fu.add_argument("--repeats", type=positive_int, default=7)
    fu.add_argument("--versions", type=positive_int, default=3, help="profiles per user")
    fu.add_argument("--threads", type=positive_int, default=1)
    fu.add_argument("--max-events", type=positive_int, default=5000,
                    help="validation events to embed per repeat")
    fu.add_argument("--json", help="write the figures to this JSON file")
    fu.set_defaults(func=_bench_fusion)

    ab = bench_targets.add_parser("ablation", help="DynLLM vs ablations and heuristics, "
                                                   "mean ± std over seeds")
    ab.add_argument("--data", required=True, help="dataset directory (see --prepare-from)")
    ab.add_argument("--profiles", help="LLM profile store with hops=2 and hops=1 profiles")
    ab.add_argument("--stats-profiles", help="rule-based profile store (model dynllm_stats)")
    ab.add_argument("--models", type=lambda s: s.split(","), default=list(MODELS),
                    help=f"comma-separated subset of {','.join(MODELS)}")
    ab.add_argument("--seeds", type=_seeds, default=[0, 1, 2], help="e.g. 0,1,2")
    ab.add_argument("--epochs", type=positive_int, default=5)
    ab.add_argument("--patience", type=positive_int, default=2)
    ab.add_argument("--batch-size", type=positive_int, default=200)
    ab.add_argument("--lr", type=float, default=1e-3)
    ab.add_argument("--negatives", type=positive_int, default=1, help="BPR negatives per purchase")
    ab.add_argument("--history-negatives", type=share, default=0.0, metavar="SHARE",
                    help="share of the negatives drawn from the user's own earlier purchases")
    ab.add_argument("--threads", type=positive_int, default=2)
    ab.add_argument("--split", choices=SPLITS, default="test",
                    help="split to score; val: choose settings without touching test")
    ab.add_argument("--out", default="benchmarks/ablation.json", help="JSON to write")
    ab.add_argument("--merge", action="store_true",
                    help="keep the other models already in --out (run models in parts)")
    ab.add_argument("--prepare-from", metavar="DATASET",
                    help="only write --data as the --top-users most active users of DATASET")
    ab.add_argument("--top-users", type=positive_int, default=150)
    ab.set_defaults(func=_bench_ablation)

    from tgn.quality import MODELS as QUALITY_MODELS

    qu = bench_targets.add_parser("quality", help="the shipped model vs every baseline: "
                                                  "per event, last basket, history slices")
    qu.add_argument("--data", help="dataset directory (required unless --render)")
    qu.add_argument("--profiles", help="LLM profile store (models dynllm, dynllm_shuffled)")
    qu.add_argument("--models", type=lambda s: s.split(","), default=list(QUALITY_MODELS),
                    help=f"comma-separated subset of {','.join(QUALITY_MODELS)}")
    qu.add_argument("--seeds", type=_seed_count, default=[0, 1, 2],
                    help="number of seeds (0..N-1) for the neural models")
    qu.add_argument("--split", choices=("val", "test"), default="val",
                    help="split to score (choose settings on val; read test once)")
    qu.add_argument("--epochs", type=positive_int, default=10, help="at most (early stopping)")
    qu.add_argument("--threads", type=positive_int, default=2)
    qu.add_argument("--workers", type=positive_int, default=1,
                    help="runs at once, each in its own process with --threads threads")
    qu.add_argument("--json", default="benchmarks/quality.json",
                    help="JSON to write (other datasets already in it are kept)")
    qu.add_argument("--readme", help="rewrite this README's quality rows (between "
                                     "<!-- quality:begin --> and <!-- quality:end -->) from --json")
    qu.add_argument("--render", action="store_true",
                    help="run nothing: print the table of --json (and rewrite --readme)")
    qu.set_defaults(func=_bench_quality)
