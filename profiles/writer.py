"""From user contexts to stored profiles: cache, generate, parse, retry, fall back, embed.

One call handles a batch of contexts::

    prompt hash ──► cache hit? ──► reuse facets + vectors (no generation)
        │ miss
        ▼
    greedy batch generation ──► parse ──► failures: one sampled retry ──► parse
        │                                        │ still malformed
        ▼                                        ▼
    grounding check, facet embeddings ◄── facets from history statistics (fallback)

The cache is the profile store itself (keyed by prompt content and model id), so an unchanged
history never costs a second generation, across restarts too.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from profiles.backends import LLMBackend
from profiles.embed import FacetEmbedder
from profiles.facets import Facets, fallback_facets, grounding, parse_facets
from profiles.graph import UserContext
from profiles.prompt import answer_choices, build_messages, prompt_hash
from profiles.store import Profile, ProfileStore
from streaming import metrics

log = logging.getLogger(__name__)


@dataclass
class WriteStats:
    """Running totals over :meth:`ProfileWriter.write` calls."""

    profiles: int = 0
    generated: int = 0
    cached: int = 0
    retried: int = 0
    fallbacks: int = 0
    grounded: int = 0
    named: int = 0
    new_tokens: int = 0
    calls: int = 0
    prompt_tokens: int = 0
    reused_tokens: int = 0
    llm_seconds: float = 0.0

    @property
    def grounding_share(self) -> float:
        """Share of named categories/brands found in the users' contexts."""
        return self.grounded / self.named if self.named else float("nan")


class ProfileWriter:
    """Writes profiles for batches of user contexts into a store.

    Args:
        backend: The language model.
        embedder: The facet embedder.
        store: Where profiles go (also the generation cache).
    """

    def __init__(self, backend: LLMBackend, embedder: FacetEmbedder, store: ProfileStore) -> None:
        self.backend, self.embedder, self.store = backend, embedder, store
        self.stats = WriteStats()

    def _generate(self, prompts: list, sample: bool, choices: list) -> list:
        start = time.perf_counter()
        gens = self.backend.generate(prompts, sample=sample, choices=choices)
        elapsed = time.perf_counter() - start
        self.stats.llm_seconds += elapsed
        metrics.LLM_REQUEST_SECONDS.observe(elapsed)
        tokens = sum(g.new_tokens for g in gens)
        self.stats.new_tokens += tokens
        self.stats.calls += len(gens)
        self.stats.prompt_tokens += sum(g.prompt_tokens for g in gens)
        self.stats.reused_tokens += sum(g.reused_tokens for g in gens)
        metrics.LLM_GENERATED_TOKENS.inc(tokens)
        return gens

    def _facets_for(self, contexts: list[UserContext], messages: list) -> list[tuple[Facets, int]]:
        """``(facets, tokens)`` per context: greedy, one sampled retry, then fallback."""
        choices = [answer_choices(c) for c in contexts]
        gens = self._generate(messages, False, choices)
        out = [(parse_facets(g.text), g.new_tokens) for g in gens]
        bad = [i for i, (f, _) in enumerate(out) if f is None]
        if bad:
            self.stats.retried += len(bad)
            metrics.LLM_RETRIES.inc(len(bad))
            retry = self._generate([messages[i] for i in bad], True, [choices[i] for i in bad])
            for i, g in zip(bad, retry, strict=True):
                out[i] = (parse_facets(g.text), out[i][1] + g.new_tokens)
        result = []
        for ctx, (facets, tokens) in zip(contexts, out, strict=True):
            if facets is None:
                log.info("user %s: model answer unusable twice; fallback facets", ctx.user_id)
                metrics.PROFILES_FAILED.labels(reason="parse_error").inc()
                facets = fallback_facets(ctx)
            result.append((facets, tokens))
        return result

    def write(self, contexts: list[UserContext], hops: int = 2) -> list[Profile]:
        """Profiles for ``contexts`` (stored before returning; versions set).

        Args:
            contexts: One context per profile to write (from ``PurchaseGraph.context``).
            hops: The hops the contexts were built with (stored with the profile).
        """
        messages = [build_messages(c) for c in contexts]
        hashes = [prompt_hash(m) for m in messages]
        model_id = self.backend.model_id
        cached = {h: self.store.cached(h, model_id) for h in set(hashes)}
        todo = list({h: i for i, h in reversed(list(enumerate(hashes)))
                     if cached[h] is None}.values())  # first context per uncached prompt
        fresh = self._facets_for([contexts[i] for i in todo], [messages[i] for i in todo]) \
            if todo else []
        vectors = self.embedder.embed_facets([f.texts for f, _ in fresh]) if fresh else []
        made = {hashes[i]: (f, v, n) for i, (f, n), v in zip(todo, fresh, vectors, strict=True)}
        first = set(todo)
        profiles = []
        for i, (ctx, h) in enumerate(zip(contexts, hashes, strict=True)):
            hit = cached[h]
            facets, vecs, tokens = (hit.facets, hit.vectors, 0) if hit else made[h]
            tokens = tokens if i in first else 0
            grounded, named = grounding(facets, ctx)
            profiles.append(Profile(ctx.user_id, ctx.ts, facets, vecs, model_id, h, hops,
                                    grounded, named, tokens))
        self.store.put(profiles)
        self._count([profiles[i] for i in todo], len(profiles))
        return profiles

    def _count(self, generated: list[Profile], total: int) -> None:
        """Add a batch to the totals; quality figures count generated profiles only."""
        s = self.stats
        s.profiles += total
        s.generated += len(generated)
        s.cached += total - len(generated)
        s.fallbacks += sum(p.facets.fallback for p in generated)
        s.grounded += sum(p.grounded for p in generated if not p.facets.fallback)
        s.named += sum(p.named for p in generated if not p.facets.fallback)
        metrics.PROFILES_GENERATED.inc(len(generated))
        metrics.PROFILE_CACHE_HITS.inc(total - len(generated))
