"""``dynllm profiles build|show`` end to end with the tiny model; clear errors."""

from __future__ import annotations

from pipelines.cli import main


def test_build_then_show(tiny_data, tiny_llm, tmp_path, capsys):
    store = str(tmp_path / "p.sqlite")
    common = ["--data", str(tiny_data), "--store", store, "--llm-model", str(tiny_llm),
              "--threads", "1", "--batch-size", "4"]
    assert main(["profiles", "build", *common, "--until-split", "all", "--max-users", "2"]) == 0
    assert "wrote 2 profiles" in capsys.readouterr().out
    assert main(["profiles", "show", "--store", store, "--user", "u1"]) == 0
    shown = capsys.readouterr().out
    assert "user u1 v1" in shown and "fallback=False" in shown and "Crowd segment: " in shown
    assert main(["profiles", "show", "--store", store, "--user", "u1", "--before", "0"]) == 2


def test_bad_arguments_are_one_line_errors(tiny_data, tmp_path, capsys):
    assert main(["profiles", "build", "--data", str(tiny_data), "--llm-model",
                 str(tmp_path)]) == 2
    assert "not a model folder" in capsys.readouterr().err
    assert main(["profiles", "build", "--data", str(tmp_path)]) == 2
    assert "not a dataset directory" in capsys.readouterr().err
    assert main(["profiles", "show", "--store", str(tmp_path / "none"), "--user", "u1"]) == 2
