"""A user's purchase context at time t: own history (1 hop) and co-buyers' tastes (2 hops).

GAL-Rec (arXiv 2406.13235) writes the user's multi-hop neighbourhood into the prompt, the way a
GNN aggregates it: here the 1-hop neighbourhood is the items the user bought, the 2-hop
neighbourhood the other users who bought the same items, summarised by what they buy most.
Everything is computed from events with ``ts <= t`` only, deterministically (ties broken by
name), and bounded (top-k lists), so the prompt stays short and a profile never sees the future.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from streaming.dataset import Dataset

#: Per-line cap when counting units: Complete Journey's fuel lines carry thousands of "units".
MAX_LINE_UNITS = 24.0

_CJ_BRAND = re.compile(r"^(National brand|Private label) \(manufacturer (\w+)\)$")


def short_brand(brand: str | None) -> str:
    """A compact brand label: ``'National brand (manufacturer 1046)'`` → ``'M1046 national'``.

    >>> short_brand("Private label (manufacturer 69)")
    'M69 private label'
    >>> short_brand("Acme")
    'Acme'
    """
    if not brand:
        return "unknown brand"
    match = _CJ_BRAND.match(brand)
    if match is None:
        return brand
    kind = "national" if match.group(1).startswith("National") else "private label"
    return f"M{match.group(2)} {kind}"


def _category_levels(path: str | None) -> tuple[str, str]:
    """``(category, type)`` from a path ``'Dept > Category > Type'`` (shorter paths repeat)."""
    parts = [p.strip() for p in (path or "other").split(">") if p.strip()] or ["other"]
    return parts[min(1, len(parts) - 1)], parts[-1]


@dataclass
class UserContext:
    """What a prompt may say about one user at time ``ts``.

    Attributes:
        user_id: The user.
        ts: Time of the last event seen (the profile is valid for events after it).
        n_events: Purchase lines up to ``ts``.
        household: Attribute text (``'age 45-54, income 50-74K, …'``) or ``None``.
        categories: Top ``(category, purchases)`` of the user, most bought first.
        types: Top ``(product type, purchases)`` (finer than categories).
        brands: Top ``(brand, purchases)``.
        recent: Product types of the latest basket lines, newest first.
        days_active: Days between the first and last event.
        units: Units bought (sum of quantities, each line capped at ``MAX_LINE_UNITS``).
        budget_share: Share of lines in the cheapest third of their category.
        premium_share: Share of lines in the dearest third of their category.
        neighbours: Co-buyers found (users sharing at least one item), ``0`` in 1-hop mode.
        crowd_categories: Top categories of the co-buyers' purchases.
        crowd_brands: Top brands of the co-buyers' purchases.
        known: Lower-cased category/type/brand names in the history or neighbourhood
            (the grounding reference).
        known_brands: The lower-cased brand names among ``known``.
    """

    user_id: str
    ts: float
    n_events: int
    household: str | None
    categories: list[tuple[str, int]]
    types: list[tuple[str, int]]
    brands: list[tuple[str, int]]
    recent: list[str]
    days_active: float
    units: float = 0.0
    budget_share: float = 0.0
    premium_share: float = 0.0
    neighbours: int = 0
    crowd_categories: list[tuple[str, int]] = field(default_factory=list)
    crowd_brands: list[tuple[str, int]] = field(default_factory=list)
    known: set[str] = field(default_factory=set)
    known_brands: set[str] = field(default_factory=set)


def _top(codes: np.ndarray, names: np.ndarray, k: int) -> list[tuple[str, int]]:
    """The ``k`` most frequent codes as ``(name, count)``, ties broken by name."""
    if len(codes) == 0:
        return []
    uniq, counts = np.unique(codes, return_counts=True)
    order = sorted(range(len(uniq)), key=lambda i: (-counts[i], names[uniq[i]]))[:k]
    return [(str(names[uniq[i]]), int(counts[i])) for i in order]


class PurchaseGraph:
    """The bipartite user-item purchase graph of a dataset, indexed for context look-ups.

    Args:
        dataset: A loaded :class:`streaming.dataset.Dataset`.
        top_k: Length of every top list in a context (bounds the prompt).
        max_neighbours: Co-buyers kept per user, those sharing the most items first.
    """

    def __init__(self, dataset: Dataset, top_k: int = 3, max_neighbours: int = 50) -> None:
        self.top_k = top_k
        self.max_neighbours = max_neighbours
        items = dataset.items.to_pandas().set_index("item_id")
        events = dataset.events.select(["user_id", "item_id", "ts", "quantity"]).to_pandas()
        self._item_codes = {item: i for i, item in enumerate(items.index)}
        levels = [_category_levels(c) for c in items["category"]]
        self._cat_names, cat_codes = np.unique([lv[0] for lv in levels], return_inverse=True)
        self._type_names, type_codes = np.unique([lv[1] for lv in levels], return_inverse=True)
        self._brand_names, brand_codes = np.unique(
            [short_brand(b) for b in items["brand"]], return_inverse=True)
        item = events["item_id"].map(self._item_codes)
        if item.isna().any():
            missing = events.loc[item.isna(), "item_id"].iloc[0]
            raise ValueError(f"event item {missing!r} is not in the items table")
        self.item = item.to_numpy(np.int64)  # (E,) item code per event, time order
        self.ts = events["ts"].to_numpy(np.float64)  # (E,)
        self.quantity = events["quantity"].to_numpy(np.float64)  # (E,)
        self.band = _price_bands(items["price"].to_numpy(np.float64), cat_codes)[self.item]
        self.cat, self.type, self.brand = cat_codes[self.item], type_codes[self.item], \
            brand_codes[self.item]
        self._user_codes, self.user = np.unique(events["user_id"].to_numpy(), return_inverse=True)
        self._user_index = {u: i for i, u in enumerate(self._user_codes)}
        self._user_events = pd.Series(np.arange(len(self.ts))).groupby(self.user).agg(list)
        self._item_events = pd.Series(np.arange(len(self.ts))).groupby(self.item).agg(list)
        self._households = _household_texts(dataset)

    @property
    def users(self) -> list[str]:
        """All user ids with at least one event, sorted."""
        return [str(u) for u in self._user_codes]

    def user_event_times(self, user_id: str) -> np.ndarray:
        """Timestamps ``(n,)`` of the user's events, in time order."""
        return self.ts[self._events_of(user_id, np.inf)]

    def _events_of(self, user_id: str, t: float) -> np.ndarray:
        code = self._user_index.get(user_id)
        if code is None:
            return np.zeros(0, np.int64)
        idx = np.asarray(self._user_events[code], np.int64)
        return idx[self.ts[idx] <= t]

    def context(self, user_id: str, t: float, hops: int = 2) -> UserContext:
        """The context of ``user_id`` from events with ``ts <= t``.

        Args:
            user_id: The user.
            t: Cut-off time (epoch seconds), inclusive.
            hops: ``2`` adds the co-buyer neighbourhood; ``1`` is the own history only.

        Returns:
            The bounded, deterministic :class:`UserContext`.
        """
        own = self._events_of(user_id, t)
        if len(own) == 0:
            raise KeyError(f"user {user_id!r} has no events up to t={t}")
        k = self.top_k
        last_ts = float(self.ts[own[-1]])
        recent = list(dict.fromkeys(str(self._type_names[c]) for c in self.type[own[::-1][:12]]))
        ctx = UserContext(
            user_id=user_id, ts=last_ts, n_events=len(own),
            household=self._households.get(user_id),
            categories=_top(self.cat[own], self._cat_names, k),
            types=_top(self.type[own], self._type_names, k),
            brands=_top(self.brand[own], self._brand_names, k),
            recent=recent[:3],
            days_active=(last_ts - float(self.ts[own[0]])) / 86400.0,
            units=float(np.minimum(self.quantity[own], MAX_LINE_UNITS).sum()),
            budget_share=float(np.mean(self.band[own] == 0)),
            premium_share=float(np.mean(self.band[own] == 2)),
        )
        ctx.known = {str(n).lower() for n in np.concatenate([
            self._cat_names[np.unique(self.cat[own])], self._type_names[np.unique(self.type[own])],
            self._brand_names[np.unique(self.brand[own])]])}
        ctx.known_brands = {str(n).lower() for n in self._brand_names[np.unique(self.brand[own])]}
        if hops >= 2:
            self._add_neighbourhood(ctx, own, t)
        return ctx

    def _add_neighbourhood(self, ctx: UserContext, own: np.ndarray, t: float) -> None:
        me = self.user[own[0]]
        co = np.concatenate([np.asarray(self._item_events[i], np.int64)
                             for i in np.unique(self.item[own])])
        co = co[(self.ts[co] <= t) & (self.user[co] != me)]
        if len(co) == 0:
            return
        users, shared = np.unique(self.user[co], return_counts=True)
        keep = users[np.lexsort((users, -shared))[: self.max_neighbours]]
        their = np.concatenate([self._events_of(str(self._user_codes[u]), t) for u in keep])
        ctx.neighbours = len(keep)
        ctx.crowd_categories = _top(self.cat[their], self._cat_names, self.top_k)
        ctx.crowd_brands = _top(self.brand[their], self._brand_names, self.top_k)
        ctx.known |= {n.lower() for n, _ in ctx.crowd_categories + ctx.crowd_brands}
        ctx.known_brands |= {n.lower() for n, _ in ctx.crowd_brands}


def _price_bands(price: np.ndarray, category: np.ndarray) -> np.ndarray:
    """Per item: 0 cheapest third of its category, 2 dearest third, 1 otherwise (or unknown).

    >>> _price_bands(np.array([1.0, 2.0, 3.0, 9.0]), np.array([0, 0, 0, 1])).tolist()
    [0, 1, 2, 1]
    """
    frame = pd.DataFrame({"price": price, "category": category})
    pct = frame.groupby("category")["price"].rank(pct=True).to_numpy()
    size = frame.groupby("category")["price"].transform("count").to_numpy()
    bands = np.where(pct <= 1 / 3, 0, np.where(pct > 2 / 3, 2, 1))
    return np.where((size >= 3) & ~np.isnan(pct), bands, 1)


def _household_texts(dataset: Dataset) -> dict[str, str]:
    """``user_id -> 'age 45-54, income 50-74K, 2 Adults Kids'`` for users with attributes."""
    users = dataset.users.to_pandas()
    wanted = [c for c in ("age", "income", "household_comp", "marital_status", "home_ownership")
              if c in users.columns]
    if not wanted:
        wanted = [c for c in users.columns if c != "user_id"][:5]
    texts = {}
    for row in users.itertuples(index=False):
        values = {c: getattr(row, c) for c in wanted}
        parts = [f"{c.replace('_', ' ') if c in ('age', 'income') else ''} {v}".strip()
                 for c, v in values.items() if isinstance(v, str) and v and v != "nan"]
        if parts:
            texts[str(row.user_id)] = ", ".join(parts)
    return texts
