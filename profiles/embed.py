"""Facet text embeddings: all-MiniLM-L6-v2 (384-d), one vector per facet.

The facet content is embedded without its heading: a shared leading label ("Favored brands:")
pulls all vectors of a facet together and drowns the content. Vectors are mean-pooled over
tokens and L2-normalised, as sentence-transformers does for this model.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from profiles.modelpack import embedder_path

EMBED_DIM = 384


class FacetEmbedder:
    """Embeds facet texts with a sentence-transformers style encoder.

    Args:
        model_path: Encoder folder; defaults to the packaged all-MiniLM-L6-v2.
        batch_size: Texts per forward pass.
    """

    def __init__(self, model_path: str | Path | None = None, batch_size: int = 64) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoModel, AutoTokenizer

        path = Path(model_path) if model_path else embedder_path()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval()
        self.batch_size = batch_size
        self.dim = int(self.model.config.hidden_size)

    def embed(self, texts: list[str]) -> np.ndarray:
        """Unit vectors ``(len(texts), dim)`` float32."""
        import torch

        out = np.zeros((len(texts), self.dim), np.float32)
        for start in range(0, len(texts), self.batch_size):
            batch = texts[start:start + self.batch_size]
            enc = self.tokenizer(batch, padding=True, truncation=True, max_length=128,
                                 return_tensors="pt")
            with torch.inference_mode():
                hidden = self.model(**enc).last_hidden_state  # (B, L, D)
            mask = enc["attention_mask"].unsqueeze(-1).float()  # (B, L, 1)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # (B, D)
            pooled = torch.nn.functional.normalize(pooled, dim=-1)
            out[start:start + len(batch)] = pooled.numpy()
        return out

    def embed_facets(self, facet_texts: list[tuple[str, ...]]) -> np.ndarray:
        """Facet vectors ``(P, 4, dim)`` for ``P`` profiles of four facet texts each."""
        flat = [t for texts in facet_texts for t in texts]
        return self.embed(flat).reshape(len(facet_texts), -1, self.dim)
