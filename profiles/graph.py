"""A user's purchase context at time t: own history (1 hop) and co-buyers' tastes (2 hops).

GAL-Rec (arXiv 2406.13235) writes the user's multi-hop neighbourhood into the prompt, the way a
GNN aggregates it: here the 1-hop neighbourhood is the items the user bought, the 2-hop
neighbourhood the other users who bought the same items, summarised by what they buy most.
Everything is computed from events with ``ts <= t`` only, deterministically (ties broken by
name), and bounded (top-k lists), so the prompt stays short and a profile never sees the future.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence
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
        brand_products: Per listed brand (own and co-buyers'), the product type bought most
            of it (the user's lines for an own brand, the co-buyers' for theirs), one of the
            user's top ``types`` only if the brand has no other: a brand code alone names no
            product (Complete Journey's are anonymised manufacturers), a brand with what is
            bought of it points at items.
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
    brand_products: dict[str, str] = field(default_factory=dict)
    known: set[str] = field(default_factory=set)
    known_brands: set[str] = field(default_factory=set)


def _top(codes: np.ndarray, names: np.ndarray, k: int) -> list[tuple[str, int]]:
    """The ``k`` most frequent codes as ``(name, count)``, ties broken by name."""
    if len(codes) == 0:
        return []
    uniq, counts = np.unique(codes, return_counts=True)
    order = sorted(range(len(uniq)), key=lambda i: (-counts[i], names[uniq[i]]))[:k]
    return [(str(names[uniq[i]]), int(counts[i])) for i in order]


def _top_products(brand: np.ndarray, kind: np.ndarray, brands: list[str], brand_names: np.ndarray,
                  type_names: np.ndarray, avoid: set[str]) -> dict[str, str]:
    """Per brand name in ``brands``: the product type of ``kind`` bought most of it among the
    lines ``brand`` / ``kind`` (codes ``[L]``), ties by name, a type in ``avoid`` only if the
    brand has no other."""
    out = {}
    for name in brands:
        code = np.searchsorted(brand_names, name)  # names are np.unique's: sorted
        ranked = [n for n, _ in _top(kind[brand == code], type_names, len(type_names))]
        if ranked:
            out[name] = next((n for n in ranked if n not in avoid), ranked[0])
    return out


class PurchaseGraph:
    """The bipartite user-item purchase graph, indexed for context look-ups, growing live.

    The catalog (items and their category, brand and price band) and the household attributes
    come from a dataset; the purchase history starts with the dataset's events before ``until``
    (the seed) and grows with :meth:`add` (the worker feeds it the ``purchases`` topic, see
    :mod:`profiles.follow`). A context reads only events with ``ts <= t`` in event-time order,
    whatever order they were added in, so a graph seeded with part of a log and fed the rest
    gives the same contexts as one built from the whole log.

    Args:
        dataset: A loaded :class:`streaming.dataset.Dataset` (catalog, households, seed events).
        top_k: Length of every top list in a context (bounds the prompt).
        max_neighbours: Co-buyers kept per user, those sharing the most items first.
        until: Seed with the events with ``ts < until`` only; ``None`` seeds every event.

    Attributes:
        seed_end: Events before this time are the seed's: a live event older than it is
            already in the graph (or belongs to history the seed left out) and is not added.
    """

    def __init__(self, dataset: Dataset, top_k: int = 3, max_neighbours: int = 50,
                 until: float | None = None) -> None:
        self.top_k = top_k
        self.max_neighbours = max_neighbours
        items = dataset.items.to_pandas().set_index("item_id")
        self._item_codes = {item: i for i, item in enumerate(items.index)}
        levels = [_category_levels(c) for c in items["category"]]
        self._cat_names, self._item_cat = np.unique([lv[0] for lv in levels],
                                                    return_inverse=True)
        self._type_names, self._item_type = np.unique([lv[1] for lv in levels],
                                                      return_inverse=True)
        self._brand_names, self._item_brand = np.unique(
            [short_brand(b) for b in items["brand"]], return_inverse=True)
        self._item_band = _price_bands(items["price"].to_numpy(np.float64), self._item_cat)
        self._households = _household_texts(dataset)
        # per event, in insertion order (the first ``_n`` rows of growable arrays)
        self._n = 0
        self._item = np.zeros(0, np.int64)  # (E,) item code
        self._ts = np.zeros(0, np.float64)  # (E,) event time
        self._quantity = np.zeros(0, np.float64)  # (E,)
        self._user = np.zeros(0, np.int64)  # (E,) user code
        self._user_index: dict[str, int] = {}
        self._user_names: list[str] = []
        self._user_events: list[list[int]] = []  # per user code: its event rows
        self._item_events: list[list[int]] = [[] for _ in range(len(items))]
        self._user_last_ts: list[float] = []  # per user code: newest event time
        events = dataset.events.select(["user_id", "item_id", "ts", "quantity"])
        ts = events.column("ts").to_numpy()
        if until is not None:
            events = events.filter(ts < until)
            self.seed_end = float(until)
        else:
            self.seed_end = float(np.nextafter(ts.max(), np.inf)) if len(ts) else -np.inf
        frame = events.to_pandas()
        self.add(frame["user_id"].to_numpy(), frame["item_id"].to_numpy(),
                 frame["ts"].to_numpy(np.float64), frame["quantity"].to_numpy(np.float64))

    def has_item(self, item_id: str) -> bool:
        """Whether the catalog knows ``item_id`` (only known items can be added)."""
        return item_id in self._item_codes

    @property
    def catalog(self) -> Collection[str]:
        """The catalog's item ids (a set-like view)."""
        return self._item_codes.keys()

    def add(self, user_ids: Sequence[str], item_ids: Sequence[str], ts: np.ndarray,
            quantity: np.ndarray) -> None:
        """Add purchase lines, in any order.

        Args:
            user_ids: ``(B,)`` buyers.
            item_ids: ``(B,)`` items, all in the catalog.
            ts: ``(B,)`` float64 event times.
            quantity: ``(B,)`` float64 quantities.

        Raises:
            ValueError: an item is not in the catalog (nothing is added).
        """
        if len(user_ids) == 0:
            return
        codes = self._item_codes
        try:
            item = np.fromiter((codes[i] for i in item_ids), np.int64, len(item_ids))
        except KeyError as missing:
            raise ValueError(f"event item {missing.args[0]!r} is not in the items table") \
                from None
        names, inverse = np.unique(np.asarray(user_ids, dtype=object).astype(str),
                                   return_inverse=True)
        for name in names.tolist():
            if name not in self._user_index:
                self._user_index[name] = len(self._user_names)
                self._user_names.append(name)
                self._user_events.append([])
                self._user_last_ts.append(-np.inf)
        user = np.array([self._user_index[n] for n in names.tolist()], np.int64)[inverse]
        rows = self._append(item, np.asarray(ts, np.float64), np.asarray(quantity, np.float64),
                            user)
        for code, members in _groups(user, rows):
            self._user_events[code].extend(members)
            self._user_last_ts[code] = max(self._user_last_ts[code],
                                           float(self._ts[members].max()))
        for code, members in _groups(item, rows):
            self._item_events[code].extend(members)

    def _append(self, item: np.ndarray, ts: np.ndarray, quantity: np.ndarray,
                user: np.ndarray) -> np.ndarray:
        """Store ``(B,)`` columns after the current rows (capacity doubles); their row numbers."""
        n, m = self._n, len(item)
        if n + m > len(self._item):
            size = max(n + m, 2 * len(self._item), 1024)
            for name in ("_item", "_ts", "_quantity", "_user"):
                grown = np.zeros(size, getattr(self, name).dtype)
                grown[:n] = getattr(self, name)[:n]
                setattr(self, name, grown)
        self._item[n:n + m], self._ts[n:n + m] = item, ts
        self._quantity[n:n + m], self._user[n:n + m] = quantity, user
        self._n = n + m
        return np.arange(n, n + m)

    def __len__(self) -> int:
        """Purchase lines in the graph."""
        return self._n

    @property
    def users(self) -> list[str]:
        """All user ids with at least one event, sorted."""
        return sorted(self._user_names)

    def latest_ts(self, user_id: str) -> float:
        """Time of the user's newest event in the graph (``-inf`` if none)."""
        code = self._user_index.get(user_id)
        return -np.inf if code is None else self._user_last_ts[code]

    def user_event_times(self, user_id: str) -> np.ndarray:
        """Timestamps ``(n,)`` of the user's events, in time order."""
        return self._ts[self._events_of(user_id, np.inf)]

    def _events_of(self, user_id: str, t: float) -> np.ndarray:
        """Rows ``(n,)`` of the user's events with ``ts <= t``, in event-time order."""
        code = self._user_index.get(user_id)
        if code is None:
            return np.zeros(0, np.int64)
        return self._events_of_code(code, t)

    def _events_of_code(self, code: int, t: float) -> np.ndarray:
        idx = np.asarray(self._user_events[code], np.int64)
        idx = idx[self._ts[idx] <= t]
        return idx[np.argsort(self._ts[idx], kind="stable")]  # ties: insertion order

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
        k, items = self.top_k, self._item[own]
        cat, kind, brand = self._item_cat[items], self._item_type[items], self._item_brand[items]
        band = self._item_band[items]
        last_ts = float(self._ts[own[-1]])
        recent = list(dict.fromkeys(str(self._type_names[c]) for c in kind[::-1][:12]))
        ctx = UserContext(
            user_id=user_id, ts=last_ts, n_events=len(own),
            household=self._households.get(user_id),
            categories=_top(cat, self._cat_names, k),
            types=_top(kind, self._type_names, k),
            brands=_top(brand, self._brand_names, k),
            recent=recent[:3],
            days_active=(last_ts - float(self._ts[own[0]])) / 86400.0,
            units=float(np.minimum(self._quantity[own], MAX_LINE_UNITS).sum()),
            budget_share=float(np.mean(band == 0)),
            premium_share=float(np.mean(band == 2)),
        )
        ctx.brand_products = _top_products(brand, kind, [n for n, _ in ctx.brands],
                                           self._brand_names, self._type_names,
                                           {n for n, _ in ctx.types})
        ctx.known = {str(n).lower() for n in np.concatenate([
            self._cat_names[np.unique(cat)], self._type_names[np.unique(kind)],
            self._brand_names[np.unique(brand)]])}
        ctx.known_brands = {str(n).lower() for n in self._brand_names[np.unique(brand)]}
        if hops >= 2:
            self._add_neighbourhood(ctx, own, t)
        return ctx

    def _add_neighbourhood(self, ctx: UserContext, own: np.ndarray, t: float) -> None:
        me = self._user[own[0]]
        co = np.concatenate([np.asarray(self._item_events[i], np.int64)
                             for i in np.unique(self._item[own])])
        co = co[(self._ts[co] <= t) & (self._user[co] != me)]
        if len(co) == 0:
            return
        # co-buyers by shared lines, ties by user id (as the sorted ids of a whole-log build)
        users, shared = np.unique(self._user[co], return_counts=True)
        names = np.array([self._user_names[u] for u in users])
        keep = users[np.lexsort((names, -shared))[: self.max_neighbours]]
        their = self._item[np.concatenate([self._events_of_code(int(u), t) for u in keep])]
        ctx.neighbours = len(keep)
        ctx.crowd_categories = _top(self._item_cat[their], self._cat_names, self.top_k)
        ctx.crowd_brands = _top(self._item_brand[their], self._brand_names, self.top_k)
        new = [n for n, _ in ctx.crowd_brands if n not in ctx.brand_products]
        ctx.brand_products |= _top_products(self._item_brand[their], self._item_type[their], new,
                                            self._brand_names, self._type_names,
                                            {n for n, _ in ctx.types})
        ctx.known |= {n.lower() for n, _ in ctx.crowd_categories + ctx.crowd_brands}
        ctx.known_brands |= {n.lower() for n, _ in ctx.crowd_brands}


def _groups(keys: np.ndarray, rows: np.ndarray) -> list[tuple[int, list[int]]]:
    """``(key, rows with that key in their order)`` for each distinct key of ``(B,)`` keys."""
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    cuts = np.flatnonzero(np.diff(sorted_keys)) + 1
    return [(int(sorted_keys[part[0]]), rows[order[part]].tolist())
            for part in np.split(np.arange(len(keys)), cuts)]


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
