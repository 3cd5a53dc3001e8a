"""The ``dynllm`` command line.

Each room owns its subcommands: a module with ``register(subparsers)`` (and optionally
``register_bench(bench_subparsers)``) listed in :data:`COMMAND_MODULES`. Handlers take the parsed
``argparse.Namespace`` and return an exit code; they import heavy libraries lazily so that
``dynllm --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version

from streaming.errors import BrokerUnreachable, UsageError

#: Modules that contribute subcommands, in help order.
COMMAND_MODULES = (
    "streaming.cli",
    "tgn.cli",
    "tgn.dynllm_cli",
    "profiles.cli",
    "pipelines.commands",
    "streaming.monitor",
)


def _version() -> str:
    try:
        return version("dynllm")
    except PackageNotFoundError:  # running from a source tree
        return "0+unknown"


def build_parser() -> argparse.ArgumentParser:
    """The full parser, with every room's subcommands and ``bench`` targets."""
    parser = argparse.ArgumentParser(
        prog="dynllm",
        description="Streaming recommender: temporal purchase graph + LLM user profiles.",
    )
    parser.add_argument("--version", action="version", version=f"dynllm {_version()}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    bench = commands.add_parser("bench", help="measure throughput and latency figures")
    bench_targets = bench.add_subparsers(dest="target", required=True, metavar="TARGET")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:  # a real missing dependency, not an absent room
                raise
            continue
        module.register(commands)
        if hasattr(module, "register_bench"):
            module.register_bench(bench_targets)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dynllm`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from streaming.kafka_io import install_log_filters

    install_log_filters()  # kafka-python's close race logs a traceback for a closed socket
    try:
        return int(args.func(args) or 0)
    except (UsageError, FileNotFoundError, BrokerUnreachable) as exc:
        if os.environ.get("DYNLLM_DEBUG"):
            raise
        print(f"dynllm: error: {exc}", file=sys.stderr)
        return 69 if isinstance(exc, BrokerUnreachable) else 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
