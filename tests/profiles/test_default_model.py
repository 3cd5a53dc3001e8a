"""The packaged default model under llama.cpp: real Complete Journey households, the grammar's
format, the reused prompt head and worker processes (the model is loaded once per backend)."""

from __future__ import annotations

import re

import pytest

from profiles.facets import grounding, parse_facets, repeats_a_facet
from profiles.grammar import ITEM_WORDS, MAX_ITEMS, AnswerFormat
from profiles.graph import PurchaseGraph
from profiles.modelpack import DEFAULT_MODEL, packaged_gguf
from profiles.prompt import (
    BUDGETS,
    FACETS,
    HOUSEHOLD_TYPES,
    STYLES,
    AnswerChoices,
    answer_choices,
    build_messages,
)
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


def _check_format(text: str, choices: AnswerChoices | None = None) -> None:
    """Four headed lines; the segment from its vocabularies; list items from the user's names
    (two different ones), or free whole words without names."""
    lines = text.split("\n")
    assert [line.split(":")[0] for line in lines] == list(FACETS), text
    values = [line.split(": ", 1)[1] for line in lines]
    assert values[0].split(", ") in [[h, b, s] for h in HOUSEHOLD_TYPES for b in BUDGETS
                                     for s in STYLES], text
    names = (choices.interests, choices.categories, choices.brands) if choices else ((),) * 3
    for value, allowed in zip(values[1:], names, strict=True):
        items = value.split(", ")
        assert 1 <= len(items) <= MAX_ITEMS, text
        if allowed:
            assert set(items) <= set(allowed) and len(set(items)) == len(items), (text, allowed)
        else:
            assert all(1 <= len(i.split()) <= ITEM_WORDS for i in items), text
            words = [w for i in items for w in i.split(" ")]
            assert all(re.fullmatch(r"[A-Za-z0-9$][A-Za-z0-9'&%+/-]*", w) for w in words), text


def test_default_model_profiles_real_households(llama, households):
    choices = [answer_choices(c) for c in households]
    gens = llama.generate([build_messages(c) for c in households], choices=choices)
    repeats = []
    for gen, ctx, pick in zip(gens, households, choices, strict=True):
        _check_format(gen.text, pick)
        facets = parse_facets(gen.text)
        assert facets is not None, gen.text
        grounded, named = grounding(facets, ctx)
        assert named >= 2 and grounded == named, (gen.text, ctx.known)
        if repeats_a_facet(facets):
            repeats.append(gen.text)
    # a brand whose only product is an interest repeats it ("M827 national Fruit Bowl And Cups"
    # beside "Fruit Bowl And Cups"): allowed in under 10% of profiles (the bench's rate)
    assert len(repeats) <= 1, repeats
    # the prompt head (template + system message) is evaluated once, then reused
    assert gens[0].reused_tokens == 0 or gens[0].reused_tokens < 80
    assert all(g.reused_tokens >= 80 for g in gens[1:]), [g.reused_tokens for g in gens]
    assert all(g.prompt_tokens > g.reused_tokens for g in gens)


def test_sampled_answers_keep_the_grammar(llama, households):
    choices = [answer_choices(c) for c in households[:2]]
    gens = llama.generate([build_messages(c) for c in households[:2]], sample=True,
                          choices=choices)
    for gen, pick in zip(gens, choices, strict=True):
        _check_format(gen.text, pick)
    for gen in llama.generate([build_messages(households[2])]):  # no names: free list items
        _check_format(gen.text)


def test_worker_processes_answer_like_one_process(llama, households):
    """Answers of reused key/values may differ in the last float bits from a fresh evaluation
    (llama.cpp splits the work differently), so equality is checked on fresh prompts decoded
    in the same layout only (a worker's first call: head, then two sequences together)."""
    from profiles.backends import LlamaCppBackend

    prompts = [build_messages(c) for c in households]
    two = LlamaCppBackend(llama.model_file, DEFAULT_MODEL.name, threads=1, processes=2)
    try:
        shared = two.generate(prompts)  # worker 1: prompts 0-1, worker 2: prompts 2-3
    finally:
        two.close()
    fresh = LlamaCppBackend(llama.model_file, DEFAULT_MODEL.name, threads=1, reuse_prefix=False)
    try:  # the first two prompts are evaluated from scratch in both: the same greedy answers
        assert [g.text for g in fresh.generate(prompts[:2])] == [g.text for g in shared[:2]]
    finally:
        fresh.close()
    assert len(shared) == len(prompts)
    for gen in shared:
        _check_format(gen.text)
    assert shared[2].reused_tokens < 80 <= shared[3].reused_tokens  # each worker its own cache


def _grammar_accepts(llm, gbnf: str, text: str) -> bool:
    """llama.cpp's own grammar sampler takes ``text`` token by token and may stop after it."""
    import ctypes

    import llama_cpp

    vocab = llm._model.vocab
    sampler = llama_cpp.llama_sampler_init_grammar(vocab, gbnf.encode(), b"root")
    one = (llama_cpp.llama_token_data * 1)()

    def allowed(token: int) -> bool:
        one[0].id, one[0].logit, one[0].p = token, 0.0, 0.0
        arr = llama_cpp.llama_token_data_array(one, 1, -1, False)
        llama_cpp.llama_sampler_apply(sampler, ctypes.byref(arr))
        return one[0].logit != float("-inf")

    try:
        for token in llm.tokenize(text.encode(), add_bos=False, special=False):
            if not allowed(token):
                return False
            llama_cpp.llama_sampler_accept(sampler, token)
        return allowed(llm.token_eos())
    finally:
        llama_cpp.llama_sampler_free(sampler)


def test_answer_format_texts_are_the_grammars_language(llama, households):
    """The line texts the decoder jumps forward on are answers llama.cpp's grammar takes, and
    what ``forced`` says is forced is what every admitted answer continues with."""
    llm = llama._session.llm
    fmt = AnswerFormat.of(answer_choices(households[0]))
    seg, interests, categories, brands = fmt.lines
    picks = [(seg[0], interests[0], categories[-1], brands[len(brands) // 2]),
             (seg[-1], interests[-1], categories[0], brands[-1])]
    for lines in picks:
        answer = "\n".join(lines)
        assert _grammar_accepts(llm, fmt.gbnf, answer), answer
        for cut in range(len(answer)):
            forced, follow = fmt.forced(answer[:cut])
            assert answer[cut:].startswith(forced), (answer[:cut], forced)
            rest = answer[cut + len(forced):]
            assert follow == ("",) and rest == "" or \
                any(rest.startswith(f.removesuffix("\n")) for f in follow) or not follow
    twice = f"{seg[0]}\n{interests[0]}, {interests[0].split(': ')[1]}\n{categories[0]}\n" \
        f"{brands[0]}"
    assert not _grammar_accepts(llm, fmt.gbnf, twice)  # a name twice: neither admits it


def _unordered(text: str) -> list[list[str]]:
    """Each line's names (the segment's three words), in sorted order."""
    return [sorted(line.split(": ", 1)[1].split(", ")) for line in text.split("\n")]


def test_jump_forward_writes_the_token_by_token_text(llama, households):
    """Feeding forced text without the model gives the answers of one token per step, on the
    same prompts decoded in the same layout (greedy), up to the order of two names in a line:
    the forced text is fed as the tokenizer splits it, in one ``llama_decode``, and where the
    model's next choice is a near tie (two categories, either first) that can flip it."""
    from profiles.backends import LlamaCppBackend

    prompts = [build_messages(c) for c in households]
    choices = [answer_choices(c) for c in households]
    step = LlamaCppBackend(llama.model_file, DEFAULT_MODEL.name, threads=1, reuse_prefix=False,
                           jump_forward=False)
    jump = LlamaCppBackend(llama.model_file, DEFAULT_MODEL.name, threads=1, reuse_prefix=False)
    try:
        slow = step.generate(prompts, choices=choices)
        fast = jump.generate(prompts, choices=choices)
    finally:
        step.close()
        jump.close()
    assert [_unordered(g.text) for g in fast] == [_unordered(g.text) for g in slow]
