"""``dynllm train``, ``dynllm evaluate``, ``dynllm bench memory`` and ``bench repeat`` end to end,
small sizes."""

from __future__ import annotations

import json

import pytest

from pipelines.cli import main
from tgn import snapshot


@pytest.mark.slow
def test_train_then_evaluate_with_baselines(tiny_dataset, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data", str(tiny_dataset), "--out", str(run), "--epochs", "2",
                 "--batch-size", "40", "--threads", "1", "--history-steps", "100",
                 "-q"]) == 0
    for name in ("model.pt", "config.json", "history.json", "curves.png"):
        assert (run / name).stat().st_size > 0, name
    assert json.loads((run / "config.json").read_text())["epochs_run"] == 2
    out = tmp_path / "eval.json"
    assert main(["evaluate", "--data", str(tiny_dataset), "--run", str(run), "--json", str(out),
                 "--baselines", "--batch-size", "20", "-q"]) == 0
    results = json.loads(out.read_text())
    assert {"TGN", "global popularity", "buy-again (frequency)"} <= set(results)
    assert all(0 <= r["recall@10"] <= 1 and r["events"] == 54 for r in results.values())
    assert "| TGN |" in capsys.readouterr().out


def test_evaluate_without_a_run_is_a_usage_error(tiny_dataset, tmp_path, capsys):
    assert main(["evaluate", "--data", str(tiny_dataset), "--run", str(tmp_path)]) == 2
    assert "no model.pt" in capsys.readouterr().err


@pytest.mark.skipif(snapshot.available(), reason="the snapshot extra is installed")
def test_snapshot_baseline_without_the_extra_is_a_one_line_usage_error(tiny_dataset, tmp_path,
                                                                       capsys):
    assert main(["evaluate", "--data", str(tiny_dataset), "--run", str(tmp_path),
                 "--baselines", "snapshot"]) == 2
    err = capsys.readouterr().err.strip()
    assert "dynllm[snapshot]" in err and "\n" not in err


def test_bench_repeat_writes_the_figures(tiny_dataset, tmp_path):
    out = tmp_path / "repeat.json"
    assert main(["bench", "repeat", "--data", str(tiny_dataset), "--events", "50",
                 "--batch-size", "10", "--repeats", "1", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["events"] == 50 and report["pairs"] > 0
    for key in ("update_us_per_event", "score_us_per_event_batch2000", "serve_us_per_user",
                "tgn_update_us_per_event", "added_to_update"):
        assert report[key] > 0


def test_bench_memory_writes_the_figures(tmp_path):
    out = tmp_path / "bench.json"
    assert main(["bench", "memory", "--nodes", "200", "--events", "400", "--repeats", "1",
                 "--threads", "1", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    for key in ("events_per_s", "speedup_vs_pyg", "fraction_of_gru_limit"):
        assert report[key] > 0 and report["batch_200"][key] > 0
