"""A bound on the records a kafka-python producer holds unacknowledged.

kafka-python 3 dropped the producer's ``buffer_memory`` pool: ``send`` appends to the record
accumulator without any limit, so a caller that sends faster than the producer's sender thread
delivers (on 2 shared cores the sender competes with the pipeline for the GIL) grows the
accumulator without end. :class:`BoundedSender` keeps the futures of the records it sent and,
past ``max_pending`` unacknowledged ones, waits for the oldest before it returns: backpressure
instead of unbounded memory.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any

log = logging.getLogger(__name__)


class BoundedSender:
    """``producer.send`` with at most ``max_pending`` records sent and not yet acknowledged.

    A failed delivery (the producer gave up after its ``delivery_timeout_ms``) is logged and
    counted in :attr:`failed`, not raised: callers that fire and forget keep doing so.

    Args:
        producer: a ``kafka.KafkaProducer``.
        max_pending: most records in flight or buffered; a send beyond it waits for the oldest.

    Attributes:
        failed: deliveries that failed so far.
        waits: sends that had to wait for the producer (how often the bound was hit).
    """

    def __init__(self, producer: Any, max_pending: int = 20_000) -> None:
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}")
        self.producer, self.max_pending = producer, max_pending
        self._pending: deque = deque()
        self.failed = 0
        self.waits = 0

    def __len__(self) -> int:
        """Records sent whose acknowledgement was not seen yet (an upper bound)."""
        self._drop_done()
        return len(self._pending)

    def send(self, topic: str, key: Any = None, value: Any = None) -> None:
        """Send one record; first wait while ``max_pending`` records are unacknowledged."""
        self._drop_done()
        if len(self._pending) >= self.max_pending:
            self.waits += 1
            while len(self._pending) >= self.max_pending:
                self._settle(self._pending.popleft())
        self._pending.append(self.producer.send(topic, key=key, value=value))

    def _drop_done(self) -> None:
        """Forget the oldest futures that are already done (failures counted)."""
        while self._pending and self._pending[0].is_done:
            self._settle(self._pending.popleft())

    def _settle(self, future: Any) -> None:
        """Wait for one future (the producer's delivery timeout bounds the wait)."""
        try:
            future.get()
        except Exception as error:  # noqa: BLE001 - kafka.errors.* of a failed delivery
            self.failed += 1
            log.warning("a record was not delivered: %r (%d so far)", error, self.failed)

    def flush(self) -> None:
        """Send everything buffered and wait for it."""
        self.producer.flush()
        self._drop_done()
