"""A trained run directory: the one place that knows its layout and reads each file once.

``dynllm train`` writes a run (:meth:`Run.write`); every reader — evaluation, replay, the
pipeline's shards and fusion stage, the server, ``dynllm explain``, the benchmarks — opens it
with :meth:`Run.open`::

    run = Run.open("runs/cj")
    model = run.model()  # TGN, or TGN + DynLLM head when the run was trained with profiles
    run.config["data"]   # the dataset it was trained on

Layout: ``model.pt`` (weights, state after train + validation, id maps; a DynLLM run's
``extra`` also holds the fusion config and the profile table), ``config.json`` (settings,
dataset path and counts, timings), ``history.json`` and ``curves.png`` (loss and validation
Recall@10 per epoch).

The checkpoint and ``config.json`` are read at most once per :class:`Run`; :meth:`Run.model`
builds a fresh model from the payload read, so callers that need several independent models
(a server's shards before their first checkpoint) do not read the file again.
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import nn

from streaming.errors import UsageError


class Run:
    """A run directory (see the module docstring for its layout).

    Args:
        path: the directory.
    """

    MODEL = "model.pt"
    CONFIG = "config.json"
    HISTORY = "history.json"
    CURVES = "curves.png"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @classmethod
    def open(cls, path: str | Path) -> Run:
        """The run at ``path``; a clear error when it holds no trained model."""
        run = cls(path)
        if not run.model_path.exists():
            raise UsageError(f"{path} is not a run directory (no {cls.MODEL}; train one with "
                             "`dynllm train`)")
        return run

    @property
    def model_path(self) -> Path:
        """``model.pt``: the checkpoint."""
        return self.path / self.MODEL

    @cached_property
    def config(self) -> dict[str, Any]:
        """``config.json`` as written by training (empty when the run has none)."""
        path = self.path / self.CONFIG
        return json.loads(path.read_text()) if path.exists() else {}

    @property
    def data_dir(self) -> Path | None:
        """The dataset the run was trained on (``config.json``'s ``data``), if recorded."""
        data = self.config.get("data")
        return Path(data) if data else None

    @cached_property
    def payload(self) -> dict[str, Any]:
        """The checkpoint's contents (:meth:`tgn.model.TGNRecommender.checkpoint_payload`)."""
        return torch.load(self.model_path, map_location="cpu", weights_only=True)

    @property
    def is_dynllm(self) -> bool:
        """Whether the run carries a DynLLM fusion head (trained with profiles)."""
        return self.payload.get("extra", {}).get("model") == "dynllm"

    @property
    def name(self) -> str:
        """``"DynLLM"`` or ``"TGN"``: how tables name the run's model."""
        return "DynLLM" if self.is_dynllm else "TGN"

    def user_head(self) -> nn.Module | None:
        """A fresh user head as the run's checkpoint describes it (``None``: plain TGN).

        Its weights are loaded with the model; a DynLLM head carries the run's profile table.
        """
        from tgn.dynllm_head import head_from_extra

        return head_from_extra(self.payload.get("extra", {}))

    def model(self, statistics: bool = True):
        """A fresh :class:`tgn.model.TGNRecommender` from the checkpoint (with its head).

        Args:
            statistics: ``False`` leaves the repeat term's purchase statistics empty (a reader
                that keeps its own skips rebuilding them).
        """
        from tgn.model import TGNRecommender

        return TGNRecommender.from_payload(self.payload, self.user_head(), statistics,
                                           source=self.model_path)

    def write(self, model, summary: dict[str, Any], history: list[dict[str, float]],
              extra: dict[str, Any] | None = None) -> None:
        """Write a trained run: the checkpoint, ``config.json``, ``history.json`` and the curves
        (none for an empty history: an untrained run).

        Args:
            model: the trained :class:`tgn.model.TGNRecommender`, its state as it should stream on.
            summary: what ``config.json`` records (settings, dataset, timings).
            history: per-epoch training records.
            extra: what the checkpoint's ``extra`` carries besides (e.g. the DynLLM head's).
        """
        self.path.mkdir(parents=True, exist_ok=True)
        model.save(self.model_path, extra=extra)
        (self.path / self.CONFIG).write_text(json.dumps(summary, indent=2) + "\n")
        (self.path / self.HISTORY).write_text(json.dumps(history, indent=2) + "\n")
        if history:
            plot_curves(history, self.path / self.CURVES)
        self.__dict__.pop("config", None)
        self.__dict__.pop("payload", None)


def plot_curves(history: list[dict[str, float]], path: Path) -> None:
    """Loss and validation Recall@10 per epoch, side by side (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    left.plot(epochs, [h["loss"] for h in history], marker="o")
    left.set(title="training BPR loss", xlabel="epoch")
    right.plot(epochs, [h["val_recall@10"] for h in history], marker="o", color="tab:green")
    right.set(title="validation Recall@10", xlabel="epoch")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

