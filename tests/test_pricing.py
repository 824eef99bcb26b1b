"""The price estimate: which neighbours count as comparables, and the pricing benchmark's bookkeeping."""

from __future__ import annotations

import numpy as np

from bench.pricing import chance_check, confidence_bins, judge, make_setup, neighbours, rising
from query.models import Estimate
from query.pricing import estimate_price
from query.search_index import Match


def match(score: float, price: float, currency: str = "USD", item: str | None = None) -> Match:
    return Match(item_id=item or f"item-{score}-{price}", title="", category="lamps", price=price, currency=currency,
                 sold_at="2024-01-01", score=score, image_path="")


def test_comparables_reach_the_floor_and_stay_near_the_best():
    e = estimate_price([match(0.30, 100), match(0.28, 110), match(0.19, 1000), match(0.05, 5)], min_similarity=0.1)
    assert [m.price for m in e.comparables] == [100, 110]  # 0.19 is more than the margin (0.1) below the best
    assert 100 <= e.price <= 110 and e.low <= e.price <= e.high and 0 < e.confidence <= 1


def test_nothing_above_the_floor_is_a_refusal_that_names_both_numbers():
    e = estimate_price([match(0.15, 100)], min_similarity=0.2)
    assert e.price is None and e.confidence == 0 and not e.comparables
    assert "the closest is 15% similar, a price needs 20%" in e.reason and "human appraisal" in e.reason
    assert "the closest is 59.7% similar, a price needs 60%" in estimate_price([match(0.5978, 100)], 0.6).reason


def test_no_neighbour_at_all_is_a_refusal_that_points_at_the_filters():
    e = estimate_price([], min_similarity=0.2)
    assert e.price is None and e.reason == "no sold item matches the filters: remove one to get a price"


def test_the_most_common_currency_wins():
    e = estimate_price([match(0.9, 100, "EUR"), match(0.89, 120, "USD"), match(0.88, 130, "USD")], 0.5)
    assert e.currency == "USD" and {m.currency for m in e.comparables} == {"USD"}


def test_a_closer_set_of_comparables_is_more_confident():
    near = estimate_price([match(0.9, 100), match(0.89, 100), match(0.88, 100)], 0.5)
    far = estimate_price([match(0.6, 100), match(0.59, 100), match(0.58, 100)], 0.5)
    assert near.price == far.price == 100 and near.confidence > far.confidence


def test_the_pricing_bench_keeps_unknown_products_out_of_the_catalogue():
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(10, 32))
    products = np.repeat(np.arange(10), 60)
    vecs = centres[products] + 0.3 * rng.normal(size=(600, 32))
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    q_products = np.repeat(np.arange(10), 5)
    queries = centres[q_products] + 0.3 * rng.normal(size=(50, 32))
    s = make_setup(vecs, products, (products % 3).astype(str), queries / np.linalg.norm(queries, axis=1)[:, None],
                   q_products)
    assert len(s.catalogue) == 300 and len(s.known) == len(s.unknown) == 25
    assert -1 < s.thresholds.similar <= s.thresholds.same < 1
    known = neighbours(s.known, s)
    assert len(known) == 25 and all(len(n) == 20 for n in known)
    assert all(n[0].score >= n[-1].score for n in known)
    # clusters this tight: a known product's comparables are its own, priced near its level
    r = judge([estimate_price(n, s.thresholds.similar) for n in known], s.known_levels,
              [estimate_price(n, s.thresholds.similar) for n in neighbours(s.unknown, s)])
    assert r["known_priced"] == 1.0 and r["good"] >= 0.9


def test_rising_pools_adjacent_violators_by_weight():
    assert rising(np.array([0.1, 0.5, 0.3, 0.9]), np.ones(4)).tolist() == [0.1, 0.4, 0.4, 0.9]
    assert rising(np.array([1.0, 0.0]), np.array([3.0, 1.0])).tolist() == [0.75, 0.75]
    assert rising(np.array([0.2, 0.4]), np.ones(2)).tolist() == [0.2, 0.4]


def test_the_confidence_calibrated_on_the_catalogue_is_checked_on_both_kinds_of_query():
    rng = np.random.default_rng(2)
    centres = rng.normal(size=(10, 32))
    products = np.repeat(np.arange(10), 60)
    vecs = centres[products] + 0.3 * rng.normal(size=(600, 32))
    q_products = np.repeat(np.arange(10), 5)
    queries = centres[q_products] + 0.3 * rng.normal(size=(50, 32))
    s = make_setup(vecs / np.linalg.norm(vecs, axis=1)[:, None], products, (products % 3).astype(str),
                   queries / np.linalg.norm(queries, axis=1)[:, None], q_products)
    c = s.calibration
    assert c.measured["items"] == 300 and 0 < c.measured["priced"] <= 300
    assert np.all(np.diff(c.chances) >= 0) and np.all(np.diff(c.knots) >= 0)
    check = chance_check(s, [estimate_price(n) for n in neighbours(s.known, s)],
                         [estimate_price(n) for n in neighbours(s.unknown, s)])
    assert check["known"]["priced"] + check["unknown"]["priced"] == check["all"]["priced"]
    assert sum(b["estimates"] for b in check["bins"]) == check["all"]["priced"]
    # tight clusters: priced from their own product, within 25% as often as the price spread (sigma 0.2) allows
    assert c.measured["within"] >= 0.6 and check["known"]["good"] >= 0.6


def test_judge_counts_refusals_and_misses():
    priced = Estimate(price=100, low=90, high=110, currency="USD", confidence=0.5, comparables=[])
    wrong = Estimate(price=300, low=250, high=350, currency="USD", confidence=0.2, comparables=[])
    refused = Estimate(reason="no sold item is similar enough")
    r = judge([priced, wrong, refused], np.array([100.0, 100.0, 100.0]), [refused, wrong])
    assert r["known_priced"] == 0.667 and r["good"] == 0.5 and r["good_of_all"] == 0.333
    assert r["level_in_range"] == 0.5 and r["unknown_priced"] == 0.5 and r["median_confidence_unknown"] == 0.2


def test_confidence_bins_count_every_price_given_once():
    sure = Estimate(price=100, low=95, high=105, currency="USD", confidence=0.9, comparables=[])
    unsure = Estimate(price=300, low=100, high=500, currency="USD", confidence=0.02, comparables=[])
    refused = Estimate(reason="no sold item is similar enough")
    bins = {b["confidence"]: b for b in confidence_bins([sure, unsure, refused], np.array([100.0] * 3), [unsure])}
    assert sum(b["estimates"] for b in bins.values()) == 3  # the refusal is no price
    assert bins["0.4-1"] == {"confidence": "0.4-1", "estimates": 1, "good": 1.0}
    assert bins["0-0.05"]["estimates"] == 2 and bins["0-0.05"]["good"] == 0.0 and bins["0.1-0.2"]["good"] is None
