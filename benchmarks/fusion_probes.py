"""Validation-only probes behind issue 5's investigation (docs/lab-notes/fusion.md, "Why the
profiles do not lift TGN"). Nothing here reads the test split.

* ``text``: zero-shot signal of the profiles. Every validation purchase is ranked by the cosine
  between the user's latest profile facet (strictly before the purchase) and the MiniLM vector
  of every item's text (title, category, brand); Recall@20 per facet, no training.
* ``oracle``: the most a per-user repeat/explore switch could give. For every user, take
  whichever of buy-again and popularity hit more of that user's validation purchases; the sum is
  an upper bound for a gate choosing between the two lists per user.
* ``item-text``: train with an item text channel (item embedding += a learned linear map of the
  item's MiniLM vector, zero-initialised), so profile facets and items meet in one text space.
* ``repeat-negatives``: one extra BPR negative drawn from the user's own past items, only for
  purchases that are repeats (the positive was bought before), so the repeat term learns which
  past item comes back without learning "past items lose to new ones".

The last two were tried and not kept (no gain beyond the seed spread); they live here, as
patches of the shipped code, so the figures can be reproduced::

    .venv/bin/python benchmarks/fusion_probes.py text --data data/cj-top150 \\
        --profiles data/cj-top150/profiles-llm-full.sqlite
    .venv/bin/python benchmarks/fusion_probes.py item-text --models tgn,dynllm,dynllm_shuffled
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn

from streaming.dataset import Dataset
from tgn import ablation
from tgn import train as training
from tgn.baselines import BuyAgain, GlobalPopularity
from tgn.dynllm_experiment import profile_table
from tgn.evaluate import Evaluator, Recommender
from tgn.experiment import build_model
from tgn.model import TGNConfig
from tgn.train import TrainConfig


def item_text_vectors(data_dir: str | Path) -> torch.Tensor:
    """MiniLM vectors ``[num_items, 384]`` of every item's text, in the model's item order
    (cached as ``DATA/item-text.pt``)."""
    cache = Path(data_dir) / "item-text.pt"
    if cache.exists():
        return torch.load(cache)
    import pyarrow.parquet as pq

    from profiles.embed import FacetEmbedder

    model, _ = build_model(Dataset.load(data_dir), TGNConfig(), seed=0)
    rows = {r["item_id"]: r for r in pq.read_table(Path(data_dir) / "items.parquet").to_pylist()}
    texts = [". ".join(str(rows[i][k]) for k in ("title", "category", "brand"))
             for i in model.items.to_list()]
    vectors = torch.from_numpy(FacetEmbedder().embed(texts))
    torch.save(vectors, cache)
    return vectors


class FacetTextMatch:
    """Scores every item by ``cos(facet, item text)`` of the user's latest profile (a facet
    index, or -1 for the mean of the four)."""

    def __init__(self, table, items: torch.Tensor, facet: int) -> None:
        self.table, self.items, self.facet = table, items, facet

    def score(self, batch) -> torch.Tensor:
        facets = self.table.lookup(batch.users, batch.t).facets  # [B, F, E]
        user = facets.mean(1) if self.facet < 0 else facets[:, self.facet]
        return user @ self.items.T

    def update(self, batch) -> None:
        pass


def _val_metrics(recommender: Recommender, train, val) -> tuple[dict[str, float], torch.Tensor]:
    evaluator = Evaluator()
    metrics = evaluator.run(recommender, val, train, 2000)
    return metrics, evaluator.ranks


def text_probe(args: argparse.Namespace) -> dict:
    data = Dataset.load(args.data)
    model, (train, val, _) = build_model(data, TGNConfig(), seed=0)
    items = item_text_vectors(args.data)
    table = profile_table(args.profiles, model, args.hops)
    if len(table) == 0:
        raise SystemExit(f"{args.profiles} holds no profiles (hops={args.hops}) for "
                         f"{args.data}'s users: nothing to probe")
    out = {}
    for facet, name in enumerate(("mean", "crowd_segment", "personal_interests",
                                  "preferred_categories", "favored_brands"), start=-1):
        metrics, _ = _val_metrics(FacetTextMatch(table, items, facet), train, val)
        out[name] = {k: metrics[k] for k in ("recall@20", "recall@50", "explore/recall@20")}
    out["random_recall@20"] = min(1.0, 20 / len(model.items))
    return out


def oracle_probe(args: argparse.Namespace) -> dict:
    data = Dataset.load(args.data)
    _, (train, val, _) = build_model(data, TGNConfig(), seed=0)
    hits = {}
    for name, rec in (("buy_again", BuyAgain("frequency", fallback_popularity=True)),
                      ("popularity", GlobalPopularity())):
        _, ranks = _val_metrics(rec, train, val)
        hits[name] = (ranks <= 20).float()
    best = sum(max(float(hits["buy_again"][val.users == u].sum()),
                   float(hits["popularity"][val.users == u].sum()))
               for u in val.users.unique().tolist())
    return {"buy_again": float(hits["buy_again"].mean()),
            "popularity": float(hits["popularity"].mean()),
            "per_user_best_of_both": best / len(val)}


def _patch_item_text(data_dir: str) -> None:
    items = item_text_vectors(data_dir)
    build = ablation.build_variant

    def build_variant(name, data, stores, config):
        model, splits = build(name, data, stores, config)
        model.text_proj = nn.Linear(items.size(1), config.embed_dim)
        nn.init.zeros_(model.text_proj.weight)
        nn.init.zeros_(model.text_proj.bias)
        temporal = model.item_embeddings

        def item_embeddings(t, which=None, chunk=8192):
            which = torch.arange(items.size(0)) if which is None else which
            return temporal(t, which, chunk) + model.text_proj(items[which])

        model.item_embeddings = item_embeddings
        return model, splits

    ablation.build_variant = build_variant


def _patch_repeat_negatives() -> None:
    uniform = training.draw_negatives

    def draw_negatives(model, batch, candidates, config, generator):
        negatives = uniform(model, batch, candidates, TrainConfig(negatives=config.negatives),
                            generator)
        repeats = model.repeat.slots(batch.users, batch.items) >= 0  # [B]
        rows = repeats.nonzero().squeeze(1)
        past = model.repeat.sample_history(batch.users[rows], batch.items[rows], generator)
        negatives[rows, 0] = torch.where(past >= 0, past, negatives[rows, 0])
        return negatives

    training.draw_negatives = draw_negatives


def train_probe(args: argparse.Namespace) -> dict:
    if args.command == "item-text":
        _patch_item_text(args.data)
        config = TrainConfig(epochs=args.epochs)
    else:
        _patch_repeat_negatives()
        config = TrainConfig(epochs=args.epochs, negatives=2)  # one uniform, one from history
    stores = {"llm": args.profiles, "stats": args.stats_profiles}
    return ablation.run_ablation(args.data, stores, args.seeds, config, models=args.models,
                                 split="val")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=("text", "oracle", "item-text", "repeat-negatives"))
    parser.add_argument("--data", default="data/cj-top150")
    parser.add_argument("--profiles", default="data/cj-top150/profiles-llm-full.sqlite")
    parser.add_argument("--stats-profiles", default="data/cj-top150/profiles-stats.sqlite")
    parser.add_argument("--hops", type=int, default=2)
    parser.add_argument("--models", type=lambda s: s.split(","), default=["tgn", "dynllm"])
    parser.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")],
                        default=[0, 1, 2, 3])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", help="write the result JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    probe = {"text": text_probe, "oracle": oracle_probe}.get(args.command, train_probe)
    result = probe(args)
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    if args.command in ("item-text", "repeat-negatives"):
        print(ablation.markdown_table(result, ("recall@10", "recall@20", "explore/recall@20")))
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
