"""A fix for unbounded memory growth of Beam's in-process runner on a long-running stream.

Beam 2.77's ``FnApiRunner.run_stages`` keeps each stage's metrics as
``consolidate(chain(this_bundle.monitoring_infos, previous))``, where ``consolidate`` is a
*generator*: nothing is consumed until the pipeline ends, so every bundle adds one lazy layer that
keeps that bundle's ``monitoring_infos`` (and with them the whole protobuf response they belong
to) alive. A batch pipeline runs few bundles; the live reader defers every ``call_seconds``
(4 bundles/s), so the chain grew by every bundle of the run (measured: +147 generators, chains and
``MonitoringInfo`` s per 45 s, the RSS growth of issue 8 after the duplicate filter was full).

:func:`bound_runner_metrics` makes the runner consolidate eagerly (a list per bundle), so it holds
one merged metric per key: the same totals at the end, bounded memory on the way.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def _consolidate_now(metrics: Iterable[Any], *args: Any, **kwargs: Any) -> list[Any]:
    """Beam's ``monitoring_infos.consolidate``, consumed at once (a list, not a generator)."""
    from apache_beam.metrics.monitoring_infos import consolidate

    return list(consolidate(metrics, *args, **kwargs))


def bound_runner_metrics() -> None:
    """Make ``FnApiRunner`` merge bundle metrics eagerly (idempotent)."""
    from apache_beam.runners.portability.fn_api_runner import fn_runner

    fn_runner.consolidate_monitoring_infos = _consolidate_now
