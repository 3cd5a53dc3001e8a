"""What the live pipeline does when its Kafka broker goes away, and when it comes back empty.

Policy (docs/reliability.md, "Outages"):

1. **Broker unreachable.** kafka-python reconnects by itself with backoff (``reconnect_backoff_ms``
   up to ``reconnect_backoff_max_ms``); reads come back empty and nothing crashes. The reader
   notices with a TCP check at most once a second (:class:`BrokerWatch`): one warning, the
   outage counted in ``dynllm_kafka_outages_total`` and ``dynllm_kafka_up`` at 0 until the
   broker answers again, then one line with the outage's length.
2. **Broker back with the same log** (a real Kafka cluster: replicated, on disk): the topic keeps
   its id and offsets, the reader resumes where it was, nothing is lost or repeated.
3. **Broker back with a new log** (the memory-only local broker, or a deleted and recreated
   topic): the topic's id (KIP-516) changed, and the checkpointed offsets point into a log that
   no longer exists; the new log starts again at offset 0. Waiting would skip the new log's first
   records, reading on would make the shards drop them as "already applied". The reader instead
   writes a reset marker into the state directory (:func:`mark_log_reset`), logs a warning,
   counts ``dynllm_source_log_resets_total`` and asks the pipeline to restart: it drains and
   checkpoints, :func:`finish_log_reset` sets every shard's positions back to the start of the
   log (the graph memory is kept) and removes the marker, and the pipeline runs again on the new
   log with fresh Kafka clients. A crash anywhere in between finds the marker on the next start
   and finishes the reset. What the old log held beyond the last read offset is lost: that is
   what an empty broker means.

4. **Started on a new log.** Every checkpoint also holds the id of the input topic its positions
   belong to (``extra["topic_id"]``). At every (re)start, :func:`prepare_input_log` compares it
   with the topic's current id; a different one means the log was replaced while the pipeline
   was down, and the reset of 3. is done before reading (a checkpoint without an id, written by
   an older version, cannot tell and is trusted).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import torch

from pipelines.state import checkpoint_path
from streaming import metrics
from streaming.broker import reachable
from streaming.kafka_settings import PLAINTEXT, KafkaSettings

log = logging.getLogger(__name__)

#: File in the state directory saying "the input log was replaced; rebase the positions".
RESET_MARKER = "log-reset.json"


class BrokerWatch:
    """Tracks whether the source broker accepts connections; logs and counts outages.

    Args:
        bootstrap_servers: Kafka ``host:port[,host:port]``.
        every_s: Shortest time between two TCP checks.
    """

    def __init__(self, bootstrap_servers: str, every_s: float = 1.0) -> None:
        self.bootstrap_servers, self.every_s = bootstrap_servers, every_s
        self.up = True
        self._checked = 0.0
        self._down_since = 0.0
        metrics.KAFKA_UP.set(1)

    def records_arrived(self) -> None:
        """A read returned records: the broker is up."""
        self._set(True)

    def read_was_empty(self) -> None:
        """A read returned nothing: check the broker (at most every ``every_s``)."""
        now = time.monotonic()
        if now - self._checked >= self.every_s:
            self._checked = now
            self._set(reachable(self.bootstrap_servers))

    def _set(self, up: bool) -> None:
        if up == self.up:
            return
        self.up = up
        metrics.KAFKA_UP.set(int(up))
        if up:
            log.warning("Kafka broker %s is back after %.1f s; reading resumes",
                        self.bootstrap_servers, time.monotonic() - self._down_since)
        else:
            self._down_since = time.monotonic()
            metrics.KAFKA_OUTAGES.inc()
            log.warning("Kafka broker %s unreachable: reading paused, reconnecting with backoff",
                        self.bootstrap_servers)


def mark_log_reset(state_dir: str | Path | None, topic: str) -> None:
    """Record (atomically) that ``topic``'s log was replaced; :func:`finish_log_reset` acts."""
    if state_dir is None:
        return
    path = Path(state_dir) / RESET_MARKER
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"topic": topic, "detected_at": time.time()}) + "\n")
    os.replace(tmp, path)


def finish_log_reset(state_dir: str | Path | None, num_shards: int,
                     topic_id: str | None = None) -> bool:
    """If a reset is marked: every shard's positions back to the log start, then drop the mark.

    Each checkpoint is rewritten atomically with its model state untouched; rewriting one that
    is already at the start changes nothing, so a crash halfway is finished on the next call.

    Args:
        topic_id: the new log's topic id, stored with the reset positions (if known).

    Returns:
        Whether a reset was marked (and is now done).
    """
    marker = None if state_dir is None else Path(state_dir) / RESET_MARKER
    if marker is None or not marker.exists():
        return False
    for shard in range(num_shards):
        path = checkpoint_path(state_dir, shard, num_shards)
        if not path.exists():
            continue
        payload = torch.load(path, map_location="cpu", weights_only=True)
        old = payload["extra"].get("positions", {})
        payload["extra"]["positions"] = {}
        frontier = payload["extra"].get("frontier")
        if frontier is not None:  # offsets belong to the old log; event time stays
            frontier["resume"], frontier["read"] = {}, {}
        if topic_id is not None:
            payload["extra"]["topic_id"] = topic_id
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save(payload, tmp)
        os.replace(tmp, path)
        log.warning("shard %d of %d: positions %s reset to the start of the new log", shard,
                    num_shards, old)
    marker.unlink()
    return True


def checkpoint_topic_ids(state_dir: str | Path, num_shards: int) -> set[str]:
    """The input topic ids the shards' checkpoints were taken on (none known: empty)."""
    ids = set()
    for shard in range(num_shards):
        path = checkpoint_path(state_dir, shard, num_shards)
        if path.exists():
            extra = torch.load(path, map_location="cpu", weights_only=True)["extra"]
            ids.add(extra.get("topic_id"))
    return ids - {None}


def current_topic_id(bootstrap_servers: str, topic: str, timeout_s: float = 5.0,
                     settings: KafkaSettings = PLAINTEXT) -> str | None:
    """The id of ``topic`` on the broker (created with 4 partitions if missing, as the reader
    would); ``None`` if the broker names none within ``timeout_s`` (no KIP-516 support).
    ``settings``: Kafka TLS/SASL settings."""
    from streaming.kafka_io import TopicReader, create_topics

    create_topics(bootstrap_servers, [topic], partitions=4, settings=settings)
    deadline = time.monotonic() + timeout_s
    with TopicReader(bootstrap_servers, topic, settings=settings) as reader:
        while (found := reader.topic_id()) is None and time.monotonic() < deadline:
            time.sleep(0.1)
    if found is None or set(found) <= set("0-"):  # the null id: the broker keeps none
        log.warning("the broker gives no id for topic %s: a recreated topic cannot be told "
                    "from the old one at start", topic)
        return None
    return found


def prepare_input_log(state_dir: str | Path | None, num_shards: int,
                      bootstrap_servers: str | None, topic: str,
                      settings: KafkaSettings = PLAINTEXT) -> str | None:
    """Before a (re)start: finish a marked reset, or do one if the checkpoints were taken on
    another log of ``topic`` than the broker's now; the current topic id (``None`` for a replay).
    """
    topic_id = (current_topic_id(bootstrap_servers, topic, settings=settings)
                if bootstrap_servers else None)
    if finish_log_reset(state_dir, num_shards, topic_id) or state_dir is None or topic_id is None:
        return topic_id
    saved = checkpoint_topic_ids(state_dir, num_shards)
    if saved and saved != {topic_id}:
        log.warning("topic %s was recreated while the pipeline was down (checkpoints on topic "
                    "id %s, the broker has %s): reading it from its start", topic,
                    ", ".join(sorted(saved)), topic_id)
        metrics.SOURCE_LOG_RESETS.labels(topic).inc()
        mark_log_reset(state_dir, topic)
        finish_log_reset(state_dir, num_shards, topic_id)
    return topic_id
