"""Facet parsing, grounding and the statistical fallback.

A generation is accepted when all four headed lines are present and non-empty. Grounding is the
share of categories and brands a profile names that occur in the user's history or shown
neighbourhood (``UserContext.known``): a name counts when it equals, contains or is contained in
a known name (case-insensitive, at least 4 characters).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from profiles.graph import UserContext
from profiles.prompt import DANGLING, FACETS, PLACEHOLDERS

_LINE = re.compile(r"^\s*[-*#\d.]*\s*\**\s*(" + "|".join(FACETS) + r")\s*\**\s*:\s*(.*)$", re.I)
_COUNT = re.compile(r"\(\d+\)")
MAX_FACET_CHARS = 200


@dataclass(frozen=True)
class Facets:
    """The four facet texts (without their headings) and how they were made.

    Attributes:
        texts: ``(crowd segment, personal interests, preferred categories, favored brands)``.
        fallback: True when written from history statistics instead of the model.
    """

    texts: tuple[str, str, str, str]
    fallback: bool = False

    def render(self) -> str:
        """The four ``Heading: text`` lines."""
        return "\n".join(f"{h}: {t}" for h, t in zip(FACETS, self.texts, strict=True))


def parse_facets(text: str) -> Facets | None:
    """The facets in a model answer, or ``None`` if any is missing or empty.

    >>> parse_facets("Crowd segment: young family\\nPersonal interests: baking\\n"
    ...              "Preferred categories: Cheese\\nFavored brands: M69 private label").texts[3]
    'M69 private label'
    >>> parse_facets("Crowd segment: x") is None
    True
    """
    found: dict[str, str] = {}
    for line in text.split("\n"):  # not splitlines(): "\x0b", "\x1c" are no line ends
        match = _LINE.match(line)
        if match is None:
            continue
        heading = next(h for h in FACETS if h.lower() == match.group(1).lower())
        value = _COUNT.sub("", match.group(2)).replace(" ,", ",")  # drop copied counts "(12)"
        value = value.strip().strip("*").strip().rstrip(" .,;")[:MAX_FACET_CHARS]
        found.setdefault(heading, value)
    if any(not found.get(h) or found[h].startswith("<") or _copies_placeholder(found[h])
           for h in FACETS):
        return None
    return Facets(tuple(found[h] for h in FACETS))  # type: ignore[arg-type]


def _copies_placeholder(value: str) -> bool:
    """True when a value copies a placeholder of the format: at least three words, and four in
    five of them are words of one placeholder (reordered or cut copies count too).

    >>> _copies_placeholder("Household type, budget, shopping style"), _copies_placeholder("baking")
    (True, False)
    """
    words = re.findall(r"[a-z]+", value.lower())
    return len(words) >= 3 and any(
        sum(w in set(re.findall(r"[a-z]+", p)) for w in words) >= 0.8 * len(words)
        for p in PLACEHOLDERS)


def named_entities(facets: Facets, first: int = 2) -> list[str]:
    """Category and brand names a profile states (lower case, counts stripped).

    Args:
        facets: The profile's facets.
        first: The first facet read: 2 categories and brands, 3 brands only.
    """
    names = []
    for text in facets.texts[first:]:
        for part in re.split(r",|;|\band\b|/(?= )", _COUNT.sub("", text)):
            name = part.strip(" .'\"").lower()
            if name:
                names.append(name)
    return names


def _is_known(name: str, known: set[str]) -> bool:
    if name in known:
        return True
    return len(name) >= 4 and any(len(k) >= 4 and (name in k or k in name) for k in known)


def grounding(facets: Facets, ctx: UserContext) -> tuple[int, int]:
    """``(grounded, named)``: how many named categories/brands occur in the context."""
    names = named_entities(facets)
    return sum(_is_known(n, ctx.known) for n in names), len(names)


def brand_grounding(facets: Facets, ctx: UserContext) -> tuple[int, int]:
    """``(brands, named)``: how many names in the brand facet are brands of the context.

    Stricter than :func:`grounding`, which also accepts a category written as a brand.
    """
    names = named_entities(facets, first=3)
    return sum(_is_known(n, ctx.known_brands) for n in names), len(names)


def fallback_facets(ctx: UserContext) -> Facets:
    """Facets from history statistics only (used when the model fails twice)."""
    crowd = ctx.household or f"household with {ctx.n_events} purchases"
    return Facets(
        (
            crowd,
            ", ".join(n for n, _ in ctx.types[:3]) or "groceries",
            ", ".join(n for n, _ in ctx.categories[:3]) or "groceries",
            ", ".join(n for n, _ in ctx.brands[:2]) or "unknown brand",
        ),
        fallback=True,
    )


# -- quality checks of written profiles (the bench's rates) -----------------------------------

#: Household attributes (age band, income band, family, status) outside the crowd segment.
_HOUSEHOLD = re.compile(r"\b(\d\d-\d\d|\d\d\+|\d+-\d+k|under \d+k|\d+k\+|income|age|married|"
                        r"single|unknown|homeowner|renter|adults?|kids?|retired|seniors?)\b", re.I)
_WORD = re.compile(r"[a-z0-9]+")


def _content_words(text: str) -> set[str]:
    return {w for w in _WORD.findall(text.lower()) if len(w) >= 3 and w not in DANGLING}


def repeats_a_facet(facets: Facets, share: float = 2 / 3) -> bool:
    """True when a facet merely repeats another: ``share`` of its content words are in it.

    >>> repeats_a_facet(Facets(("Soft Drinks, Cheese buyers", "snacking", "Soft Drinks, Cheese",
    ...                         "M69 private label")))
    True
    >>> repeats_a_facet(Facets(("budget family", "baking", "Cheese, Soft Drinks", "M69")))
    False
    """
    words = [_content_words(t) for t in facets.texts]
    return any(a and b and len(a & b) >= share * min(len(a), len(b))
               for i, a in enumerate(words) for b in words[i + 1:])


def household_in_wrong_facet(facets: Facets) -> bool:
    """True when interests, categories or brands state household attributes (age, income…).

    >>> household_in_wrong_facet(Facets(("retired couple", "Income under 15K, Married",
    ...                                   "Cheese", "M69 private label")))
    True
    """
    return any(_HOUSEHOLD.search(t) for t in facets.texts[1:])


def cut_mid_phrase(facets: Facets) -> bool:
    """True when a facet, or an item of a list facet, ends on a word no phrase ends on.

    >>> cut_mid_phrase(Facets(("Households aged 65+ with income between", "a", "b", "c")))
    True
    """
    items = [facets.texts[0]] + [i for t in facets.texts[1:] for i in t.split(",")]
    return any((_WORD.findall(i.lower()) or [""])[-1] in DANGLING for i in items)
