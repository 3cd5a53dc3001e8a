"""The packaged default model under llama.cpp: real Complete Journey households, the grammar's
format, the reused prompt head and worker processes (the model is loaded once per backend)."""

from __future__ import annotations

import re

import pytest

from profiles.facets import grounding, parse_facets
from profiles.grammar import ITEM_WORDS, MAX_ITEMS, SEGMENT_WORDS
from profiles.graph import PurchaseGraph
from profiles.modelpack import DEFAULT_MODEL, packaged_gguf
from profiles.prompt import FACETS, build_messages
from streaming.dataset import Dataset

pytestmark = [pytest.mark.llm, pytest.mark.slow]


@pytest.fixture(scope="module")
def llama():
    """The default model in this process, 1 thread (as each shipped worker process runs it)."""
    from profiles.backends import LlamaCppBackend

    backend = LlamaCppBackend(packaged_gguf(), DEFAULT_MODEL.name, threads=1, processes=1)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def households(cj_small):
    """Contexts of four real households with at least 20 lines before the end of train."""
    dataset = Dataset.load(cj_small)
    graph = PurchaseGraph(dataset)
    cut = dataset.meta["split"]["train_end"]
    users = [u for u in graph.users if (graph.user_event_times(u) <= cut).sum() >= 20][:4]
    return [graph.context(u, cut) for u in users]


def _check_format(text: str) -> None:
    """Four headed lines; word caps, list items and whole words as the grammar allows."""
    lines = text.split("\n")
    assert [line.split(":")[0] for line in lines] == list(FACETS), text
    values = [line.split(": ", 1)[1] for line in lines]
    assert 1 <= len(values[0].split()) <= SEGMENT_WORDS
    for value in values[1:]:
        items = value.split(", ")
        assert 1 <= len(items) <= MAX_ITEMS and all(
            1 <= len(i.split()) <= ITEM_WORDS for i in items), text
    words = [w for v in values for w in re.split(r"[,;]? ", v)]
    assert all(re.fullmatch(r"[A-Za-z0-9$][A-Za-z0-9'&%+/-]*", w) for w in words), text


def test_default_model_profiles_real_households(llama, households):
    gens = llama.generate([build_messages(c) for c in households])
    for gen, ctx in zip(gens, households, strict=True):
        _check_format(gen.text)
        facets = parse_facets(gen.text)
        assert facets is not None, gen.text
        grounded, named = grounding(facets, ctx)
        assert named >= 2 and grounded / named >= 0.5, (gen.text, ctx.known)
    # the prompt head (template + system message) is evaluated once, then reused
    assert gens[0].reused_tokens == 0 or gens[0].reused_tokens < 80
    assert all(g.reused_tokens >= 80 for g in gens[1:]), [g.reused_tokens for g in gens]
    assert all(g.prompt_tokens > g.reused_tokens for g in gens)


def test_sampled_answers_keep_the_grammar(llama, households):
    for gen in llama.generate([build_messages(c) for c in households[:2]], sample=True):
        _check_format(gen.text)


def test_worker_processes_answer_like_one_process(llama, households):
    """Answers of reused key/values may differ in the last float bits from a fresh evaluation
    (llama.cpp splits the work differently), so equality is checked on fresh prompts only."""
    from profiles.backends import LlamaCppBackend

    prompts = [build_messages(c) for c in households]
    two = LlamaCppBackend(llama.model_file, DEFAULT_MODEL.name, threads=1, processes=2)
    try:
        shared = two.generate(prompts)  # worker 1: prompts 0-1, worker 2: prompts 2-3
    finally:
        two.close()
    fresh = LlamaCppBackend(llama.model_file, DEFAULT_MODEL.name, threads=1, reuse_prefix=False)
    try:  # a first prompt is evaluated from scratch in both: the same greedy answer
        assert fresh.generate(prompts[:1])[0].text == shared[0].text
    finally:
        fresh.close()
    assert len(shared) == len(prompts)
    for gen in shared:
        _check_format(gen.text)
    assert shared[2].reused_tokens < 80 <= shared[3].reused_tokens  # each worker its own cache
