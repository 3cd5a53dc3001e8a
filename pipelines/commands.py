"""Subcommands of the ``pipelines`` room: ``run`` (live), ``replay``, ``serve``, ``bench pipeline``.

Everything after ``--`` goes to Beam as runner options, e.g.
``dynllm run ... -- --runner FlinkRunner --flink_master localhost:8081`` (see docs/pipeline.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import threading
from pathlib import Path

from pipelines.elements import BATCH_EVENTS
from streaming.arg_types import non_negative_float, positive_float, positive_int
from streaming.errors import UsageError
from streaming.kafka_settings import add_kafka_options, settings_from_args
from tgn.run import Run

log = logging.getLogger(__name__)


def _beam_args(args: argparse.Namespace) -> list[str]:
    extra = list(args.beam_args or [])
    return extra[1:] if extra[:1] == ["--"] else extra


def _batching(args: argparse.Namespace) -> dict:
    """The micro-batch rule's settings (``PipelineConfig`` fields)."""
    return {"batch_events": args.batch_events, "batch_window_s": args.batch_window,
            "lateness_s": args.allowed_lateness}


def _run(args: argparse.Namespace) -> int:
    import torch

    from pipelines.pipeline import PipelineConfig, run_pipeline
    from pipelines.sources import StopFlag
    from streaming import metrics

    Run.open(args.run)  # a clear error before anything starts
    kafka_settings = settings_from_args(args)
    torch.set_num_threads(args.threads)
    metrics.process_info("pipeline", model_id=str(Path(args.run).resolve()))
    server = metrics.start_metrics_server(args.metrics_port)
    stop = StopFlag(args.stop_dir)

    def request_stop(signum: int, _frame: object) -> None:
        log.info("%s: draining, checkpointing and stopping", signal.Signals(signum).name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, request_stop)
    config = PipelineConfig(
        run_dir=args.run, state_dir=args.state_dir, shards=args.shards,
        bootstrap_servers=args.bootstrap_servers, kafka_settings=kafka_settings,
        topic=args.topic, max_batch=args.max_batch,
        checkpoint_events=args.checkpoint_events, checkpoint_seconds=args.checkpoint_seconds,
        request_profiles=not args.no_profile_requests, idle_seconds=args.idle_seconds,
        threads=args.threads, **_batching(args))
    log.info("pipeline reading %s from %s (%s); /metrics on port %d", args.topic,
             args.bootstrap_servers, kafka_settings.describe(), server.server_port)
    try:
        run_pipeline(config, stop, _beam_args(args))
    finally:
        server.shutdown()
    log.info("pipeline stopped cleanly")
    return 0


def _replay(args: argparse.Namespace) -> int:
    import numpy as np
    import pyarrow.parquet as pq
    import torch

    from pipelines.pipeline import PipelineConfig, run_pipeline
    from streaming.dataset import Dataset

    Run.open(args.run)  # a clear error before anything starts
    torch.set_num_threads(args.threads)
    data = Dataset.load(args.data)
    log_path = str(Path(args.data) / "events.parquet")
    evaluate_to = args.json if args.evaluate else None
    if args.evaluate and not evaluate_to:
        evaluate_to = str(Path(args.state_dir or args.run) / "replay-evaluation.json")
    test_from = data.meta["split"]["val_end"] if args.evaluate else -np.inf
    ts = pq.read_table(log_path, columns=["ts"]).column("ts").to_numpy()
    config = PipelineConfig(
        run_dir=args.run, state_dir=args.state_dir, shards=args.shards, log_path=log_path,
        cut_row=int(np.searchsorted(ts, test_from)) if args.evaluate else None,
        dead_letter_path=args.dead_letters, fresh_state=True, evaluate_to=evaluate_to,
        test_from=test_from, max_batch=args.batch_size, threads=args.threads,
        **_batching(args))
    if args.evaluate and args.shards != 1:
        raise UsageError("--evaluate needs --shards 1 (every candidate scored from one state)")
    if args.evaluate and args.state_dir and any(Path(args.state_dir).glob("shard-*.pt")):
        raise UsageError(f"--evaluate replays from the start: {args.state_dir} already holds "
                         "checkpoints (use an empty --state-dir)")
    run_pipeline(config, beam_args=_beam_args(args))
    if evaluate_to:
        results = json.loads(Path(evaluate_to).read_text())
        keys = ("recall@10", "recall@20", "recall@50", "ndcg@20", "mrr", "explore/recall@20")
        print("  ".join(f"{k} {results[k]:.4f}" for k in keys))
        print(f"all metrics: {evaluate_to}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    import torch

    from pipelines.server import Recommender, make_server
    from streaming import metrics

    Run.open(args.run)  # a clear error before anything starts
    kafka_settings = settings_from_args(args)
    torch.set_num_threads(args.threads)
    metrics.process_info("server", model_id=str(Path(args.run).resolve()))
    recommender = Recommender(args.run, args.state_dir, args.data, args.bootstrap_servers,
                              args.topic, kafka_settings).start()
    server = make_server(recommender, args.host, args.port)
    # shutdown() waits for serve_forever() to return: call it off the main thread
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    log.info("serving http://%s:%d/recommend?user=ID&k=10 (and /healthz, /metrics, "
             "/openapi.json)%s", args.host, server.server_port,
             f"; following {args.topic} on {args.bootstrap_servers}"
             if args.bootstrap_servers else "")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        recommender.close()
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``run``, ``replay`` and ``serve``."""
    run = commands.add_parser("run", help="live streaming pipeline: Kafka purchases → "
                                          "user embeddings (until SIGTERM/SIGINT)")
    run.add_argument("--bootstrap-servers", required=True, help="Kafka host:port")
    add_kafka_options(run)
    run.add_argument("--run", required=True, help="run directory written by `dynllm train`")
    run.add_argument("--state-dir", help="checkpoints and embedding store (resumed on restart)")
    run.add_argument("--topic", default="purchases", help="purchases topic (default purchases)")
    run.add_argument("--metrics-port", type=int, default=9100, help="/metrics port (9100)")
    run.add_argument("--checkpoint-events", type=positive_int, default=50_000,
                     help="checkpoint at least every N events (default 50000)")
    run.add_argument("--checkpoint-seconds", type=float, default=30.0,
                     help="... or every T seconds (default 30)")
    run.add_argument("--max-batch", type=positive_int, default=2000,
                     help="most records per read of the topic (default 2000)")
    run.add_argument("--idle-seconds", type=positive_float, default=1.0,
                     help="a caught-up partition without records this long stops holding "
                          "the watermark back; all idle: open micro-batches are sealed (1)")
    run.add_argument("--no-profile-requests", action="store_true",
                     help="do not publish profile requests")
    run.add_argument("--stop-dir", help="folder for the stop markers the reader polls "
                                        "(default: the system temp folder; on a cluster, one "
                                        "every Beam worker can see)")
    replay = commands.add_parser("replay", help="run the same pipeline over a dataset's log "
                                                "in event-time order")
    replay.add_argument("--data", required=True, help="dataset directory")
    replay.add_argument("--run", required=True, help="run directory written by `dynllm train`")
    replay.add_argument("--state-dir", help="write checkpoints and the embedding store here")
    replay.add_argument("--evaluate", action="store_true",
                        help="test-then-update metrics on the test split (as `dynllm evaluate`)")
    replay.add_argument("--json", help="with --evaluate: write the metrics to this file")
    replay.add_argument("--dead-letters", help="JSONL file for rejected rows")
    replay.add_argument("--batch-size", type=positive_int, default=2000,
                        help="rows per read; with --evaluate events per micro-batch "
                             "(default 2000, as `dynllm evaluate`)")
    for sub in (run, replay):
        sub.add_argument("--batch-events", type=positive_int, default=BATCH_EVENTS,
                         help=f"most events per micro-batch ({BATCH_EVENTS}; docs/pipeline.md, "
                              "'Event time')")
        sub.add_argument("--batch-window", type=positive_float, default=86400.0,
                         help="a micro-batch spans at most this many event-time seconds "
                              "(86400; with real-time event stamps at low rates, e.g. 1)")
        sub.add_argument("--allowed-lateness", type=non_negative_float, default=0.0,
                         help="event-time seconds an event may be behind its partition's "
                              "newest and still be applied; older: dead letter late_event (0)")
        sub.add_argument("--shards", type=positive_int, default=1,
                         help="split the memory update by user into N shards")
        sub.add_argument("--threads", type=positive_int, default=1, help="torch threads (1)")
        sub.add_argument("beam_args", nargs=argparse.REMAINDER,
                         help="after --: Beam runner options (e.g. -- --runner FlinkRunner)")
    run.set_defaults(func=_run)
    replay.set_defaults(func=_replay)
    serve = commands.add_parser("serve", help="HTTP recommendations from the pipeline's state")
    serve.add_argument("--run", required=True, help="run directory written by `dynllm train`")
    serve.add_argument("--state-dir", required=True, help="the pipeline's --state-dir")
    serve.add_argument("--data", help="dataset for item text (default: the run's dataset)")
    serve.add_argument("--host", default="127.0.0.1", help="bind address (127.0.0.1)")
    serve.add_argument("--port", type=int, default=8080, help="port (8080)")
    serve.add_argument("--threads", type=positive_int, default=1, help="torch threads (1)")
    serve.add_argument("--bootstrap-servers",
                       help="Kafka host:port: follow the user-embeddings changelog (answers "
                            "~1 s behind the pipeline; without it, as of the last checkpoint)")
    serve.add_argument("--topic", default="user-embeddings",
                       help="the changelog topic (user-embeddings)")
    add_kafka_options(serve)
    serve.set_defaults(func=_serve)


def register_bench(bench_targets: argparse._SubParsersAction) -> None:
    """Add ``bench pipeline``, ``bench load`` and ``bench serving``."""
    from pipelines import load_bench, serving_bench
    from pipelines.bench import add_bench_arguments

    add_bench_arguments(bench_targets)
    load_bench.add_bench_arguments(bench_targets)
    serving_bench.add_bench_arguments(bench_targets)
