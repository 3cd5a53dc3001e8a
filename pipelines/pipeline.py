"""Wire the composites into one pipeline, live (Kafka) or replay (a dataset's log).

::

    ReadPurchases → ParseAndValidate ──(dead letters)──► WriteDeadLetters
                          │
                          ▼
                   SealMicroBatches ──(late events)──► WriteDeadLetters
                          │
                          ▼
                   UpdateGraphMemory ──► RequestProfiles (live)
                          │
                          ▼
                   FuseEmbeddings → WriteEmbeddings

Live and replay differ only in the source and in where side outputs go; the transforms are the
same objects. Runner: the in-process FnApiRunner unless ``--runner`` is given in the Beam
arguments (see ``docs/pipeline.md``). A live pipeline whose input topic is recreated under it
(a memory-only broker restarted) checkpoints and runs again on the new log
(:mod:`pipelines.outages`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import apache_beam as beam
import numpy as np
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from pipelines.elements import BATCH_EVENTS
from pipelines.memory import UpdateGraphMemory
from pipelines.outages import prepare_input_log
from pipelines.outputs import WriteEmbeddings
from pipelines.parse import DEAD_LETTERS, ParseAndValidate, WriteDeadLetters
from pipelines.profiles_io import FuseEmbeddings, RequestProfiles
from pipelines.sources import CheckpointPolicy, ReadPurchases, StopFlag
from pipelines.state import (
    check_shard_count,
    resume_frontier,
    resume_positions,
)
from pipelines.watermark import LATE_EVENTS, BatchRule, SealMicroBatches
from streaming.kafka_settings import PLAINTEXT, KafkaSettings

log = logging.getLogger(__name__)


@dataclass
class PipelineConfig:
    """What a pipeline run reads, where its state lives and how it is split.

    Attributes:
        run_dir: trained run directory (``model.pt``).
        state_dir: shard checkpoints and embedding stores (``None``: keep nothing).
        shards: how many shards split the users.
        bootstrap_servers: Kafka ``host:port`` (live); ``None`` for a replay.
        kafka_settings: TLS/SASL settings of every Kafka client of the run (live).
        topic: purchases topic (live).
        log_path: ``events.parquet`` to replay.
        stop_row: replay rows before this one only.
        cut_row: replay batches restart at this row (where evaluated events start).
        dead_letter_path: JSONL file for dead letters of a replay.
        fresh_state: start from empty memory (a replay from the beginning of the log).
        evaluate_to: JSON file for test-then-update metrics (replay, one shard).
        test_from: event time where evaluated events start.
        max_batch: most events per batch.
        checkpoint_events: checkpoint at least every this many events...
        checkpoint_seconds: ... or this many seconds.
        call_seconds: how long one call of the live reader polls before it lets the runner
            finish the bundle (per-bundle cost against the runner's end-of-bundle pause).
        request_profiles: publish profile requests (live).
        batch_events: most events in a micro-batch (:class:`~pipelines.watermark.BatchRule`).
        batch_window_s: a micro-batch never spans more event time than this.
        lateness_s: how far behind its partition's newest event an event may be and still
            be applied (the watermark waits this long in event time).
        idle_seconds: a caught-up partition without records for this long (wall clock) stops
            holding the watermark back; all idle: the open micro-batches are sealed.
        latency_log: append a latency record per emitted batch to this JSONL file
            (``dynllm bench pipeline``; :func:`~pipelines.outputs.read_latency_log`).
        threads: torch threads of every worker that applies the memory (``None``: leave the
            worker's as they are); travels with the pipeline, so a portable runner's SDK
            workers get the ``--threads`` the command was given.
    """

    run_dir: str
    state_dir: str | None = None
    shards: int = 1
    bootstrap_servers: str | None = None
    kafka_settings: KafkaSettings = PLAINTEXT
    topic: str = "purchases"
    log_path: str | None = None
    stop_row: int | None = None
    cut_row: int | None = None
    dead_letter_path: str | None = None
    fresh_state: bool = False
    evaluate_to: str | None = None
    test_from: float = -np.inf
    max_batch: int = 2000
    checkpoint_events: int = 50_000
    checkpoint_seconds: float = 30.0
    call_seconds: float = 0.25
    request_profiles: bool = True
    batch_events: int = BATCH_EVENTS
    batch_window_s: float = 86400.0
    lateness_s: float = 0.0
    idle_seconds: float = 1.0
    latency_log: str | None = None
    threads: int | None = None

    @property
    def rule(self) -> BatchRule:
        """How events are cut into micro-batches; an evaluating replay keeps the evaluator's
        batches (one per batch read)."""
        return BatchRule(None if self.evaluate_to else self.batch_events, self.batch_window_s,
                         self.lateness_s)

    @property
    def live(self) -> bool:
        """Reading Kafka rather than a log."""
        return self.bootstrap_servers is not None


def build(pipeline: beam.Pipeline, config: PipelineConfig, stop: StopFlag,
          topic_id: str | None = None) -> None:
    """Add the transforms of ``config`` to ``pipeline`` (``topic_id``: the live input topic's id,
    kept in the checkpoints)."""
    frontier = resume_frontier(config.state_dir, config.shards, config.rule)
    positions = (frontier.resume if frontier is not None
                 else resume_positions(config.state_dir, config.shards))
    if positions:
        log.info("resuming from checkpointed positions %s", positions)
    policy = CheckpointPolicy(config.checkpoint_events, config.checkpoint_seconds)
    raw = pipeline | "ReadPurchases" >> ReadPurchases(
        bootstrap_servers=config.bootstrap_servers, topic=config.topic, positions=positions,
        log_path=config.log_path, stop_row=config.stop_row, cut_row=config.cut_row, stop=stop,
        max_batch=config.max_batch, call_s=config.call_seconds, policy=policy,
        state_dir=config.state_dir, idle_s=config.idle_seconds, settings=config.kafka_settings)
    parsed = raw | "ParseAndValidate" >> ParseAndValidate(state_dir=config.state_dir,
                                                          num_shards=config.shards,
                                                          start=positions)
    sealed = parsed.events | "SealMicroBatches" >> SealMicroBatches(config.rule, frontier)
    dlq_path = None if config.live else config.dead_letter_path
    if config.live or dlq_path:
        _ = ((parsed[DEAD_LETTERS], sealed[LATE_EVENTS]) | "AllDeadLetters" >> beam.Flatten()
             | "WriteDeadLetters" >> WriteDeadLetters(config.bootstrap_servers, dlq_path,
                                                      config.kafka_settings))
    states = sealed.events | "UpdateGraphMemory" >> UpdateGraphMemory(
        config.run_dir, config.state_dir, config.shards, config.fresh_state,
        config.evaluate_to, config.test_from, topic_id, config.threads)
    if config.live and config.request_profiles:
        _ = states | "RequestProfiles" >> RequestProfiles(config.bootstrap_servers,
                                                          settings=config.kafka_settings)
    _ = (states
         | "FuseEmbeddings" >> FuseEmbeddings(config.run_dir, config.bootstrap_servers, stop=stop,
                                              settings=config.kafka_settings)
         | "WriteEmbeddings" >> WriteEmbeddings(config.bootstrap_servers,
                                                state_dir=config.state_dir,
                                                num_shards=config.shards,
                                                settings=config.kafka_settings,
                                                latency_path=config.latency_log))


def run_pipeline(config: PipelineConfig, stop: StopFlag | None = None,
                 beam_args: Sequence[str] = ()) -> None:
    """Build and run the pipeline until the log ends (replay) or ``stop`` is set (live).

    A live run restarts itself on a recreated input topic, after moving the checkpointed
    positions to the start of the new log; it does the same when it starts on checkpoints taken
    on another log of the topic (:func:`~pipelines.outages.prepare_input_log`).

    Args:
        config: what to run.
        stop: ends a live run cleanly (drain, checkpoint); a new flag if ``None``.
        beam_args: runner arguments, e.g. ``["--runner", "FlinkRunner", ...]``.
    """
    stop = stop or StopFlag()
    if config.state_dir:
        check_shard_count(config.state_dir, config.shards)
    while True:
        # finishes a reset the reader marked (or a crash interrupted), or finds one from before
        topic_id = prepare_input_log(config.state_dir, config.shards, config.bootstrap_servers,
                                     config.topic, config.kafka_settings)
        _run_once(config, stop, beam_args, topic_id)
        if not stop.restart_pending():
            return
        stop.rearm()
        log.warning("restarting the pipeline on the new log of %s", config.topic)


def _run_once(config: PipelineConfig, stop: StopFlag, beam_args: Sequence[str],
              topic_id: str | None) -> None:
    options = PipelineOptions(list(beam_args))
    runner = options.view_as(StandardOptions).runner
    if runner is None:  # Prism would try to download its binary; run in this process instead
        from apache_beam.runners.portability.fn_api_runner import FnApiRunner

        from pipelines.beam_patches import bound_runner_metrics

        bound_runner_metrics()  # else its metrics keep every bundle of the stream alive
        runner = FnApiRunner()
    with beam.Pipeline(runner=runner, options=options) as pipeline:
        build(pipeline, config, stop, topic_id)
