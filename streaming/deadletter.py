"""Dead-letter sinks: keep every rejected record, with its reason, so nothing is lost.

A dead letter is written as one JSON object::

    {"reason": "bad_price", "detail": "price=-1.0", "received_at": 1700000000.0,
     "raw": "{\\"event_id\\": ...}", "raw_encoding": "utf-8"}

``raw_encoding`` says how to get the original record back (:func:`decode_raw`): ``utf-8`` (the
text itself; UTF-8 bytes come back as ``str``), ``base64`` (bytes that were not UTF-8, or a
string with lone surrogates), ``json`` (a dict given directly) or ``repr`` (anything else; not
reversible). Sinks count what they wrote per reason, so
``accepted + sum(sink.counts.values())`` adds up to what was read.
"""

from __future__ import annotations

import base64
import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from streaming.kafka_settings import PLAINTEXT, KafkaSettings
from streaming.validation import DeadLetter

#: The Kafka topic of dead letters from the live pipeline.
DLQ_TOPIC = "purchases.dlq"


def encode_raw(raw: Any) -> tuple[str, str]:
    """``(text, raw_encoding)`` for a raw record; see the module docstring.

    >>> encode_raw(b"\\xff\\x00")
    ('/wA=', 'base64')
    >>> encode_raw('{"a": 1}')
    ('{"a": 1}', 'utf-8')
    """
    if isinstance(raw, bytes | bytearray | memoryview):
        data = bytes(raw)
        try:
            return data.decode("utf-8"), "utf-8"
        except UnicodeDecodeError:
            return base64.b64encode(data).decode("ascii"), "base64"
    if isinstance(raw, str):
        try:
            raw.encode("utf-8")
            return raw, "utf-8"
        except UnicodeEncodeError:  # lone surrogates
            return base64.b64encode(raw.encode("utf-8", "surrogatepass")).decode("ascii"), "base64"
    try:
        return json.dumps(raw, default=repr), "json"
    except (ValueError, TypeError, RecursionError):  # circular or otherwise unencodable
        return repr(raw)[:10_000], "repr"


def decode_raw(text: str, raw_encoding: str) -> Any:
    """The original record from :func:`encode_raw`'s output (``repr`` gives the text back)."""
    if raw_encoding == "base64":
        return base64.b64decode(text)
    if raw_encoding == "json":
        return json.loads(text)
    return text


def dead_letter_record(letter: DeadLetter) -> dict[str, Any]:
    """The JSON-ready form of a dead letter."""
    text, raw_encoding = encode_raw(letter.raw)
    return {"reason": str(letter.reason), "detail": letter.detail,
            "received_at": letter.received_at, "raw": text, "raw_encoding": raw_encoding}


class DeadLetterSink:
    """Base of the sinks: counts per reason; subclasses implement :meth:`_write`.

    Attributes:
        counts: Dead letters written, per reason code.
    """

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def write(self, letter: DeadLetter) -> None:
        """Store one dead letter."""
        self._write(dead_letter_record(letter))
        self.counts[str(letter.reason)] += 1

    def _write(self, record: dict[str, Any]) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        """Make everything written so far durable."""

    def close(self) -> None:
        """Flush and release resources."""
        self.flush()

    def __enter__(self) -> DeadLetterSink:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class JsonlDeadLetterSink(DeadLetterSink):
    """Append dead letters to a JSON Lines file (for replays and offline runs).

    Args:
        path: File to append to (created with its parent directories).
    """

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")

    def _write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record, ensure_ascii=True) + "\n")

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class KafkaDeadLetterSink(DeadLetterSink):
    """Send dead letters as JSON to a Kafka topic, keyed by reason.

    Args:
        bootstrap_servers: ``"host:port"``.
        topic: Dead-letter topic (created with one partition if missing).
        producer: An existing producer to share (then :meth:`close` only flushes it).
        settings: Kafka TLS/SASL settings (:mod:`streaming.kafka_settings`).
    """

    def __init__(self, bootstrap_servers: str, topic: str = DLQ_TOPIC, producer: Any = None,
                 settings: KafkaSettings = PLAINTEXT):
        from streaming.kafka_io import create_topics, json_producer

        super().__init__()
        self.topic = topic
        create_topics(bootstrap_servers, [topic], partitions=1, settings=settings)
        self._owns_producer = producer is None
        self._producer = producer or json_producer(bootstrap_servers, settings)

    def _write(self, record: dict[str, Any]) -> None:
        self._producer.send(self.topic, key=record["reason"], value=record)

    def flush(self) -> None:
        self._producer.flush()

    def close(self) -> None:
        self.flush()
        if self._owns_producer:
            self._producer.close()


def read_dead_letters(path: str | Path) -> Iterator[dict[str, Any]]:
    """The records of a JSONL dead-letter file, with ``raw`` decoded back to the original."""
    with Path(path).open(encoding="utf-8") as lines:
        for line in lines:
            record = json.loads(line)
            record["raw"] = decode_raw(record["raw"], record["raw_encoding"])
            yield record
