"""Constrained decoding of the four-line answer: it cannot overflow, miss a heading or run on.

The answer is pre-filled up to the first heading (``Crowd segment:``). While a batch generates,
:class:`FacetLines` keeps every row in the format, per row and step:

- after a line break the next heading's tokens are forced (the model never writes a heading,
  so it cannot misspell, skip or repeat one), and after the fourth line the end token;
- a value must start with a token holding a letter or digit (no empty value, no ``<…>``) and
  not with the first token of a placeholder of the format (the 0.5B model likes to copy
  "Household type and shopping style" instead of answering);
- a list line's last allowed item cannot be followed by a comma (the model ends the line
  instead of starting an item that would be cut);
- a value line ends (a forced line break) at its token cap; lines cut by the cap are recorded
  so the backend can drop a half-written last list item.

So every answer has four headed, bounded lines and a row stops as soon as its fourth line ends;
the batch stops with its longest row. The rules only mask logits: greedy answers that already
fit the format are unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import LogitsProcessor

from profiles.prompt import FACETS, PLACEHOLDERS

#: Value tokens per line before a forced line break (segment, interests, categories, brands).
#: "M1089 national, M544 national" is 12 Qwen tokens (one per digit).
LINE_CAPS = (10, 10, 12, 12)
#: Items per list line (0: free text, no limit).
MAX_ITEMS = (0, 2, 2, 2)


@dataclass
class VocabClasses:
    """Token classes the format rules need, from one decode of the whole vocabulary.

    Attributes:
        newline: ``(V,)`` bool, the token's text holds a line break.
        comma: ``(V,)`` bool, the token's text holds a comma or semicolon (item separators).
        value_start: ``(V,)`` bool, may start a value (a letter or digit, not special).
        special: ``(V,)`` bool, never mid-value: special tokens, ids beyond the tokenizer and
            line breaks other than the plain one (``".\\n"``, ``"\\n\\n"``), so lines stay clean.
        break_id: The plain ``"\\n"`` token.
        eos_id: The end token forced after the fourth line.
        headings: Token ids of ``"Heading:"`` for facets 2-4 (index 1-3; index 0 unused).
        copy_start: ``(V,)`` bool, the first token of a placeholder (any case, with or without
            a leading space): never the first token of a value.
    """

    newline: torch.Tensor
    comma: torch.Tensor
    value_start: torch.Tensor
    special: torch.Tensor
    break_id: int
    eos_id: int
    headings: list[list[int]]
    copy_start: torch.Tensor

    @classmethod
    def build(cls, tokenizer, vocab_size: int, eos_id: int) -> VocabClasses:
        """Classify ``vocab_size`` ids (the model's logit width; may exceed the tokenizer)."""
        texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
        texts += [""] * (vocab_size - len(texts))
        newline = torch.tensor(["\n" in t for t in texts])
        breaks = tokenizer.encode("\n", add_special_tokens=False)
        break_id = breaks[0] if len(breaks) == 1 else int(newline.nonzero()[0])
        special = torch.zeros(vocab_size, dtype=torch.bool)
        special[[i for i in tokenizer.all_special_ids if i < vocab_size]] = True
        special[len(tokenizer):] = True
        special |= newline
        special[break_id] = False
        copy_start = torch.zeros(vocab_size, dtype=torch.bool)
        for text in PLACEHOLDERS:
            for variant in (text, text.capitalize(), " " + text, " " + text.capitalize()):
                copy_start[tokenizer.encode(variant, add_special_tokens=False)[0]] = True
        return cls(
            newline=newline, comma=torch.tensor(["," in t or ";" in t for t in texts]),
            value_start=torch.tensor([any(c.isalnum() for c in t) for t in texts]) & ~special,
            special=special, break_id=break_id, eos_id=eos_id,
            headings=[[]] + [tokenizer.encode(f"{h}:", add_special_tokens=False)
                             for h in FACETS[1:]], copy_start=copy_start)

    def max_tokens(self, caps: tuple[int, ...] = LINE_CAPS) -> int:
        """The longest possible answer: values, headings, line breaks and the end token."""
        return sum(caps) + sum(len(h) for h in self.headings) + len(FACETS)


@dataclass
class _Row:
    line: int = 0  # facet being written; len(FACETS) once done
    count: int = 0  # value tokens written on this line
    commas: int = 0
    queue: list[tuple[int, bool]] = field(default_factory=list)  # forced (token, is_break)
    capped: set[int] = field(default_factory=set)


class FacetLines(LogitsProcessor):
    """Masks the logits of a batch so that every row writes the four-line format.

    Args:
        vocab: The token classes of the model's tokenizer.
        start: Prompt length: generated tokens begin at this column of ``input_ids``.
        batch: Rows in the batch.
        caps: Value tokens per line.
        max_items: Items per line (0: no limit).

    Attributes:
        rows: Per-row state; ``rows[r].capped`` holds the lines cut by their token cap.
    """

    def __init__(self, vocab: VocabClasses, start: int, batch: int,
                 caps: tuple[int, ...] = LINE_CAPS, max_items: tuple[int, ...] = MAX_ITEMS) -> None:
        self.vocab, self.start, self.caps, self.max_items = vocab, start, caps, max_items
        self.rows = [_Row() for _ in range(batch)]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """``input_ids (B, L)``, ``scores (B, V)`` → masked scores ``(B, V)``."""
        if input_ids.shape[1] > self.start:
            for row, tok in zip(self.rows, input_ids[:, -1].tolist(), strict=True):
                self._advance(row, tok)
        blocked = torch.finfo(scores.dtype).min
        width = scores.shape[1]
        for r, row in enumerate(self.rows):
            if row.line >= len(FACETS) or row.queue:
                forced = row.queue[0][0] if row.queue else self.vocab.eos_id
                scores[r] = blocked
                scores[r, forced] = 0.0
            elif row.count == 0:
                scores[r, ~self.vocab.value_start[:width] | self.vocab.copy_start[:width]] = blocked
            else:
                scores[r, self.vocab.special[:width]] = blocked
                if self.max_items[row.line] and row.commas + 1 >= self.max_items[row.line]:
                    scores[r, self.vocab.comma[:width]] = blocked  # last item: no new one
        return scores

    def _advance(self, row: _Row, tok: int) -> None:
        """Update one row's state with the token it just produced."""
        if row.line >= len(FACETS):
            return
        if row.queue:
            _, is_break = row.queue.pop(0)
            if not is_break:
                return  # a heading token
        elif not self.vocab.newline[tok]:
            row.count += 1
            row.commas += int(self.vocab.comma[tok])
            if row.count >= self.caps[row.line]:
                row.queue = [(self.vocab.break_id, True)]
                row.capped.add(row.line)
            return
        row.line += 1
        row.count = row.commas = 0
        row.queue = [(self.vocab.eos_id, False)] if row.line == len(FACETS) else \
            [(t, False) for t in self.vocab.headings[row.line]]
