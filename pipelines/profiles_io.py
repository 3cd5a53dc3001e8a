"""``RequestProfiles`` (trigger policy → ``profile-requests``) and ``FuseEmbeddings``.

The pipeline never waits for the LLM: it asks for a profile when a user's history has grown
enough (:class:`ProfileTrigger`) and fuses whatever valid profile it has at the time — the latest
one written from events strictly before the user's newest event, read from the run's checkpoint
and, live, from the ``profile-updates`` topic that the profile worker fills.

Shapes: ``U`` users in a batch, ``E`` embedding width, ``F`` facets, ``T`` text width.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import apache_beam as beam
import numpy as np

from pipelines.elements import UserStates
from pipelines.sources import StopFlag
from streaming import metrics
from streaming.kafka_settings import PLAINTEXT, KafkaSettings

log = logging.getLogger(__name__)

#: Topic the pipeline asks for profiles on, and the one the worker answers on.
REQUEST_TOPIC = "profile-requests"
UPDATE_TOPIC = "profile-updates"


@dataclass(frozen=True)
class ProfileTrigger:
    """Ask for a profile when a user reaches ``first`` events, then every ``every`` more.

    >>> trigger = ProfileTrigger(first=5, every=10)
    >>> trigger.fires(np.array([0, 4, 5, 14, 15]), np.array([3, 5, 9, 15, 24])).tolist()
    [False, True, False, True, False]
    """

    first: int = 5  # fewer purchases say little about a shopper
    every: int = 25  # regenerating costs an LLM call; a profile moves slowly

    def _step(self, count: np.ndarray) -> np.ndarray:
        return np.where(count < self.first, -1, (count - self.first) // self.every)

    def fires(self, before: np.ndarray, after: np.ndarray) -> np.ndarray:
        """``[U]`` bool: the event count went from ``before`` to ``after`` over a threshold."""
        return self._step(after) > self._step(before)


class _RequestProfilesFn(beam.DoFn):
    def __init__(self, bootstrap_servers: str, topic: str, trigger: ProfileTrigger,
                 settings: KafkaSettings) -> None:
        self.bootstrap_servers, self.topic, self.trigger = bootstrap_servers, topic, trigger
        self.settings = settings

    def setup(self) -> None:
        from streaming.kafka_io import create_topics, json_producer

        create_topics(self.bootstrap_servers, [self.topic], settings=self.settings)
        self._producer = json_producer(self.bootstrap_servers, self.settings)

    def process(self, states: UserStates):
        due = np.flatnonzero(self.trigger.fires(states.events_before, states.version))
        now = time.time()
        for i in due:
            self._producer.send(self.topic, key=states.user_ids[i], value={
                "user_id": states.user_ids[i], "ts": float(states.ts[i]),
                "events": int(states.version[i]), "requested_at": now})
        metrics.PROFILE_REQUESTS_SENT.inc(len(due))
        return []

    def teardown(self) -> None:
        self._producer.flush()
        self._producer.close()


class RequestProfiles(beam.PTransform):
    """Publish ``{user_id, ts, events, requested_at}`` to ``profile-requests`` when due.

    Args:
        bootstrap_servers: Kafka ``host:port``.
        topic: request topic.
        trigger: when a user is due for a (new) profile.
        settings: Kafka TLS/SASL settings (:mod:`streaming.kafka_settings`).
    """

    def __init__(self, bootstrap_servers: str, topic: str = REQUEST_TOPIC,
                 trigger: ProfileTrigger | None = None,
                 settings: KafkaSettings = PLAINTEXT) -> None:
        super().__init__()
        self.fn = _RequestProfilesFn(bootstrap_servers, topic, trigger or ProfileTrigger(),
                                     settings)

    def expand(self, states):
        return states | "Publish" >> beam.ParDo(self.fn)


class LiveProfiles:
    """Profile versions keyed by user id string, as a time-correct look-up table.

    Starts from a checkpoint's profile table and takes new versions from ``profile-updates``
    messages (``profiles.store.Profile.to_message``); the look-up table is rebuilt only when
    something new arrived.

    Args:
        user_ids: ``P`` user ids of the initial profiles.
        ts: ``[P]`` last event time each profile saw.
        vectors: ``[P, F, T]`` facet vectors.
    """

    def __init__(self, user_ids: list[str], ts: np.ndarray, vectors: np.ndarray) -> None:
        self._index: dict[str, int] = {}
        self._rows: tuple[list, list, list] = ([], list(ts), list(vectors))
        self._rows[0].extend(self._index.setdefault(u, len(self._index)) for u in user_ids)
        self._lock = threading.Lock()
        self._table = None

    def add(self, message: dict) -> None:
        """Take one ``profile-updates`` message."""
        vectors = np.asarray(message["vectors"], np.float32)
        with self._lock:
            user = str(message["user_id"])
            self._rows[0].append(self._index.setdefault(user, len(self._index)))
            self._rows[1].append(float(message["ts"]))
            self._rows[2].append(vectors)
            self._table = None
        metrics.PROFILE_UPDATES_APPLIED.inc()

    def table(self, num_facets: int, text_dim: int):
        """Every version as a :class:`~tgn.profile_features.ProfileTable` keyed by this object's
        user index (:meth:`index`); the same object until a new version arrives."""
        import torch

        from tgn.profile_features import ProfileTable

        with self._lock:
            if self._table is None:
                self._table = (ProfileTable(torch.tensor(self._rows[0], dtype=torch.long),
                                            torch.tensor(self._rows[1], dtype=torch.float64),
                                            torch.from_numpy(np.stack(self._rows[2])))
                               if self._rows[0] else ProfileTable.empty(num_facets, text_dim))
            return self._table

    def index(self, user_ids: list[str]):
        """``[U]`` int64 user indices of :meth:`table` (a user with no profile gets one that
        holds none)."""
        import torch

        with self._lock:
            known = len(self._index)
            return torch.tensor([self._index.get(u, known) for u in user_ids], dtype=torch.long)

    def lookup(self, user_ids: list[str], t: np.ndarray, num_facets: int, text_dim: int):
        """``ProfileLookup`` (facets ``[U, F, T]``, has_profile ``[U]``) for users at ``t``."""
        import torch

        return self.table(num_facets, text_dim).lookup(self.index(user_ids), torch.from_numpy(t))


class _FuseFn(beam.DoFn):
    def __init__(self, run_dir: str, bootstrap_servers: str | None, topic: str,
                 stop: StopFlag | None, settings: KafkaSettings) -> None:
        self.run_dir, self.bootstrap_servers, self.topic = run_dir, bootstrap_servers, topic
        self.stop, self.settings = stop, settings

    def setup(self) -> None:
        from tgn.dynllm_head import DynLLMHead
        from tgn.run import Run

        model = Run.open(self.run_dir).model().eval()
        head = model.user_head
        self._head = head if isinstance(head, DynLLMHead) else None
        self._stop = threading.Event()
        if self._head is None:
            return
        table = head.profiles
        self._profiles = LiveProfiles(model.users.decode(table.user_index.tolist()),
                                      table.ts.numpy(), table.vectors.numpy())
        # the head reads the live table (keyed by user id, not the run's user index) from now on
        head.set_profiles(self._profiles.table(head.config.num_facets, head.config.text_dim))
        if self.bootstrap_servers:
            threading.Thread(target=self._follow_updates, daemon=True,
                             name="profile-updates").start()

    def _follow_updates(self) -> None:
        import json

        from streaming.kafka_io import TopicReader, create_topics

        create_topics(self.bootstrap_servers, [self.topic], settings=self.settings)
        with TopicReader(self.bootstrap_servers, self.topic, settings=self.settings) as reader:
            while not (self._stop.is_set() or (self.stop is not None and self.stop.is_set())):
                for record in reader.poll(0.5):
                    try:
                        self._profiles.add(json.loads(record.value))
                    except (ValueError, KeyError, TypeError) as exc:
                        log.warning("skipping bad profile update at offset %s: %s",
                                    record.offset, exc)

    def process(self, states: UserStates):
        self._fuse(states)
        states.span = states.span.mark("fuse")
        yield states

    def _fuse(self, states: UserStates) -> None:
        """Set ``states.embedding`` (and facet weights and ``has_profile`` with a head): the
        model's own head (:meth:`tgn.dynllm_head.DynLLMHead.forward`, the path of
        ``model.user_embeddings``), reading the live profile table."""
        import torch

        if self._head is None or len(states) == 0:
            states.embedding = states.temporal
            metrics.FUSIONS_WITHOUT_PROFILE.inc(len(states))
            return
        config = self._head.config
        table = self._profiles.table(config.num_facets, config.text_dim)
        if table is not self._head.profiles:  # new versions: the head folds only those
            self._head.set_profiles(table, appended=True)
        with torch.no_grad():
            self._head(torch.from_numpy(states.temporal), self._profiles.index(states.user_ids),
                       torch.from_numpy(states.ts))
        out = self._head.last
        has = out.has_profile.numpy()
        metrics.FUSIONS_WITHOUT_PROFILE.inc(int((~has).sum()))
        states.embedding = out.embedding.numpy()
        states.facet_weights = out.relevance.numpy()
        states.has_profile = has

    def teardown(self) -> None:
        if hasattr(self, "_stop"):
            self._stop.set()


class FuseEmbeddings(beam.PTransform):
    """Temporal user embeddings → final embeddings and facet weights (DynLLM fusion head).

    A run without a fusion head (plain TGN) passes the temporal embedding through.

    Args:
        run_dir: the trained run (its ``model.pt`` holds the head and the profiles it saw).
        bootstrap_servers: Kafka ``host:port`` to follow ``profile-updates`` (live); ``None``
            fuses with the checkpoint's profiles only (replay).
        topic: the profile update topic.
        stop: ends following ``profile-updates`` when the pipeline stops.
        settings: Kafka TLS/SASL settings (:mod:`streaming.kafka_settings`).
    """

    def __init__(self, run_dir: str, bootstrap_servers: str | None = None,
                 topic: str = UPDATE_TOPIC, stop: StopFlag | None = None,
                 settings: KafkaSettings = PLAINTEXT) -> None:
        super().__init__()
        self.fn = _FuseFn(str(run_dir), bootstrap_servers, topic, stop, settings)

    def expand(self, states):
        return states | "Fuse" >> beam.ParDo(self.fn)
