"""``WriteEmbeddings``: user embeddings to the ``user-embeddings`` topic and an on-disk store.

Each message is JSON ``{user_id, ts, version, embedding, facet_weights, events}`` keyed by user
id (``facet_weights`` is ``null`` without a profile model; ``events`` is ``[[item_id, ts], ...]``,
the user's events this update applied, in the order applied, so ``version - len(events)`` events
of the user came before). The topic is a changelog: ``dynllm serve`` follows it, keeping each
user's newest embedding and replaying ``events`` into its own copy of the purchase statistics
(the contract is in docs/pipeline.md, "Serving contract"). The store keeps each user's latest
embedding per shard in ``STATE_DIR/embeddings-shard-K-of-N.npz``, rewritten atomically at every
checkpoint: what ``dynllm serve`` starts from (and all it reads without a broker). For benchmarks
the writer can also append a latency record per emitted batch to a file (:func:`read_latency_log`).

Shapes: ``U`` users, ``E`` embedding width, ``F`` facets.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.coders import VarIntCoder
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec

from pipelines.elements import UserStates
from streaming import metrics
from streaming.kafka_settings import PLAINTEXT, KafkaSettings

#: Output topic of the live pipeline.
EMBEDDING_TOPIC = "user-embeddings"
#: One emitted batch's latency record: ``(produced_at [B], span trace, emit time)``.
LatencyRecord = tuple[np.ndarray, tuple[tuple[str, float], ...], float]
#: Most ``user-embeddings`` records sent and not yet acknowledged (~0.8 KB each) before the
#: writer waits for the producer (:class:`streaming.bounded_send.BoundedSender`).
MAX_UNACKED = 20_000


def store_path(state_dir: str | Path, shard: int, num_shards: int) -> Path:
    """The embedding store file of one shard."""
    return Path(state_dir) / f"embeddings-shard-{shard}-of-{num_shards}.npz"


class EmbeddingStore:
    """The latest embedding of every user of one shard, saved as one ``.npz`` file.

    Args:
        path: the file (loaded if it exists).
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.rows: dict[str, tuple[float, int, np.ndarray, np.ndarray | None]] = {}
        if path is not None and path.exists():
            for user, ts, version, vector, weights in zip(*load_store(path), strict=True):
                self.rows[str(user)] = (float(ts), int(version), vector,
                                        None if np.isnan(weights).all() else weights)

    def put(self, states: UserStates) -> None:
        """Keep the users' new embeddings."""
        weights = states.facet_weights
        for i, user in enumerate(states.user_ids):
            self.rows[user] = (float(states.ts[i]), int(states.version[i]), states.embedding[i],
                               None if weights is None else weights[i])

    def save(self) -> None:
        """Rewrite the file atomically (temp file + ``os.replace``)."""
        if self.path is None or not self.rows:
            return
        users = list(self.rows)
        values = list(self.rows.values())
        width = next((len(v[3]) for v in values if v[3] is not None), 0)
        weights = np.stack([v[3] if v[3] is not None else np.full(width, np.nan, np.float32)
                            for v in values]) if width else np.zeros((len(users), 0), np.float32)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with tmp.open("wb") as out:
            np.savez(out, user_ids=np.array(users), ts=np.array([v[0] for v in values]),
                     version=np.array([v[1] for v in values], np.int64),
                     embedding=np.stack([v[2] for v in values]).astype(np.float32),
                     facet_weights=weights.astype(np.float32))
        os.replace(tmp, self.path)


def load_store(path: str | Path) -> tuple[np.ndarray, ...]:
    """``(user_ids [U], ts [U], version [U], embedding [U, E], facet_weights [U, F])``."""
    with np.load(path) as data:
        return tuple(data[k] for k in ("user_ids", "ts", "version", "embedding",
                                       "facet_weights"))


def latency_line(states: UserStates, emitted: float) -> bytes:
    """One JSON line ``{"produced_at": [B], "trace": [[stage, s], ...], "emitted": s}``."""
    return (json.dumps({"produced_at": states.produced_at.tolist(),
                        "trace": [list(mark) for mark in states.span.trace],
                        "emitted": emitted}) + "\n").encode()


def read_latency_log(path: str | Path) -> list[LatencyRecord]:
    """The records a writer appended to ``path`` so far (a line still being written is left
    for the next read); none if the file is not there yet."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return []
    complete = text[:text.rfind("\n") + 1]  # a writer appends whole lines, each in one write
    records = [json.loads(line) for line in complete.splitlines()]
    return [(np.asarray(r["produced_at"], np.float64), tuple(tuple(m) for m in r["trace"]),
             float(r["emitted"])) for r in records]


def user_events(states: UserStates) -> list[list[list[object]]]:
    """Per user of a batch, its applied events ``[[item_id, ts], ...]`` in the order applied.

    >>> from pipelines.elements import Span
    >>> states = UserStates(0, Span.of(0, 0, 3), ["a", "b"], np.zeros(2), np.zeros(2),
    ...                     np.zeros(2), np.zeros(2), np.zeros((2, 1)), np.zeros(3), np.zeros(2),
    ...                     event_user=np.array([1, 0, 1]), event_items=["x", "y", "z"],
    ...                     event_ts=np.array([1.0, 2.0, 3.0]))
    >>> user_events(states)
    [[['y', 2.0]], [['x', 1.0], ['z', 3.0]]]
    """
    out: list[list[list[object]]] = [[] for _ in states.user_ids]
    if states.event_user is None:
        return out
    ts = states.event_ts.tolist()
    for row, (user, item) in enumerate(zip(states.event_user.tolist(), states.event_items,
                                           strict=True)):
        out[user].append([item, ts[row]])
    return out


def embedding_message(states: UserStates, i: int,
                      events: list[list[object]] | None = None) -> dict[str, object]:
    """The ``user-embeddings`` message of user ``i`` of a batch (``events``: its applied
    events, from :func:`user_events`). Values are rounded to 6 decimals in float64 (rounded
    in float32 they printed as 17 digits: twice the bytes, twice the encoding time)."""
    weights = states.facet_weights
    return {"user_id": states.user_ids[i], "ts": float(states.ts[i]),
            "version": int(states.version[i]),
            "embedding": _rounded(states.embedding[i]),
            "facet_weights": None if weights is None else _rounded(weights[i]),
            "events": events or []}


def _rounded(values: np.ndarray) -> list[float]:
    """``values [N]`` as floats rounded to 6 decimals (printed as such in JSON).

    >>> _rounded(np.array([0.1257299929857254, 2.0], np.float32))
    [0.12573, 2.0]
    """
    return np.round(values.astype(np.float64), 6).tolist()


class _WriteFn(beam.DoFn):
    """Stateful per shard, so one worker owns each shard's store file.

    The stores and the producer live in the instance: a store is what was saved at the last
    checkpoint plus the embeddings written since, so a new instance (another worker, a restart)
    starts from the saved file.

    Attributes:
        WRITTEN: embeddings this key had written when its store was last saved (Beam state,
            written only then: see ``pipelines.memory._ApplyToMemoryFn.APPLIED``).
    """

    WRITTEN = ReadModifyWriteStateSpec("written", VarIntCoder())
    _written = beam.DoFn.StateParam(WRITTEN)

    def __init__(self, bootstrap_servers: str | None, topic: str, state_dir: str | None,
                 num_shards: int, settings: KafkaSettings, latency_path: str | None) -> None:
        self.bootstrap_servers, self.topic, self.settings = bootstrap_servers, topic, settings
        self.state_dir, self.num_shards, self.latency_path = state_dir, num_shards, latency_path

    def setup(self) -> None:
        self._stores: dict[int, EmbeddingStore] = {}
        self._unsaved: dict[int, int] = {}  # embeddings written since the store was saved
        self._producer = None
        self._latency_fd = None if self.latency_path is None else os.open(
            self.latency_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        if self.bootstrap_servers:
            from streaming.bounded_send import BoundedSender
            from streaming.kafka_io import create_topics, json_producer

            create_topics(self.bootstrap_servers, [self.topic], settings=self.settings)
            # kafka-python 3 buffers sends without a bound: wait for it past MAX_UNACKED
            self._producer = BoundedSender(
                json_producer(self.bootstrap_servers, self.settings, linger_ms=5), MAX_UNACKED)

    def process(self, keyed: tuple[int, UserStates], written=_written):
        shard, states = keyed
        store = self._stores.get(shard)
        if store is None:
            path = store_path(self.state_dir, shard, self.num_shards) if self.state_dir else None
            store = self._stores[shard] = EmbeddingStore(path)
        store.put(states)
        if self._producer is not None:
            events = user_events(states)
            for i, user in enumerate(states.user_ids):
                self._producer.send(self.topic, key=user,
                                    value=embedding_message(states, i, events[i]))
        emitted = time.time()
        for seconds in emitted - states.first_produced_at:  # per embedding, its oldest event
            metrics.EVENT_TO_EMBEDDING_SECONDS.observe(seconds)
        if self._latency_fd is not None:  # one write per line: writers never interleave
            os.write(self._latency_fd, latency_line(states, emitted))
        metrics.EMBEDDINGS_EMITTED.inc(len(states))
        self._unsaved[shard] = self._unsaved.get(shard, 0) + len(states)
        if states.span.checkpoint:
            store.save()
            written.write((written.read() or 0) + self._unsaved.pop(shard))
        return []

    def teardown(self) -> None:
        for store in getattr(self, "_stores", {}).values():
            store.save()
        if getattr(self, "_producer", None) is not None:
            self._producer.flush()
            self._producer.producer.close()
        if getattr(self, "_latency_fd", None) is not None:
            os.close(self._latency_fd)
            self._latency_fd = None


class WriteEmbeddings(beam.PTransform):
    """Publish user embeddings and keep them in the on-disk store.

    Args:
        bootstrap_servers: Kafka ``host:port`` (``None``: store only, e.g. replay).
        topic: output topic.
        state_dir: where the store files live (``None``: no store).
        num_shards: the shard count (part of the store file names).
        settings: Kafka TLS/SASL settings (:mod:`streaming.kafka_settings`).
        latency_path: append one :func:`latency_line` per emitted batch to this file
            (benchmarks; ``None``: none). The file is data on the workers' filesystem, so the
            records reach the reader from any worker process.
    """

    def __init__(self, bootstrap_servers: str | None = None, topic: str = EMBEDDING_TOPIC,
                 state_dir: str | None = None, num_shards: int = 1,
                 settings: KafkaSettings = PLAINTEXT, latency_path: str | None = None) -> None:
        super().__init__()
        self.fn = _WriteFn(bootstrap_servers, topic, state_dir and str(state_dir), num_shards,
                           settings, latency_path and str(latency_path))

    def expand(self, states):
        return (states
                | "KeyByShard" >> beam.Map(lambda s: (s.shard, s))
                .with_output_types(tuple[int, Any])  # an int key: a deterministic key coder
                | "Write" >> beam.ParDo(self.fn))
