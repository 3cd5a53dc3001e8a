"""``dynllm bench profiles``: profile throughput and quality of the local model on real users.

Measures, on the first ``users`` users of a dataset (profiles from their training-split history):
profiles/minute (overall, per core, and the median over batches), tokens generated and prompt
tokens per profile, grounding share, brand-facet precision (names in the brand facet that are
brands of the history or co-buyers), first-answer parse failures and fallbacks, and the machine's
load average before and after (the machine may be shared). In the same run it
measures a reference: the same model and prompts one at a time (batch size 1), and the cache: the
same users again (identical prompts, no generation).
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from profiles.backends import TransformersBackend
from profiles.batch import cutoff
from profiles.embed import FacetEmbedder
from profiles.facets import brand_grounding
from profiles.graph import PurchaseGraph
from profiles.prompt import build_messages, render_context
from profiles.store import ProfileStore
from profiles.writer import ProfileWriter
from streaming.dataset import Dataset


def _rate(profiles: int, seconds: float) -> float:
    return 60.0 * profiles / seconds if seconds > 0 else float("nan")


def run(data: str | Path, model_path: Path, users: int = 16, batch_size: int = 8,
        threads: int = 2, reference_users: int = 2, hops: int = 2,
        int8: bool = False) -> dict[str, object]:
    """Run the benchmark; returns the figures as a JSON-able dict."""
    import torch

    torch.set_num_threads(threads)
    load_before = os.getloadavg()
    dataset = Dataset.load(data)
    graph = PurchaseGraph(dataset)
    until = cutoff(dataset, "train")
    chosen = [u for u in graph.users if len(graph.user_event_times(u)) and
              graph.user_event_times(u)[0] < until][:users]
    contexts = [graph.context(u, until - 1e-6, hops) for u in chosen]
    start = time.perf_counter()
    backend = TransformersBackend(model_path, batch_size=batch_size, int8=int8)
    embedder = FacetEmbedder()
    load_s = time.perf_counter() - start
    prompt_tokens = [len(backend.tokenizer(backend._text(build_messages(c)))["input_ids"])
                     for c in contexts]
    one_hop_tokens = [len(backend.tokenizer(backend._text(build_messages(
        graph.context(c.user_id, c.ts, 1))))["input_ids"]) for c in contexts]
    with tempfile.TemporaryDirectory() as tmp:
        writer = ProfileWriter(backend, embedder, ProfileStore(Path(tmp) / "bench.sqlite"))
        batch_rates, brands, start = [], [0, 0], time.perf_counter()
        for i in range(0, len(contexts), batch_size):
            t0 = time.perf_counter()
            for ctx, p in zip(contexts[i:i + batch_size],
                              writer.write(contexts[i:i + batch_size], hops), strict=True):
                if not p.facets.fallback:
                    found, named = brand_grounding(p.facets, ctx)
                    brands = [brands[0] + found, brands[1] + named]
            batch_rates.append(_rate(len(contexts[i:i + batch_size]), time.perf_counter() - t0))
        total_s = time.perf_counter() - start
        stats = dataclasses.replace(writer.stats)  # before the cached re-run adds to it
        example = max(writer.store.export().user_ids.tolist(),
                      key=lambda u: (graph.context(u, until - 1e-6).household is not None,
                                     graph.context(u, until - 1e-6).n_events))
        shown = writer.store.latest(example)
        t0 = time.perf_counter()
        writer.write(contexts, hops)  # identical prompts: cached (fallbacks are retried)
        cached_s = time.perf_counter() - t0
        backend.batch_size = 1
        ref = ProfileWriter(backend, embedder, ProfileStore(Path(tmp) / "ref.sqlite"))
        t0 = time.perf_counter()
        for ctx in contexts[:reference_users]:
            ref.write([ctx], hops)
        ref_s = time.perf_counter() - t0
    rate = _rate(len(contexts), total_s)
    ref_rate = _rate(min(reference_users, len(contexts)), ref_s)
    return {
        "model_id": backend.model_id, "data": str(data), "users": len(contexts), "hops": hops,
        "load_average_1_5_15_before": [round(x, 2) for x in load_before],
        "load_average_1_5_15_after": [round(x, 2) for x in os.getloadavg()],
        "threads": threads, "batch_size": batch_size, "load_seconds": round(load_s, 1),
        "profiles_per_minute": round(rate, 2), "profiles_per_minute_per_core":
            round(rate / threads, 2), "median_batch_profiles_per_minute":
            round(statistics.median(batch_rates), 2),
        "generated_tokens_per_profile": round(stats.new_tokens / max(1, stats.generated), 1),
        "prompt_tokens_per_profile": round(statistics.mean(prompt_tokens), 1),
        "prompt_tokens_per_profile_1hop": round(statistics.mean(one_hop_tokens), 1),
        "grounding_share": round(stats.grounding_share, 3),
        "brand_facet_precision": round(brands[0] / max(1, brands[1]), 3),
        "first_answer_parse_failure_rate": round(stats.retried / max(1, stats.generated), 3),
        "fallback_rate": round(stats.fallbacks / max(1, stats.generated), 3),
        "cached_rerun_seconds": round(cached_s, 3),
        "reference_batch1_profiles_per_minute": round(ref_rate, 2),
        "speedup_vs_batch1": round(rate / ref_rate, 2) if ref_rate == ref_rate else None,
        "example": {"user_id": example, "prompt": render_context(graph.context(
            example, until - 1e-6, hops)), "profile": shown.facets.render(),
            "fallback": shown.facets.fallback, "grounded": f"{shown.grounded}/{shown.named}"},
    }


def main(data: str, model_path: Path, users: int, batch_size: int, threads: int,
         reference_users: int, hops: int, json_out: str | None, int8: bool = False) -> int:
    """Run, print and optionally save the figures."""
    result = run(data, model_path, users, batch_size, threads, reference_users, hops, int8)
    for key, value in result.items():
        if key != "example":
            print(f"{key:>40}: {value}")
    example = result["example"]
    print(f"\nexample, user {example['user_id']}:\n{example['prompt']}\n--\n{example['profile']}")
    if json_out:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(result, indent=2) + "\n")
    return 0
