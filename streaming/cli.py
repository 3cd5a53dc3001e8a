"""Subcommands of the ``streaming`` room: ``data prepare``, ``data import``, ``broker``,
``produce`` (in :mod:`streaming.kafka_cli`) and ``bench kafka``."""

from __future__ import annotations

import argparse
import json

from streaming import kafka_cli
from streaming.arg_types import positive_int
from streaming.errors import UsageError


def _weeks(text: str) -> tuple[int, int]:
    first, sep, last = text.partition("-")
    try:
        return (int(first), int(last)) if sep else (int(first), int(first))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected A-B (e.g. 1-26), got {text!r}") from None


def _print_meta(meta: dict) -> None:
    counts = meta["counts"]
    print(f"wrote {counts['events']:,} events, {counts['users']:,} users, "
          f"{counts['items']:,} items")
    print(json.dumps({k: meta[k] for k in ("time_range", "split")}, indent=2))


def _prepare(args: argparse.Namespace) -> int:
    if args.dataset != "completejourney":
        raise UsageError(f"unknown dataset {args.dataset!r}; available: completejourney")
    from streaming.completejourney import prepare

    _print_meta(prepare(args.out, args.weeks, args.min_user_events, args.min_item_events,
                        args.max_events))
    return 0


def _import(args: argparse.Namespace) -> int:
    from streaming.importer import import_files

    _print_meta(import_files(args.out, args.events, args.items, args.map, args.users))
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``data prepare`` and ``data import``."""
    data = commands.add_parser("data", help="build a dataset directory (Parquet + meta.json)")
    verbs = data.add_subparsers(dest="verb", required=True, metavar="VERB")
    prep = verbs.add_parser("prepare", help="build a dataset from a packaged real purchase log")
    prep.add_argument("--dataset", default="completejourney", help="completejourney")
    prep.add_argument("--out", required=True, help="dataset directory to write")
    prep.add_argument("--weeks", type=_weeks, help="week range A-B of 2017 (1-53)")
    prep.add_argument("--min-user-events", type=positive_int, default=1)
    prep.add_argument("--min-item-events", type=positive_int, default=1)
    prep.add_argument("--max-events", type=positive_int, help="keep the first N events in time")
    prep.set_defaults(func=_prepare)
    imp = verbs.add_parser("import", help="build a dataset from your own CSV/TSV/Parquet log")
    imp.add_argument("--events", required=True, help="purchase log file")
    imp.add_argument("--items", required=True, help="item catalog file")
    imp.add_argument("--users", help="optional user attribute file")
    imp.add_argument("--map", required=True,
                     help="KEY=COLUMN,... with keys user,item,ts[,quantity,price,event_id,"
                          "basket,store,title,category,brand,item_price]")
    imp.add_argument("--out", required=True, help="dataset directory to write")
    imp.set_defaults(func=_import)
    kafka_cli.register(commands)


def register_bench(bench_targets: argparse._SubParsersAction) -> None:
    """Add ``bench kafka``."""
    kafka_cli.register_bench(bench_targets)
