"""Every Prometheus metric of dynllm, declared once, grouped by the process that updates it.

Three long-running processes expose ``/metrics`` (ports agreed in ``deploy/README.md``):

* the **pipeline** (``dynllm run ...``) on :data:`PIPELINE_PORT` (9100),
* the **profile worker** (``dynllm worker ...``) on :data:`WORKER_PORT` (9101),
* the **server** (``dynllm serve ...``) at ``/metrics`` on its HTTP port :data:`SERVER_PORT`
  (8080).

All metrics live in prometheus-client's default registry, so every process exposes the whole set;
a metric a process never touches stays at zero there (labelled ones have no series at all), and
queries select a process with the ``job`` label that Prometheus adds. ``dynllm monitor`` runs a
local Prometheus scraping all three. Names follow the Prometheus
conventions (https://prometheus.io/docs/practices/naming/): the ``dynllm_`` prefix, base units
(seconds, bytes), counters exposed with ``_total`` (prometheus-client appends it), histograms as
``_bucket``/``_sum``/``_count``. Labels carry only low-cardinality values (stage, reason, topic,
partition, HTTP handler and code), never user or item ids.

Usage in a process::

    from streaming import metrics

    metrics.process_info("pipeline", model_id="tgn:ckpt-2017w26")
    metrics.start_metrics_server(metrics.PIPELINE_PORT)
    metrics.EVENTS_CONSUMED.inc(len(batch))
    with metrics.MEMORY_UPDATE_SECONDS.time():
        ...
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from importlib.metadata import PackageNotFoundError, version
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
    start_http_server,
)
from prometheus_client.metrics import MetricWrapperBase

#: Default ``/metrics`` port of the pipeline process.
PIPELINE_PORT = 9100
#: Default ``/metrics`` port of the profile worker.
WORKER_PORT = 9101
#: Default HTTP port of the recommendation server, which serves ``/metrics`` itself.
SERVER_PORT = 8080
#: Environment variable naming the address :func:`start_metrics_server` binds by default.
ADDR_ENV = "DYNLLM_METRICS_ADDR"

# Bucket boundaries, in base units. Each covers the range seen on a 2-core CPU machine with room
# above it, so slow runs still land in a finite bucket.
FAST_SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
END_TO_END_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                      120.0)
LLM_SECONDS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
BATCH_EVENTS = (1, 10, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000)
_MINUTE, _HOUR, _DAY = 60.0, 3600.0, 86400.0
STALENESS_SECONDS = (_MINUTE, 10 * _MINUTE, _HOUR, 6 * _HOUR, _DAY, 3 * _DAY, 7 * _DAY, 14 * _DAY,
                     30 * _DAY, 90 * _DAY)

# --------------------------------------------------------------------------------------------
# Pipeline (ReadPurchases → ParseAndValidate → UpdateGraphMemory → FuseEmbeddings → Write...)
# --------------------------------------------------------------------------------------------

EVENTS_CONSUMED = Counter(
    "dynllm_events_consumed", "Records read from the source (Kafka topic or replay log). "
    "Pipeline: ReadPurchases, before validation.")
EVENTS_VALID = Counter(
    "dynllm_events_valid", "Records that passed validation. Pipeline: ParseAndValidate.")
EVENTS_DEAD_LETTERED = Counter(
    "dynllm_events_dead_lettered", "Records sent to the dead-letter topic, by validation reason "
    "(streaming.validation.Reason). Pipeline: ParseAndValidate.", ["reason"])
CONSUMER_LAG = Gauge(
    "dynllm_consumer_lag_messages", "Messages between the consumer position and the partition's "
    "end offset. Pipeline: ReadPurchases, per assigned partition.", ["topic", "partition"])
KAFKA_UP = Gauge(
    "dynllm_kafka_up", "1 while the source broker accepts connections, 0 from the first failed "
    "check (reads came back empty and a TCP connect failed) until it does again. "
    "Pipeline: ReadPurchases.")
KAFKA_OUTAGES = Counter(
    "dynllm_kafka_outages", "Times the source broker became unreachable; reading pauses and "
    "kafka-python reconnects with backoff. Pipeline: ReadPurchases.")
SOURCE_LOG_RESETS = Counter(
    "dynllm_source_log_resets", "Times the input topic was found recreated (its topic id "
    "changed: a memory-only broker restarted, or the topic was deleted); the pipeline "
    "checkpoints, restarts from the start of the new log and the old log's unread records are "
    "lost. Pipeline: ReadPurchases.", ["topic"])
EVENTS_SEALED = Counter(
    "dynllm_watermark_events", "Valid events the watermark stage decided on: sealed into a "
    "micro-batch, dead-lettered as late, or skipped as already applied (read again after a "
    "restart). Pipeline: SealMicroBatches.", ["outcome"])
EVENTS_WAITING = Gauge(
    "dynllm_events_waiting_for_watermark", "Valid events read but not yet sealed into a "
    "micro-batch (their batch is still open). Pipeline: SealMicroBatches.")
WATERMARK = Gauge(
    "dynllm_watermark_timestamp_seconds", "Event-time watermark (Unix seconds): every event "
    "older than it has been read. Pipeline: SealMicroBatches.")
LAST_EVENT_TIMESTAMP = Gauge(
    "dynllm_last_event_timestamp_seconds", "Event time (Unix seconds) of the newest event "
    "applied to the graph memory. Pipeline: UpdateGraphMemory.")
MEMORY_UPDATE_BATCH_EVENTS = Histogram(
    "dynllm_memory_update_batch_events", "Events in each memory-update micro-batch. "
    "Pipeline: UpdateGraphMemory.", buckets=BATCH_EVENTS)
MEMORY_UPDATE_SECONDS = Histogram(
    "dynllm_memory_update_seconds", "Wall-clock time of one memory-update micro-batch. "
    "Pipeline: UpdateGraphMemory.", buckets=FAST_SECONDS)
EVENT_TO_EMBEDDING_SECONDS = Histogram(
    "dynllm_event_to_embedding_seconds", "Wall-clock time from reading an event to writing the "
    "user embedding it produced. Pipeline: WriteEmbeddings.", buckets=END_TO_END_SECONDS)
EMBEDDINGS_EMITTED = Counter(
    "dynllm_embeddings_emitted", "User embeddings written to the output topic/store. "
    "Pipeline: WriteEmbeddings.")
FUSIONS_WITHOUT_PROFILE = Counter(
    "dynllm_fusions_without_profile", "Embeddings fused with no LLM profile for the user yet "
    "(temporal part only). Pipeline: FuseEmbeddings.")
PROFILE_STALENESS_SECONDS = Histogram(
    "dynllm_profile_staleness_seconds", "Age of the profile used at fusion, in event time: the "
    "event's time minus the time of the newest event the profile was written from. "
    "Pipeline: FuseEmbeddings.", buckets=STALENESS_SECONDS)
PROFILE_REQUESTS_SENT = Counter(
    "dynllm_profile_requests_sent", "Profile requests published to the profile-requests topic. "
    "Pipeline: RequestProfiles.")
PROFILE_UPDATES_APPLIED = Counter(
    "dynllm_profile_updates_applied", "Profiles read from the profile-updates topic into the "
    "fusion store. Pipeline: FuseEmbeddings.")

# --------------------------------------------------------------------------------------------
# Profile worker (profile-requests → prompt → LLM → facets → text embeddings → profile-updates)
# --------------------------------------------------------------------------------------------

PROFILE_REQUESTS_QUEUED = Counter(
    "dynllm_profile_requests_queued", "Profile requests accepted into the worker's queue. "
    "Profile worker.")
PROFILE_QUEUE_LENGTH = Gauge(
    "dynllm_profile_queue_length", "Profile requests waiting in the worker's queue. "
    "Profile worker.")
PROFILE_GRAPH_EVENTS = Counter(
    "dynllm_profile_graph_events", "Records of the purchases topic read by the worker into its "
    "purchase graph, by outcome: added, in_seed (older than the seed dataset's end), or the "
    "dead-letter reason it was skipped for (the pipeline dead-letters those). Profile worker.",
    ["outcome"])
PROFILES_GENERATED = Counter(
    "dynllm_profiles_generated", "Profiles written by the LLM and published. Profile worker.")
PROFILES_FAILED = Counter(
    "dynllm_profiles_failed", "Profile requests given up after retries, by reason (e.g. "
    "llm_error, timeout, parse_error, ungrounded). Profile worker.", ["reason"])
PROFILE_CACHE_HITS = Counter(
    "dynllm_profile_cache_hits", "Profile requests answered from the cache without calling the "
    "LLM. Profile worker.")
LLM_RETRIES = Counter(
    "dynllm_llm_retries", "LLM calls repeated after an error or unusable answer. Profile worker.")
LLM_ERRORS = Counter(
    "dynllm_llm_errors", "Failed LLM endpoint attempts, by kind (timeout, http_5xx, http_429, "
    "connection); each is retried with backoff. Profile worker (HttpBackend).", ["kind"])
PROFILE_BATCH_RETRIES = Counter(
    "dynllm_profile_batch_retries", "Batches put back in the queue because the LLM backend "
    "still failed after its own retries; tried again after a growing pause, and their requests "
    "stay unacknowledged until done. Profile worker.")
LLM_REQUEST_SECONDS = Histogram(
    "dynllm_llm_request_seconds", "Wall-clock time of one LLM generation call (a whole batch "
    "for batched backends). Profile worker.", buckets=LLM_SECONDS)
LLM_PROMPT_TOKENS = Counter(
    "dynllm_llm_prompt_tokens", "Prompt tokens sent to the LLM. Profile worker.")
LLM_GENERATED_TOKENS = Counter(
    "dynllm_llm_generated_tokens", "Tokens generated by the LLM (rate = tokens/s). "
    "Profile worker.")

# --------------------------------------------------------------------------------------------
# Server (GET /recommend, /metrics)
# --------------------------------------------------------------------------------------------

HTTP_REQUESTS = Counter(
    "dynllm_http_requests", "HTTP requests answered, by route template and status code. "
    "Server.", ["handler", "code"])
HTTP_REQUEST_SECONDS = Histogram(
    "dynllm_http_request_duration_seconds", "Wall-clock time to answer an HTTP request, by route "
    "template. Server.", ["handler"], buckets=FAST_SECONDS)
EMBEDDING_STORE_USERS = Gauge(
    "dynllm_embedding_store_users", "Users with an embedding in the store being served. Server.")

# --------------------------------------------------------------------------------------------
# Every process
# --------------------------------------------------------------------------------------------

CHECKPOINT_TIMESTAMP = Gauge(
    "dynllm_checkpoint_timestamp_seconds", "Unix time the checkpoint in use was written (the "
    "pipeline sets it on each save, pipeline and server on load); checkpoint age = time() - "
    "value. Pipeline, server.")
PROCESS_INFO = Info(
    "dynllm_process", "Constant 1 with the process role, dynllm version and model ids as labels. "
    "Every process, via process_info().")


def _package_version() -> str:
    try:
        return version("dynllm")
    except PackageNotFoundError:  # running from a source tree
        return "0+unknown"


def process_info(role: str, model_id: str = "", **extra: str) -> None:
    """Set ``dynllm_process_info{role, version, model_id, ...} 1`` for this process.

    Args:
        role: ``"pipeline"``, ``"worker"`` or ``"server"``.
        model_id: The model in use (checkpoint name, LLM id); empty when none.
        **extra: Further constant labels, e.g. ``embedder="all-MiniLM-L6-v2"``.
    """
    PROCESS_INFO.info({"role": role, "version": _package_version(), "model_id": model_id,
                       **extra})


def init_label_values(metric: MetricWrapperBase, label: str, values: Iterable[str]) -> None:
    """Create the series of a one-label metric at zero, so ``rate()`` sees it before it moves.

    Args:
        metric: A metric declared with the single label ``label``.
        label: The label name, e.g. ``"reason"``.
        values: The known values, e.g. ``streaming.validation.Reason``.

    >>> rejected = Counter("rejected", "example", ["reason"], registry=None)
    >>> init_label_values(rejected, "reason", ["bad_json", "bad_id"])
    >>> samples = rejected.collect()[0].samples
    >>> sorted(s.labels["reason"] for s in samples if s.name == "rejected_total")
    ['bad_id', 'bad_json']
    """
    for value in values:
        metric.labels(**{label: str(value)})


def start_metrics_server(port: int, addr: str | None = None) -> WSGIServer:
    """Serve ``/metrics`` of the default registry from a daemon thread.

    Args:
        port: TCP port; 0 picks a free one (read it back from ``server.server_port``).
        addr: Address to bind. ``None`` reads :data:`ADDR_ENV` (``DYNLLM_METRICS_ADDR``, set to
            ``0.0.0.0`` in the containers of ``deploy/docker-compose.yml``) and falls back to
            loopback, so nothing is exposed beyond the machine unless asked for.

    Returns:
        The running server; ``server.shutdown()`` stops it.
    """
    server, _thread = start_http_server(port, addr or os.environ.get(ADDR_ENV, "127.0.0.1"))
    return server



def exposition() -> tuple[bytes, str]:
    """The text exposition of every metric and its content type, for a server's ``/metrics``.

    Returns:
        ``(body, content_type)`` to send with status 200.
    """
    return generate_latest(), CONTENT_TYPE_LATEST
