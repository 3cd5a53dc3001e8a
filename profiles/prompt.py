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
        interests: Product types (the user's most bought) for the interests.
        categories: Catalog categories (the user's and the co-buyers') for the categories.
        brands: Brands with their products (the user's and the co-buyers') for the brands.
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

#: Words a finished phrase does not end on ("… with income between" was cut).
DANGLING = frozenset("a an and as at between but by for from in including into like of on or "
                     "plus such than that the to who with".split())


def short_name(name: str) -> str:
    """A product or category name cut before its first digit or bracket (if text remains), and
    without a last word no phrase ends on (the catalog cuts names at 30 characters).

    >>> short_name("Soft Drinks 12/18&15Pk Can Car"), short_name("Pineapple Juice (Over 50%")
    ('Soft Drinks', 'Pineapple Juice')
    >>> short_name("2% Milk"), short_name("Frzn Boxed Vegetables- Value A")
    ('2% Milk', 'Frzn Boxed Vegetables- Value')
    """
    cut = _NOISE.sub("", name).strip(" -,&/")
    words = cut.split(" ")
    while len(words) > 1 and words[-1].lower() in DANGLING:
        words.pop()
    cut = " ".join(words).strip(" -,&/")
    return cut if len(cut) >= 3 else name


def _names(names: list[str]) -> str:
    return ", ".join(dict.fromkeys(short_name(n) for n in names)) or "none"


def brand_label(ctx: UserContext, brand: str) -> str:
    """A brand as the prompt and the brands line name it: with the product bought most of it.

    >>> from profiles.graph import UserContext
    >>> ctx = UserContext("u1", 0.0, 3, None, [], [], [("M69 private label", 3)], [], 1.0,
    ...                   brand_products={"M69 private label": "Cheddar 8 Oz"})
    >>> brand_label(ctx, "M69 private label"), brand_label(ctx, "M7 national")
    ('M69 private label Cheddar', 'M7 national')
    """
    product = ctx.brand_products.get(brand)
    return f"{brand} {short_name(product)}" if product else brand


def _labels(ctx: UserContext, brands: list[str]) -> str:
    return ", ".join(dict.fromkeys(brand_label(ctx, b) for b in brands)) or "none"


def render_context(ctx: UserContext) -> str:
    """The user message: household, own history (1 hop), what co-buyers buy (2 hops).

    >>> from profiles.graph import UserContext
    >>> ctx = UserContext("u1", 0.0, 3, None, [("Cheese", 2)], [("Cheddar 8 Oz", 2)],
    ...                   [("M69 private label", 3)], ["Cheddar 8 Oz", "Milk"], 1.0, 3.0,
    ...                   brand_products={"M69 private label": "Cheddar 8 Oz"})
    >>> print(render_context(ctx))
    3 lines, 3 units in 1 days, 0% budget, 0% premium
    Categories: Cheese
    Products: Cheddar; recently Milk
    Brands: M69 private label Cheddar
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
        f"Brands: {_labels(ctx, brands)}",
    ]
    if ctx.neighbours:  # what the co-buyers buy most, less what this shopper's lists show
        crowd_cats = [n for n, _ in ctx.crowd_categories if n not in cats]
        crowd_brands = [n for n, _ in ctx.crowd_brands if n not in brands]
        lines.append(f"{ctx.neighbours} co-buyers also buy: {_names(crowd_cats)}; "
                     f"{_labels(ctx, crowd_brands)}")
    return "\n".join(lines)


def answer_choices(ctx: UserContext) -> AnswerChoices:
    """The names the user's list lines may use, all shown in the prompt: interests from the
    product types the user buys most (not the recent ones: what a household buys most is what
    it buys next, measured in docs/profiles.md), categories less any whose words all occur in
    one interest, so the two lines cannot repeat each other ("Cheese" beside "Shredded Cheese"),
    and brands with their products (:func:`brand_label`); categories and brands of the user and
    of the co-buyers.

    >>> from profiles.graph import UserContext
    >>> ctx = UserContext("u1", 0.0, 3, None, [("Cheese", 2), ("Dairy", 1)],
    ...                   [("Cheddar Cheese 8 Oz", 2)], [("M69 private label", 3)], ["Milk"],
    ...                   1.0, 3.0, brand_products={"M69 private label": "Milk"})
    >>> answer_choices(ctx)
    AnswerChoices(interests=('Cheddar Cheese',), categories=('Dairy',), \
brands=('M69 private label Milk',))
    """
    interests = tuple(dict.fromkeys(short_name(n) for n, _ in ctx.types))
    words = [_words(t) for t in interests]
    categories = tuple(c for c in dict.fromkeys(short_name(n) for n, _ in
                                                ctx.categories + ctx.crowd_categories)
                       if not any(_words(c) <= w for w in words))
    brands = tuple(dict.fromkeys(brand_label(ctx, n) for n, _ in ctx.brands + ctx.crowd_brands))
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
