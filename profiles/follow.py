"""The worker's view of the live stream: the ``purchases`` topic read into a :class:`PurchaseGraph`.

The profile worker builds each prompt from its own copy of the purchase graph, seeded from a
dataset and grown here from every valid event on ``purchases`` (why the worker keeps the graph
rather than the pipeline sending context: docs/profiles.md, "Live worker"). The topic is read
with ``assign()`` from its beginning on every start (the graph lives in memory; a consumer-group
join would cost seconds on the local broker and its committed offsets would point past history
the new process no longer holds).

What is not added, counted by outcome in ``dynllm_profile_graph_events_total``:

- records :func:`~streaming.validation.validate_event` rejects (the reason is the outcome) —
  the pipeline already dead-letters them with that reason on ``purchases.dlq``, so the worker
  only skips them (writing them twice would duplicate the dead-letter topic);
- ``unknown_item``: items the catalog does not know (a prompt needs their category and brand);
- ``duplicate_event_id``: an event id seen recently (at-least-once delivery);
- ``in_seed``: events older than the seed's end, which the seed already holds.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from profiles.graph import PurchaseGraph
from streaming import metrics
from streaming.kafka_io import TopicReader, create_topics
from streaming.kafka_settings import PLAINTEXT, KafkaSettings
from streaming.validation import DeadLetter, RecentIds, ValidationRules, validate_event

log = logging.getLogger(__name__)

#: The topic the pipeline reads purchases from, followed here too.
PURCHASES_TOPIC = "purchases"


class PurchaseFollower:
    """Reads ``purchases`` into ``graph``.

    Args:
        bootstrap_servers: Kafka ``host:port``.
        graph: The graph to grow (seeded already).
        topic: The purchases topic.
        max_batch: Most records per poll.
        settings: Kafka TLS/SASL settings (:mod:`streaming.kafka_settings`).
    """

    def __init__(self, bootstrap_servers: str, graph: PurchaseGraph,
                 topic: str = PURCHASES_TOPIC, max_batch: int = 5000,
                 settings: KafkaSettings = PLAINTEXT) -> None:
        self.graph = graph
        create_topics(bootstrap_servers, [topic], settings=settings)
        self.reader = TopicReader(bootstrap_servers, topic, max_batch=max_batch,
                                  settings=settings)
        self._rules = ValidationRules(catalog=graph.catalog)
        self._recent = RecentIds()
        self.added = 0

    def poll(self, timeout_s: float = 0.0) -> int:
        """Read one batch (waiting up to ``timeout_s``) into the graph; records read."""
        records = self.reader.poll(timeout_s)
        users, items, ts, quantity = [], [], [], []
        skipped: dict[str, int] = {}
        seed_end = self.graph.seed_end
        for record in records:
            event = validate_event(record.value, self._rules, self._recent)
            if isinstance(event, DeadLetter):
                skipped[event.reason.value] = skipped.get(event.reason.value, 0) + 1
            elif event.ts < seed_end:
                skipped["in_seed"] = skipped.get("in_seed", 0) + 1
            else:
                users.append(event.user_id)
                items.append(event.item_id)
                ts.append(event.ts)
                quantity.append(event.quantity)
        self.graph.add(users, items, np.array(ts, np.float64), np.array(quantity, np.float64))
        self.added += len(users)
        if users:
            metrics.PROFILE_GRAPH_EVENTS.labels(outcome="added").inc(len(users))
        for outcome, count in skipped.items():
            metrics.PROFILE_GRAPH_EVENTS.labels(outcome=outcome).inc(count)
        return len(records)

    def catch_up(self, max_seconds: float = 30.0) -> int:
        """Read until a poll finds nothing new (or ``max_seconds`` pass); records read."""
        read, deadline = 0, time.monotonic() + max_seconds
        while time.monotonic() < deadline:
            got = self.poll(0.05)
            read += got
            if got == 0:
                break
        return read

    def wait_for(self, user_id: str, ts: float, timeout_s: float) -> bool:
        """Read until the graph holds an event of ``user_id`` at ``ts`` or later.

        A profile request is sent after the pipeline read the purchase it is about, so that
        purchase is on the topic; this only waits for this reader to get there.

        Returns:
            Whether it arrived within ``timeout_s``.
        """
        deadline = time.monotonic() + timeout_s
        while self.graph.latest_ts(user_id) < ts:
            if time.monotonic() >= deadline:
                return False
            self.poll(0.1)
        return True

    def close(self) -> None:
        """Close the consumer."""
        self.reader.close()
