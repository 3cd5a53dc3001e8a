"""Language-model backends behind one small interface.

- :class:`LlamaCppBackend` (the default): a GGUF model run by llama.cpp (llama-cpp-python),
  greedy, answer pre-filled and kept in the four-line format by a per-user GBNF grammar
  (:mod:`profiles.grammar`). The answers of a call are decoded together as sequences of one
  llama.cpp context (:class:`_GrammarDecoder`): the prompt head shared by every user (chat
  template and system message) is evaluated once and copied, only the per-user parts are
  evaluated; several worker processes can share the prompts.
- :class:`TransformersBackend`: any local Hugging Face model folder (``--llm-model DIR``),
  batched, kept in the format by a logits processor (:mod:`profiles.constrain`: transformers
  has no grammar engine), stopped per row as soon as the four lines are written.
- :class:`HttpBackend`: any OpenAI-compatible ``/chat/completions`` endpoint (vLLM, Ollama,
  llama.cpp server, a hosted API), with timeouts and retries with exponential backoff.

All take chat messages (``[{"role": …, "content": …}, …]``) and return :class:`Generation`.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import queue
import threading
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Protocol, TypeVar

from profiles.grammar import MAX_ANSWER_TOKENS, AnswerFormat
from profiles.prompt import PREFILL, AnswerChoices
from streaming import metrics
from streaming.errors import UsageError

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")
Messages = list[dict[str, str]]


class BackendError(RuntimeError):
    """The backend could not answer (after its retries)."""


@dataclass(frozen=True)
class Generation:
    """One answer: its text (starting at the first heading) and the tokens it cost.

    Attributes:
        text: The answer, starting at the first heading.
        new_tokens: Tokens generated.
        prompt_tokens: Tokens of the prompt (0 where the backend does not say).
        reused_tokens: Prompt tokens whose key/values were reused, not evaluated.
    """

    text: str
    new_tokens: int
    prompt_tokens: int = 0
    reused_tokens: int = 0


class LLMBackend(Protocol):
    """What the profile writer needs from a model."""

    model_id: str

    def generate(self, prompts: list[Messages], sample: bool = False,
                 choices: list[AnswerChoices] | None = None) -> list[Generation]:
        """Answer every prompt; ``sample=True`` for a varied retry instead of greedy;
        ``choices``: per prompt, the names its list lines may use (where the backend can
        enforce them: llama.cpp's grammar)."""
        ...


class _GrammarDecoder:
    """Several answers decoded together under a GBNF grammar, the grammar checked lazily.

    - **Sequences in one batch**: the prompts of a call are llama.cpp sequences of one context
      (unified key/value cache). The head they share (chat template, system message) is
      evaluated once, on sequence 0, and kept from call to call while it does not change; the
      other sequences get it by ``llama_memory_seq_cp`` (no compute). Each decode step then
      feeds one new token of every unfinished answer in one ``llama_decode``, so the weights
      are read once per step for all of them.
    - **Lazy grammar**: llama-cpp-python's ``create_completion(grammar=…)`` runs llama.cpp's
      grammar sampler over the whole vocabulary (151,936 tokens for Qwen) before every token.
      As in llama.cpp's own ``common_sampler``, the token is picked without the grammar first
      and the grammar asked about that one token; only when it rejects it is the best allowed
      token looked for (greedy: the same token the eager grammar gives).
    - **Jump-forward**: wherever the grammar leaves one continuation only (the rest of a name
      after its first distinctive token, a separator, the line break and heading after a
      line's last name; :meth:`profiles.grammar.AnswerFormat.forced`), its tokens are fed with
      the sampled token in the same ``llama_decode``, without logits or a pick of their own;
      text that ends the answer is not fed at all. The forced text is fed as the tokenizer
      splits it, less any last tokens whose split could change with what follows (a space
      before the model's next word): the model continues from the tokens it would have
      written. ``jump=False`` decodes one token per step (the reference of the tests).
    - **Logits where needed**: the prompt asks for the last position's only, a step for each
      answer's last fed token; the grammar is applied to the whole vocabulary only when none
      of the model's 256 best tokens is allowed.

    Args:
        llm: The loaded model (its weights and tokenizer; the decoder has its own context).
        threads: llama.cpp threads.
        n_seq: Most answers decoded together (a longer call is decoded in chunks).
        seq_tokens: Key/value cells per sequence (prompt + answer).
        jump: Feed forced text without asking the model (jump-forward).
    """

    #: Tokens of the model's best the grammar is asked about before the whole vocabulary.
    TOP = 256
    #: Characters of each text that may follow forced text, checked for a changed split.
    LOOKAHEAD = 24

    def __init__(self, llm, threads: int, n_seq: int, seq_tokens: int,
                 jump: bool = True) -> None:
        import contextlib
        import ctypes

        import llama_cpp
        import numpy as np
        from llama_cpp import _internals

        self._lib, self._ct, self._np = llama_cpp, ctypes, np
        self.llm = llm
        self.n_seq, self.seq_tokens, self.jump = n_seq, seq_tokens, jump
        self.vocab = llm._model.vocab
        self.n_vocab = llm.n_vocab()
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = params.n_batch = n_seq * seq_tokens
        params.n_ubatch = min(512, params.n_ctx)
        params.n_seq_max, params.kv_unified = n_seq, True
        params.n_threads = params.n_threads_batch = threads
        self._stack = contextlib.ExitStack()
        context = self._stack.enter_context(contextlib.closing(
            _internals.LlamaContext(model=llm._model, params=params, verbose=False)))
        self.ctx, self.mem = context.ctx, context.memory
        self.batch = llama_cpp.llama_batch_init(params.n_batch, 0, 1)
        self._stack.callback(llama_cpp.llama_batch_free, self.batch)
        self._head: list[int] = []  # tokens held by sequence 0 at positions 0..len-1
        self._full = (llama_cpp.llama_token_data * self.n_vocab)()
        self._full_view = np.ctypeslib.as_array(self._full)  # fields id, logit, p
        self._full_view["id"] = np.arange(self.n_vocab)
        self._n_top = min(self.TOP, self.n_vocab)
        self._top = (llama_cpp.llama_token_data * self._n_top)()
        self._top_view = np.ctypeslib.as_array(self._top)
        self._one = (llama_cpp.llama_token_data * 1)()
        self._pieces: dict[int, str] = {}
        self._splits: dict[str, list[int]] = {}  # text -> tokens, kept for one decode call

    def close(self) -> None:
        """Free the context and the batch."""
        self._stack.close()

    def forget(self) -> None:
        """Evaluate the next call's shared head from scratch (no key/values kept)."""
        self._head = []

    # -- grammar ---------------------------------------------------------------------------

    def _apply(self, sampler, data, size: int) -> None:
        arr = self._lib.llama_token_data_array(data, size, -1, False)
        self._lib.llama_sampler_apply(sampler, self._ct.byref(arr))

    def _allowed(self, sampler, token: int) -> bool:
        self._one[0].id, self._one[0].logit, self._one[0].p = token, 0.0, 0.0
        self._apply(sampler, self._one, 1)
        return self._one[0].logit != float("-inf")

    def _piece(self, token: int) -> str:
        if token not in self._pieces:
            self._pieces[token] = self.llm.detokenize([token]).decode("utf-8", "replace")
        return self._pieces[token]

    def _tokens(self, text: str) -> list[int]:
        if text not in self._splits:
            self._splits[text] = self.llm.tokenize(text.encode(), add_bos=False, special=False)
        return self._splits[text]

    def _pick(self, logits, sampler, rng) -> int:
        """The next token: the model's choice if the grammar allows it, else the best allowed."""
        np = self._np
        token = int(logits.argmax()) if rng is None else _sample(logits, rng)
        if self._allowed(sampler, token):
            return token
        if rng is None:  # the best allowed is nearly always among the model's best few
            top = np.argpartition(logits, -self._n_top)[-self._n_top:]
            top = top[np.lexsort((top, -logits[top]))]  # best first, ties by id as argmax
            self._top_view["id"], self._top_view["logit"], self._top_view["p"] = \
                top, logits[top], 0.0
            self._apply(sampler, self._top, self._n_top)
            allowed = np.isfinite(self._top_view["logit"])
            if allowed.any():
                return int(top[allowed.argmax()])
        self._full_view["logit"] = logits
        self._full_view["p"] = 0.0
        self._apply(sampler, self._full, self.n_vocab)
        masked = self._full_view["logit"]
        if rng is None:
            return int(masked.argmax())
        ok = np.isfinite(masked)
        return int(np.flatnonzero(ok)[_sample(masked[ok], rng)])

    # -- batches ---------------------------------------------------------------------------

    def _decode(self, rows: list[tuple[int, int, int, bool]]) -> list[int]:
        """Evaluate ``(token, position, sequence, wants logits)`` rows in one batch; returns
        the batch index of every row that wants logits."""
        batch, lib = self.batch, self._lib
        for i, (token, pos, seq, logits) in enumerate(rows):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, pos, 1
            batch.seq_id[i][0], batch.logits[i] = seq, logits
        batch.n_tokens = len(rows)
        if rows and (code := lib.llama_decode(self.ctx, batch)) != 0:
            raise BackendError(f"llama_decode failed with code {code}")
        return [i for i, row in enumerate(rows) if row[3]]

    def _logits(self, index: int):
        return self._np.ctypeslib.as_array(self._lib.llama_get_logits_ith(self.ctx, index),
                                           shape=(self.n_vocab,))

    def _prefill(self, prompts: list[list[int]]) -> tuple[int, int, list[int]]:
        """Load the prompts into sequences 0..B-1: ``(shared head length, head tokens kept from
        the previous call, batch index of every sequence's logits)``."""
        lib = self._lib
        head = len(os.path.commonprefix(prompts)) if len(prompts) > 1 else len(prompts[0])
        head = min(head, min(len(p) for p in prompts) - 1)  # every sequence evaluates >= 1
        kept = len(os.path.commonprefix([self._head, prompts[0][:head]]))
        for seq in range(1, self.n_seq):
            lib.llama_memory_seq_rm(self.mem, seq, -1, -1)
        lib.llama_memory_seq_rm(self.mem, 0, kept, -1)
        self._decode([(t, kept + j, 0, False) for j, t in enumerate(prompts[0][kept:head])])
        self._head = prompts[0][:head]
        for seq in range(1, len(prompts)):
            lib.llama_memory_seq_cp(self.mem, 0, seq, -1, -1)
        rows = [(t, head + j, seq, j == len(p) - head - 1)
                for seq, p in enumerate(prompts) for j, t in enumerate(p[head:])]
        return head, kept, self._decode(rows)

    def decode(self, prompts: list[list[int]], formats: list[AnswerFormat], max_tokens: int,
               rng=None) -> list[tuple[list[int], int]]:
        """``(answer tokens, reused prompt tokens)`` per prompt, each under its answer format
        (GBNF grammar, root rule ``root``); ``rng``: sample, not greedy.

        Reused tokens: the shared head counts as evaluated once (for the first prompt, less
        what the previous call had already evaluated), reused for every other prompt.
        """
        out: list[tuple[list[int], int]] = []
        for start in range(0, len(prompts), self.n_seq):
            end = start + self.n_seq
            out += self._decode_chunk(prompts[start:end], formats[start:end], max_tokens, rng)
        return out

    def _decode_chunk(self, prompts: list[list[int]], formats: list[AnswerFormat],
                      max_tokens: int, rng) -> list[tuple[list[int], int]]:
        lib = self._lib
        if (longest := max(len(p) for p in prompts)) + max_tokens > self.seq_tokens:
            raise BackendError(f"a prompt of {longest} tokens leaves no room for a "
                               f"{max_tokens}-token answer in {self.seq_tokens} cells")
        head, kept, index = self._prefill(prompts)
        samplers = [lib.llama_sampler_init_grammar(self.vocab, f.gbnf.encode(), b"root")
                    for f in formats]
        if not all(samplers):
            for sampler in filter(None, samplers):
                lib.llama_sampler_free(sampler)
            raise BackendError("llama.cpp rejected an answer grammar")
        answers: list[list[int]] = [[] for _ in prompts]
        texts = [""] * len(prompts)  # each answer's text so far, after the pre-filled heading
        pos = [len(p) for p in prompts]
        live = list(range(len(prompts)))
        self._splits.clear()
        try:
            while live:
                rows, stepping = [], []
                for seq, i in zip(live, index, strict=True):
                    token = self._pick(self._logits(i), samplers[seq], rng)
                    if lib.llama_vocab_is_eog(self.vocab, token):
                        continue
                    lib.llama_sampler_accept(samplers[seq], token)
                    texts[seq] += self._piece(token)
                    step, done = [token], False
                    if self.jump:
                        forced, done = self._forced(samplers[seq], formats[seq], texts[seq])
                        step += forced
                        texts[seq] += "".join(self._piece(t) for t in forced)
                    answers[seq] += step
                    if done or len(answers[seq]) >= max_tokens:
                        continue
                    rows += [(t, pos[seq] + j, seq, j == len(step) - 1)
                             for j, t in enumerate(step)]
                    pos[seq] += len(step)
                    stepping.append(seq)
                live, index = stepping, self._decode(rows)
        finally:
            for sampler in samplers:
                lib.llama_sampler_free(sampler)
        reused = [kept] + [head] * (len(prompts) - 1)
        return list(zip(answers, reused, strict=True))

    def _forced(self, sampler, fmt: AnswerFormat, text: str) -> tuple[list[int], bool]:
        """The tokens the grammar forces after ``text`` (accepted by ``sampler``), and whether
        the answer is complete after them.

        The forced text is split as the tokenizer splits it; where something may follow, only
        the tokens that stay the same whatever follows are taken (so a space is left to join
        the model's next word); the model writes the rest.
        """
        forced, follow = fmt.forced(text)
        if not forced:
            return [], follow == ("",)
        tokens = self._tokens(forced)
        keep = len(tokens) if follow else len(tokens) - 1  # free words: the last may join them
        for after in dict.fromkeys(f[:self.LOOKAHEAD] for f in follow if f):
            keep = min(keep, len(os.path.commonprefix([tokens, self._tokens(forced + after)])))
        out = []
        for token in tokens[:keep]:
            if not self._allowed(sampler, token):  # not what the grammar forces: stop here
                return out, False
            self._lib.llama_sampler_accept(sampler, token)
            out.append(token)
        return out, follow == ("",) and len(out) == len(tokens)


def _sample(logits, rng, temperature: float = 0.7, top_p: float = 0.9, top_k: int = 40) -> int:
    """An index drawn from ``softmax(logits / temperature)`` cut to its top-k and top-p."""
    import numpy as np

    k = min(top_k, len(logits))
    top = np.argpartition(-logits, k - 1)[:k]
    top = top[np.argsort(-logits[top])]
    p = np.exp((logits[top] - logits[top[0]]) / temperature)
    p /= p.sum()
    keep = int(np.searchsorted(np.cumsum(p), top_p)) + 1
    p = p[:keep] / p[:keep].sum()
    return int(top[rng.choice(keep, p=p)])


#: llama.cpp's names of the x86 instruction sets it was compiled for (``llama_print_system_info``)
#: and the flags Linux lists for them in ``/proc/cpuinfo``.
CPU_FEATURE_FLAGS = {"AVX": "avx", "AVX2": "avx2", "F16C": "f16c", "FMA": "fma", "BMI2": "bmi2",
                     "AVX_VNNI": "avx_vnni", "AVX512": "avx512f", "AVX512_VBMI": "avx512vbmi",
                     "AVX512_VNNI": "avx512_vnni", "AVX512_BF16": "avx512_bf16",
                     "AMX_INT8": "amx_int8"}


def missing_cpu_features(system_info: str, cpu_flags: set[str]) -> list[str]:
    """The instruction sets a llama.cpp build uses (its system-info line) that the CPU lacks.

    >>> info = "CPU : SSE3 = 1 | AVX = 1 | AVX2 = 1 | AVX512 = 1 | AVX512_BF16 = 1 | OPENMP = 1 |"
    >>> missing_cpu_features(info, {"avx", "avx2", "avx512f"})
    ['AVX512_BF16']
    >>> missing_cpu_features(info, set())  # no flags known (not Linux): nothing to say
    []
    """
    if not cpu_flags:
        return []
    pairs = (part.split("=", 1) for part in system_info.replace("CPU :", "|").split("|")
             if "=" in part)
    used = [name.strip() for name, value in pairs if value.strip() == "1"]
    return [n for n in used if n in CPU_FEATURE_FLAGS and CPU_FEATURE_FLAGS[n] not in cpu_flags]


def _cpu_flags() -> set[str]:
    """The CPU's flags as Linux lists them (empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            line = next((row for row in f if row.startswith("flags")), "")
    except OSError:
        return set()
    return set(line.partition(":")[2].split())


def check_llama_build() -> None:
    """Refuse a llama.cpp build this CPU cannot run (one :class:`UsageError` line, instead of a
    SIGILL inside llama.cpp): the Makefile builds for the CPU it runs on (AVX-512 where present),
    so a virtual environment copied to an older machine would otherwise crash at the first
    decode."""
    import llama_cpp

    info = llama_cpp.llama_print_system_info().decode("utf-8", "replace")
    if missing := missing_cpu_features(info, _cpu_flags()):
        raise UsageError(f"this llama-cpp-python build uses {', '.join(missing)}, which this CPU"
                         " lacks; rebuild it here: make clean install")


class _LlamaSession:
    """One llama.cpp model in this process: chat template, grammar decoder, completion.

    Args:
        model_file: A checked GGUF file (:func:`profiles.modelpack.check_gguf`).
        threads: llama.cpp threads (prompt and generation).
        seed: Seed of the sampled retries.
        n_ctx: Key/value cells per answer (prompt + answer).
        repeat_penalty: llama.cpp repeat penalty of the unconstrained reference (1.0: none).
        n_seq: Answers the grammar decoder writes together.
        jump_forward: Feed the text the grammar forces without asking the model.
    """

    def __init__(self, model_file: str, threads: int, seed: int, n_ctx: int,
                 repeat_penalty: float, n_seq: int, jump_forward: bool = True) -> None:
        from llama_cpp import Llama
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        check_llama_build()
        try:
            self.llm = Llama(model_path=model_file, n_ctx=n_ctx, n_batch=n_ctx,
                             n_threads=threads, n_threads_batch=threads, seed=seed,
                             verbose=False)
        except ValueError as exc:  # llama.cpp refused the file
            raise UsageError(f"llama.cpp cannot load {model_file}: {exc}") from None
        self.seed, self.repeat_penalty = seed, repeat_penalty
        template = self.llm.metadata.get("tokenizer.chat_template")
        eos = self.llm.detokenize([self.llm.token_eos()], special=True).decode()
        self.template = Jinja2ChatFormatter(template, eos_token=eos, bos_token="") \
            if template else None
        self._decoder_args = (threads, n_seq, n_ctx, jump_forward)
        self._decoder: _GrammarDecoder | None = None  # built on first constrained call
        self._retries = 0

    def text(self, messages: Messages) -> str:
        """The prompt: chat template (head identical for every user) + pre-filled heading."""
        if self.template is None:
            head = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
        else:
            head = self.template(messages=messages).prompt
        return head + PREFILL

    def answers(self, prompts: list[Messages], sample: bool, constrained: bool, reuse: bool,
                choices: list[AnswerChoices] | None = None) -> list[Generation]:
        """Answers to ``prompts``: grammar-constrained ones decoded together (the list lines
        limited to ``choices`` where given); the plain reference one at a time
        (``reuse=False``: no key/values kept between prompts)."""
        import numpy as np

        tokens = [self.llm.tokenize(self.text(m).encode(), special=True) for m in prompts]
        if not constrained:
            return [self._plain(t, sample, reuse) for t in tokens]
        if self._decoder is None:
            self._decoder = _GrammarDecoder(self.llm, *self._decoder_args)
        if not reuse:
            self._decoder.forget()
        rng = None
        if sample:  # a new stream per retry, reproducible from the seed
            self._retries += 1
            rng = np.random.default_rng([self.seed, self._retries])
        gens = []
        formats = [AnswerFormat.of(c) for c in choices or [None] * len(prompts)]
        decoded = self._decoder.decode(tokens, formats, MAX_ANSWER_TOKENS, rng)
        for prompt, (out, reused) in zip(tokens, decoded, strict=True):
            answer = PREFILL + self.llm.detokenize(out).decode("utf-8", "replace")
            gens.append(Generation(answer.removesuffix("\n"), len(out), len(prompt), reused))
        return gens

    def _plain(self, tokens: list[int], sample: bool, reuse: bool) -> Generation:
        """llama-cpp-python out of the box: ``create_completion``, no grammar."""
        if not reuse:
            self.llm.reset()
        reused = _common_prefix(self.llm, tokens)
        out = self.llm.create_completion(
            tokens, max_tokens=96, temperature=0.7 if sample else 0.0, top_p=0.9, seed=self.seed,
            repeat_penalty=self.repeat_penalty)
        answer = PREFILL + out["choices"][0]["text"]
        return Generation(answer.removesuffix("\n"), int(out["usage"]["completion_tokens"]),
                          len(tokens), reused)


def _common_prefix(llm, tokens: list[int]) -> int:
    """Prompt tokens llama.cpp will reuse from its cache (it re-evaluates at least one)."""
    cached = llm.input_ids[: llm.n_tokens].tolist()
    pairs = zip(cached, tokens[:-1], strict=False)
    return next((i for i, (a, b) in enumerate(pairs) if a != b),
                min(len(cached), len(tokens) - 1))


def _serve(conn: Connection, session_args: tuple) -> None:
    """A worker process: load the model once, answer jobs until ``None`` arrives."""
    try:
        session = _LlamaSession(*session_args)
    except UsageError as exc:
        conn.send(exc)
        return
    conn.send("ready")
    while (job := conn.recv()) is not None:
        try:
            start = time.process_time()
            gens = session.answers(*job)
            conn.send((gens, time.process_time() - start))
        except Exception as exc:  # noqa: BLE001 (sent to the parent, raised there)
            conn.send(BackendError(f"llama.cpp worker failed: {exc!r}"))


class LlamaCppBackend:
    """A GGUF model run by llama.cpp, greedy, grammar-constrained, prompt head reused.

    Args:
        model_file: A GGUF file, already checked (:func:`profiles.modelpack.packaged_gguf` or
            :func:`profiles.modelpack.check_gguf`).
        model_id: Name stored with every profile (default: the file name without ``.gguf``).
        threads: llama.cpp threads per process.
        processes: Model copies in worker processes (1: in this process); a ``generate`` call
            gives each a contiguous share of the prompts.
        constrained: Enforce the four-line format with the GBNF grammar (``False``: the plain
            one-at-a-time reference of the bench).
        reuse_prefix: Keep the key/values of the previous prompt and evaluate only what
            differs (llama.cpp's longest-common-prefix reuse); ``False`` for the reference.
        seed: Seed of the sampled retries.
        n_ctx: Key/value cells per answer (prompt + answer).
        repeat_penalty: llama.cpp's repeat penalty of the unconstrained reference (1.0: off).
        n_seq: Answers each process decodes together (its share of a ``generate`` call is
            decoded in chunks of this many).
        jump_forward: Feed the text the grammar forces (the rest of a name, separators, the next
            heading) with the sampled token, without logits (``False``: one token per step,
            the reference of the tests).
    """

    def __init__(self, model_file: str | Path, model_id: str | None = None, threads: int = 2,
                 processes: int = 1, constrained: bool = True, reuse_prefix: bool = True,
                 seed: int = 0, n_ctx: int = 640, repeat_penalty: float = 1.0,
                 n_seq: int = 8, jump_forward: bool = True) -> None:
        self.model_file = Path(model_file)
        self.model_id = f"llama.cpp:{model_id or self.model_file.stem}"
        self.threads, self.processes = threads, processes
        self.constrained, self.reuse_prefix = constrained, reuse_prefix
        args = (str(self.model_file), threads, seed, n_ctx, repeat_penalty, n_seq, jump_forward)
        self._session = _LlamaSession(*args) if processes == 1 else None
        self._workers: list[tuple[multiprocessing.process.BaseProcess, Connection]] = []
        if processes > 1:
            self._start_workers(args)
        self._finalizer = weakref.finalize(self, _stop_workers, self._workers)
        #: CPU seconds spent answering, summed over the model processes.
        self.cpu_seconds = 0.0

    def _start_workers(self, args: tuple) -> None:
        ctx = multiprocessing.get_context("spawn")
        for _ in range(self.processes):
            parent, child = ctx.Pipe()
            process = ctx.Process(target=_serve, args=(child, args), daemon=True)
            process.start()
            self._workers.append((process, parent))
        for _, conn in self._workers:
            reply = conn.recv()
            if isinstance(reply, Exception):
                _stop_workers(self._workers)
                raise reply

    def generate(self, prompts: list[Messages], sample: bool = False,
                 choices: list[AnswerChoices] | None = None) -> list[Generation]:
        """Answer ``prompts``; with worker processes, each answers a contiguous share."""
        job = (sample, self.constrained, self.reuse_prefix)
        if self._session is not None:
            start = time.process_time()
            gens = self._session.answers(prompts, *job, choices)
            self.cpu_seconds += time.process_time() - start
            return gens
        shares = _split(prompts, len(self._workers))
        picks = _split(choices, len(self._workers)) if choices else [None] * len(shares)
        busy = [(conn, share, pick) for (_, conn), share, pick
                in zip(self._workers, shares, picks, strict=True) if share]
        for conn, share, pick in busy:
            conn.send((share, *job, pick))
        results: list[Generation] = []
        for conn, _, _ in busy:
            reply = conn.recv()
            if isinstance(reply, Exception):
                raise reply
            results += reply[0]
            self.cpu_seconds += reply[1]
        return results

    def close(self) -> None:
        """Stop the worker processes (also done when the backend is garbage-collected)."""
        self._finalizer()


def _split(items: list[T], parts: int) -> list[list[T]]:
    """``items`` in ``parts`` contiguous, near-equal shares (in order).

    >>> _split([1, 2, 3, 4, 5], 2)
    [[1, 2, 3], [4, 5]]
    """
    size, extra = divmod(len(items), parts)
    out, start = [], 0
    for i in range(parts):
        end = start + size + (i < extra)
        out.append(items[start:end])
        start = end
    return out


def _stop_workers(workers: list[tuple[multiprocessing.process.BaseProcess, Connection]]) -> None:
    for _, conn in workers:
        try:
            conn.send(None)
        except (BrokenPipeError, OSError):
            pass
    for process, _ in workers:
        process.join(timeout=5)
        if process.is_alive():
            process.terminate()
    workers.clear()


class TransformersBackend:
    """A local causal LM, batched greedy generation on CPU.

    Args:
        model_path: A Hugging Face model folder (see :func:`profiles.modelpack.resolve_model`).
        batch_size: Prompts per ``generate`` call (left-padded; similar lengths grouped).
        max_new_tokens: Hard cap on answer tokens (default: the longest answer the format
            allows, so it never cuts one).
        seed: Seed of the sampled retries.
        prefix_cache: Compute the key/values of the prompt prefix shared by a batch (system
            message and chat template head) once and reuse them; answers are identical.
        int8: Dynamic int8 quantization of every ``Linear`` (per-channel weights, activations
            quantized per batch): several times faster on CPU, answers differ (see
            docs/profiles.md); the model id gets an ``-int8`` suffix, so cache and store keep
            the two apart.
    """

    def __init__(self, model_path: str | Path, batch_size: int = 8,
                 max_new_tokens: int | None = None, seed: int = 0,
                 prefix_cache: bool = True, int8: bool = False) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from profiles.constrain import VocabClasses

        self.model_path = Path(model_path)
        self.model_id = self.model_path.name
        self.batch_size = batch_size
        self.seed = seed
        self.prefix_cache = prefix_cache
        self._prefix: tuple[str, object, object] | None = None  # (text, ids (1, P), cache)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path, padding_side="left")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=torch.float32)
        self.model.eval()
        if int8:
            from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

            spec = {torch.nn.Linear: per_channel_dynamic_qconfig}
            self.model = quantize_dynamic(self.model, spec, dtype=torch.qint8)
            self.model_id += "-int8"
        eos = self.model.generation_config.eos_token_id
        eos = eos[0] if isinstance(eos, list) else eos
        self.vocab = VocabClasses.build(self.tokenizer, self.model.config.vocab_size,
                                        self.tokenizer.eos_token_id if eos is None else eos)
        self.max_new_tokens = max_new_tokens or self.vocab.max_tokens()

    def _text(self, messages: Messages) -> str:
        if self.tokenizer.chat_template:
            head = self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=True)
        else:  # plain models (e.g. the tiny test model): a minimal role-tagged layout
            head = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
        return head + PREFILL

    def generate(self, prompts: list[Messages], sample: bool = False,
                 choices: list[AnswerChoices] | None = None) -> list[Generation]:
        """Answer ``prompts`` in batches of ``batch_size`` (grouped by prompt length);
        ``choices`` is not enforced (no grammar engine)."""
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
        from transformers import LogitsProcessorList

        from profiles.constrain import FacetLines

        enc = self._encode(texts)
        start = enc["input_ids"].shape[1]
        lines = FacetLines(self.vocab, start, len(texts))
        kwargs = {"do_sample": True, "temperature": 0.7, "top_p": 0.9} if sample else \
            {"do_sample": False}
        if sample:
            torch.manual_seed(self.seed)
        with torch.inference_mode():
            ids = self.model.generate(
                **enc, max_new_tokens=self.max_new_tokens, repetition_penalty=1.1,
                pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.vocab.eos_id,
                logits_processor=LogitsProcessorList([lines]), **kwargs)
        gens = []
        for row, state in zip(ids[:, start:], lines.rows, strict=True):
            keep = row != self.tokenizer.pad_token_id
            text = PREFILL + self.tokenizer.decode(row[keep], skip_special_tokens=True)
            text = text.removesuffix("\n")  # the fourth line's break
            gens.append(Generation(drop_partial_items(text, state.capped), int(keep.sum())))
        return gens


def drop_partial_items(text: str, capped: set[int]) -> str:
    """Cut the last item of every list line that hit its token cap (``capped``: line indices).

    A capped line with a single item (or free text, line 0) is kept as written.

    >>> drop_partial_items("a\\nb\\nCheese, Soft Dri\\nFavored brands: M69 private label", {2})
    'a\\nb\\nCheese\\nFavored brands: M69 private label'
    >>> drop_partial_items("a, b", {0})
    'a, b'
    """
    lines = text.split("\n")
    for i in capped:
        if i > 0 and i < len(lines) and "," in lines[i]:
            lines[i] = lines[i].rsplit(",", 1)[0]
    return "\n".join(lines)


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

    def generate(self, prompts: list[Messages], sample: bool = False,
                 choices: list[AnswerChoices] | None = None) -> list[Generation]:
        """Answer each prompt with one request (``concurrency`` at a time); ``choices`` is not
        sent (the endpoint's own format rules apply)."""
        return map_in_daemon_threads(lambda m: self._one(m, sample), prompts, self.concurrency)

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
            metrics.LLM_ERRORS.labels(_error_kind(error)).inc()
            if attempt < self.retries:
                log.warning("LLM endpoint failed (%s); retry in %.1fs", error, delay)
                metrics.LLM_RETRIES.inc()
                time.sleep(delay)
                delay *= 2
        raise BackendError(f"{self.url} failed after {self.retries + 1} attempts: {error}")


def map_in_daemon_threads(fn: Callable[[T], R], items: list[T], concurrency: int) -> list[R]:
    """``[fn(x) for x in items]``, ``concurrency`` calls at a time, in daemon threads.

    Unlike a ``ThreadPoolExecutor``, an exception in the caller's thread (a SIGTERM handler
    abandoning the batch) returns at once: nothing waits for calls still in flight.

    >>> map_in_daemon_threads(lambda x: x * x, [1, 2, 3], 2)
    [1, 4, 9]
    """
    todo: queue.SimpleQueue[int] = queue.SimpleQueue()
    for i in range(len(items)):
        todo.put(i)
    results: list[object] = [None] * len(items)
    errors: list[BaseException] = []

    def work() -> None:
        while not errors:
            try:
                i = todo.get_nowait()
            except queue.Empty:
                return
            try:
                results[i] = fn(items[i])
            except BaseException as exc:  # noqa: BLE001 (re-raised in the caller)
                errors.append(exc)

    threads = [threading.Thread(target=work, daemon=True)
               for _ in range(min(concurrency, len(items)))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results  # type: ignore[return-value]


def _error_kind(error: Exception) -> str:
    """The ``kind`` label of a failed endpoint attempt.

    >>> _error_kind(TimeoutError("timed out")), _error_kind(ConnectionResetError())
    ('timeout', 'connection')
    """
    if isinstance(error, urllib.error.HTTPError):
        return "http_429" if error.code == 429 else "http_5xx"
    reason = getattr(error, "reason", error)  # URLError wraps the socket's error
    return "timeout" if isinstance(reason, TimeoutError) else "connection"
