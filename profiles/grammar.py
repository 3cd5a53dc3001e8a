"""The four-line answer as a GBNF grammar (llama.cpp's own constrained decoding).

The answer is pre-filled up to the first heading (``Crowd segment:``); the grammar takes it from
there, so under llama.cpp every answer is four lines with the headings of
:data:`profiles.prompt.FACETS`, in order, each written by the grammar (the model cannot skip,
misspell or repeat one), and nothing after the fourth line. What each line may say:

- **crowd segment**: ``<household type>, <budget>, <shopping style>``, each from a short
  vocabulary (``HOUSEHOLD_TYPES``, ``BUDGETS``, ``STYLES`` of :mod:`profiles.prompt`): a
  description of the household, never a copy of its attribute line ("45-54, income 15-24K,
  2 Adults Kids") or of category names;
- **personal interests**: one or two of the product types the user buys most;
- **preferred categories**: one or two catalog categories the prompt shows (the user's and the
  co-buyers'), two different ones, less every one whose words all occur in one interest, so the
  two lines cannot repeat each other;
- **favored brands**: one or two of the brands shown in the prompt, each with the product
  bought most of it ("M69 private label Lunchmeat"), two different ones.

A list line with no names given falls back to free whole words
(at most :data:`MAX_ITEMS` items of :data:`ITEM_WORDS` words). The grammar is a pure function
of these constants and the names.

:class:`AnswerFormat` holds the grammar with the texts each of its lines may take (the same
language, enumerated: at most a few hundred per line), so a decoder can tell where the grammar
leaves one continuation only (the rest of a name, a separator, the next heading) and feed it
without asking the model (:meth:`AnswerFormat.forced`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from profiles.prompt import BUDGETS, FACETS, HOUSEHOLD_TYPES, STYLES, AnswerChoices

#: Items per list line, and words per free item (when no names are given).
MAX_ITEMS = 2
ITEM_WORDS = 5
#: Characters per free word after its first.
WORD_CHARS = 20
#: Answer token cap: above the longest answer the grammar allows, so it never binds.
MAX_ANSWER_TOKENS = 128

def _literal(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _alternatives(names: tuple[str, ...]) -> str:
    return " | ".join(_literal(n) for n in names)


def _pair_rules(name: str, names: tuple[str, ...]) -> list[str]:
    """``name ::= a (", " other-than-a)? | b (", " other-than-b)? | …`` (no item twice)."""
    if len(names) == 1:
        return [f"{name} ::= {_literal(names[0])}"]
    rows = [f"{name}{i} ::= {_literal(n)} (\", \" ({_alternatives(names[:i] + names[i + 1:])}))?"
            for i, n in enumerate(names)]
    return [f"{name} ::= " + " | ".join(f"{name}{i}" for i in range(len(names)))] + rows


def answer_grammar(choices: AnswerChoices | None = None) -> str:
    """The GBNF text of an answer after the pre-filled first heading.

    >>> text = answer_grammar(AnswerChoices(("Corn Chips",), ("Cheese", "Soft Drinks"),
    ...                                     ("M69 private label",)))
    >>> text.splitlines()[0].startswith('root ::= " " segment "\\\\nPersonal interests: "')
    True
    >>> 'categories1 ::= "Soft Drinks" (", " ("Cheese"))?' in text
    True
    """
    choices = choices or AnswerChoices()
    lines = [f'root ::= " " segment "\\n{FACETS[1]}: " interests "\\n{FACETS[2]}: " categories'
             f' "\\n{FACETS[3]}: " brands',
             'segment ::= household ", " budget ", " style',
             f"household ::= {_alternatives(HOUSEHOLD_TYPES)}",
             f"budget ::= {_alternatives(BUDGETS)}",
             f"style ::= {_alternatives(STYLES)}"]
    lists = (("interests", choices.interests), ("categories", choices.categories),
             ("brands", choices.brands))
    for name, names in lists:
        lines += _pair_rules(name, names) if names else [
            f'{name} ::= item (", " item){{0,{MAX_ITEMS - 1}}}']
    if not all(names for _, names in lists):
        lines += [f'item ::= word (" " word){{0,{ITEM_WORDS - 1}}}',
                  f"word ::= [A-Za-z0-9$] [A-Za-z0-9'&%+/-]{{0,{WORD_CHARS}}}"]
    return "\n".join(lines) + "\n"


def _pairs(names: tuple[str, ...]) -> tuple[str, ...]:
    """Every text of :func:`_pair_rules` over ``names``: one name, or two different ones."""
    return names + tuple(f"{a}, {b}" for a in names for b in names if b != a)


def line_texts(choices: AnswerChoices | None = None) -> tuple[tuple[str, ...] | None, ...]:
    """Every text each answer line may take under :func:`answer_grammar` (``None``: free words).

    The first line's heading is pre-filled, so its texts start after it; the others start with
    their heading.

    >>> lines = line_texts(AnswerChoices(("Corn Chips", "Milk"), (), ("M69 private label",)))
    >>> len(lines[0]), lines[0][0]
    (256, ' single adult, budget shopper, big stock-up trips')
    >>> lines[1], lines[2], lines[3]
    (('Personal interests: Corn Chips', 'Personal interests: Milk', \
'Personal interests: Corn Chips, Milk', 'Personal interests: Milk, Corn Chips'), None, \
('Favored brands: M69 private label',))
    """
    choices = choices or AnswerChoices()
    lines: list[tuple[str, ...] | None] = [tuple(
        f" {h}, {b}, {s}" for h in HOUSEHOLD_TYPES for b in BUDGETS for s in STYLES)]
    for facet, names in zip(FACETS[1:], (choices.interests, choices.categories, choices.brands),
                            strict=True):
        lines.append(tuple(f"{facet}: {text}" for text in _pairs(names)) if names else None)
    return tuple(lines)


@dataclass(frozen=True)
class AnswerFormat:
    """One user's answer: its GBNF grammar and every text each of its lines may take.

    Attributes:
        gbnf: The grammar (:func:`answer_grammar`), root rule ``root``.
        lines: :func:`line_texts` of the same names.
    """

    gbnf: str
    lines: tuple[tuple[str, ...] | None, ...]

    @classmethod
    def of(cls, choices: AnswerChoices | None = None) -> AnswerFormat:
        """The format of an answer whose list lines use ``choices``."""
        return cls(answer_grammar(choices), line_texts(choices))

    def forced(self, text: str) -> tuple[str, tuple[str, ...]]:
        """What the grammar forces after ``text`` (the answer so far, after the pre-filled
        heading), and what may follow that.

        Returns ``(forced, follow)``: ``forced`` is the longest text every admitted continuation
        of ``text`` starts with (it runs on over a line break when a line has one way left to
        end); ``follow`` holds the distinct texts that may come after it, each the rest of its
        line plus the break where another line follows: ``("",)`` when the answer ends after
        ``forced``, ``()`` when a line of free words follows (not enumerated).

        >>> fmt = AnswerFormat.of(AnswerChoices(("Corn Chips", "Milk"), ("Beef",), ("M69 x",)))
        >>> fmt.forced(" single adult, budget shopper, big")
        (' stock-up trips\\nPersonal interests: ', ('Corn Chips\\n', 'Milk\\n', \
'Corn Chips, Milk\\n', 'Milk, Corn Chips\\n'))
        >>> fmt.forced(" single adult, budget shopper, big stock-up trips\\nPersonal interests: C")
        ('orn Chips', ('\\n', ', Milk\\n'))
        >>> fmt.forced(" single adult, budget shopper, big stock-up trips\\n"
        ...            "Personal interests: Milk\\n")
        ('Preferred categories: Beef\\nFavored brands: M69 x', ('',))
        """
        line = text.count("\n")
        partial = text.rsplit("\n", 1)[-1]
        forced = ""
        while line < len(self.lines):
            options = self.lines[line]
            if options is None:  # free words: only the heading is forced
                head = f"{FACETS[line]}: "
                return forced + (head[len(partial):] if head.startswith(partial) else ""), ()
            rest = [o[len(partial):] for o in options if o.startswith(partial)]
            if not rest:
                return forced, ()
            common = os.path.commonprefix(rest)
            last = line == len(self.lines) - 1
            if any(r != common for r in rest):
                ends = "" if last else "\n"
                return forced + common, tuple(dict.fromkeys(r[len(common):] + ends
                                                            for r in rest))
            forced += common  # one text left: the line ends after it
            if last:
                return forced, ("",)
            forced, line, partial = forced + "\n", line + 1, ""
        return forced, ("",)
