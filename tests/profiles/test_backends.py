"""Backends: the local transformers model (tiny, random) and a real HTTP chat-completions peer."""

from __future__ import annotations

import pytest

from profiles.backends import BackendError, HttpBackend, TransformersBackend
from profiles.prompt import PREFILL

PROMPTS = [[{"role": "system", "content": "Write a profile."},
            {"role": "user", "content": "Categories: Cheese (3)" + " and more" * i}]
           for i in range(3)]


def test_local_backend_batches_prefills_and_caps_tokens(tiny_llm):
    backend = TransformersBackend(tiny_llm, batch_size=2, max_new_tokens=12)
    gens = backend.generate(PROMPTS)
    assert len(gens) == 3
    assert all(g.text.startswith(PREFILL) and 0 < g.new_tokens <= 12 for g in gens)
    assert backend.generate(PROMPTS) == gens  # greedy: deterministic across batch layouts
    one = TransformersBackend(tiny_llm, batch_size=1, max_new_tokens=12).generate(PROMPTS[:1])
    assert one[0].text == gens[0].text  # left padding does not change the answer


def test_shared_prefix_cache_changes_no_answer(tiny_llm):
    cached = TransformersBackend(tiny_llm, batch_size=3, max_new_tokens=12)
    plain = TransformersBackend(tiny_llm, batch_size=3, max_new_tokens=12, prefix_cache=False)
    texts = [cached._text(m) for m in PROMPTS]
    enc = cached._encode(texts)
    assert "past_key_values" in enc  # the shared head "system: ...\nuser: " was reused
    assert enc["attention_mask"].sum().item() == plain._encode(texts)["attention_mask"].sum()
    assert cached.generate(PROMPTS) == plain.generate(PROMPTS)


def test_http_backend_answers_and_retries_server_errors(chat_peer):
    backend = HttpBackend(chat_peer.url, model="peer", backoff=0.01)
    chat_peer.script = [503, 500]  # two failures, then an answer
    (gen,) = backend.generate([PROMPTS[0]])
    assert "Preferred categories: Cheese" in gen.text and gen.new_tokens > 0
    assert len(chat_peer.requests) == 3
    assert chat_peer.requests[0]["model"] == "peer"
    assert chat_peer.requests[0]["messages"] == PROMPTS[0]


def test_http_backend_gives_up_clearly(chat_peer):
    chat_peer.script = [400]
    with pytest.raises(BackendError, match="HTTP 400"):  # a client error is not retried
        HttpBackend(chat_peer.url, backoff=0.01).generate([PROMPTS[0]])
    assert len(chat_peer.requests) == 1
    chat_peer.delay = 0.5
    with pytest.raises(BackendError, match="after 2 attempts"):
        HttpBackend(chat_peer.url, timeout=0.1, retries=1, backoff=0.01).generate([PROMPTS[0]])
