"""``dynllm bench quality``: every model through one evaluator, the JSON layout, seeds."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from streaming.dataset import Dataset
from tgn.quality import (
    README_BEGIN,
    README_END,
    glance,
    markdown_table,
    run_quality,
    save,
    write_readme,
)
from tgn.train import TrainConfig

FAST = TrainConfig(epochs=1, batch_size=50, eval_batch_size=100, history_steps=100)


def test_quality_json_has_every_part_and_seeds_differ(tmp_path, tiny_dataset, tiny_config):
    models = ["tgn", "popularity", "buy_again_popularity", "tifu_knn", "up_cf"]
    # dot products only, so the ranking shows the initialisation (the history mixture alone
    # ranks the tiny log's repeats perfectly whatever the seed)
    config = replace(tiny_config, repeat=False)
    result = run_quality(tiny_dataset, models, seeds=[0, 1], split="val", train_config=FAST,
                         model_config=config, progress=False)
    (name, part), = result.items()
    assert name == tiny_dataset.name and part["meta"]["split"] == "val"
    assert set(part["per_event"]) == set(models) == set(part["basket"])
    assert set(part["slices"]) == {"cold", "light", "heavy"}
    tgn, pop = part["per_event"]["tgn"], part["per_event"]["popularity"]
    assert tgn["recall@20"]["seeds"] == 2 and pop["recall@20"]["seeds"] == 1
    assert pop["recall@20"]["std"] == 0.0
    assert tgn["mrr"]["std"] > 0  # two seeds, two initialisations
    for model in models:
        assert 0.0 <= part["basket"][model]["recall@10"]["mean"] <= 1.0
    # the tiny log's validation purchases all repeat: no explore events, no NaN in the JSON
    assert part["per_event"]["tgn"]["explore/recall@20"]["mean"] is None
    # the user's own items: buy-again + popularity finds the tiny log's repeats
    assert part["per_event"]["buy_again_popularity"]["repeat/recall@20"]["mean"] > 0.9
    assert "| tgn |" in markdown_table(result)
    out = tmp_path / "q.json"
    save({"other": {"per_event": {}}}, out)
    save(result, out, merge=True)
    assert set(json.loads(out.read_text())) == {"other", name}
    # models run in parts land side by side
    part2 = run_quality(tiny_dataset, ["buy_again"], seeds=[0], split="val", train_config=FAST,
                        model_config=config, progress=False)
    save(part2, out, merge=True)
    both = json.loads(out.read_text())[name]
    assert set(both["per_event"]) == {*models, "buy_again"} and len(both["meta_parts"]) == 1
    # README rows: best first and marked, the rest of the README untouched
    rows = glance({name: both})
    best = max(both["per_event"], key=lambda m: both["per_event"][m]["recall@20"]["mean"])
    assert rows.count("\n") == 2  # per event, explore, last basket
    assert rows.splitlines()[0].split("**")[1].startswith(f"{best} ")
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{README_BEGIN}\nold rows\n{README_END}\noutro\n")
    write_readme({name: both}, readme)
    text = readme.read_text()
    assert "old rows" not in text and rows in text
    assert text.startswith("intro\n") and text.endswith(f"{README_END}\noutro\n")


def test_dynllm_models_need_a_profile_store(tiny_dataset):
    with pytest.raises(ValueError, match="profile store"):
        run_quality(tiny_dataset, ["dynllm"], seeds=[0], split="val", progress=False)
    with pytest.raises(ValueError, match="unknown models"):
        run_quality(tiny_dataset, ["nope"], seeds=[0], split="val", progress=False)


def test_runs_in_worker_processes_give_the_same_result(tiny_dataset, tiny_config):
    config = replace(tiny_config, repeat=False)
    args = (tiny_dataset, ["tgn", "popularity"], [0, 1], "val")
    one = run_quality(*args, train_config=FAST, model_config=config, progress=False)
    partial: list[dict] = []
    two = run_quality(*args, train_config=FAST, model_config=config, progress=False,
                      on_result=partial.append, workers=2)
    name = tiny_dataset.name
    for part in ("per_event", "basket", "slices"):
        for model, metrics in one[name][part].items():
            if part == "slices":
                continue
            assert {k: v for k, v in metrics.items() if "seconds" not in k} == {
                k: v for k, v in two[name][part][model].items() if "seconds" not in k}
    assert len(partial) == 3 and two[name]["meta"]["workers"] == 2


def test_top_users_subsets_after_a_skip_are_disjoint(cj_small, tmp_path):
    """The 5 most active households, and the next 5: disjoint, each with all its events."""
    from tgn.ablation import top_users_subset

    first = top_users_subset(cj_small, tmp_path / "a", 5)
    after = top_users_subset(cj_small, tmp_path / "b", 5, skip=5)
    a, b = Dataset.load(tmp_path / "a"), Dataset.load(tmp_path / "b")
    users_a, users_b = (set(d.events.column("user_id").to_pylist()) for d in (a, b))
    assert len(users_a) == len(users_b) == 5 and not users_a & users_b
    assert after["subset"]["skip"] == 5 and "skip" not in first["subset"]
    source = Dataset.load(cj_small).events
    counts = source.group_by("user_id").aggregate([("user_id", "count")]).to_pylist()
    per_user = {r["user_id"]: r["user_id_count"] for r in counts}
    assert min(per_user[u] for u in users_a) >= max(per_user[u] for u in users_b)
    assert b.events.num_rows == sum(per_user[u] for u in users_b)
