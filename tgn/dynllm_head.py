"""The DynLLM user head: time-correct profile lookup + distilled attention fusion.

Plugs into :class:`tgn.model.TGNRecommender` as ``user_head``: for users ``[B]`` at times
``t [B]`` it looks up the latest profile written strictly before ``t``
(:class:`tgn.profile_features.ProfileTable`) and fuses its four facet vectors with the temporal
embedding (:class:`tgn.fusion.DistilledFusion`). The facet relevance of the last call is kept
for explanations and the serving API.

The profile table is data, not weights: it is saved beside the weights in the checkpoint's
``extra`` (:func:`head_extra`, read back by :func:`head_from_extra`; runs are opened with
:class:`tgn.run.Run`) and can be swapped while streaming (:meth:`DynLLMHead.set_profiles`) as
new profiles arrive.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from tgn.fusion import DistilledFusion, FoldedFusion, FusionConfig, FusionOutput
from tgn.profile_features import ProfileTable


class DynLLMHead(nn.Module):
    """``head(z [B, D], user_index [B], t [B]) -> [B, D]`` fusing profiles into ``z``.

    The output of the latest call (:attr:`last`, :attr:`last_rows`) is kept on the instance
    for callers that just scored through the model and want the facet relevance behind it
    (``dynllm explain``, tests): ``forward`` must return only the embedding to fit the
    ``user_head`` contract. It is a per-call convenience, not state: the pipeline's fusion stage
    reads it right after its own call on its own head and passes the weights on as data, the
    server reads them from the embedding store and changelog; it is not saved, and a concurrent
    caller of the same head overwrites it.

    Args:
        config: fusion sizes and switches; ``config.dim`` must equal the model's embed width.
        profiles: the profile versions to read (empty: every user takes the no-profile path).
    """

    def __init__(self, config: FusionConfig | None = None,
                 profiles: ProfileTable | None = None) -> None:
        super().__init__()
        self.fusion = DistilledFusion(config)
        self.config = self.fusion.config
        self.profiles = profiles or ProfileTable.empty(self.config.num_facets,
                                                       self.config.text_dim)
        self._last: tuple[FusionOutput, Tensor, Tensor | None] | None = None
        #: eval only: folded tables of the profile versions in the table's input order
        #: (``profiles.source_row``), then one for "no profile"
        self._keys: FoldedFusion | None = None

    def train(self, mode: bool = True) -> DynLLMHead:
        """Switch mode; leaving eval mode drops the cached facet keys (weights will change)."""
        self._keys = None
        return super().train(mode)

    def set_profiles(self, profiles: ProfileTable, appended: bool = False) -> None:
        """Read from ``profiles`` from now on (e.g. after new profiles arrived).

        Args:
            profiles: the new table.
            appended: ``profiles`` was built from the current table's input rows, in their
                order, followed by new versions: only the new ones are folded (a live table
                that only grows re-folds nothing it had).
        """
        if (profiles.num_facets, profiles.text_dim) != (self.config.num_facets,
                                                        self.config.text_dim) and len(profiles):
            raise ValueError(f"profiles are [P, {profiles.num_facets}, {profiles.text_dim}], "
                             f"the head expects [P, {self.config.num_facets}, "
                             f"{self.config.text_dim}]")
        if not appended:
            self._keys = None
        self.profiles = profiles

    @property
    def last(self) -> FusionOutput | None:
        """Output of the latest call (embedding [B, D], facet relevance [B, F], has_profile)."""
        if self._last is None:
            return None
        out, _, inverse = self._last
        if inverse is None:
            return out
        return FusionOutput(out.embedding[inverse], out.relevance[inverse],
                            out.has_profile[inverse])

    @property
    def last_rows(self) -> Tensor | None:
        """[B] profile rows read by the latest call (-1: no profile)."""
        if self._last is None:
            return None
        _, row, inverse = self._last
        return row if inverse is None else row[inverse]

    @torch.no_grad()
    def _cached_tables(self) -> FoldedFusion:
        """Folded tables (:meth:`DistilledFusion.fold`) of every profile version in input order,
        the last row for "no profile"; each version is folded once per eval session."""
        fusion, table = self.fusion, self.profiles
        done = 0 if self._keys is None else len(self._keys) - 1
        if self._keys is not None and done == len(table):
            return self._keys
        sorted_row = torch.empty_like(table.source_row)
        sorted_row[table.source_row] = torch.arange(len(table))  # input position -> sorted row
        vectors = table.vectors[sorted_row[done:]]  # the versions not folded yet, input order
        parts = [fusion.facet_keys(vectors[i:i + 4096]) for i in range(0, len(vectors), 4096)]
        if self._keys is None:
            self._keys = fusion.fold(torch.cat(parts + [fusion.no_profile_keys().unsqueeze(0)]))
        else:
            new, old = fusion.fold(torch.cat(parts)), self._keys
            self._keys = FoldedFusion(
                *(torch.cat([a[:-1], b, a[-1:]]) for a, b in ((old.score, new.score),
                                                               (old.value, new.value),
                                                               (old.offset, new.offset))),
                old.merge_z, old.merge_bias)
        return self._keys

    def forward(self, z: Tensor, user_index: Tensor, t: Tensor) -> Tensor:
        """Fused user embeddings [B, D] (facet relevance kept in :attr:`last`).

        In eval mode the profile-only part (projection, gate, key/value maps, folded query and
        output maps) is computed once per profile version, and the rest once per run of equal
        ``(user, t)`` in the batch (a basket is many events of one user at one time: the same
        temporal embedding, the same profile); in training everything runs per event.
        """
        if self.training:
            found = self.profiles.lookup(user_index, t)
            keys = self.fusion.facet_keys(found.facets.to(z.dtype))
            out = self.fusion.attend(z, keys, found.has_profile)
            self._last = (out, found.row, None)
            return out.embedding
        # inference: once per distinct (user, t), from precomputed per-profile tables; events
        # come in time order, so a basket's lines are adjacent (no sort needed), and the stream
        # embeds each user once per batch (no run at all). Index bookkeeping in NumPy: a few
        # dozen users per call, where each torch call costs more than the arithmetic.
        users, times = user_index.numpy(), t.numpy()
        starts = np.ones(len(users), dtype=bool)
        starts[1:] = (users[1:] != users[:-1]) | (times[1:] != times[:-1])
        inverse = None if starts.all() else torch.from_numpy(np.cumsum(starts) - 1)  # [B] run
        if inverse is not None:
            first = torch.from_numpy(np.flatnonzero(starts))  # [U] first event of each run
            z, user_index, t = z[first], user_index[first], t[first]
        row = self.profiles.latest_rows(user_index, t)
        tables = self._cached_tables()
        has = row >= 0
        # the folded tables follow the table's input order (appended versions go at the end)
        source = self.profiles.source_row.numpy()[np.maximum(row.numpy(), 0)] \
            if len(self.profiles) else row.numpy()
        source = torch.from_numpy(np.where(has.numpy(), source, len(tables) - 1))
        out = self.fusion.attend_folded(z, tables, source, has)
        self._last = (out, row, inverse)  # per run; expanded to events on demand
        return out.embedding if inverse is None else out.embedding[inverse]


def head_extra(head: DynLLMHead) -> dict[str, Any]:
    """What a checkpoint's ``extra`` needs to rebuild ``head``: its config and profile table."""
    return {"model": "dynllm", "fusion": asdict(head.config), "profiles": head.profiles.to_state()}


def head_from_extra(extra: dict[str, Any]) -> DynLLMHead | None:
    """A fresh head as a checkpoint's ``extra`` (:func:`head_extra`) describes it, with its
    profile table; ``None`` for a plain TGN checkpoint. Its weights load with the model."""
    if extra.get("model") != "dynllm":
        return None
    return DynLLMHead(FusionConfig(**extra["fusion"]), ProfileTable.from_state(extra["profiles"]))
