"""The four-line answer as a GBNF grammar (llama.cpp's own constrained decoding).

The answer is pre-filled up to the first heading (``Crowd segment:``); the grammar takes it from
there, so under llama.cpp every answer is

- four lines with the headings of :data:`profiles.prompt.FACETS`, in order, each written by the
  grammar (the model cannot skip, misspell or repeat one), and nothing after the fourth line;
- values made of whole words (a word starts with a letter, digit or ``$``; no ``<…>``, no
  markdown), so a line can only end after a complete word;
- per-line caps in words, not tokens: the crowd segment at most :data:`SEGMENT_WORDS` words,
  every list line (interests, categories, brands) at most :data:`MAX_ITEMS` items of at most
  :data:`ITEM_WORDS` words each. The caps are loose enough that a greedy answer ends before
  them (measured in BENCHMARKS.md); when one binds, the line still ends on a word boundary.

The grammar string is a pure function of these constants and the headings.
"""

from __future__ import annotations

from profiles.prompt import FACETS

#: Words in the free-text crowd-segment line.
SEGMENT_WORDS = 12
#: Items per list line, and words per item.
MAX_ITEMS = 2
ITEM_WORDS = 5
#: Characters per word after its first (long enough for "budget-conscious", "M1089").
WORD_CHARS = 20


def answer_grammar() -> str:
    """The GBNF text of an answer after the pre-filled first heading.

    >>> text = answer_grammar()
    >>> text.splitlines()[0].startswith('root ::= " " segment "\\\\nPersonal interests: "')
    True
    """
    headings = "".join(f' "\\n{h}: " items' for h in FACETS[1:])
    return "\n".join([
        f'root ::= " " segment{headings}',
        f'segment ::= word (("," | ";")? " " word){{0,{SEGMENT_WORDS - 1}}}',
        f'items ::= item (", " item){{0,{MAX_ITEMS - 1}}}',
        f'item ::= word (" " word){{0,{ITEM_WORDS - 1}}}',
        f"word ::= [A-Za-z0-9$] [A-Za-z0-9'&%+/-]{{0,{WORD_CHARS}}}",
    ]) + "\n"
