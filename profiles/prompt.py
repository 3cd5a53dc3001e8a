"""The graph-aware profile prompt: a fixed system message, a few compact lines of context.

Prompt processing dominates CPU cost, so the per-user part is short: a fixed system message
with the task and the answer format (identical for every user, so a local backend computes it
once and reuses its key/values; it also replaces the chat template's long default one), then a
few bounded, most-bought-first lists without counts (digits cost one token each) and with product
names cut before their pack-size noise (about 100 per-user tokens with the Qwen template, 2 hops).
The system message comes first and is the same for every user, so llama.cpp reuses its
key/values from one prompt to the next: its length costs nothing per user. The answer is
pre-filled with the first heading (``Crowd segment:``) so even a small model starts in the right
format. Placeholders hold no example values: a 0.5B model copies them verbatim.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from profiles.graph import UserContext

#: The four facets, in answer order; also the headings of the answer lines.
FACETS = ("Crowd segment", "Personal interests", "Preferred categories", "Favored brands")

#: The crowd segment's vocabularies: household type, budget, shopping style.
HOUSEHOLD_TYPES = ("single adult", "young couple", "couple", "family with kids",
                   "single parent", "large family", "senior couple", "senior single")
BUDGETS = ("budget shopper", "value shopper", "mid-range shopper", "premium shopper")
STYLES = ("big stock-up trips", "frequent small trips", "cooks from scratch",
          "convenience food", "fresh food lover", "snack lover", "brand loyal",
          "private label loyal")
_WORDS = re.compile(r"[a-z]+")


def _words(name: str) -> set[str]:
    return {w for w in _WORDS.findall(name.lower()) if len(w) >= 3}


@dataclass(frozen=True)
class AnswerChoices:
    """The names one user's list lines may use (as the prompt shows them).

    Attributes:
        interests: Product types (the user's most bought and most recent) for the interests.
        categories: Catalog categories (the user's and the co-buyers') for the categories.
        brands: Brands (the user's and the co-buyers') for the brands line.
    """

    interests: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    brands: tuple[str, ...] = ()


def _system() -> str:
    return ("You profile grocery shoppers from their purchase data (lists are most bought"
            " first). Answer in exactly four short lines:\n"
            "Crowd segment: <household type>, <budget>, <shopping style>\n"
            "Personal interests: <two names from the Products list>\n"
            "Preferred categories: <two names from the Categories or co-buyers lists>\n"
            "Favored brands: <two names from the Brands or co-buyers lists>\n"
            f"Household types: {', '.join(HOUSEHOLD_TYPES)} (the Household line tells).\n"
            f"Budgets: {', '.join(BUDGETS)} (the budget and premium shares tell).\n"
            f"Shopping styles: {', '.join(STYLES)}.")


SYSTEM = _system()

#: The answer starts with this text (pre-filled for local models).
PREFILL = f"{FACETS[0]}:"

#: The placeholder texts of the format, one per answer line (the placeholders of a line joined:
#: "household type budget shopping style"); an answer that copies one is no answer.
PLACEHOLDERS = tuple(" ".join(re.findall(r"<([^>]+)>", line)).lower()
                     for line in SYSTEM.split("\n") if "<" in line)

_NOISE = re.compile(r"\s*[(\d].*$")  # "Soft Drinks 12/18&15Pk" -> "Soft Drinks"


def short_name(name: str) -> str:
    """A product or category name cut before its first digit or bracket (if text remains).

    >>> short_name("Soft Drinks 12/18&15Pk Can Car"), short_name("Pineapple Juice (Over 50%")
    ('Soft Drinks', 'Pineapple Juice')
    >>> short_name("2% Milk")
    '2% Milk'
    """
    cut = _NOISE.sub("", name).strip(" -,&/")
    return cut if len(cut) >= 3 else name


def _names(names: list[str]) -> str:
    return ", ".join(dict.fromkeys(short_name(n) for n in names)) or "none"


def render_context(ctx: UserContext) -> str:
    """The user message: household, own history (1 hop), what co-buyers buy (2 hops).

    >>> from profiles.graph import UserContext
    >>> ctx = UserContext("u1", 0.0, 3, None, [("Cheese", 2)], [("Cheddar 8 Oz", 2)],
    ...                   [("M69 private label", 3)], ["Cheddar 8 Oz", "Milk"], 1.0, 3.0)
    >>> print(render_context(ctx))
    3 lines, 3 units in 1 days, 0% budget, 0% premium
    Categories: Cheese
    Products: Cheddar; recently Milk
    Brands: M69 private label
    """
    lines = [f"Household: {ctx.household}"] if ctx.household else []
    cats, types = [n for n, _ in ctx.categories], [n for n, _ in ctx.types]
    brands = [n for n, _ in ctx.brands]
    recent = [n for n in ctx.recent if n not in types]
    lines += [
        f"{ctx.n_events} lines, {ctx.units:g} units in {max(1, round(ctx.days_active))} days, "
        f"{ctx.budget_share:.0%} budget, {ctx.premium_share:.0%} premium",
        f"Categories: {_names(cats)}",
        f"Products: {_names(types)}" + (f"; recently {_names(recent)}" if recent else ""),
        f"Brands: {_names(brands)}",
    ]
    if ctx.neighbours:  # what the co-buyers buy most, less what this shopper's lists show
        crowd_cats = [n for n, _ in ctx.crowd_categories if n not in cats]
        crowd_brands = [n for n, _ in ctx.crowd_brands if n not in brands]
        lines.append(f"{ctx.neighbours} co-buyers also buy: {_names(crowd_cats)}; "
                     f"{_names(crowd_brands)}")
    return "\n".join(lines)


def answer_choices(ctx: UserContext) -> AnswerChoices:
    """The names the user's list lines may use: those the prompt shows, interests (product
    types) less any sharing a word with a category, so the two lines cannot repeat each other.

    >>> from profiles.graph import UserContext
    >>> ctx = UserContext("u1", 0.0, 3, None, [("Cheese", 2)], [("Cheddar Cheese 8 Oz", 2)],
    ...                   [("M69 private label", 3)], ["Milk"], 1.0, 3.0)
    >>> answer_choices(ctx)
    AnswerChoices(interests=('Milk',), categories=('Cheese',), brands=('M69 private label',))
    """
    categories = tuple(dict.fromkeys(short_name(n) for n, _ in
                                     ctx.categories + ctx.crowd_categories))
    used = set().union(*(_words(c) for c in categories))
    types = [short_name(n) for n, _ in ctx.types] + [short_name(n) for n in ctx.recent]
    interests = tuple(dict.fromkeys(t for t in types if not _words(t) & used))
    brands = tuple(dict.fromkeys(n for n, _ in ctx.brands + ctx.crowd_brands))
    return AnswerChoices(interests, categories, brands)


def build_messages(ctx: UserContext) -> list[dict[str, str]]:
    """Chat messages ``[system, user]`` for one user."""
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": render_context(ctx)}]


def prompt_hash(messages: list[dict[str, str]]) -> str:
    """A content hash of the prompt (16 hex chars): equal prompts share a cached profile.

    >>> prompt_hash([{"role": "user", "content": "x"}]) == prompt_hash(
    ...     [{"role": "user", "content": "x"}])
    True
    """
    text = "\x1e".join(f"{m['role']}\x1f{m['content']}" for m in messages) + PREFILL
    return hashlib.sha256(text.encode()).hexdigest()[:16]
