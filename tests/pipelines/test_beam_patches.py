"""The in-process runner's metrics stay bounded over many bundles (issue 8's RSS growth)."""

from __future__ import annotations

import gc
import itertools

import apache_beam as beam
from apache_beam.io.restriction_trackers import OffsetRange, OffsetRestrictionTracker
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.transforms.core import RestrictionProvider

from pipelines.beam_patches import bound_runner_metrics

CALLS = 300  # one bundle each, like the live reader's deferrals
#: live ``itertools.chain`` objects seen by the DoFn, by position
CHAINS: dict[int, int] = {}


class _Positions(RestrictionProvider):
    def initial_restriction(self, element: int) -> OffsetRange:
        return OffsetRange(0, element)

    def create_tracker(self, restriction: OffsetRange) -> OffsetRestrictionTracker:
        return OffsetRestrictionTracker(restriction)

    def restriction_size(self, element: int, restriction: OffsetRange) -> int:
        return restriction.size()


_POSITIONS = beam.DoFn.RestrictionParam(_Positions())


class _OnePerCall(beam.DoFn):
    """Claims one position per call and defers the rest: a bundle per position."""

    def process(self, element: int, tracker=_POSITIONS):
        position = tracker.current_restriction().start
        if not tracker.try_claim(position):
            return
        if position in (50, CALLS - 1):
            gc.collect()
            CHAINS[position] = sum(isinstance(o, itertools.chain) for o in gc.get_objects())
        yield position
        tracker.defer_remainder()


def test_runner_metrics_do_not_grow_with_bundles():
    assert bound_runner_metrics()  # the installed release is one the patch was measured on
    with beam.Pipeline(runner=FnApiRunner()) as pipeline:
        _ = (pipeline | beam.Create([CALLS]) | beam.ParDo(_OnePerCall())
             | beam.Map(lambda x: x + 1))
    # unpatched, Beam 2.77 keeps two lazy chains per bundle alive (~500 more here)
    assert CHAINS[CALLS - 1] - CHAINS[50] < 25, CHAINS


def test_other_beam_releases_are_left_alone(caplog):
    from apache_beam.runners.portability.fn_api_runner import fn_runner

    before = fn_runner.consolidate_monitoring_infos
    assert bound_runner_metrics(version="99.0.0") is False
    assert fn_runner.consolidate_monitoring_infos is before
    assert "not applied" in caplog.text
