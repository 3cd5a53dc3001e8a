"""The asynchronous profile worker: ``profile-requests`` → profiles → ``profile-updates``.

Prompts come from the live graph: the worker follows the ``purchases`` topic into its own
:class:`~profiles.graph.PurchaseGraph` (seeded from a dataset, :mod:`profiles.follow`), and
before each batch it reads that topic up to the purchases the requests are about, so a purchase
the pipeline has seen is in the next profile of its household.

A request is a JSON message ``{"user_id": "u7", "ts": 1483272000.0, "new_events": 1}``: the user
bought ``new_events`` lines (default 1), the newest at event time ``ts``; other fields, such as
the pipeline's ``events`` and ``requested_at``, are ignored. The :class:`TriggerPolicy` decides
whether it is due: N new purchases since the last profile, the last profile older than T, or no
profile yet; a request older than the user's last profile never is. The pipeline's
``RequestProfiles`` already thins its requests (after 5 purchases, then every 25), hence the
default N = 1; a sender with one request per purchase should raise it.

Due requests wait in a queue that holds one entry per user (a newer request replaces the older
one) and at most ``max_queue`` users: while the queue drains, nothing more is read
(backpressure). Each batch of users is written (cached prompts cost nothing), stored, and
published as ``profile-updates``.

Delivery: read positions are saved in the profile store only once every request read so far is
done, and after the updates were flushed to the broker and every send succeeded (a batch whose
updates were not delivered stays queued and is retried after the same doubling pause as an LLM
failure; its profiles are stored, so the retry republishes them from the cache). SIGTERM also
interrupts a flush that waits for a broker that is gone, and closing waits at most
``CLOSE_TIMEOUT_S`` for unsent updates. A worker killed mid-batch therefore
re-reads the unfinished requests on restart (at-least-once; repeats hit the cache and the store's
unique key), and no request is lost.

LLM outages: the backend retries each call itself (``HttpBackend``: timeout, backoff); when it
still fails (:class:`~profiles.backends.BackendError`), the batch stays in the queue, the failure
is counted (``dynllm_profile_batch_retries_total``) and the batch is tried again after a pause
that doubles up to ``max_backoff_s``. Nothing is acknowledged meanwhile, so a worker stopped
during an outage re-reads the requests on restart. The pipeline does not wait: fusion keeps the
last profile it received for each user.
"""

from __future__ import annotations

import json
import logging
import signal
import time
from dataclasses import dataclass, field

from profiles.backends import BackendError
from profiles.follow import PURCHASES_TOPIC, PurchaseFollower
from profiles.graph import PurchaseGraph
from profiles.store import ProfileStore
from profiles.writer import ProfileWriter
from streaming import metrics
from streaming.kafka_io import TopicReader, create_topics, json_producer
from streaming.kafka_settings import PLAINTEXT, KafkaSettings

log = logging.getLogger(__name__)

REQUESTS_TOPIC = "profile-requests"
UPDATES_TOPIC = "profile-updates"
#: Longest wait for unsent updates when the worker stops (they are re-sent after a restart:
#: their requests are not acknowledged).
CLOSE_TIMEOUT_S = 5.0


class StopRequested(Exception):
    """Raised by the SIGTERM handler to abandon the batch being written."""


@dataclass(frozen=True)
class Request:
    """A parsed profile request."""

    user_id: str
    ts: float
    new_events: int = 1


def parse_request(value: bytes | None) -> Request | None:
    """The request in a message value, or ``None`` if it is not one.

    >>> parse_request(b'{"user_id": "7", "ts": 5}')
    Request(user_id='7', ts=5.0, new_events=1)
    >>> parse_request(b'{"ts": 5}') is None
    True
    """
    try:
        data = json.loads(value or b"")
        return Request(str(data["user_id"]), float(data["ts"]), int(data.get("new_events", 1)))
    except (ValueError, KeyError, TypeError):
        return None


@dataclass
class TriggerPolicy:
    """When a user's profile is due for regeneration.

    Args:
        min_new_events: Regenerate after this many purchase lines since the last profile.
        max_age_s: ... or when the last profile is this much older (event time) than the request.
    """

    min_new_events: int = 1
    max_age_s: float = 7 * 86400.0
    _pending: dict[str, int] = field(default_factory=dict)
    _last_ts: dict[str, float] = field(default_factory=dict)

    def observe(self, request: Request, store: ProfileStore) -> bool:
        """Count the request's purchases; True if the user's profile is now due."""
        user = request.user_id
        if user not in self._last_ts:
            latest = store.latest(user)
            self._last_ts[user] = latest.ts if latest else float("-inf")
        if request.ts < self._last_ts[user]:  # the last profile already saw newer events
            return False
        self._pending[user] = self._pending.get(user, 0) + request.new_events
        return (self._pending[user] >= self.min_new_events
                or request.ts - self._last_ts[user] >= self.max_age_s)

    def done(self, user_id: str, ts: float) -> None:
        """A profile from events up to ``ts`` was written for ``user_id``."""
        self._pending[user_id] = 0
        self._last_ts[user_id] = max(ts, self._last_ts.get(user_id, float("-inf")))


class ProfileWorker:
    """Consumes requests, writes profiles, publishes updates.

    Args:
        bootstrap_servers: Kafka ``host:port``.
        graph: The purchase history the prompts are built from (seeded); it grows with every
            valid event of ``purchases_topic``.
        writer: Model + embedder + store.
        policy: The trigger policy.
        hops: 2 for graph-aware prompts, 1 for own history only.
        batch_size: Users per generation batch.
        max_queue: Most queued users (backpressure bound).
        backoff_s: First pause after a batch failed on the backend; doubles per failure.
        max_backoff_s: Longest pause between tries of a failing batch.
        purchases_topic: The purchases topic the graph follows.
        sync_timeout_s: Longest wait, per batch, for the purchases its requests are about to
            reach the graph (they are on the topic before the request; this covers read lag).
        settings: Kafka TLS/SASL settings of its clients (:mod:`streaming.kafka_settings`).
    """

    def __init__(self, bootstrap_servers: str, graph: PurchaseGraph, writer: ProfileWriter,
                 policy: TriggerPolicy, hops: int = 2, batch_size: int = 8,
                 max_queue: int = 64, backoff_s: float = 1.0, max_backoff_s: float = 60.0,
                 purchases_topic: str = PURCHASES_TOPIC, sync_timeout_s: float = 2.0,
                 settings: KafkaSettings = PLAINTEXT) -> None:
        self.graph, self.writer, self.store = graph, writer, writer.store
        self.sync_timeout_s = sync_timeout_s
        self.policy, self.hops = policy, hops
        self.batch_size, self.max_queue = batch_size, max_queue
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self._failures = 0  # consecutive batches the backend failed
        create_topics(bootstrap_servers, [REQUESTS_TOPIC, UPDATES_TOPIC], settings=settings)
        self.follower = PurchaseFollower(bootstrap_servers, graph, purchases_topic,
                                         settings=settings)
        self.reader = TopicReader(bootstrap_servers, REQUESTS_TOPIC,
                                  offsets=self.store.offsets(REQUESTS_TOPIC), max_batch=max_queue,
                                  settings=settings)
        self.producer = json_producer(bootstrap_servers, settings)
        self.queue: dict[str, Request] = {}
        self.stopping = False
        self._writing = False  # a batch is being written or published: SIGTERM interrupts it

    def _enqueue(self, records: list) -> None:
        for record in records:
            request = parse_request(record.value)
            if request is None:
                metrics.PROFILES_FAILED.labels(reason="bad_request").inc()
                log.warning("skipping malformed request at offset %s", record.offset)
            elif self.policy.observe(request, self.store):
                old = self.queue.get(request.user_id)
                if old is None or request.ts > old.ts:
                    self.queue[request.user_id] = request
                metrics.PROFILE_REQUESTS_QUEUED.inc()
        metrics.PROFILE_QUEUE_LENGTH.set(len(self.queue))

    def _process_batch(self) -> None:
        users = list(self.queue)[: self.batch_size]
        self.follower.catch_up()
        deadline = time.monotonic() + self.sync_timeout_s
        contexts = []
        for user in users:
            request = self.queue[user]
            if not self.follower.wait_for(user, request.ts,
                                          max(0.0, deadline - time.monotonic())):
                log.warning("purchase of user %s at %s not on %s yet; profiling what is there",
                            user, request.ts, self.follower.reader.topic)
            try:
                contexts.append(self.graph.context(user, request.ts, self.hops))
            except KeyError:
                metrics.PROFILES_FAILED.labels(reason="unknown_user").inc()
                log.warning("user %s has no history up to %s; request dropped", user, request.ts)
                del self.queue[user]
        self._writing = True
        try:
            profiles = self.writer.write(contexts, self.hops) if contexts else []
        except BackendError as exc:
            self._writing = False
            self._back_off(f"LLM backend failed ({exc})")
            return  # the batch stays queued, its requests unacknowledged
        self._failures = 0
        try:  # a flush can wait for a broker that is gone: SIGTERM still stops here
            sent = [self.producer.send(UPDATES_TOPIC, key=p.user_id, value=p.to_message())
                    for p in profiles]
            self.producer.flush()
        finally:
            self._writing = False
        failed = [f.exception for f in sent if f.failed()]
        if failed:  # not delivered: keep the batch (stored profiles are republished from cache)
            self._back_off(f"{len(failed)} of {len(sent)} profile updates not delivered "
                           f"({failed[0]})")
            return
        for profile in profiles:
            self.policy.done(profile.user_id, profile.ts)
        for user in users:
            self.queue.pop(user, None)
        metrics.PROFILE_QUEUE_LENGTH.set(len(self.queue))

    def _back_off(self, error: str) -> None:
        """Count a failed batch and pause (doubling, capped), waking up early on SIGTERM."""
        self._failures += 1
        metrics.PROFILE_BATCH_RETRIES.inc()
        pause = min(self.max_backoff_s, self.backoff_s * 2 ** (self._failures - 1))
        log.warning("%s; %d queued users kept, next try in %.1fs", error, len(self.queue),
                    pause)
        deadline = time.monotonic() + pause
        while not self.stopping and time.monotonic() < deadline:
            time.sleep(min(0.1, pause))

    def _on_sigterm(self, *_: object) -> None:
        """Stop after the current step; a batch in generation (minutes on a CPU) or waiting for
        the broker to take its updates is abandoned."""
        self.stopping = True
        if self._writing:
            raise StopRequested

    def run(self, idle_exit_s: float | None = None) -> None:
        """Serve until SIGTERM/SIGINT (or ``idle_exit_s`` without requests).

        SIGTERM during a batch abandons it at once: its requests are not acknowledged, so a
        restarted worker writes them again (a profile already stored is republished from the
        cache).
        """
        signal.signal(signal.SIGTERM, self._on_sigterm)
        try:
            self._serve(idle_exit_s)
        except StopRequested:
            log.info("stopped mid-batch; %d queued users will be re-read on restart",
                     len(self.queue))
        self.close()

    def _serve(self, idle_exit_s: float | None) -> None:
        last_work = time.monotonic()
        while not self.stopping:
            records = self.reader.poll(0.5)
            self.follower.catch_up()  # keep the graph current while idle, too
            self._enqueue(records)
            while self.queue and not self.stopping:  # drain before reading more (backpressure)
                self._process_batch()
            if not self.queue:  # every request read so far is done: safe to resume from here
                self.store.save_offsets(REQUESTS_TOPIC, self.reader.positions)
            if records:
                last_work = time.monotonic()
            elif idle_exit_s is not None and time.monotonic() - last_work > idle_exit_s:
                break

    def close(self) -> None:
        """Flush (at most ``CLOSE_TIMEOUT_S``: the broker may be gone) and close the Kafka
        connections."""
        from kafka.errors import KafkaTimeoutError

        try:
            self.producer.close(timeout=CLOSE_TIMEOUT_S)
        except KafkaTimeoutError:  # kafka-python raises instead of dropping what is unsent
            log.warning("profile updates still unsent after %.0f s (broker gone?); their "
                        "requests are re-read on restart", CLOSE_TIMEOUT_S)
        self.reader.close()
        self.follower.close()
