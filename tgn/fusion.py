"""DynLLM fusion: distilled attention over the four LLM profile facets.

Part 3 of DynLLM (arXiv 2405.07580): every facet text embedding is projected (linear → dropout →
LayerNorm) and passed through a learned top-k gate that keeps the ``k`` dimensions with the
largest score ``s = e ⊙ p/‖p‖`` as ``e_I ⊙ tanh(s_I)`` and zeroes the rest (the gPool trick of
Graph U-Nets, applied across dimensions). The temporal user embedding then attends over the four
distilled facets (multi-head; the averaged attention weights are the facets' relevance) and an MLP
merges ``[temporal ‖ attended facets]`` into the final user embedding.

Users without a profile use a learned "no profile" facet set in place of their distilled facets,
so the attention always has four keys and the output stays finite.

Shapes: ``B`` batch, ``F`` facets (4), ``E`` text embedding width (384), ``D`` model width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from tgn.data import expand_rows

#: The facet order used everywhere (profiles export, fusion, explain).
FACETS = ("crowd_segment", "personal_interests", "preferred_categories", "favored_brands")


@dataclass
class FusionConfig:
    """Configuration of :class:`DistilledFusion`."""

    dim: int = 100  # D: width of the temporal user embedding it fuses with
    text_dim: int = 384  # E: all-MiniLM-L6-v2 vectors
    num_facets: int = len(FACETS)
    top_k: int | None = None  # None: the public code's share, 80 of 128 dims (62.5%) of D
    heads: int = 2  # as in the public code
    dropout: float = 0.1
    gate: bool = True  # False: the "without distillation gate" ablation
    residual: bool = True  # add the temporal embedding back, so facets can only refine it


class TopKGate(nn.Module):
    """Learned top-k gate over the last dimension, one projection vector per facet.

    Args:
        num_facets: ``F``, one learned vector ``p`` per facet.
        dim: ``D``, width of the gated vectors.
        k: how many dimensions survive (``1 <= k <= D``).
    """

    def __init__(self, num_facets: int, dim: int, k: int) -> None:
        super().__init__()
        if not 1 <= k <= dim:
            raise ValueError(f"top_k must be in [1, {dim}], got {k}")
        self.k = k
        self.p = nn.Parameter(torch.empty(num_facets, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Draw ``p`` from N(0, 1)."""
        nn.init.normal_(self.p)

    def forward(self, e: Tensor) -> Tensor:
        """Keep the ``k`` best-scoring dimensions of ``e`` [B, F, D], scaled by ``tanh(score)``.

        Returns:
            [B, F, D], exactly ``k`` entries per facet may be non-zero.
        """
        s = e * (self.p / self.p.norm(dim=-1, keepdim=True))  # [B, F, D]
        s_top, idx = s.topk(self.k, dim=-1)  # [B, F, k]
        kept = e.gather(-1, idx) * torch.tanh(s_top)
        return torch.zeros_like(e).scatter(-1, idx, kept)


class FacetProjection(nn.Module):
    """Per-facet linear → dropout → LayerNorm, batched over facets with one einsum.

    Args:
        num_facets: ``F``.
        in_dim: ``E``, text embedding width.
        out_dim: ``D``.
        dropout: dropout probability between the linear map and the norm.
    """

    def __init__(self, num_facets: int, in_dim: int, out_dim: int, dropout: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_facets, in_dim, out_dim))
        self.bias = nn.Parameter(torch.zeros(num_facets, out_dim))
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(out_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-uniform weights, zero bias, fresh LayerNorm."""
        nn.init.xavier_uniform_(self.weight)
        nn.init.zeros_(self.bias)
        self.norm.reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        """Project ``x`` [B, F, E] to [B, F, D]."""
        h = torch.einsum("bfe,fed->bfd", x, self.weight) + self.bias
        return self.norm(self.dropout(h))


@dataclass
class FusionOutput:
    """What :class:`DistilledFusion` returns.

    Attributes:
        embedding: [B, D] fused user embeddings.
        relevance: [B, F] attention weights over facets (rows sum to 1); for users without a
            profile they are the weights over the learned "no profile" facets.
        has_profile: [B] bool, which rows used a real profile.
    """

    embedding: Tensor
    relevance: Tensor
    has_profile: Tensor


@dataclass
class FoldedFusion:
    """Inference tables of :meth:`DistilledFusion.fold` (``N`` profile versions, ``H`` heads).

    Attributes:
        score: [N, F, H, D] per-facet query maps: attention logit = ``z · score + offset``.
        value: [N, F, H, D] facet values already mapped through the output and merge layers.
        offset: [N, F, H] logit offsets.
        merge_z: [D, D] the first merge layer's map of the temporal embedding (transposed).
        merge_bias: [D] its bias, with the output layer's bias folded in.
    """

    score: Tensor
    value: Tensor
    offset: Tensor
    merge_z: Tensor
    merge_bias: Tensor

    def __len__(self) -> int:
        return self.score.shape[0]


class DistilledFusion(nn.Module):
    """Fuse temporal user embeddings with distilled profile facets.

    The work splits in two: :meth:`facet_keys` depends on the profile only (projection, gate,
    key/value maps) and can be cached per profile version; :meth:`attend` is the per-event part
    (query, softmax over ``F`` keys, merge MLP).

    Args:
        config: sizes and switches (see :class:`FusionConfig`).
    """

    def __init__(self, config: FusionConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or FusionConfig()
        if config.dim % config.heads:
            raise ValueError(f"dim {config.dim} is not divisible by heads {config.heads}")
        self.project = FacetProjection(config.num_facets, config.text_dim, config.dim,
                                       config.dropout)
        k = config.top_k or max(1, round(0.625 * config.dim))
        self.gate = TopKGate(config.num_facets, config.dim, k) if config.gate else None
        self.no_profile = nn.Parameter(torch.empty(config.num_facets, config.dim))
        # multi-head attention with one query; no attention dropout: the weights are the
        # facets' relevance and must sum to 1
        self.query = nn.Linear(config.dim, config.dim)
        self.key_value = nn.Linear(config.dim, 2 * config.dim)
        self.out = nn.Linear(config.dim, config.dim)
        self.merge = nn.Sequential(
            nn.Linear(2 * config.dim, config.dim),
            nn.ReLU(),
            nn.Linear(config.dim, config.dim),
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-initialise every weight."""
        self.project.reset_parameters()
        if self.gate is not None:
            self.gate.reset_parameters()
        nn.init.normal_(self.no_profile, std=0.1)
        for layer in (self.query, self.key_value, self.out, *self.merge):
            if isinstance(layer, nn.Linear):
                layer.reset_parameters()
        if self.config.residual:  # start as the identity on the temporal embedding
            nn.init.zeros_(self.merge[-1].weight)
            nn.init.zeros_(self.merge[-1].bias)

    def distill(self, facets: Tensor) -> Tensor:
        """Distilled facets [B, F, D] from text vectors ``facets`` [B, F, E]."""
        if facets.shape[1:] != (self.config.num_facets, self.config.text_dim):
            raise ValueError(f"facets must be [B, {self.config.num_facets}, "
                             f"{self.config.text_dim}], got {list(facets.shape)}")
        d = self.project(facets)
        return d if self.gate is None else self.gate(d)

    def facet_keys(self, facets: Tensor) -> Tensor:
        """Attention keys and values [B, F, 2D] of the distilled facets of ``facets`` [B, F, E]."""
        return self.key_value(self.distill(facets))

    def no_profile_keys(self) -> Tensor:
        """Keys and values [F, 2D] of the learned "no profile" facet set."""
        return self.key_value(self.no_profile)

    def attend(self, z: Tensor, keys: Tensor, has_profile: Tensor) -> FusionOutput:
        """The per-event part: ``z`` [B, D] attends over ``keys`` [B, F, 2D], then the merge.

        Rows where ``has_profile`` [B] is False use :meth:`no_profile_keys` instead of ``keys``.
        """
        (b, f, _), h, d = keys.shape, self.config.heads, self.config.dim
        keys = torch.where(has_profile.view(-1, 1, 1), keys,
                           self.no_profile_keys().unsqueeze(0).to(keys.dtype))
        key, value = keys.view(b, f, 2, h, d // h).unbind(2)  # [B, F, H, D/H] each
        query = self.query(z).view(b, 1, h, d // h)
        # with F = 4 keys, broadcast products beat batched matmuls on CPU
        weights = torch.softmax((query * key).sum(-1) / math.sqrt(d // h), dim=1)  # [B, F, H]
        attended = self.out((weights.unsqueeze(-1) * value).sum(1).reshape(b, d))  # [B, D]
        out = self.merge(torch.cat([z, attended], dim=-1))
        if self.config.residual:
            out = out + z
        return FusionOutput(out, weights.mean(2), has_profile)  # relevance [B, F]

    @torch.no_grad()
    def fold(self, keys: Tensor) -> FoldedFusion:
        """Fold the query, output and first merge maps into per-profile tables (inference only).

        Scores are linear in ``z``: ``q_h · k_hf = z · (W_q,h^T k_hf) + b_q,h · k_hf``, and the
        attended values reach the merge only through ``W_1b W_o``; both are precomputed per
        profile so the per-event work is two small contractions and the merge.

        Args:
            keys: [N, F, 2D] from :meth:`facet_keys` (or :meth:`no_profile_keys`).
        """
        h, d = self.config.heads, self.config.dim
        key, value = keys.view(-1, keys.shape[1], 2, h, d // h).unbind(2)  # [N, F, H, D/H]
        scale = math.sqrt(d // h)
        w_q = self.query.weight.view(h, d // h, d)
        score = torch.einsum("nfhe,hed->nfhd", key, w_q) / scale
        offset = torch.einsum("nfhe,he->nfh", key, self.query.bias.view(h, d // h)) / scale
        w_1 = self.merge[0].weight
        w_vo = (w_1[:, d:] @ self.out.weight).view(d, h, d // h)
        value = torch.einsum("nfhe,dhe->nfhd", value, w_vo)
        return FoldedFusion(score.contiguous(), value.contiguous(), offset.contiguous(),
                            w_1[:, :d].T.contiguous(),
                            self.merge[0].bias + w_1[:, d:] @ self.out.bias)

    @torch.no_grad()
    def attend_folded(self, z: Tensor, folded: FoldedFusion, rows: Tensor,
                      has_profile: Tensor) -> FusionOutput:
        """:meth:`attend` from :meth:`fold` tables (inference): ``z`` [B, D] reads table rows
        ``rows`` [B] (the "no profile" row where ``has_profile`` [B] is False)."""
        b, (f, h, d) = z.shape[0], folded.score.shape[1:]
        # one gather per table, then the two contractions as batched matmuls over the F*H heads
        score, value, offset = (expand_rows(x, rows)
                                for x in (folded.score, folded.value, folded.offset))
        logits = torch.baddbmm(offset.view(b, f * h, 1), score.view(b, f * h, d), z.unsqueeze(2))
        weights = torch.softmax(logits.view(b, f, h), dim=1)  # [B, F, H]
        attended = torch.bmm(weights.view(b, 1, f * h), value.view(b, f * h, d)).view(b, d)
        hidden = torch.addmm(attended, z, folded.merge_z).add_(folded.merge_bias).relu_()
        last = self.merge[2]
        out = torch.addmm(z if self.config.residual else last.bias, hidden, last.weight.T)
        if self.config.residual:
            out += last.bias
        return FusionOutput(out, weights.mean(2), has_profile)

    def forward(self, z: Tensor, facets: Tensor, has_profile: Tensor) -> FusionOutput:
        """Fuse.

        Args:
            z: [B, D] temporal user embeddings (the attention query).
            facets: [B, F, E] facet text embeddings (ignored where ``has_profile`` is False).
            has_profile: [B] bool.

        Returns:
            A :class:`FusionOutput` with the [B, D] embedding and [B, F] facet relevance.
        """
        return self.attend(z, self.facet_keys(facets), has_profile)
