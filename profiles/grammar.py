"""The four-line answer as a GBNF grammar (llama.cpp's own constrained decoding).

The answer is pre-filled up to the first heading (``Crowd segment:``); the grammar takes it from
there, so under llama.cpp every answer is four lines with the headings of
:data:`profiles.prompt.FACETS`, in order, each written by the grammar (the model cannot skip,
misspell or repeat one), and nothing after the fourth line. What each line may say:

- **crowd segment**: ``<household type>, <budget>, <shopping style>``, each from a short
  vocabulary (``HOUSEHOLD_TYPES``, ``BUDGETS``, ``STYLES`` of :mod:`profiles.prompt`): a
  description of the household, never a copy of its attribute line ("45-54, income 15-24K,
  2 Adults Kids") or of category names;
- **personal interests**: one or two product types the prompt shows (most bought, most
  recent), less every one that shares a word with a category the next line may use, so the
  two lines cannot repeat each other;
- **preferred categories**: one or two catalog categories the prompt shows (the user's and the
  co-buyers'), two different ones;
- **favored brands**: one or two of the brands shown in the prompt, two different ones.

A list line with no names given falls back to free whole words
(at most :data:`MAX_ITEMS` items of :data:`ITEM_WORDS` words). The grammar is a pure function
of these constants and the names.
"""

from __future__ import annotations

from profiles.prompt import BUDGETS, FACETS, HOUSEHOLD_TYPES, STYLES, AnswerChoices

#: Items per list line, and words per free item (when no names are given).
MAX_ITEMS = 2
ITEM_WORDS = 5
#: Characters per free word after its first.
WORD_CHARS = 20
#: Headings the grammar forces after the first, second and third line break (the decoder feeds
#: them to the model in one step; the space after the colon is left to the model's next token).
HEADINGS = tuple(f"{h}:" for h in FACETS[1:])
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
