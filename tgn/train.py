"""Training: BPR over the event stream, early stopping on validation Recall@10.

One epoch streams the training split in time order (TGN, https://arxiv.org/abs/2006.10637):
for each batch the state holds every earlier event; the previous batch is applied with gradients
at the start of the step (so the GRU and message path learn, as in PyG's lazy memory), the batch
is scored against sampled negatives (BPR, https://arxiv.org/abs/1205.2618), and the state is
detached after the optimiser step. Negatives are uniform over the items seen so far; with
``TrainConfig.history_negatives`` a share of them comes from the user's own earlier purchases,
so the repeat term also sees past items that were not bought again (with uniform negatives
alone it only learns "bought before beats anything"). Validation replays the split
test-then-update with the :class:`~tgn.evaluate.Evaluator`; the best epoch's weights are kept.

A user head with extra parameters (the DynLLM fusion head) trains jointly with no change here:
it is a submodule of the model; if it defines ``extra_loss() -> Tensor`` that term is added.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from tgn.data import EventBatch, distinct_queries
from tgn.evaluate import Evaluator
from tgn.model import TGNRecommender

#: Validation metrics kept in the per-epoch history (``val_`` + name).
VAL_METRICS = ("recall@10", "recall@20", "mrr", "repeat/recall@20", "explore/recall@20",
               "explore/ndcg@20")


#: Stage-1 losses (:attr:`TrainConfig.loss`).
LOSSES = ("bpr", "softmax")


@dataclass
class TrainConfig:
    """Optimisation settings; the defaults are the full configuration."""

    epochs: int = 10
    batch_size: int = 200  # TGN's batch size: smaller batches see fresher state
    lr: float = 1e-3
    #: stage 1's loss: ``"bpr"`` (each purchase against ``negatives`` uniform items) or
    #: ``"softmax"`` (cross-entropy of each purchase against ``softmax_negatives`` uniform items
    #: shared by the batch: a sampled full-catalog softmax, as SASRec-with-CE)
    loss: str = "bpr"
    negatives: int = 1  # BPR pairs per purchase
    softmax_negatives: int = 1000
    #: share of each purchase's negatives drawn from the user's own earlier purchases (the
    #: rest uniform over the items seen so far), so the repeat term learns which past items
    #: not to repeat; needs the repeat term's history (``TGNConfig.repeat``), else all uniform.
    #: 0.0 by default: 0.1 won on cj26 validation by +0.002 Recall@10 but lost 17% on cj-top150
    #: validation (docs/lab-notes/temporal-model.md, "History negatives for the repeat term")
    history_negatives: float = 0.0
    patience: int = 2  # epochs without a better validation Recall@10 before stopping
    seed: int = 0
    #: events scored from one state in validation and evaluation: TGN's batch size, so a
    #: score is at most 200 events behind the stream (2,000 hid most of a MovieLens session
    #: from its own next events: docs/quality.md, "Evaluation batch")
    eval_batch_size: int = 200
    max_val_events: int | None = None  # validate on the first N events (smoke runs)
    #: stage 2 (:func:`fit_history`): optimiser steps (on the newest batches of the training
    #: events; a small log is passed over again), learning rate, batch size and the share of
    #: each pass that only builds state first (chosen on validation: docs/quality.md; 1,500
    #: steps, not 500: stage 2 was under-trained, "Fourth round")
    history_steps: int = 1500
    history_lr: float = 3e-3
    history_batch_size: int = 200
    history_warmup: float = 0.5

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.negatives < 1 or self.softmax_negatives < 1:
            raise ValueError(f"negatives must be at least 1, got {self.negatives} and "
                             f"{self.softmax_negatives}")
        if not 0.0 <= self.history_negatives <= 1.0:
            raise ValueError(f"history_negatives must be in [0, 1], got {self.history_negatives}")


@dataclass
class TrainResult:
    """Per-epoch history and the selected epoch."""

    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = -1
    best_recall: float = -math.inf
    history_losses: list[float] = field(default_factory=list)  # stage 2, per step


def first_seen_order(items: Tensor) -> tuple[Tensor, Tensor]:
    """Items in order of first appearance ``[M]`` and that appearance's position ``[M]``.

    >>> first_seen_order(torch.tensor([5, 2, 5, 7]))
    (tensor([5, 2, 7]), tensor([0, 1, 3]))
    """
    uniq, inverse = torch.unique(items, return_inverse=True)
    first = torch.full((uniq.numel(),), items.numel()).scatter_reduce_(
        0, inverse, torch.arange(items.numel()), "amin")
    order = torch.argsort(first)
    return uniq[order], first[order]


def draw_negatives(model: TGNRecommender, batch: EventBatch, candidates: Tensor,
                   config: TrainConfig, generator: torch.Generator) -> Tensor:
    """BPR negatives ``[B, R]`` (``R = config.negatives``) for the purchases of ``batch``.

    Of each row's ``R`` columns the first ``floor(h)`` (``h = history_negatives · R``) are
    history negatives and the next one is with probability ``frac(h)``: an item drawn from the
    user's purchases recorded before the batch, never the row's positive
    (:meth:`~tgn.repeat.RepeatScore.sample_history`). The others, and a history column whose
    user has no other past item, are uniform over ``candidates [M]`` (items seen so far).
    The random draws do not depend on the history, so a seed gives the same stream of draws.
    """
    b, r = len(batch), config.negatives
    negatives = candidates[torch.randint(candidates.numel(), (b, r), generator=generator)]
    share = config.history_negatives
    if share == 0.0 or model.repeat is None:
        return negatives
    h = share * r
    column = torch.arange(r, dtype=torch.float64).expand(b, r)
    coin = torch.rand(b, generator=generator, dtype=torch.float64).unsqueeze(1)
    from_history = (column < math.floor(h)) | ((column == math.floor(h)) & (coin < h % 1))
    rows = from_history.nonzero()  # [H, 2]
    past = model.repeat.sample_history(batch.users[rows[:, 0]], batch.items[rows[:, 0]],
                                       generator)
    negatives[rows[:, 0], rows[:, 1]] = torch.where(past >= 0, past,
                                                    negatives[rows[:, 0], rows[:, 1]])
    return negatives


def bpr_loss(model: TGNRecommender, batch: EventBatch, negatives: Tensor) -> Tensor:
    """Mean ``-log σ(s(u, pos) - s(u, neg))`` over ``negatives [B, R]`` item indices, where
    ``s`` is the dot product of the temporal embeddings (stage 1; the history mixture is fitted
    afterwards by :func:`fit_history`)."""
    b, r = negatives.shape
    users = model.user_embeddings(batch.users, batch.t)  # [B, E]
    items = torch.cat([batch.items, negatives.reshape(-1)])  # [B + B·R]
    t = torch.cat([batch.t, batch.t.repeat_interleave(r)])
    z = model.item_embeddings(t, items)
    pos = (users * z[:b]).sum(-1)  # [B]
    neg = (users.repeat_interleave(r, 0) * z[b:]).sum(-1).view(b, r)
    return -F.logsigmoid(pos.unsqueeze(1) - neg).mean()


def softmax_loss(model: TGNRecommender, batch: EventBatch, negatives: Tensor) -> Tensor:
    """Mean cross-entropy of each purchase of ``batch`` against ``negatives [S]`` item indices
    shared by the batch (a sampled softmax over the catalog; a negative equal to the row's
    positive is masked). Items are embedded at the batch's first time, as in evaluation."""
    users = model.user_embeddings(batch.users, batch.t)  # [B, E]
    z = model.item_embeddings(float(batch.t[0]), torch.cat([batch.items, negatives]))
    b = len(batch)
    pos = (users * z[:b]).sum(-1, keepdim=True)  # [B, 1]
    neg = (users @ z[b:].T).masked_fill(negatives == batch.items.unsqueeze(1), -torch.inf)
    logits = torch.cat([pos, neg], dim=1)  # [B, 1 + S]
    return F.cross_entropy(logits, torch.zeros(b, dtype=torch.long))


def train_epoch(model: TGNRecommender, optimizer: torch.optim.Optimizer, train: EventBatch,
                config: TrainConfig, generator: torch.Generator, progress: bool = True) -> float:
    """Stream the training events once; returns the mean stage-1 loss (``config.loss``)."""
    model.train()
    model.reset_state()
    seen_items, first_pos = first_seen_order(train.items)
    prev, losses, start = None, [], 0
    bar = tqdm(list(train.batches(config.batch_size)), desc="train", disable=not progress)
    for batch in bar:
        optimizer.zero_grad()
        if prev is not None:
            model.update(prev)  # with gradients: the memory path learns from this step's loss
        known = max(1, int(torch.searchsorted(first_pos, start + len(batch))))
        if config.loss == "softmax":
            shared = torch.randint(known, (config.softmax_negatives,), generator=generator)
            loss = softmax_loss(model, batch, seen_items[shared])
        else:
            negatives = draw_negatives(model, batch, seen_items[:known], config, generator)
            loss = bpr_loss(model, batch, negatives)
        if callable(extra := getattr(model.user_head, "extra_loss", None)):
            loss = loss + extra()  # the user head's own term (the DynLLM head's distillation)
        loss.backward()
        optimizer.step()
        model.detach()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
        prev, start = batch, start + len(batch)
    with torch.no_grad():
        if prev is not None:
            model.update(prev)
    return sum(losses) / max(1, len(losses))


class DotProducts:
    """The model's dot products alone as a :class:`~tgn.evaluate.Recommender` (stage 1's
    validation: the history mixture is not fitted yet)."""

    def __init__(self, model: TGNRecommender) -> None:
        self.model = model

    def score(self, batch: EventBatch) -> Tensor:
        return self.model.score_users(batch.users, batch.t, mix=False)

    def update(self, batch: EventBatch) -> None:
        self.model.update(batch)


def validate(model: TGNRecommender, val: EventBatch, config: TrainConfig,
             progress: bool = True, seen: EventBatch | None = None,
             mix: bool = True) -> dict[str, float]:
    """Test-then-update metrics on the validation events, continuing from the current state.

    ``seen`` (the training events) makes their items candidates from the first batch on, as in
    the test evaluation; without it the first ``eval_batch_size`` purchases can only miss.
    ``mix=False`` scores the dot products alone (:class:`DotProducts`).
    """
    model.eval()
    if config.max_val_events is not None:
        val = val[: config.max_val_events]
    evaluator = Evaluator()
    if seen is not None:
        evaluator.observe(seen)
    return evaluator.run(model if mix else DotProducts(model), val,
                         batch_size=config.eval_batch_size, progress=progress)


def fit_history(model: TGNRecommender, events: EventBatch, config: TrainConfig,
                progress: bool = True) -> list[float]:
    """Stage 2: fit the history mixture's weights (:class:`~tgn.repeat.RepeatScore`: ``g``,
    the item prior, the gate, the explore weight) with the temporal model frozen.

    Takes exactly ``config.history_steps`` optimiser steps, each on one batch of ``events``
    (whole timestamps, so a basket is scored from the state as of its start): the batch's
    purchases are scored by their mixture log-probability over the full catalog (dot products
    from the frozen model), one Adam step is taken on the negative mean, and the batch is
    applied. A pass streams ``events`` in time order; the first ``config.history_warmup`` share
    only builds state, and of the rest only the *last* batches a pass still needs are scored
    (the newest events, nearest to what is recommended next), so a large log costs
    ``history_steps`` scored batches and a small one is passed over again until they are taken.
    Returns the loss of each step (``history_steps`` of them unless nothing is rankable).
    """
    assert model.repeat is not None, "fit_history needs the history mixture (config.repeat)"
    optimizer = torch.optim.Adam(model.repeat.parameters(), lr=config.history_lr)
    batches = list(events.batches(config.history_batch_size, whole_times=True))
    sizes = torch.tensor([len(b) for b in batches])
    starts = sizes.cumsum(0) - sizes  # [P] events applied before each batch
    warm = int(torch.searchsorted(starts, int(config.history_warmup * len(events))))
    losses: list[float] = []
    while len(losses) < config.history_steps and warm < len(batches):
        model.eval()
        model.reset_state()
        first = max(warm, len(batches) - (config.history_steps - len(losses)))
        taken = len(losses)
        bar = tqdm(batches, desc="history", disable=not progress)
        for index, batch in enumerate(bar):
            if index >= first and len(losses) < config.history_steps:
                users, t, inverse, _ = distinct_queries(batch.users, batch.t)
                with torch.no_grad():
                    dot = model.score_users(users, t, item_time=float(batch.t[0]), mix=False)
                logp = model.repeat.log_probs(dot, users, t)[inverse, batch.items]  # [B]
                logp = logp[torch.isfinite(logp)]  # items nobody had bought yet: unrankable
                if logp.numel():
                    loss = -logp.mean()
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                    losses.append(loss.item())
                    bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
            with torch.no_grad():
                model.update(batch)
        if len(losses) == taken:
            break  # nothing to fit on (no rankable purchase after the warm-up share)
    return losses


def train(model: TGNRecommender, train_events: EventBatch, val_events: EventBatch,
          config: TrainConfig, progress: bool = True) -> TrainResult:
    """Fit ``model`` with BPR and early stopping; leaves the best epoch's weights loaded.

    Args:
        model: the recommender (its id maps must cover both splits).
        train_events: training split, time-ordered.
        val_events: validation split, right after the training split.
        config: optimisation settings.
        progress: show tqdm bars.
    """
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    result, best_weights, stale = TrainResult(), None, 0
    for epoch in range(config.epochs):
        started = time.perf_counter()
        loss = train_epoch(model, optimizer, train_events, config, generator, progress)
        trained = time.perf_counter()
        metrics = validate(model, val_events, config, progress, seen=train_events, mix=False)
        result.history.append({
            "epoch": epoch, "loss": loss, "train_seconds": trained - started,
            "val_seconds": time.perf_counter() - trained, **{
            f"val_{k}": v for k, v in metrics.items() if k in VAL_METRICS}})
        if progress:
            tqdm.write(f"epoch {epoch}: loss {loss:.4f}  val recall@10 {metrics['recall@10']:.4f}")
        if metrics["recall@10"] > result.best_recall:
            result.best_epoch, result.best_recall = epoch, metrics["recall@10"]
            best_weights, stale = copy.deepcopy(model.state_dict()), 0
        else:
            stale += 1
            if stale >= config.patience:
                break
    if best_weights is not None:
        model.load_state_dict(best_weights)
    if model.repeat is not None:
        result.history_losses = fit_history(model, train_events, config, progress)
    return result
