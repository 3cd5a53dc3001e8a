"""The packaged default model writes one real Complete Journey household's profile."""

from __future__ import annotations

import pytest

from profiles.facets import grounding, parse_facets
from profiles.graph import PurchaseGraph
from profiles.modelpack import DEFAULT_MODEL, resolve_model
from profiles.prompt import build_messages
from streaming.dataset import Dataset


@pytest.mark.llm
@pytest.mark.slow
def test_default_model_profiles_one_real_user(cj_small):
    import torch

    from profiles.backends import TransformersBackend

    torch.set_num_threads(2)
    path = resolve_model()  # converts once (~2 min), then loads from the cache
    assert (path / "DYNLLM_SOURCE").read_text().split()[-1] == DEFAULT_MODEL.sha256
    dataset = Dataset.load(cj_small)
    graph = PurchaseGraph(dataset)
    cut = dataset.meta["split"]["train_end"]
    user = next(u for u in graph.users if (graph.user_event_times(u) <= cut).sum() >= 20)
    ctx = graph.context(user, cut)
    backend = TransformersBackend(path, batch_size=1)
    (gen,) = backend.generate([build_messages(ctx)])
    facets = parse_facets(gen.text)
    assert facets is not None, gen.text
    assert 5 < gen.new_tokens <= backend.vocab.max_tokens()
    assert all(facets.texts[i].count(",") <= 1 for i in (1, 2, 3))  # two items per list
    grounded, named = grounding(facets, ctx)
    assert named >= 2 and grounded / named >= 0.5, (gen.text, ctx.known)
