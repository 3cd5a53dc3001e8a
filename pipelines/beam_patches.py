"""A fix for unbounded memory growth of Beam's in-process runner on a long-running stream.

Beam 2.77's ``FnApiRunner.run_stages`` keeps each stage's metrics as
``consolidate(chain(this_bundle.monitoring_infos, previous))``, where ``consolidate`` is a
*generator*: nothing is consumed until the pipeline ends, so every bundle adds one lazy layer that
keeps that bundle's ``monitoring_infos`` (and with them the whole protobuf response they belong
to) alive. A batch pipeline runs few bundles; the live reader defers every ``call_seconds``
(4 bundles/s), so the chain grew by every bundle of the run (measured: +147 generators, chains and
``MonitoringInfo`` s per 45 s, the RSS growth of issue 8 after the duplicate filter was full).

:func:`bound_runner_metrics` makes the runner consolidate eagerly (a list per bundle), so it holds
one merged metric per key: the same totals at the end, bounded memory on the way. It patches only
the Beam releases in :data:`PATCHED_RELEASES` (read and measured); on any other release it warns
and leaves the runner alone, since a later release may have fixed or renamed the function.

Upstream: not reported yet (this machine reaches only package registries). The report to file at
https://github.com/apache/beam/issues: "apache-beam 2.77.0, ``FnApiRunner.run_stages``: the
per-stage ``consolidate_monitoring_infos(chain(...))`` generator chain grows by one layer per
bundle, keeping every bundle's ``monitoring_infos`` alive until the pipeline ends".
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

log = logging.getLogger(__name__)

#: Beam releases whose ``fn_runner`` keeps the lazy chain (read in the source, measured by
#: ``tests/pipelines/test_beam_patches.py``); the patch is applied to these only.
PATCHED_RELEASES = ("2.77.0",)


def _consolidate_now(metrics: Iterable[Any], *args: Any, **kwargs: Any) -> list[Any]:
    """Beam's ``monitoring_infos.consolidate``, consumed at once (a list, not a generator)."""
    from apache_beam.metrics.monitoring_infos import consolidate

    return list(consolidate(metrics, *args, **kwargs))


def bound_runner_metrics(version: str | None = None) -> bool:
    """Make ``FnApiRunner`` merge bundle metrics eagerly (idempotent); returns whether it did.

    Args:
        version: the Beam release to decide for (default: the installed one). Outside
            :data:`PATCHED_RELEASES`, or if the runner no longer has the function, nothing is
            changed and a warning says so.
    """
    import apache_beam
    from apache_beam.runners.portability.fn_api_runner import fn_runner

    version = version or apache_beam.__version__
    if version not in PATCHED_RELEASES or not hasattr(fn_runner, "consolidate_monitoring_infos"):
        log.warning("apache-beam %s: runner metrics patch not applied (checked for %s); a long "
                    "live run may grow in memory if that release still chains bundle metrics",
                    version, ", ".join(PATCHED_RELEASES))
        return False
    fn_runner.consolidate_monitoring_infos = _consolidate_now
    return True
