"""Kafka helpers shared by the producer, the pipeline, the profile worker and the tests.

Built on kafka-python. Reading uses ``assign()`` with explicit offsets instead of consumer-group
joins: a group join takes ~23 s against the local Tansu broker, and a pipeline that checkpoints
its own offsets does not need one. Values are read as raw ``bytes`` and handed to
:func:`streaming.validation.validate_event`, so a malformed message becomes a dead letter instead of
a crash in a deserializer.

Two broker quirks shape this module (see docs/kafka.md): ``acks=0`` lost messages, so
producers use ``acks >= 1``; and the broker can misreport partition end offsets after batched
produce, so readers count what they read instead of trusting ``end_offsets``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

from kafka.serializer import Serializer

from streaming.errors import BrokerUnreachable
from streaming.kafka_settings import PLAINTEXT, KafkaSettings

#: Producer settings: ordered, acknowledged, duplicate-free delivery with batching for throughput.
PRODUCER_DEFAULTS: dict[str, Any] = {
    # Idempotence (Tansu supports it) keeps per-partition order and drops duplicates on retry
    # with 5 requests in flight; it requires acks="all". acks=0 lost messages on this broker.
    "enable_idempotence": True,
    "acks": "all",
    "max_in_flight_requests_per_connection": 5,
    "linger_ms": 20,  # gather sends into larger requests (+20% here over 5 ms)
    "batch_size": 256 * 1024,
}


class ClosedTransportRecvFilter(logging.Filter):
    """Drops kafka-python's receive-error record for a connection that was already closed.

    kafka-python 3.0.12 (and its master as of this writing) closes a client's connections on
    the caller's thread (``KafkaAdminClient.close`` → ``Manager.close`` → ``conn.close``), which
    sets the transport's socket to ``None``, while the client's IO thread can be between its
    ``wait_read`` and ``recv`` in ``_read_from_sock``; that ``recv`` then fails with
    ``AttributeError: 'NoneType' object has no attribute 'recv'`` and is logged with a
    traceback ("Error receiving network data closing socket"), although the connection was
    closed on purpose. Only that record is dropped, and only when its transport is closing:
    a receive error on an open connection is still logged.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """False for the receive-error record of a closed transport."""
        if not str(record.msg).startswith("%s: Error receiving network data"):
            return True
        transport = record.args[0] if isinstance(record.args, tuple) and record.args else None
        is_closing = getattr(transport, "is_closing", None)
        return not (callable(is_closing) and is_closing())


#: Client settings whose values are secrets.
SECRET_KEYS = frozenset({"sasl_plain_password", "ssl_password", "sasl.password"})
#: kafka-python loggers that log a client's whole configuration (``KafkaAdminClient`` logs
#: ``"Starting KafkaAdminClient with configuration: %s"`` at DEBUG, password included).
CONFIG_LOGGERS = ("kafka.admin.client", "kafka.producer.kafka", "kafka.consumer.group")


class SecretConfigFilter(logging.Filter):
    """Masks secret values (:data:`SECRET_KEYS`) in the configuration dicts a record formats.

    The record is kept; only its arguments are replaced by copies with ``"***"`` for secrets.
    """

    @staticmethod
    def _masked(value: Any) -> Any:
        if isinstance(value, dict) and SECRET_KEYS & value.keys():
            return {k: ("***" if k in SECRET_KEYS and v is not None else v)
                    for k, v in value.items()}
        return value

    def filter(self, record: logging.LogRecord) -> bool:
        """Always True; rewrites ``record.args`` when a dict in them holds a secret."""
        if isinstance(record.args, tuple):
            record.args = tuple(self._masked(a) for a in record.args)
        elif isinstance(record.args, dict):
            record.args = self._masked(record.args)
        return True


def install_log_filters() -> None:
    """Add :class:`ClosedTransportRecvFilter` to kafka-python's transport logger and
    :class:`SecretConfigFilter` to the loggers that print client configurations (once each).

    Called by the ``dynllm`` entry point, which owns the process's logging set-up.
    """
    wanted = [("kafka.net.transport", ClosedTransportRecvFilter)]
    wanted += [(name, SecretConfigFilter) for name in CONFIG_LOGGERS]
    for name, kind in wanted:
        logger = logging.getLogger(name)
        if not any(isinstance(f, kind) for f in logger.filters):
            logger.addFilter(kind())


class Record(NamedTuple):
    """One message read from a topic (value still raw bytes)."""

    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int


def encode_json(value: Any) -> bytes:
    """Compact JSON for a message value; ``bytes`` pass through untouched (raw or junk records).

    >>> encode_json({"a": 1, "b": [1.5]})
    b'{"a":1,"b":[1.5]}'
    """
    if isinstance(value, bytes):
        return value
    return json.dumps(value, separators=(",", ":")).encode("utf-8")


class _JsonSerializer(Serializer):
    def serialize(self, topic: str, headers: Any, value: Any) -> bytes:
        return encode_json(value)


class _KeySerializer(Serializer):
    def serialize(self, topic: str, headers: Any, key: str | bytes | None) -> bytes | None:
        return key.encode("utf-8") if isinstance(key, str) else key


def client_config(bootstrap_servers: str, settings: KafkaSettings,
                  **config: Any) -> dict[str, Any]:
    """The keyword arguments of every kafka-python client dynllm builds: the bootstrap list,
    ``config``, and the security settings over them (they cannot be overridden per client)."""
    return {"bootstrap_servers": bootstrap_servers, **config, **settings.kafka_python_kwargs()}


def librdkafka_config(bootstrap_servers: str, settings: KafkaSettings,
                      **config: Any) -> dict[str, Any]:
    """The configuration of every confluent-kafka (librdkafka) client dynllm builds:
    ``bootstrap.servers``, ``config`` (librdkafka names), and the security settings over them."""
    return {"bootstrap.servers": bootstrap_servers, **config, **settings.librdkafka_config()}


def json_producer(bootstrap_servers: str, settings: KafkaSettings = PLAINTEXT,
                  **overrides: Any):
    """A ``KafkaProducer`` whose values are JSON (or raw bytes) and keys UTF-8 strings.

    Args:
        bootstrap_servers: ``"host:port[,host:port]"``.
        settings: TLS/SASL settings (:mod:`streaming.kafka_settings`).
        **overrides: Any ``KafkaProducer`` setting, replacing :data:`PRODUCER_DEFAULTS`.
    """
    from kafka import KafkaProducer

    return KafkaProducer(**client_config(
        bootstrap_servers, settings, value_serializer=_JsonSerializer(),
        key_serializer=_KeySerializer(), **{**PRODUCER_DEFAULTS, **overrides}))


def consumer(bootstrap_servers: str, settings: KafkaSettings = PLAINTEXT, **config: Any):
    """A group-less ``KafkaConsumer`` without auto-commit (offsets are the caller's)."""
    from kafka import KafkaConsumer

    return KafkaConsumer(**client_config(bootstrap_servers, settings, group_id=None,
                                         enable_auto_commit=False, **config))


def security_hint(settings: KafkaSettings) -> str:
    """`` with SSL ...`` for an error line when the settings are not plaintext (no secrets)."""
    return "" if settings.is_plaintext else (
        f" with {settings.describe()} (check --kafka-config / DYNLLM_KAFKA_*: docs/kafka.md)")


def create_topics(bootstrap_servers: str, names: Iterable[str], partitions: int = 4,
                  timeout_ms: int = 30_000, settings: KafkaSettings = PLAINTEXT) -> None:
    """Create topics that do not exist yet (existing ones are left as they are), connecting
    with ``settings`` (TLS/SASL).

    Raises :class:`~streaming.errors.BrokerUnreachable` when no broker answers within
    ``timeout_ms`` (the command line prints it as one line).
    """
    from kafka.admin import KafkaAdminClient, NewTopic
    from kafka.errors import KafkaTimeoutError, TopicAlreadyExistsError

    try:
        admin = KafkaAdminClient(**client_config(bootstrap_servers, settings,
                                                 bootstrap_timeout_ms=timeout_ms))
    except KafkaTimeoutError as exc:
        raise BrokerUnreachable(f"cannot reach Kafka at {bootstrap_servers}"
                                f"{security_hint(settings)}: {exc}") from exc
    try:
        existing = set(admin.list_topics())
        new = [NewTopic(n, num_partitions=partitions, replication_factor=1)
               for n in names if n not in existing]
        if new:
            try:
                admin.create_topics(new)
            except TopicAlreadyExistsError:  # created concurrently
                pass
    finally:
        admin.close()


class TopicReader:
    """Read a topic's partitions with ``assign()`` from explicit offsets, in batches.

    Args:
        bootstrap_servers: ``"host:port"``.
        topic: Topic to read.
        partitions: Partitions to read; ``None`` means all of them.
        offsets: Next offset to read per partition (e.g. restored from a checkpoint); a partition
            not listed starts at its beginning.
        max_batch: Most records returned by one :meth:`poll`.
        metadata_timeout_s: How long to wait for the topic's partitions (``partitions=None``).
        settings: TLS/SASL settings (:mod:`streaming.kafka_settings`).
        **consumer_config: Extra ``KafkaConsumer`` settings.

    Attributes:
        positions: Next offset per partition, advanced by what was read (save it to resume).
        count: Records read so far.
    """

    def __init__(self, bootstrap_servers: str, topic: str, partitions: Iterable[int] | None = None,
                 offsets: dict[int, int] | None = None, max_batch: int = 5000,
                 metadata_timeout_s: float = 10.0, settings: KafkaSettings = PLAINTEXT,
                 **consumer_config: Any) -> None:
        from kafka import TopicPartition

        config = {"fetch_max_wait_ms": 100, "auto_offset_reset": "earliest", **consumer_config}
        self.topic = topic
        self.max_batch = max_batch
        self._consumer = consumer(bootstrap_servers, settings, **config)
        chosen = (sorted(partitions) if partitions is not None
                  else self._wait_for_partitions(metadata_timeout_s))
        offsets = offsets or {}
        self.positions = {p: offsets.get(p, 0) for p in chosen}
        self.count = 0
        assigned = [TopicPartition(topic, p) for p in chosen]
        self._consumer.assign(assigned)
        for tp in assigned:
            # Offset 0 below a real Kafka log start falls back to the earliest offset.
            self._consumer.seek(tp, self.positions[tp.partition])

    def _wait_for_partitions(self, timeout_s: float) -> list[int]:
        deadline = time.monotonic() + timeout_s
        while True:
            found = self._consumer.partitions_for_topic(self.topic)
            if found:
                return sorted(found)
            if time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"topic {self.topic!r} has no partitions (does it exist?)")
            time.sleep(0.1)

    def poll(self, timeout_s: float = 1.0) -> list[Record]:
        """Up to ``max_batch`` new records (possibly none), in offset order per partition."""
        fetched = self._consumer.poll(timeout_ms=int(timeout_s * 1000), max_records=self.max_batch)
        batch = [Record(m.partition, m.offset, m.key, m.value, m.timestamp)
                 for messages in fetched.values() for m in messages]
        for partition_messages in fetched.values():
            last = partition_messages[-1]
            self.positions[last.partition] = last.offset + 1
        self.count += len(batch)
        return batch

    def batches(self, limit: int | None = None, idle_timeout_s: float | None = None,
                poll_timeout_s: float = 0.5) -> Iterator[list[Record]]:
        """Yield non-empty batches until ``limit`` records were read or none came for a while.

        Args:
            limit: Stop once this many records were read in total (the last batch is cut to it).
            idle_timeout_s: Stop after this many seconds without a record; ``None`` waits forever.
            poll_timeout_s: Longest single wait for the broker.
        """
        last_record = time.monotonic()
        while limit is None or self.count < limit:
            batch = self.poll(poll_timeout_s)
            if batch:
                last_record = time.monotonic()
                if limit is not None and self.count > limit:
                    batch = self._cut(batch, len(batch) - (self.count - limit))
                yield batch
            elif idle_timeout_s is not None and time.monotonic() - last_record > idle_timeout_s:
                return

    def _cut(self, batch: list[Record], keep: int) -> list[Record]:
        """Keep the first ``keep`` records; rewind positions so the rest is read next time."""
        from kafka import TopicPartition

        kept, dropped = batch[:keep], batch[keep:]
        for record in reversed(dropped):
            self.positions[record.partition] = record.offset
        for partition in {r.partition for r in dropped}:
            self._consumer.seek(TopicPartition(self.topic, partition), self.positions[partition])
        self.count -= len(dropped)
        return kept

    def lag(self, partition: int) -> int | None:
        """Records between the read position and the partition's end as the last fetch response
        reported it (its high watermark); ``None`` before any fetch of that partition."""
        from kafka import TopicPartition

        end = self._consumer.highwater(TopicPartition(self.topic, partition))
        return None if end is None else max(0, end - self.positions[partition])

    def buffered(self, partition: int) -> bool:
        """Whether the consumer holds fetched records of ``partition`` not returned by
        :meth:`poll` yet (kafka-python 3.0's fetcher drains one partition's fetch at a time, so
        a partition can wait behind another's backlog for many polls, its high watermark
        unread meanwhile)."""
        fetcher = self._consumer._fetcher
        current = fetcher._next_partition_records
        if current is not None and current.topic_partition.partition == partition and current:
            return True
        return any(f.topic_partition.partition == partition
                   for f in list(fetcher._completed_fetches))

    def topic_id(self) -> str | None:
        """The topic's id (KIP-516) in the latest metadata, ``None`` while unknown.

        A new id under the same name means the topic was recreated: its log, and the offsets
        in it, start again (kafka-python keeps the id in its private cluster metadata).
        """
        found = self._consumer._client.cluster.topic_id(self.topic)
        return None if found is None else str(found)

    def close(self) -> None:
        """Close the consumer connection."""
        self._consumer.close()

    def __enter__(self) -> TopicReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
