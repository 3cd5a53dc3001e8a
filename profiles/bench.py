"""``dynllm bench profiles``: throughput and quality of the llama.cpp profile backend on real users.

On the first ``users`` users of a dataset (profiles from their training-split history), in one
run:

- the backend as shipped: GBNF-constrained, prompt head reused across users, ``processes``
  model copies with ``threads`` each, prompts in batches of ``batch_size``;
- the **reference** on the same model and the first ``reference_users`` of the same prompts:
  one prompt at a time, one process with all the cores, no grammar, no key/value reuse (how
  llama-cpp-python is used out of the box);
- quality of the shipped answers: grounding, brand-facet precision, first-answer failures and
  fallbacks, and the share of profiles with a facet repeating another, household attributes
  outside the crowd segment, or a phrase cut mid-way;
- optionally (``signal_data``) the zero-shot facet signal: one profile per household of that
  dataset at the end of its training split, scored by ``benchmarks/fusion_probes.py text``
  (Recall@20 of the facet-item text cosine on validation purchases).

Before the timing each model process answers one prompt (untimed, its CPU seconds reported as
``warmup_llm_cpu_seconds``): it evaluates the prompt head shared by every user once, as a
running worker does with its first batch, so the figures are the steady-state cost per profile
(runs before 2026-12-02 13:00 UTC included that one-time head in their 16 profiles).

Rates are per core: profiles per minute divided by ``threads * processes``. On a shared machine
wall-clock rates follow the load, so the CPU seconds the model processes spent answering are
reported too (``profiles_per_llm_cpu_minute``, the same for the reference); CPU time is
inflated by contention far less than wall time. The load average before and after is
recorded.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from profiles.backends import LlamaCppBackend
from profiles.batch import build, cutoff
from profiles.embed import FacetEmbedder
from profiles.facets import (
    brand_grounding,
    cut_mid_phrase,
    household_in_wrong_facet,
    repeats_a_facet,
)
from profiles.graph import PurchaseGraph, UserContext
from profiles.prompt import answer_choices, build_messages, render_context
from profiles.store import Profile, ProfileStore
from profiles.writer import ProfileWriter
from streaming.dataset import Dataset
from streaming.errors import UsageError

#: The probe that scores facets against item texts (one implementation, in the lab room).
PROBE = Path(__file__).resolve().parent.parent / "benchmarks" / "fusion_probes.py"


def _rate(profiles: int, seconds: float) -> float:
    return 60.0 * profiles / seconds if seconds > 0 else float("nan")


def _share(flags: list[bool]) -> float:
    return round(sum(flags) / len(flags), 3) if flags else float("nan")


def _write_timed(writer: ProfileWriter, contexts: list[UserContext], batch_size: int,
                 hops: int) -> tuple[list[Profile], list[float], float]:
    """Profiles, per-batch rates and total seconds of writing ``contexts`` in batches."""
    profiles, rates, start = [], [], time.perf_counter()
    for i in range(0, len(contexts), batch_size):
        t0 = time.perf_counter()
        profiles += writer.write(contexts[i:i + batch_size], hops)
        rates.append(_rate(len(contexts[i:i + batch_size]), time.perf_counter() - t0))
    return profiles, rates, time.perf_counter() - start


def _quality(profiles: list[Profile], contexts: list[UserContext]) -> dict[str, float]:
    made = [(p, c) for p, c in zip(profiles, contexts, strict=True) if not p.facets.fallback]
    found = [brand_grounding(p.facets, c) for p, c in made]
    return {
        "brand_facet_precision": round(sum(f for f, _ in found) / max(1, sum(n for _, n in found)),
                                       3),
        "facet_repeats_facet_rate": _share([repeats_a_facet(p.facets) for p, _ in made]),
        "household_in_wrong_facet_rate": _share([household_in_wrong_facet(p.facets)
                                                 for p, _ in made]),
        "cut_mid_phrase_rate": _share([cut_mid_phrase(p.facets) for p, _ in made]),
    }


def facet_signal(signal_data: str | Path, writer: ProfileWriter, store: Path,
                 batch_size: int, hops: int) -> dict[str, object]:
    """Profiles for every household of ``signal_data`` (end of train), then the text probe."""
    if not PROBE.exists():
        raise UsageError(f"the facet-signal probe {PROBE} is not here (run from a checkout)")
    dataset = Dataset.load(signal_data)
    start = time.perf_counter()
    target = ProfileStore(store)  # the writer's own store is the speed run's
    written = build(dataset, ProfileWriter(writer.backend, writer.embedder, target), target,
                    "train", hops=hops, batch_size=batch_size, progress=False)
    target.close()
    build_s = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "probe.json"
        subprocess.run([sys.executable, str(PROBE), "text", "--data", str(signal_data),
                        "--profiles", str(store), "--hops", str(hops), "--out", str(out)],
                       check=True, stdout=subprocess.DEVNULL)
        probe = json.loads(out.read_text())
    return {"profiles": written, "build_seconds": round(build_s, 1), "store": str(store),
            "probe": probe}


def run(data: str | Path, model_file: Path, model_id: str | None = None, users: int = 24,
        threads: int = 1, processes: int = 2, batch_size: int = 8, reference_users: int = 8,
        hops: int = 2, signal_data: str | Path | None = None,
        signal_store: Path | None = None) -> dict[str, object]:
    """Run the benchmark; returns the figures as a JSON-able dict."""
    load_before = os.getloadavg()
    dataset = Dataset.load(data)
    graph = PurchaseGraph(dataset)
    until = cutoff(dataset, "train")
    chosen = [u for u in graph.users if len(graph.user_event_times(u)) and
              graph.user_event_times(u)[0] < until][:users]
    contexts = [graph.context(u, until - 1e-6, hops) for u in chosen]
    cores = threads * processes
    embedder = FacetEmbedder()
    start = time.perf_counter()
    backend = LlamaCppBackend(model_file, model_id, threads=threads, processes=processes)
    load_s = time.perf_counter() - start
    warm = contexts[:processes]  # one prompt per model process: the shared head evaluated
    backend.generate([build_messages(c) for c in warm], choices=[answer_choices(c) for c in warm])
    warmup_cpu_s = backend.cpu_seconds
    reference = LlamaCppBackend(model_file, model_id, threads=cores, processes=1,
                                constrained=False, reuse_prefix=False)
    with tempfile.TemporaryDirectory() as tmp:
        writer = ProfileWriter(backend, embedder, ProfileStore(Path(tmp) / "bench.sqlite"))
        profiles, batch_rates, total_s = _write_timed(writer, contexts, batch_size, hops)
        stats = dataclasses.replace(writer.stats)
        llm_cpu_s = backend.cpu_seconds - warmup_cpu_s
        ref = ProfileWriter(reference, embedder, ProfileStore(Path(tmp) / "ref.sqlite"))
        _, _, ref_s = _write_timed(ref, contexts[:reference_users], 1, hops)
        ref_cpu_s = reference.cpu_seconds
        reference.close()
        signal = facet_signal(signal_data, writer, signal_store or Path(tmp) / "signal.sqlite",
                              batch_size, hops) if signal_data else None
    backend.close()
    rate, ref_rate = _rate(len(contexts), total_s), _rate(ref.stats.profiles, ref_s)
    example = max(range(len(contexts)), key=lambda i: (contexts[i].household is not None,
                                                       contexts[i].n_events))
    result: dict[str, object] = {
        "model_id": backend.model_id, "data": str(data), "users": len(contexts), "hops": hops,
        "load_average_1_5_15_before": [round(x, 2) for x in load_before],
        "threads": threads, "processes": processes, "batch_size": batch_size,
        "load_seconds": round(load_s, 1),
        "warmup_llm_cpu_seconds": round(warmup_cpu_s, 2),
        "profiles_per_minute": round(rate, 2),
        "profiles_per_minute_per_core": round(rate / cores, 2),
        "median_batch_profiles_per_minute_per_core": round(statistics.median(batch_rates) / cores,
                                                           2),
        "reference_users": ref.stats.profiles,
        "reference_profiles_per_minute_per_core": round(ref_rate / cores, 2),
        "speedup_vs_reference": round(rate / ref_rate, 2),
        "llm_cpu_seconds_per_profile": round(llm_cpu_s / max(1, stats.generated), 2),
        "reference_llm_cpu_seconds_per_profile": round(ref_cpu_s / max(1, ref.stats.generated),
                                                       2),
        "profiles_per_llm_cpu_minute": round(_rate(stats.generated, llm_cpu_s), 2),
        "reference_profiles_per_llm_cpu_minute": round(_rate(ref.stats.generated, ref_cpu_s), 2),
        "cpu_speedup_vs_reference": round((ref_cpu_s / max(1, ref.stats.generated)) /
                                          max(1e-9, llm_cpu_s / max(1, stats.generated)), 2),
        "reference_fallback_rate": round(ref.stats.fallbacks / max(1, ref.stats.generated), 3),
        "generated_tokens_per_profile": round(stats.new_tokens / max(1, stats.generated), 1),
        "reference_generated_tokens_per_profile":
            round(ref.stats.new_tokens / max(1, ref.stats.generated), 1),
        "prompt_tokens_per_profile": round(stats.prompt_tokens / max(1, stats.calls), 1),
        "reused_prompt_share": round(stats.reused_tokens / max(1, stats.prompt_tokens), 3),
        "grounding_share": round(stats.grounding_share, 3),
        **_quality(profiles, contexts),
        "first_answer_parse_failure_rate": round(stats.retried / max(1, stats.generated), 3),
        "fallback_rate": round(stats.fallbacks / max(1, stats.generated), 3),
        "facet_signal_recall@20": None,
        "example": {"user_id": contexts[example].user_id,
                    "prompt": render_context(contexts[example]),
                    "profile": profiles[example].facets.render(),
                    "fallback": profiles[example].facets.fallback,
                    "grounded": f"{profiles[example].grounded}/{profiles[example].named}"},
    }
    if signal is not None:
        probe = signal["probe"]
        result["facet_signal_recall@20"] = round(probe["mean"]["recall@20"], 4)
        result["facet_signal_explore_recall@20"] = round(probe["mean"]["explore/recall@20"], 4)
        result["facet_signal_random_recall@20"] = round(probe["random_recall@20"], 4)
        result["facet_signal"] = signal
    result["load_average_1_5_15_after"] = [round(x, 2) for x in os.getloadavg()]
    return result


def main(data: str, model_file: Path, model_id: str | None, users: int, threads: int,
         processes: int, batch_size: int, reference_users: int, hops: int,
         json_out: str | None, signal_data: str | None = None,
         signal_store: str | None = None) -> int:
    """Run, print and optionally save the figures."""
    result = run(data, model_file, model_id, users, threads, processes, batch_size,
                 reference_users, hops, signal_data, Path(signal_store) if signal_store else None)
    for key, value in result.items():
        if key not in ("example", "facet_signal"):
            print(f"{key:>42}: {value}")
    example = result["example"]
    print(f"\nexample, user {example['user_id']}:\n{example['prompt']}\n--\n{example['profile']}")
    if json_out:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(result, indent=2) + "\n")
    return 0
