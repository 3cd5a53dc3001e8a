"""The restriction of the live Kafka reader: the next offset of every partition of a topic.

One element of the splittable reader covers a whole topic, so one call reads whatever any
partition has (a poll of one consumer) instead of the runner calling back once per partition.
Its restriction is "every offset from these positions on"; the reader claims new positions as
it reads, and deferring splits off the rest: the primary ends at the claimed positions, the
residual starts there. Claiming ``None`` ends reading (shutdown).
"""

from __future__ import annotations

from dataclasses import dataclass

from apache_beam.io.iobase import RestrictionProgress, RestrictionTracker
from apache_beam.transforms.core import RestrictionProvider

#: ``((partition, offset), ...)`` sorted by partition: hashable and picklable.
Positions = tuple[tuple[int, int], ...]


def as_positions(offsets: dict[int, int]) -> Positions:
    """The sorted tuple form of ``{partition: offset}``.

    >>> as_positions({2: 7, 0: 3})
    ((0, 3), (2, 7))
    """
    return tuple(sorted((int(p), int(o)) for p, o in offsets.items()))


@dataclass(frozen=True)
class TopicPositions:
    """Offsets ``[start, stop)`` per partition; ``stop is None``: to the end of the log (never).

    Attributes:
        start: first offset per partition.
        stop: offset after the last one per partition, or ``None`` (unbounded).
    """

    start: Positions
    stop: Positions | None = None


class PositionsTracker(RestrictionTracker):
    """Claims the positions reached so far; splitting (deferral) hands the rest on.

    Args:
        restriction: the :class:`TopicPositions` to read.
    """

    def __init__(self, restriction: TopicPositions) -> None:
        self._restriction = restriction
        self._claimed = dict(restriction.start)
        self._read = 0  # records claimed (progress)
        self._done = restriction.stop is not None  # a bounded primary has nothing left

    def current_restriction(self) -> TopicPositions:
        return self._restriction

    def try_claim(self, position: dict[int, int] | None) -> bool:
        """Claim reading up to ``position`` (next offset per partition); ``None``: the end."""
        if self._done:
            return False
        if position is None:
            self._restriction = TopicPositions(self._restriction.start,
                                               as_positions(self._claimed))
            self._done = True
            return True
        for partition, offset in position.items():
            previous = self._claimed.get(partition, 0)
            if offset < previous:
                raise ValueError(f"partition {partition}: claim {offset} below {previous}")
            self._read += offset - previous
            self._claimed[partition] = offset
        return True

    def try_split(self, fraction_of_remainder: float):
        """Split at the claimed positions: ``(primary up to them, residual from them)``."""
        if self._done:
            return None
        claimed = as_positions(self._claimed)
        primary = TopicPositions(self._restriction.start, claimed)
        self._restriction, self._done = primary, True
        return primary, TopicPositions(claimed)

    def check_done(self) -> None:
        if not self._done:
            raise ValueError(f"reading {self._restriction} neither ended nor deferred the rest")

    def current_progress(self) -> RestrictionProgress:
        return RestrictionProgress(completed=float(self._read), remaining=1.0)

    def is_bounded(self) -> bool:
        return self._restriction.stop is not None


class TopicPositionsProvider(RestrictionProvider):
    """Restrictions of an element with a ``positions`` attribute: from there, unbounded."""

    def initial_restriction(self, element) -> TopicPositions:
        return TopicPositions(element.positions)

    def create_tracker(self, restriction: TopicPositions) -> PositionsTracker:
        return PositionsTracker(restriction)

    def restriction_size(self, element, restriction: TopicPositions) -> int:
        return 1  # unknown: the log has no end
