"""The shared argparse number converters."""

from __future__ import annotations

import argparse

import pytest

from streaming.arg_types import port, positive_float, positive_int, share


@pytest.mark.parametrize(("convert", "text", "value"), [
    (positive_int, "3", 3), (positive_float, "0.5", 0.5), (port, "65535", 65535),
    (share, "0", 0.0), (share, "1", 1.0)])
def test_accepts_values_in_range(convert, text, value):
    assert convert(text) == value


@pytest.mark.parametrize(("convert", "text", "expected"), [
    (positive_int, "0", "an integer >= 1"), (positive_int, "2.5", "an integer >= 1"),
    (positive_float, "0", "a number > 0"), (port, "65536", "a port in 1-65535"),
    (share, "1.5", "between 0 and 1"), (share, "x", "between 0 and 1")])
def test_refuses_with_what_was_expected(convert, text, expected):
    with pytest.raises(argparse.ArgumentTypeError, match=expected):
        convert(text)
