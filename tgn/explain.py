"""``dynllm explain``: why a DynLLM run recommends what it does to one user.

Prints the four facet texts of the profile the model reads at time ``t`` (the latest profile
written strictly before ``t``), the attention weight the user's temporal embedding gives each
facet (its relevance), and the top-K items with their text. ``t`` defaults to one second after
the last event the run's state holds (the moment a live system would serve next).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pyarrow.compute as pc
import torch

from streaming.dataset import Dataset
from streaming.errors import UsageError
from tgn.dynllm_head import DynLLMHead
from tgn.fusion import FACETS
from tgn.profile_features import read_profile_texts
from tgn.run import Run


@dataclass
class Explanation:
    """One user's explanation.

    Attributes:
        user_id: the user.
        t: the time the embedding was computed for (epoch seconds).
        profile_ts: last event time of the profile used, None without one.
        fallback: the profile was written by the rule-based fallback, not the LLM.
        facets: ``(facet, relevance, text)`` for the four facets (relevance over the learned
            "no profile" facets when the user has no profile yet; text None then).
        items: ``(item_id, score, text, times the user bought it before t)``, best first.
    """

    user_id: str
    t: float
    profile_ts: float | None
    fallback: bool
    facets: list[tuple[str, float, str | None]] = field(default_factory=list)
    items: list[tuple[str, float, str, int]] = field(default_factory=list)


def _item_texts(data: Dataset) -> dict[str, str]:
    cols = data.items.select(["item_id", "title", "category", "brand"]).to_pydict()
    return {i: " — ".join(str(p) for p in parts if p)
            for i, *parts in zip(cols["item_id"], cols["title"], cols["category"],
                                 cols["brand"], strict=True)}


def _times_bought(data: Dataset, user_id: str, t: float) -> dict[str, int]:
    ev = data.events
    mine = ev.filter(pc.and_(pc.equal(ev.column("user_id"), user_id), pc.less(ev.column("ts"), t)))
    counts = mine.group_by("item_id").aggregate([("item_id", "count")]).to_pydict()
    return dict(zip(counts["item_id"], counts["item_id_count"], strict=True))


@torch.no_grad()
def explain_user(run_dir: str | Path, user_id: str, k: int = 10,
                 at: float | None = None) -> Explanation:
    """Explain the top-``k`` recommendations of a DynLLM run for ``user_id`` at time ``at``."""
    run = Run.open(run_dir)
    config = run.config
    if not config:
        raise UsageError(f"{run_dir} has no {Run.CONFIG} (written by `dynllm train`)")
    if not run.is_dynllm:
        raise UsageError(f"{run_dir} holds a {config.get('model')!r} run; explain needs a DynLLM "
                         "run (dynllm train --model dynllm)")
    model = run.model().eval()
    if user_id not in model.users:
        raise UsageError(f"user {user_id!r} is not known to the run")
    t = float(model.memory.last_update.max()) + 1.0 if at is None else float(at)
    user = torch.tensor(model.users.encode([user_id], grow=False))
    when = torch.tensor([t], dtype=torch.float64)
    scores = model.score_users(user, when)[0]  # the full score, as evaluated
    head: DynLLMHead = model.user_head  # type: ignore[assignment]
    row = int(head.last_rows[0])
    relevance = head.last.relevance[0].tolist()
    profile_ts = float(head.profiles.ts[row]) if row >= 0 else None
    texts = read_profile_texts(config["profiles"], user_id, profile_ts, config.get("hops")) \
        if profile_ts is not None else None
    out = Explanation(user_id, t, profile_ts, bool(head.profiles.fallback[row]) if row >= 0
                      else False)
    out.facets = [(name, w, texts[i] if texts else None)
                  for i, (name, w) in enumerate(zip(FACETS, relevance, strict=True))]
    data = Dataset.load(config["data"])
    item_text, bought = _item_texts(data), _times_bought(data, user_id, t)
    top = scores.topk(min(k, scores.numel()))
    for score, index in zip(top.values.tolist(), top.indices.tolist(), strict=True):
        item_id = model.items.decode([index])[0]
        out.items.append((item_id, score, item_text.get(item_id, "?"), bought.get(item_id, 0)))
    return out


def render(expl: Explanation) -> str:
    """Human-readable text of an :class:`Explanation`."""
    stamp = datetime.fromtimestamp(expl.t, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    lines = [f"user {expl.user_id} at {stamp}"]
    if expl.profile_ts is None:
        lines.append("no profile written before this time: the learned no-profile facets are "
                     "used (weights below are over those)")
    else:
        written = datetime.fromtimestamp(expl.profile_ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        kind = "rule-based fallback" if expl.fallback else "LLM"
        lines.append(f"profile from events up to {written} ({kind})")
    lines.append("")
    lines.append(f"{'facet':<22} {'relevance':>9}  text")
    for name, weight, text in expl.facets:
        lines.append(f"{name.replace('_', ' '):<22} {weight:>9.3f}  {text or '-'}")
    lines.append("")
    lines.append(f"top {len(expl.items)} recommendations:")
    for rank, (item_id, score, text, times) in enumerate(expl.items, 1):
        again = f"  [bought {times}x before]" if times else ""
        lines.append(f"{rank:>3}. {score:8.3f}  {item_id}  {text}{again}")
    return "\n".join(lines)
