"""Kafka subcommands: ``dynllm broker``, ``dynllm produce`` and ``dynllm bench kafka``."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from pathlib import Path

from streaming.arg_types import number, port, positive_float, positive_int
from streaming.errors import UsageError
from streaming.kafka_settings import KafkaSettings, add_kafka_options, settings_from_args


def _quiet_kafka(args: argparse.Namespace) -> None:
    """kafka-python logs every connection at INFO; keep that for ``--verbose``."""
    if not args.verbose:
        logging.getLogger("kafka").setLevel(logging.WARNING)


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _broker(args: argparse.Namespace) -> int:
    from streaming.broker import Broker

    signal.signal(signal.SIGTERM, _raise_interrupt)
    with Broker(port=args.port, host=args.host, quiet=not args.verbose) as broker:
        try:  # the banner inside: a SIGTERM right after it must still stop cleanly
            print(f"Kafka-protocol broker (Tansu) on {broker.bootstrap_servers}; memory-only: "
                  "topics and messages are lost when it stops. Ctrl-C to stop.", flush=True)
            code = broker.wait()
        except KeyboardInterrupt:
            print("stopping broker", file=sys.stderr)
            return 0
    raise UsageError(f"the broker exited on its own with code {code}")


def _connect(bootstrap_servers: str, settings: KafkaSettings):
    from kafka.errors import KafkaError

    from streaming.broker import reachable
    from streaming.kafka_io import json_producer, security_hint

    problem = (f"no Kafka broker answers at {bootstrap_servers}"
               + (" (start one with: dynllm broker)" if settings.is_plaintext
                  else security_hint(settings)))
    if not reachable(bootstrap_servers):  # fails in ms instead of kafka-python's 30 s
        raise UsageError(problem)
    try:
        return json_producer(bootstrap_servers, settings)
    except KafkaError:
        raise UsageError(problem) from None


def _produce(args: argparse.Namespace) -> int:
    from streaming.dataset import Dataset
    from streaming.kafka_io import create_topics
    from streaming.producer import produce_events

    _quiet_kafka(args)
    settings = settings_from_args(args)
    dataset = Dataset.load(args.data)
    events = dataset.split(args.split) if args.split else dataset.events
    if args.skip or args.limit is not None:
        events = events.slice(args.skip, args.limit)
    producer = _connect(args.bootstrap_servers, settings)
    create_topics(args.bootstrap_servers, [args.topic], args.partitions, settings=settings)
    try:
        report = produce_events(producer, args.topic, events, args.rate, args.speedup)
    finally:
        producer.close()
    print(f"sent {report.sent:,} events to {args.topic!r}: {report.delivered:,} delivered, "
          f"{report.failed:,} failed, {report.seconds:.1f} s, {report.rate:,.0f} events/s")
    if report.failed:
        print(f"first error: {report.errors[0]}", file=sys.stderr)
        return 1
    return 0


def _bench_kafka(args: argparse.Namespace) -> int:
    from streaming import kafka_bench

    _quiet_kafka(args)
    if args.data is not None and not Path(args.data).is_dir():
        raise UsageError(f"{args.data} is not a dataset directory")
    data = Path(args.data) if args.data else None
    result = kafka_bench.run(args.events, args.repeats, args.partitions, data)
    print(kafka_bench.format_report(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``broker`` and ``produce``."""
    broker = commands.add_parser(
        "broker", help="run a local Kafka-protocol broker (Tansu, memory-only) in the foreground")
    broker.add_argument("--port", type=port, default=9092)
    broker.add_argument("--host", default="127.0.0.1", help="listen address (loopback default)")
    broker.set_defaults(func=_broker)
    produce = commands.add_parser(
        "produce", help="replay a dataset's events into a Kafka topic as JSON, in time order")
    produce.add_argument("--data", required=True, help="dataset directory")
    produce.add_argument("--topic", default="purchases")
    produce.add_argument("--bootstrap-servers", default="127.0.0.1:9092", help="HOST:PORT")
    add_kafka_options(produce)
    produce.add_argument("--split", choices=("train", "val", "test"),
                         help="send only this chronological split (default: every event)")
    produce.add_argument("--skip", type=number(int, lambda v: v >= 0, "an integer >= 0"),
                         default=0, metavar="N",
                         help="leave out the first N events (of the split)")
    produce.add_argument("--limit", type=positive_int,
                         help="send only the first N events (after --skip)")
    produce.add_argument("--partitions", type=positive_int, default=4,
                         help="partitions if the topic must be created")
    pace = produce.add_mutually_exclusive_group()
    pace.add_argument("--rate", type=positive_float, help="events per second (default: max)")
    pace.add_argument("--speedup", type=positive_float,
                      help="event-time seconds per wall-clock second")
    produce.set_defaults(func=_produce)


def register_bench(targets: argparse._SubParsersAction) -> None:
    """Add ``bench kafka``."""
    bench = targets.add_parser(
        "kafka", help="produce and read back real events through a local broker")
    bench.add_argument("--events", type=positive_int, default=100_000)
    bench.add_argument("--repeats", type=positive_int, default=3)
    bench.add_argument("--partitions", type=positive_int, default=4)
    bench.add_argument("--data", help="dataset directory (default: data/cj26 or a fresh slice)")
    bench.add_argument("--json", help="also write all figures to this JSON file")
    bench.set_defaults(func=_bench_kafka)
