"""Cataloguing assist: the category the neighbours vote for, possible duplicates, a price, the nearest items."""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

from query.floors import Floors
from query.models import CategoryVote, Estimate
from query.pricing import as_percent, estimate_price
from query.search_index import Filters, Match, SearchIndex, item_query

ESTIMATE_NEIGHBOURS = 20  # sold items an estimate looks at (pricing.py keeps the close ones)


def vote_category(neighbours: list[Match], temperature: float, min_similarity: float) -> CategoryVote:
    """Similarity-weighted vote of the categories of the neighbours at least min_similarity similar: each
    votes exp(-(best - its similarity) / T), so the nearest items weigh most and a close second kind still
    counts (T and the floor chosen in docs/EVALUATION.md). With no neighbour that similar, no suggestion: a
    photo of something the catalogue never sold gets no category it would have to undo."""
    voters = [m for m in neighbours if m.score >= min_similarity]
    if not voters:
        if not neighbours:
            return CategoryVote(reason="the catalogue has no sold item to compare this photo with")
        closest = as_percent(max(m.score for m in neighbours), min_similarity)
        return CategoryVote(reason=f"no sold item is similar enough to suggest a category: the closest is "
                                   f"{closest} similar, a suggestion needs {as_percent(min_similarity)}")
    best = max(m.score for m in voters)
    weights: dict[str, float] = defaultdict(float)
    for m in voters:
        weights[m.category] += math.exp((m.score - best) / temperature)
    total = sum(weights.values())
    ranked = sorted(weights.items(), key=lambda kv: -kv[1])
    runner = ranked[1] if len(ranked) > 1 else (None, 0.0)
    return CategoryVote(suggested=ranked[0][0], confidence=round(ranked[0][1] / total, 3), runner_up=runner[0],
                        runner_up_confidence=round(runner[1] / total, 3), neighbours=len(voters))


def duplicates(per_photo: list[list[Match]], threshold: float) -> list[Match]:
    """Catalogue items with a photo at least `threshold` similar to one of the query's photos (the nearest items
    of each photo), each at its best score, best first. Photo by photo: a relisted photo sent with other sides
    of the item is still the same photo, where their mean would be less similar to it."""
    found: dict[str, Match] = {}
    for neighbours in per_photo:
        for m in neighbours:
            if m.score >= threshold and (m.item_id not in found or m.score > found[m.item_id].score):
                found[m.item_id] = m
    return sorted(found.values(), key=lambda m: -m.score)


def estimate(index: SearchIndex, query: np.ndarray, filters: Filters, floors: Floors) -> Estimate:
    """The expected price from the nearest items; price filters do not apply (they would bias it)."""
    f = filters.model_copy(update={"min_price": None, "max_price": None})
    return estimate_price(index.nearest(query, ESTIMATE_NEIGHBOURS, f), floors.price)


def assist(index: SearchIndex, photos: np.ndarray, k: int, filters: Filters, *, vote_neighbours: int,
           vote_temperature: float, floors: Floors, duplicate_threshold: float) -> dict:
    """The parts of an AssistResponse for the photos (N, dim, index space) of one item: the vote, the estimate
    and the nearest items from the item's query (query.search_index.item_query), the duplicates photo by
    photo. The vote and the duplicates look at the whole catalogue; the nearest items and the estimate
    honour the filters."""
    query = item_query(photos)
    unfiltered = index.nearest(query, vote_neighbours)
    # one photo's query is that photo: its nearest items are already here
    per_photo = [unfiltered] if len(photos) == 1 else [index.nearest(p, vote_neighbours) for p in photos]
    return {"category": vote_category(unfiltered, vote_temperature, floors.vote),
            "duplicates": duplicates(per_photo, duplicate_threshold),
            "duplicate_threshold": duplicate_threshold, "estimate": estimate(index, query, filters, floors),
            "nearest": index.nearest(query, k, filters)}
