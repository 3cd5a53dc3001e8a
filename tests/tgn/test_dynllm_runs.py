"""DynLLM end to end on the tiny dataset: joint training, run directory, explain, ablation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from profiles.facets import Facets
from profiles.store import Profile, ProfileStore
from streaming.dataset import Dataset
from streaming.errors import UsageError
from tgn.ablation import aggregate, build_variant, markdown_table, run_ablation
from tgn.dynllm_experiment import fit_dynllm
from tgn.explain import explain_user, render
from tgn.model import TGNConfig
from tgn.profile_features import read_profile_store, read_profile_texts
from tgn.run import Run
from tgn.train import TrainConfig

SMALL = TGNConfig(memory_dim=8, time_dim=4, embed_dim=8, heads=2, neighbors=3)
QUICK = TrainConfig(epochs=1, batch_size=60, eval_batch_size=60, history_steps=100)


@pytest.fixture(scope="module")
def store(tiny_dataset, tmp_path_factory):
    """Two profile versions per user (after its 5th and 15th event), for hops 2 and 1."""
    ev = Dataset.load(tiny_dataset).events.to_pandas()
    path = tmp_path_factory.mktemp("store") / "profiles.sqlite"
    rng = np.random.default_rng(0)
    profiles = []
    for user, rows in ev.groupby("user_id"):
        for n in (5, 15):
            for hops in (1, 2):
                texts = (f"{user} crowd {n}", "baking", "Bread", f"M{hops} brand")
                profiles.append(Profile(user, float(rows.ts.iloc[n - 1]), Facets(texts),
                                        rng.normal(size=(4, 384)).astype(np.float32),
                                        "test-model", f"h{user}{n}{hops}", hops))
    db = ProfileStore(path)
    db.put(profiles)
    db.close()
    return path


def test_read_store_filters_hops_and_keeps_texts(store):
    users, ts, vectors, fallback = read_profile_store(store, hops=1)
    assert len(users) == 24 and vectors.shape == (24, 4, 384) and not fallback.any()
    assert read_profile_texts(store, users[0], ts[0], hops=1)[3] == "M1 brand"
    assert read_profile_texts(store, users[0], ts[0] + 1, hops=1) is None
    with pytest.raises(FileNotFoundError):
        read_profile_store(store.parent / "missing.sqlite")


@pytest.fixture(scope="module")
def run_dir(tiny_dataset, store, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    fit_dynllm(tiny_dataset, out, store, hops=2, model_config=SMALL, train_config=QUICK,
               progress=False)
    return out


def test_fit_writes_a_self_contained_dynllm_run(run_dir):
    config = json.loads((run_dir / "config.json").read_text())
    assert config["model"] == "dynllm" and config["hops"] == 2
    assert config["profile_counts"]["profiles"] == 24
    assert config["profile_counts"]["users_with_profile"] == 12
    assert (run_dir / "model.pt").exists() and (run_dir / "curves.png").exists()


def test_explain_prints_facets_weights_and_items(run_dir):
    expl = explain_user(run_dir, "u3", k=5)
    assert expl.profile_ts is not None
    assert [f[2] for f in expl.facets] == ["u3 crowd 15", "baking", "Bread", "M2 brand"]
    assert sum(f[1] for f in expl.facets) == pytest.approx(1.0, abs=1e-5)
    assert len(expl.items) == 5 and expl.items[0][1] >= expl.items[-1][1]
    text = render(expl)
    assert "favored brands" in text and "top 5 recommendations" in text


def test_explain_scores_are_the_models_full_score(run_dir):
    expl = explain_user(run_dir, "u3", k=20)
    model = Run.open(run_dir).model().eval()
    user, t = torch.tensor(model.users.encode(["u3"], grow=False)), torch.tensor([expl.t],
                                                                                dtype=torch.float64)
    with torch.no_grad():
        dot = model.user_embeddings(user, t) @ model.item_embeddings(expl.t).T
        full = model.mix_history(dot, user, t)[0]
    assert (full != dot[0]).all()  # the history mixture, not the bare dot product
    index = model.items.encode([item[0] for item in expl.items], grow=False)
    torch.testing.assert_close(torch.tensor([item[1] for item in expl.items]), full[index])


def test_explain_before_any_profile_says_so(run_dir, tiny_dataset):
    first = float(Dataset.load(tiny_dataset).events.column("ts")[0].as_py())
    expl = explain_user(run_dir, "u3", k=3, at=first)
    assert expl.profile_ts is None and all(f[2] is None for f in expl.facets)
    assert "no profile" in render(expl)


def test_explain_rejects_unknown_user(run_dir):
    with pytest.raises(UsageError, match="not known"):
        explain_user(run_dir, "nobody")


def test_ablation_aggregates_over_seeds(tiny_dataset, store):
    result = run_ablation(tiny_dataset, {"llm": store, "stats": None}, [0, 1], QUICK, SMALL,
                          models=("popularity", "dynllm_1hop"), progress=False)
    assert len(result["popularity"]["recall@20"]["values"]) == 1  # deterministic: run once
    values = result["dynllm_1hop"]["recall@20"]["values"]
    assert len(values) == 2 and 0.0 <= min(values) <= max(values) <= 1.0
    assert result["_meta"]["profiles"]["llm_hops1"]["profiles"] == 24
    # every tiny user has a profile: the profiled slice is all test purchases
    pop = result["popularity"]
    assert pop["profiled/events"]["mean"] == pop["events"]["mean"]
    assert pop["profiled/recall@20"]["mean"] == pop["recall@20"]["mean"]
    assert "dynllm_1hop" in markdown_table(result)


def test_aggregate_mean_and_sample_std():
    out = aggregate([{"m": 1.0}, {"m": 3.0}])
    assert out["m"]["mean"] == 2.0 and out["m"]["std"] == pytest.approx(2 ** 0.5)


def test_cli_train_evaluate_explain_dynllm(tiny_dataset, store, tmp_path, capsys):
    from pipelines.cli import main

    run = tmp_path / "run"
    assert main(["train", "--data", str(tiny_dataset), "--model", "dynllm", "--profiles",
                 str(store), "--hops", "1", "--no-gate", "--out", str(run), "--epochs", "1",
                 "--batch-size", "120", "--history-steps", "100", "-q"]) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["hops"] == 1 and config["fusion_config"]["gate"] is False
    assert main(["evaluate", "--data", str(tiny_dataset), "--run", str(run), "-q"]) == 0
    assert "| DynLLM |" in capsys.readouterr().out
    assert main(["explain", "--run", str(run), "--user", "u1", "--k", "3"]) == 0
    assert "M1 brand" in capsys.readouterr().out  # the hops=1 profile's text
    assert main(["train", "--data", str(tiny_dataset), "--model", "dynllm",
                 "--out", str(run)]) == 2  # no --profiles: one clear error line


def test_ablation_tgn_no_repeat_is_tgn_without_the_repeat_term(tiny_dataset):
    data = Dataset.load(tiny_dataset)
    with_term, _ = build_variant("tgn", data, {}, SMALL, seed=0)
    without, _ = build_variant("tgn_no_repeat", data, {}, SMALL, seed=0)
    assert with_term.repeat is not None and without.repeat is None
    assert without.config.embed_dim == with_term.config.embed_dim


def test_ablation_on_validation_scores_the_validation_split(tiny_dataset):
    data = Dataset.load(tiny_dataset)
    val = run_ablation(tiny_dataset, {}, [0], QUICK, SMALL, models=("popularity",),
                       progress=False, split="val")
    test = run_ablation(tiny_dataset, {}, [0], QUICK, SMALL, models=("popularity",),
                        progress=False)
    _, (_, val_events, test_events) = build_variant("tgn", data, {}, SMALL, seed=0)
    assert val["popularity"]["events"]["mean"] == len(val_events)
    assert test["popularity"]["events"]["mean"] == len(test_events)
    assert val["_meta"]["scored_split"] == "val"
    with pytest.raises(ValueError, match="split"):
        run_ablation(tiny_dataset, {}, [0], QUICK, SMALL, models=("popularity",),
                     progress=False, split="train")


def test_ablation_shuffled_variant_reads_other_users_profiles(tiny_dataset, store):
    data = Dataset.load(tiny_dataset)
    own, _ = build_variant("dynllm", data, {"llm": store}, SMALL, seed=0)
    other, _ = build_variant("dynllm_shuffled", data, {"llm": store}, SMALL, seed=0)
    mine, theirs = own.user_head.profiles, other.user_head.profiles
    assert len(mine) == len(theirs)  # the same versions, handed around
    assert torch.allclose(mine.vectors.sum(0), theirs.vectors.sum(0), atol=1e-4)
    for user in mine.user_index.unique().tolist():  # nobody keeps their own versions
        own_vectors = mine.vectors[mine.user_index == user]
        new_vectors = theirs.vectors[theirs.user_index == user]
        assert len(new_vectors) > 0
        assert not any(torch.equal(v, w) for v in own_vectors for w in new_vectors)


def test_ablation_seeds_change_the_initialisation(tiny_dataset):
    """Each seed of the ablation draws its own weights (they once all shared seed 0's)."""
    data = Dataset.load(tiny_dataset)
    a, _ = build_variant("tgn", data, {}, SMALL, seed=0)
    b, _ = build_variant("tgn", data, {}, SMALL, seed=0)
    c, _ = build_variant("tgn", data, {}, SMALL, seed=1)
    assert torch.equal(a.attention.query.weight, b.attention.query.weight)
    assert not torch.equal(a.attention.query.weight, c.attention.query.weight)
