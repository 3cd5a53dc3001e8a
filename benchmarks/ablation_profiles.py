"""Build the profiles the DynLLM ablation reads (``dynllm bench ablation``).

An LLM profile costs tens of seconds on a shared 2-core CPU (the packaged Qwen2.5-Coder-0.5B,
batch 8), so the ablation uses two stores over one dataset (see BENCHMARKS.md):

* ``--llm-store``: LLM profiles of the ``--llm-users`` most active users, one version each,
  written from the events up to ``--at-train-fraction`` of the training split (so the fusion
  sees them in the second part of training, in validation and in test). Both prompt kinds are
  written user batch by user batch — graph-aware (hops=2) then own history only (hops=1) — so a
  stopped run leaves both variants on the same users. Interrupted runs resume.
* ``--stats-store``: rule-based facets from history statistics (``profiles.facets.
  fallback_facets``: household, top product types, categories, brands; no LLM) for every user,
  refreshed every ``--stats-refresh-every`` purchase lines up to the end of validation, embedded
  with the same MiniLM model. They test the fusion itself at full coverage.

Run under the shared lock::

    flock /tmp/dynllm-bench.lock .venv/bin/python benchmarks/ablation_profiles.py \\
        --data data/cj-top150 --llm-users 40
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

import numpy as np

STATS_MODEL_ID = "history-statistics"


def _stats_profiles(data, graph, store_path: Path, refresh_every: int) -> int:
    from profiles.batch import cutoff, plan
    from profiles.embed import FacetEmbedder
    from profiles.facets import fallback_facets
    from profiles.store import Profile, ProfileStore

    store = ProfileStore(store_path)
    tasks = [t for t in plan(graph, cutoff(data, "val"), refresh_every)
             if not store.has(t.user_id, t.ts, STATS_MODEL_ID, 2)]
    contexts = [graph.context(t.user_id, t.ts, hops=2) for t in tasks]
    facets = [fallback_facets(c) for c in contexts]
    vectors = FacetEmbedder().embed_facets([f.texts for f in facets]) if facets else []
    store.put([Profile(c.user_id, c.ts, f, v, STATS_MODEL_ID, f"stats-{c.user_id}-{c.ts}", 2)
               for c, f, v in zip(contexts, facets, vectors, strict=True)])
    total = len(store)
    store.close()
    return total


def _llm_profiles(data, graph, store_path: Path, users: list[str], times: list[float],
                  batch_size: int, threads: int, until: float, int8: bool,
                  hops_kinds: list[int]) -> None:
    from tqdm import tqdm

    from profiles.backends import LlamaCppBackend
    from profiles.embed import FacetEmbedder
    from profiles.modelpack import DEFAULT_MODEL, packaged_gguf
    from profiles.store import ProfileStore
    from profiles.writer import ProfileWriter

    if int8:
        raise SystemExit("--int8 applied to the transformers backend; the default is llama.cpp")
    store = ProfileStore(store_path)
    backend = LlamaCppBackend(packaged_gguf(), DEFAULT_MODEL.name, threads=1, processes=threads)
    writer = ProfileWriter(backend, FacetEmbedder(), store)
    bar = tqdm(total=len(hops_kinds) * len(users) * len(times), unit="profile")
    started = time.perf_counter()
    for at in times:  # every user's first version, then the refresh
        for start in range(0, len(users), batch_size):
            if time.time() > until:
                print(f"time budget spent: stopped after {start} users at t={at:.0f}")
                break
            chunk = [u for u in users[start:start + batch_size]
                     if graph.user_event_times(u)[0] <= at]
            for hops in hops_kinds:
                contexts = [graph.context(u, at, hops) for u in chunk]
                todo = [c for c in contexts
                        if not store.has(c.user_id, c.ts, backend.model_id, hops)]
                if todo:
                    writer.write(todo, hops)
                bar.update(len(chunk))
    bar.close()
    s = writer.stats
    print(f"LLM: {s.generated} generated, {s.cached} cached, {s.fallbacks} fallbacks, "
          f"grounding {s.grounding_share:.1%}, {s.new_tokens} tokens, "
          f"{time.perf_counter() - started:.0f} s wall ({s.llm_seconds:.0f} s in the LLM)")
    store.close()


def _deadline(args: argparse.Namespace) -> float:
    if not args.until_utc:
        return float("inf")
    from datetime import UTC, datetime

    hour, minute = (int(x) for x in args.until_utc.split(":"))
    return datetime.now(UTC).replace(hour=hour, minute=minute, second=0).timestamp()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="dataset directory")
    parser.add_argument("--llm-store", help="default: DATA/profiles-llm.sqlite")
    parser.add_argument("--stats-store", help="default: DATA/profiles-stats.sqlite")
    parser.add_argument("--llm-users", type=int, default=40, help="most active users profiled")
    parser.add_argument("--at-train-fraction", default="0.5",
                        help="comma-separated fractions of the training split: one profile "
                             "version per user at each (e.g. 0.5,1.0 adds a refresh at the "
                             "end of training)")
    parser.add_argument("--int8", action="store_true",
                        help="dynamic int8 quantization of the LLM (see docs/profiles.md)")
    parser.add_argument("--hops", default="2,1",
                        help="comma-separated prompt kinds to write (2: with co-buyers, 1: history "
                             "only); the shipped model reads 2")
    parser.add_argument("--stats-refresh-every", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-llm", action="store_true")
    parser.add_argument("--until-utc", help="HH:MM: start no new user batch after this time")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    from profiles.graph import PurchaseGraph
    from streaming.dataset import Dataset

    data = Dataset.load(args.data)
    graph = PurchaseGraph(data)
    root = Path(args.data)
    total = _stats_profiles(data, graph, Path(args.stats_store or root / "profiles-stats.sqlite"),
                            args.stats_refresh_every)
    print(f"stats: {total} rule-based profile versions stored")
    if args.skip_llm:
        return 0
    ts = np.sort(data.split("train").column("ts").to_numpy())
    fractions = [float(f) for f in args.at_train_fraction.split(",")]
    times = [float(ts[min(len(ts) - 1, int(len(ts) * f))]) for f in fractions]
    at = times[0]
    counts = data.events.group_by("user_id").aggregate([("user_id", "count")])
    counts = counts.sort_by([("user_id_count", "descending"), ("user_id", "ascending")])
    users = [u for u in counts.column("user_id").to_pylist()
             if len(graph.user_event_times(u)) and graph.user_event_times(u)[0] <= at]
    print(f"LLM profiles at t={times} for {min(args.llm_users, len(users))} users")
    _llm_profiles(data, graph, Path(args.llm_store or root / "profiles-llm.sqlite"),
                  users[:args.llm_users], times, args.batch_size, args.threads, _deadline(args),
                  args.int8, [int(h) for h in args.hops.split(",")])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
