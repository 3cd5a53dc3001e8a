"""LLM user profiles: graph-aware prompts, model backends, facet parsing and grounding, facet
embeddings, the profile store and the asynchronous worker."""
