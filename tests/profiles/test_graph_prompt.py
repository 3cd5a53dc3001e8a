"""Contexts (1 and 2 hops, time cut), prompts, facet parsing, grounding and fallback."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from profiles.facets import Facets, brand_grounding, fallback_facets, grounding, parse_facets
from profiles.graph import PurchaseGraph
from profiles.prompt import build_messages, prompt_hash, render_context
from streaming.dataset import Dataset

DAY = 86400.0


@pytest.fixture(scope="module")
def graph(tiny_data) -> PurchaseGraph:
    return PurchaseGraph(Dataset.load(tiny_data))


def test_context_sees_only_events_up_to_t(graph):
    ctx = graph.context("u1", 14 * DAY)  # u1's chips purchase (day 15) is in the future
    assert ctx.n_events == 5 and ctx.ts == 14 * DAY and ctx.units == 5.0
    assert ctx.budget_share == ctx.premium_share == 0.0  # one item per category: mid band
    assert [n for n, _ in ctx.categories] == ["Cheese", "Fluid Milk"]  # 3 and 2
    assert "bag snacks" not in {n for n, _ in ctx.categories}
    assert ctx.household == "age 45-54, income 50-74K, 2 Adults Kids"
    with pytest.raises(KeyError):
        graph.context("u3", 3 * DAY)  # u3's first purchase is on day 4


def test_two_hops_adds_co_buyers_and_one_hop_does_not(graph):
    two = graph.context("u1", 14 * DAY, hops=2)
    # u2 shares cheese with u1; u2 (up to day 14) bought cheese x2 and soda x2.
    assert two.neighbours == 1
    assert dict(two.crowd_categories) == {"Cheese": 2, "Soft Drinks": 2}
    assert "soft drinks" in two.known
    # cheese and M69 are already in u1's own lists: the 2-hop line shows only what is new
    assert render_context(two).splitlines()[-1] == \
        "1 co-buyers also buy: Soft Drinks; M7 national Cola"  # a brand with its product
    one = graph.context("u1", 14 * DAY, hops=1)
    assert one.neighbours == 0 and "co-buyers" not in render_context(one)
    assert "soft drinks" not in one.known
    lonely = graph.context("u4", 13 * DAY)  # bread: nobody else buys it
    assert lonely.neighbours == 0


def test_graph_grown_live_equals_the_whole_log(tiny_data, cj_small):
    """Seeded with the first part of a log and fed the rest (per-user order kept, users
    interleaved as partitions deliver them, in several batches), the graph gives the same
    context as one built from the whole log, at every cut time."""
    for path, cut_share in ((tiny_data, 0.5), (cj_small, 0.6)):
        data = Dataset.load(path)
        whole = PurchaseGraph(data)
        events = data.events.to_pandas()
        until = float(events["ts"].quantile(cut_share))
        grown = PurchaseGraph(data, until=until)
        assert grown.seed_end == until and len(grown) == int((events["ts"] < until).sum())
        rest = events[events["ts"] >= until]
        rest = rest.assign(row=np.arange(len(rest))).sort_values(["user_id", "row"])
        for part in np.array_split(np.arange(len(rest)), 5):
            chunk = rest.iloc[part]
            grown.add(chunk["user_id"].to_numpy(), chunk["item_id"].to_numpy(),
                      chunk["ts"].to_numpy(), chunk["quantity"].to_numpy())
        assert len(grown) == len(whole) and grown.users == whole.users
        users = whole.users[:: max(1, len(whole.users) // 40)]
        for user in users:
            times = whole.user_event_times(user)
            assert np.array_equal(grown.user_event_times(user), times)
            assert grown.latest_ts(user) == times[-1]
            for t in {times[0], times[len(times) // 2], times[-1], until}:
                if t >= times[0]:
                    assert dataclasses.astuple(grown.context(user, t)) == \
                        dataclasses.astuple(whole.context(user, t)), (path, user, t)


def test_live_purchase_changes_the_context_and_unknown_items_are_refused(tiny_data):
    graph = PurchaseGraph(Dataset.load(tiny_data), until=10 * DAY)  # u4's day-13 bread cut
    assert graph.latest_ts("u4") == 9 * DAY and graph.context("u4", 20 * DAY).neighbours == 0
    graph.add(["u4"], ["i1"], np.array([20 * DAY]), np.array([2.0]))  # cheese, live
    ctx = graph.context("u4", 20 * DAY)
    assert (ctx.n_events, ctx.ts, ctx.units) == (2, 20 * DAY, 3.0)
    assert [n for n, _ in ctx.categories] == ["Bread", "Cheese"] and ctx.neighbours == 2
    assert graph.context("u4", 19 * DAY).n_events == 1  # the cut still holds
    with pytest.raises(ValueError, match="no-such-item"):
        graph.add(["u4", "u4"], ["i2", "no-such-item"], np.array([21 * DAY] * 2), np.ones(2))
    assert graph.latest_ts("u4") == 20 * DAY  # nothing of the refused batch was added
    graph.add(["new"], ["i5"], np.array([22 * DAY]), np.ones(1))  # a household born live
    assert "new" in graph.users and graph.context("new", 22 * DAY).neighbours == 1


def test_prompt_is_deterministic_and_bounded(graph):
    a, b = build_messages(graph.context("u2", 11 * DAY)), build_messages(
        graph.context("u2", 11 * DAY))
    assert a == b and prompt_hash(a) == prompt_hash(b)
    assert prompt_hash(a) != prompt_hash(build_messages(graph.context("u2", 7 * DAY)))
    assert len(a[1]["content"]) < 600


def test_parse_accepts_variants_and_rejects_incomplete():
    text = ("Crowd segment: retired couple\n**Personal interests:** gardening\n"
            "- Preferred categories: Cheese (3), Soft Drinks\nFavored brands: M7 national.\n")
    facets = parse_facets(text)
    assert facets is not None
    assert facets.texts == ("retired couple", "gardening", "Cheese, Soft Drinks", "M7 national")
    assert parse_facets(text.replace("Favored brands: M7 national.", "")) is None
    assert parse_facets(text.replace("Soft Drinks", "Soft Drinks,")).texts[2] == \
        "Cheese, Soft Drinks"  # a dangling comma (an item the model did not write) goes
    assert parse_facets("Crowd segment: a\nPersonal interests: b\nPreferred categories: c\n"
                        "Favored brands: <1-2 brands copied from the data>") is None
    for copy in ("The household: type, budget, shopping style.", "Household type, budget, style"):
        copied = text.replace("retired couple", copy)
        assert parse_facets(copied) is None  # a placeholder copied from the format: no answer


def test_grounding_counts_names_found_in_the_context(graph):
    ctx = graph.context("u1", 14 * DAY)
    facets = Facets(("x", "y", "Cheese, Caviar", "M69 private label and Gucci"))
    assert grounding(facets, ctx) == (2, 4)  # Cheese, M69 yes; Caviar, Gucci no
    crowd_only = Facets(("x", "y", "Soft Drinks", "M7 national"))  # named by co-buyers
    assert grounding(crowd_only, ctx) == (2, 2)
    mixed = Facets(("x", "y", "Cheese", "Cheese, M7 national; Gucci"))  # a category as brand
    assert grounding(mixed, ctx) == (3, 4) and brand_grounding(mixed, ctx) == (1, 3)


def test_fallback_uses_history_statistics(graph):
    ctx = graph.context("u2", 11 * DAY)
    facets = fallback_facets(ctx)
    assert facets.fallback
    assert facets.texts[2] == "Cheese, Soft Drinks" and grounding(facets, ctx) == (4, 4)
    assert facets.texts[0] == "household with 4 purchases"
