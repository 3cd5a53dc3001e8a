"""The graph-aware profile prompt: a fixed system message, a few compact lines of context.

Prompt processing dominates CPU cost, so the prompt is short: a fixed system message with the
answer format (identical for every user; it also replaces the chat template's long default one),
a handful of bounded top-k lists, and a one-line instruction last (about 230 tokens with the Qwen
template, 2 hops). The answer is pre-filled with the first heading
(``Crowd segment:``) so even a small model starts in the right format and writes few tokens.
Placeholders hold no example values: a 0.5B model copies them verbatim.
"""

from __future__ import annotations

import hashlib

from profiles.graph import UserContext

#: The four facets, in answer order; also the headings of the answer lines.
FACETS = ("Crowd segment", "Personal interests", "Preferred categories", "Favored brands")

SYSTEM = ("Describe a shopper in exactly this format:\n"
          "Crowd segment: <household type and shopping style>\n"
          "Personal interests: <two interests>\n"
          "Preferred categories: <two categories from the data>\n"
          "Favored brands: <two brands from the data>")

#: The closing instruction (after the data, where a small model follows it best).
INSTRUCTION = "Write the four lines for this shopper."

#: The answer starts with this text (pre-filled for local models).
PREFILL = f"{FACETS[0]}:"


def _counted(pairs: list[tuple[str, int]]) -> str:
    return ", ".join(f"{name} ({n})" for name, n in pairs) or "none"


def render_context(ctx: UserContext) -> str:
    """The user message: household, own history, (2-hop) what co-buyers buy, the instruction.

    >>> from profiles.graph import UserContext
    >>> ctx = UserContext("u1", 0.0, 3, None, [("Cheese", 2)], [("Cheddar", 2)],
    ...                   [("M69 private label", 3)], ["Cheddar"], 1.0)
    >>> print(render_context(ctx).replace(INSTRUCTION, "<instruction>"))
    Purchases: 3 lines, 0 units in 1 days; 0% budget and 0% premium-priced for their category
    Categories: Cheese (2)
    Products: Cheddar (2); recently Cheddar
    Brands: M69 private label (3)
    <instruction>
    """
    lines = [f"Household: {ctx.household}"] if ctx.household else []
    lines += [
        f"Purchases: {ctx.n_events} lines, {ctx.units:g} units in "
        f"{max(1, round(ctx.days_active))} days; {ctx.budget_share:.0%} budget and "
        f"{ctx.premium_share:.0%} premium-priced for their category",
        f"Categories: {_counted(ctx.categories)}",
        f"Products: {_counted(ctx.types)}; recently {', '.join(ctx.recent) or 'none'}",
        f"Brands: {_counted(ctx.brands)}",
    ]
    if ctx.neighbours:
        crowd_cats = ", ".join(n for n, _ in ctx.crowd_categories)
        crowd_brands = ", ".join(n for n, _ in ctx.crowd_brands)
        lines.append(f"{ctx.neighbours} shoppers buying the same items buy most: "
                     f"{crowd_cats}; brands {crowd_brands}")
    lines.append(INSTRUCTION)
    return "\n".join(lines)


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
