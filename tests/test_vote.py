"""/assist's category vote: which neighbours vote, the answer when none is similar enough, and the floor
bench's bookkeeping."""

from __future__ import annotations

import numpy as np

from bench.category_floor import GROUPS, evaluate
from bench.pricing import sold_half
from query.assist import vote_category
from query.search_index import Match


def match(score: float, category: str) -> Match:
    return Match(item_id=f"{category}-{score}", title="", category=category, price=10, currency="USD",
                 sold_at="2024-01-01", score=score, image_path="")


def test_only_neighbours_at_the_floor_vote():
    neighbours = [match(0.62, "lamps"), match(0.61, "chairs"), *[match(0.59, "clocks")] * 8]
    vote = vote_category(neighbours, temperature=0.05, min_similarity=0.6)
    assert (vote.suggested, vote.runner_up, vote.neighbours, vote.reason) == ("lamps", "chairs", 2, None)
    assert vote.confidence + vote.runner_up_confidence == 1.0
    # without a floor the eight clocks just under it outvote them, as they did before the floor
    assert vote_category(neighbours, temperature=0.05, min_similarity=-1).suggested == "clocks"


def test_nothing_at_the_floor_is_no_suggestion_that_names_both_numbers():
    vote = vote_category([match(0.55, "lamps"), match(0.41, "chairs")], temperature=0.05, min_similarity=0.6)
    assert (vote.suggested, vote.confidence, vote.runner_up, vote.neighbours) == (None, 0, None, 0)
    assert vote.reason == ("no sold item is similar enough to suggest a category: the closest is 55% similar, a "
                           "suggestion needs 60%")
    assert "the closest is 59.7% similar" in vote_category([match(0.5978, "lamps")], 0.05, 0.6).reason


def test_an_empty_catalogue_is_no_suggestion_and_says_so():
    vote = vote_category([], temperature=0.05, min_similarity=0.6)
    assert vote.suggested is None and vote.reason == "the catalogue has no sold item to compare this photo with"


def test_the_floor_bench_keeps_half_the_products_and_sorts_the_queries_by_what_was_sold():
    rng = np.random.default_rng(1)
    products = np.repeat(np.arange(8), 5)
    sold = sold_half(products, np.random.default_rng(0))
    assert sold.sum() == 20 and len(set(products[sold])) == 4
    # 8 products of 4 kinds, each product its own direction; queries lie close to their product's photos
    centres = np.eye(16)[:8] * 4
    cat_vecs = centres[products] + rng.normal(0, 0.3, (40, 16))
    kinds = np.array(["a", "a", "b", "b", "c", "c", "d", "d"])
    q_products = np.arange(8)
    queries = (centres + rng.normal(0, 0.3, (8, 16)), q_products, kinds[q_products])
    by_floor = {r["floor"]: r for r in evaluate(cat_vecs, products, kinds[products], *queries, splits=1)}
    unknown = by_floor[None]["unknown, sold kind"]["photos"] + by_floor[None]["unknown, new kind"]["photos"]
    assert by_floor[None]["known"] == {"photos": 4, "named": 4, "right": 4} and unknown == 4
    assert by_floor[None]["unknown, new kind"]["named"] == by_floor[None]["unknown, new kind"]["photos"] > 0
    # another product's direction is orthogonal: at 0.6 only the photos of sold products get a category
    assert by_floor[0.6]["known"]["right"] == 4
    assert by_floor[0.6]["unknown, new kind"]["named"] == 0 and by_floor[0.6]["unknown, sold kind"]["named"] == 0
    # more draws of the sold half: every query photo counted once per draw
    summed = evaluate(cat_vecs, products, kinds[products], *queries, splits=3)[0]
    assert sum(summed[g]["photos"] for g in GROUPS) == 24
