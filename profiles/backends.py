"""Language-model backends behind one small interface.

- :class:`TransformersBackend`: a local causal LM run with transformers (the default), batched,
  greedy, answer pre-filled, stopped per row as soon as the four lines are written.
- :class:`HttpBackend`: any OpenAI-compatible ``/chat/completions`` endpoint (vLLM, Ollama,
  llama.cpp server, a hosted API), with timeouts and retries with exponential backoff.

Both take chat messages (``[{"role": …, "content": …}, …]``) and return :class:`Generation`.
"""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from profiles.prompt import PREFILL

log = logging.getLogger(__name__)
Messages = list[dict[str, str]]


class BackendError(RuntimeError):
    """The backend could not answer (after its retries)."""


@dataclass(frozen=True)
class Generation:
    """One answer: its text (starting at the first heading) and the tokens it cost."""

    text: str
    new_tokens: int


class LLMBackend(Protocol):
    """What the profile writer needs from a model."""

    model_id: str

    def generate(self, prompts: list[Messages], sample: bool = False) -> list[Generation]:
        """Answer every prompt; ``sample=True`` for a varied retry instead of greedy."""
        ...


class TransformersBackend:
    """A local causal LM, batched greedy generation on CPU.

    Args:
        model_path: A Hugging Face model folder (see :func:`profiles.modelpack.resolve_model`).
        batch_size: Prompts per ``generate`` call (left-padded; similar lengths grouped).
        max_new_tokens: Hard cap on answer tokens.
        seed: Seed of the sampled retries.
        prefix_cache: Compute the key/values of the prompt prefix shared by a batch (system
            message and chat template head) once and reuse them; answers are identical.
    """

    def __init__(self, model_path: str | Path, batch_size: int = 8, max_new_tokens: int = 56,
                 seed: int = 0, prefix_cache: bool = True) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model_path = Path(model_path)
        self.model_id = self.model_path.name
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.seed = seed
        self.prefix_cache = prefix_cache
        self._prefix: tuple[str, object, object] | None = None  # (text, ids (1, P), cache)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path, padding_side="left")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=torch.float32)
        self.model.eval()
        vocab = self.tokenizer.convert_ids_to_tokens(list(range(len(self.tokenizer))))
        newline = [i for i, tok in enumerate(vocab)
                   if tok and "\n" in self.tokenizer.convert_tokens_to_string([tok])]
        self._newline_ids = torch.tensor(newline or [-1])

    def _text(self, messages: Messages) -> str:
        if self.tokenizer.chat_template:
            head = self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=True)
        else:  # plain models (e.g. the tiny test model): a minimal role-tagged layout
            head = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
        return head + PREFILL

    def generate(self, prompts: list[Messages], sample: bool = False) -> list[Generation]:
        """Answer ``prompts`` in batches of ``batch_size`` (grouped by prompt length)."""
        texts = [self._text(m) for m in prompts]
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out: list[Generation | None] = [None] * len(texts)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            for i, gen in zip(chunk, self._generate_batch([texts[i] for i in chunk], sample),
                              strict=True):
                out[i] = gen
        return out  # type: ignore[return-value]

    def _encode(self, texts: list[str]) -> dict:
        """``generate`` inputs; with a reusable shared prefix, its cached key/values too.

        Layout with the prefix cache: ``[prefix | left-padded suffix]`` (B, P + S), the mask
        zero on the padding in between; positions follow the mask, so answers are unchanged.
        """
        import copy

        import torch

        plain = self.tokenizer(texts, return_tensors="pt", padding=True)
        prefix = os.path.commonprefix(texts)
        prefix = prefix[: prefix.rfind("\n") + 1]
        if not (self.prefix_cache and prefix):
            return dict(plain)
        if self._prefix is None or self._prefix[0] != prefix:
            ids = self.tokenizer(prefix, return_tensors="pt")["input_ids"]
            with torch.inference_mode():
                self._prefix = (prefix, ids, self.model(ids, use_cache=True).past_key_values)
        _, ids, cache = self._prefix
        suffix = self.tokenizer([t[len(prefix):] for t in texts], return_tensors="pt",
                                padding=True, add_special_tokens=False)
        whole = self.tokenizer(texts)["input_ids"]
        tails = [row[m.bool()].tolist() for row, m in zip(suffix["input_ids"],
                                                          suffix["attention_mask"], strict=True)]
        if any(w != ids[0].tolist() + t for w, t in zip(whole, tails, strict=True)):
            return dict(plain)  # the prefix does not tokenize on its own: no reuse
        batch = len(texts)
        cache = copy.deepcopy(cache)
        cache.batch_repeat_interleave(batch)
        return {"input_ids": torch.cat([ids.expand(batch, -1), suffix["input_ids"]], 1),
                "attention_mask": torch.cat([torch.ones(batch, ids.shape[1], dtype=torch.long),
                                             suffix["attention_mask"]], 1),
                "past_key_values": cache}

    def _generate_batch(self, texts: list[str], sample: bool) -> list[Generation]:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        enc = self._encode(texts)
        start, newline_ids = enc["input_ids"].shape[1], self._newline_ids

        class FourLines(StoppingCriteria):
            """Stops a row once its answer holds the remaining three line breaks."""

            def __call__(self, input_ids, scores, **kwargs):  # (B, L) -> (B,) bool
                return torch.isin(input_ids[:, start:], newline_ids).sum(1) >= 4

        kwargs = {"do_sample": True, "temperature": 0.7, "top_p": 0.9} if sample else \
            {"do_sample": False}
        if sample:
            torch.manual_seed(self.seed)
        with torch.inference_mode():
            ids = self.model.generate(
                **enc, max_new_tokens=self.max_new_tokens, repetition_penalty=1.1,
                pad_token_id=self.tokenizer.pad_token_id,
                stopping_criteria=StoppingCriteriaList([FourLines()]), **kwargs)
        gens = []
        for row in ids[:, start:]:
            keep = row != self.tokenizer.pad_token_id
            text = self.tokenizer.decode(row[keep], skip_special_tokens=True)
            # stopped early (padded after EOS or the four lines) or four lines: not token-capped
            finished = not bool(keep.all()) or text.count("\n") >= 4
            gens.append(Generation(PREFILL + (text if finished else drop_partial_item(text)),
                                   int(keep.sum())))
        return gens


def drop_partial_item(text: str) -> str:
    """Cut the last, token-capped list item of an unfinished answer (all of it if alone).

    >>> drop_partial_item("a\\nFavored brands: M69 private label, M31")
    'a\\nFavored brands: M69 private label'
    >>> drop_partial_item("a\\nFavored brands: M10")
    'a\\nFavored brands:'
    """
    head, _, last = text.rpartition("\n")
    if "," in last:
        last = last.rsplit(",", 1)[0]
    elif ":" in last:  # a lone cut-off value is no value: the answer fails to parse
        last = last.split(":", 1)[0] + ":"
    return f"{head}\n{last}" if head else last


class HttpBackend:
    """An OpenAI-compatible chat-completions endpoint.

    Args:
        url: Base URL (``http://host:8000/v1``) or the full ``…/chat/completions`` URL.
        model: Model name sent in the request.
        timeout: Seconds per HTTP request.
        retries: Extra attempts after a timeout, connection error, 429 or 5xx.
        backoff: First retry delay in seconds; doubles each retry.
        concurrency: Requests in flight at once.
        max_tokens: Answer token cap.
    """

    def __init__(self, url: str, model: str = "default", timeout: float = 60.0, retries: int = 3,
                 backoff: float = 0.5, concurrency: int = 4, max_tokens: int = 96) -> None:
        url = url.rstrip("/")
        self.url = url if url.endswith("/chat/completions") else url + "/chat/completions"
        self.model_id = f"http:{model}"
        self.model, self.timeout, self.retries = model, timeout, retries
        self.backoff, self.concurrency, self.max_tokens = backoff, concurrency, max_tokens

    def generate(self, prompts: list[Messages], sample: bool = False) -> list[Generation]:
        """Answer each prompt with one request (``concurrency`` at a time)."""
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(lambda m: self._one(m, sample), prompts))

    def _one(self, messages: Messages, sample: bool) -> Generation:
        body = json.dumps({"model": self.model, "messages": messages,
                           "max_tokens": self.max_tokens,
                           "temperature": 0.7 if sample else 0.0}).encode()
        delay = self.backoff
        for attempt in range(self.retries + 1):
            request = urllib.request.Request(self.url, body,
                                             {"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    reply = json.loads(response.read())
                text = reply["choices"][0]["message"]["content"] or ""
                tokens = int(reply.get("usage", {}).get("completion_tokens", 0))
                return Generation(text, tokens)
            except urllib.error.HTTPError as exc:
                if exc.code != 429 and exc.code < 500:
                    raise BackendError(f"{self.url} answered HTTP {exc.code}") from exc
                error: Exception = exc
            except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
                error = exc
            except (KeyError, IndexError, TypeError, ValueError) as exc:
                raise BackendError(f"{self.url} sent no chat completion: {exc!r}") from exc
            if attempt < self.retries:
                log.warning("LLM endpoint failed (%s); retry in %.1fs", error, delay)
                time.sleep(delay)
                delay *= 2
        raise BackendError(f"{self.url} failed after {self.retries + 1} attempts: {error}")
