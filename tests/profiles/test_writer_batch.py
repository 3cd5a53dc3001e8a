"""The profile writer (cache, retry, fallback, grounding, embeddings) and the batch build."""

from __future__ import annotations

import numpy as np
import pytest

from profiles.backends import HttpBackend, TransformersBackend
from profiles.batch import build, plan
from profiles.graph import PurchaseGraph
from profiles.store import ProfileStore
from profiles.writer import ProfileWriter
from streaming.dataset import Dataset

DAY = 86400.0


@pytest.fixture(scope="module")
def dataset(tiny_data) -> Dataset:
    return Dataset.load(tiny_data)


def test_http_model_profiles_are_grounded_embedded_and_cached(dataset, chat_peer, embedder,
                                                              tmp_path):
    graph = PurchaseGraph(dataset)
    writer = ProfileWriter(HttpBackend(chat_peer.url, backoff=0.01), embedder,
                           ProfileStore(tmp_path / "p.sqlite"))
    contexts = [graph.context("u1", 14 * DAY), graph.context("u2", 11 * DAY),
                graph.context("u1", 14 * DAY)]  # a repeated prompt is generated once
    profiles = writer.write(contexts)
    assert len(chat_peer.requests) == 2 and writer.stats.generated == 2
    assert [p.facets.texts[2] for p in profiles] == ["Cheese", "Cheese", "Cheese"]
    assert not any(p.facets.fallback for p in profiles)
    assert writer.stats.grounding_share == 1.0
    vectors = profiles[0].vectors
    assert vectors.shape == (4, 384) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    # facets are embedded without their headings, so different facets differ
    assert float(vectors[2] @ vectors[3]) < 0.9
    writer.write([graph.context("u2", 11 * DAY)])  # unchanged history: no new generation
    assert len(chat_peer.requests) == 2 and writer.stats.cached == 2


def test_malformed_answers_retry_once_then_fall_back(dataset, chat_peer, embedder, tmp_path):
    chat_peer.answer = lambda prompt: "I am not sure."
    writer = ProfileWriter(HttpBackend(chat_peer.url, backoff=0.01), embedder,
                           ProfileStore(tmp_path / "p.sqlite"))
    (profile,) = writer.write([PurchaseGraph(dataset).context("u2", 11 * DAY)])
    assert len(chat_peer.requests) == 2  # greedy answer + one sampled retry
    assert chat_peer.requests[1]["temperature"] > 0
    assert profile.facets.fallback and profile.facets.texts[2] == "Cheese, Soft Drinks"
    assert writer.stats.fallbacks == 1 and writer.stats.retried == 1
    assert writer.store.cached(profile.prompt_hash, profile.model_id) is None


def test_plan_refreshes_every_n_events_before_the_cut(dataset):
    graph = PurchaseGraph(dataset)
    tasks = plan(graph, until=12 * DAY, refresh_every=2)
    by_user = {u: [t.ts / DAY for t in tasks if t.user_id == u] for u in graph.users}
    # u1 bought on days 0, 1, 6, 10 before day 12: after the 2nd and 4th line (the last)
    assert by_user == {"u1": [1.0, 10.0], "u2": [3.0, 11.0], "u3": [5.0, 8.0], "u4": [9.0]}
    assert [t.ts for t in tasks] == sorted(t.ts for t in tasks)
    assert len(plan(graph, until=12 * DAY, max_users=1)) == 1
    chosen = plan(graph, until=12 * DAY, users=["u3", "u4", "nobody"])
    assert [(t.user_id, t.ts / DAY) for t in chosen] == [("u3", 8.0), ("u4", 9.0)]


def test_batch_build_resumes_without_repeating(dataset, tiny_llm, embedder, tmp_path):
    store = ProfileStore(tmp_path / "p.sqlite")
    writer = ProfileWriter(TransformersBackend(tiny_llm, batch_size=4),
                           embedder, store)
    kwargs = {"until_split": "all", "refresh_every": 3, "batch_size": 4, "progress": False}
    assert build(dataset, writer, store, limit=3, **kwargs) == 3  # "killed" after 3
    # every 3rd line and the last: u1 days 6, 15; u2 7, 11; u3 8, 12; u4 13 -> 7 profiles
    assert build(dataset, writer, store, **kwargs) == 7 - 3  # continues with the rest
    assert build(dataset, writer, store, **kwargs) == 0
    table = store.export()
    # random weights, yet constrained decoding keeps every answer in the four-line format
    assert len(table.ts) == 7 and not table.fallback.any()
    assert writer.stats.generated == 7 and writer.stats.retried == writer.stats.fallbacks == 0


@pytest.mark.llm
@pytest.mark.slow
def test_bench_reports_consistent_figures(tiny_data):
    from profiles import bench
    from profiles.modelpack import DEFAULT_MODEL, packaged_gguf

    result = bench.run(tiny_data, packaged_gguf(), DEFAULT_MODEL.name, users=3, threads=1,
                       processes=2, batch_size=2, reference_users=1)
    assert result["users"] == 3 and result["reference_users"] == 1
    assert result["profiles_per_minute_per_core"] > 0
    assert result["reference_profiles_per_minute_per_core"] > 0
    assert result["model_id"] == f"llama.cpp:{DEFAULT_MODEL.name}"
    assert result["fallback_rate"] == 0.0  # the grammar keeps the format
    assert 0.0 <= result["grounding_share"] <= 1.0
    assert 0.0 < result["reused_prompt_share"] < 1.0  # the head was reused by later prompts
    assert result["facet_signal_recall@20"] is None  # only with signal_data
    assert result["example"]["fallback"] is False


@pytest.mark.llm
@pytest.mark.slow
def test_bench_facet_signal_probes_the_profiles_it_wrote(tiny_data, tmp_path):
    from profiles import bench
    from profiles.modelpack import DEFAULT_MODEL, packaged_gguf

    store = tmp_path / "signal.sqlite"
    result = bench.run(tiny_data, packaged_gguf(), DEFAULT_MODEL.name, users=2, threads=1,
                       processes=1, batch_size=4, reference_users=1, signal_data=tiny_data,
                       signal_store=store)
    signal = result["facet_signal"]
    # the probe reads the store the signal profiles went to, not the speed run's
    assert signal["profiles"] > 0 and len(ProfileStore(store)) == signal["profiles"]
    assert 0.0 < result["facet_signal_random_recall@20"] <= 1.0
    assert 0.0 <= result["facet_signal_recall@20"] <= 1.0
