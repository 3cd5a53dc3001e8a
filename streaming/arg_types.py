"""argparse ``type=`` converters for bounded numbers, shared by every subcommand.

Each converter turns a bad value into an :class:`argparse.ArgumentTypeError` that names what was
expected, so argparse prints ``dynllm ...: error: argument --x: expected ..., got ...``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TypeVar

N = TypeVar("N", int, float)


def number(kind: Callable[[str], N], accept: Callable[[N], bool],
           expected: str) -> Callable[[str], N]:
    """A converter: ``kind(text)``, refused unless ``accept(value)``; ``expected`` reads
    "expected <expected>, got <text>" in the error."""

    def parse(text: str) -> N:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
        return value

    return parse


#: An integer >= 1.
positive_int = number(int, lambda v: v >= 1, "an integer >= 1")
#: A number > 0.
positive_float = number(float, lambda v: v > 0, "a number > 0")
#: A finite number >= 0.
non_negative_float = number(float, lambda v: 0 <= v < float("inf"), "a number >= 0")
#: A TCP port, 1-65535.
port = number(int, lambda v: 1 <= v <= 65535, "a port in 1-65535")
#: A share, 0-1 inclusive.
share = number(float, lambda v: 0.0 <= v <= 1.0, "a number between 0 and 1")
