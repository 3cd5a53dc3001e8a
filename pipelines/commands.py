"""Subcommands of the ``pipelines`` room (filled in as the streaming pipeline lands)."""

from __future__ import annotations

import argparse


def register(commands: argparse._SubParsersAction) -> None:
    """Add the pipeline-level subcommands."""
