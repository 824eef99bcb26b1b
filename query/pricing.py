"""Expected price from the nearest sold items: similarity-weighted median, range and confidence."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np

from query.floors import PCA
from query.models import Estimate
from query.search_index import Match

# The floor a comparable must reach depends on the index's vector space (query/floors.py). In the builder's
# PCA-256, measured on shop photos and COIL-100 with made-up prices (python -m bench.pricing,
# docs/EVALUATION.md "Price estimates"): at 0.6, 91% of photos of sold products get a price (as many within
# 25% of their level as with any lower floor) and about a third of photos of never-sold products are refused;
# the index's calibrated same/similar thresholds are pairwise cuts (0.17-0.31) that would price every
# never-sold product.
MIN_SIMILARITY = PCA.price
# Comparables must also be nearly as similar as the best match: items a whole look away (other families
# in the demo score 0.6-0.76 when the same family scores 0.8-0.98) would otherwise blur the price.
RELATIVE_MARGIN = 0.1
LOW_QUANTILE, HIGH_QUANTILE = 0.2, 0.8


def weighted_quantile(values: np.ndarray, weights: np.ndarray, q: float) -> float:
    """Smallest value whose cumulative weight reaches q of the total (q=0.5: weighted median)."""
    order = np.argsort(values)
    cum = np.cumsum(weights[order])
    return float(values[order][np.searchsorted(cum, q * cum[-1])])


def as_percent(similarity: float, below: float | None = None) -> str:
    """As the page shows similarities; one decimal, rounded down, where a whole number would reach `below`."""
    if below is not None and round(100 * similarity) >= round(100 * below):
        return f"{math.floor(1000 * similarity) / 10:.1f}%"
    return f"{max(0, round(100 * similarity))}%"


def estimate_price(neighbours: list[Match], min_similarity: float = MIN_SIMILARITY) -> Estimate:
    """Comparables: neighbours scoring at least min_similarity and within RELATIVE_MARGIN of the best,
    in the most common currency among them."""
    if not neighbours:
        return Estimate(reason="no sold item matches the filters: remove one to get a price")
    floor = max(min_similarity, neighbours[0].score - RELATIVE_MARGIN)
    close = [m for m in neighbours if m.score >= floor]
    if not close:  # in the percentages the answers and the page give similarities in
        closest = as_percent(neighbours[0].score, min_similarity)
        return Estimate(reason=f"no sold item is similar enough to price this photo: the closest is {closest} "
                               f"similar, a price needs {as_percent(min_similarity)}; it needs a human appraisal")
    currency = Counter(m.currency for m in close).most_common(1)[0][0]
    comps = [m for m in close if m.currency == currency]
    prices = np.array([m.price for m in comps])
    weights = np.array([m.score - min_similarity + 1e-3 for m in comps])
    point = weighted_quantile(prices, weights, 0.5)
    low, high = (weighted_quantile(prices, weights, q) for q in (LOW_QUANTILE, HIGH_QUANTILE))
    closeness = float(np.average([(m.score - min_similarity) / (1 - min_similarity) for m in comps],
                                 weights=weights))
    agreement = 1.0 - min(1.0, (high - low) / max(point, 1e-9))
    support = len(comps) / (len(comps) + 2)  # one comparable is weak evidence however close
    return Estimate(price=round(point, 2), low=round(low, 2), high=round(high, 2), currency=currency,
                    confidence=round(max(0.0, min(1.0, closeness * agreement * support)), 3), comparables=comps)
