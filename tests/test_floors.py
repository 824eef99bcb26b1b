"""The floors of /estimate and /assist follow the index's vector space; the bench that measured the raw one.

A server on the demo index (no projection: raw descriptors) answers with the raw floors in test_assist.py,
test_service.py and test_ui.py ("a price needs 70%", "a suggestion needs 65%").
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from bench import space_floors
from model_store.settings import get_settings
from query.active import Active
from query.floors import PCA, RAW, UNMEASURED, WHITENED, floors_for


def test_each_vector_space_has_its_own_floors():
    assert floors_for("pca") == PCA and (PCA.price, PCA.vote) == (0.6, 0.55)
    assert floors_for("none") == RAW and (RAW.price, RAW.vote) == (0.7, 0.65)
    assert floors_for("pca-whiten") == WHITENED and (WHITENED.price, WHITENED.vote) == (0.275, 0.25)
    f = floors_for("learned")  # not measured: PCA's floors, and it says so
    assert f == UNMEASURED and (f.price, f.vote) == (PCA.price, PCA.vote) and "not measured" in f.space


@pytest.mark.parametrize("projection", ["pca", "none", "pca-whiten", "learned"])
def test_a_vote_floor_set_in_the_settings_replaces_the_measured_one_only(projection):
    f = floors_for(projection, vote_override=0.42)
    assert f.vote == 0.42 and f.price == floors_for(projection).price and "set to 0.42" in f.space


def test_the_served_index_takes_its_floors_from_its_manifest_and_the_settings(monkeypatch):
    raw_index = SimpleNamespace(manifest=SimpleNamespace(projection="none"))  # all Active.floors reads of it
    assert Active(raw_index, deployment=None, served=None).floors() == RAW
    monkeypatch.setenv("IMAGESEARCH_VOTE_MIN_SIMILARITY", "0.42")
    get_settings.cache_clear()
    assert Active(raw_index, deployment=None, served=None).floors() == floors_for("none", vote_override=0.42)


def test_the_space_floors_bench_draws_catalogues_of_the_sizes_it_reports(monkeypatch):
    """Its bookkeeping on clustered vectors: sizes, shares and counts, and the table marks the chosen floors."""
    monkeypatch.setattr(space_floors, "SIZES", (40, 100))
    monkeypatch.setattr(space_floors, "DRAWS", 2)
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(20, 32))
    products = np.repeat(np.arange(20), 30)
    q_products = np.repeat(np.arange(20), 4)

    def unit(v: np.ndarray) -> np.ndarray:
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    arrays = (unit(centres[products] + 0.3 * rng.normal(size=(600, 32))), products, (products % 4).astype(str),
              unit(centres[q_products] + 0.3 * rng.normal(size=(80, 32))), q_products, (q_products % 4).astype(str))
    rows = space_floors.measure_data(arrays)
    assert [r["space"] for r in rows] == ["PCA-256", "raw", "raw", "whitened PCA-256"]
    assert rows[0]["photos"] == rows[3]["photos"] == 300 and 30 <= rows[1]["photos"] <= 50 <= 80 <= rows[2]["photos"] <= 120
    for r in rows[1:]:
        prices, votes = space_floors.SWEEPS[r["space"]]
        assert [p["floor"] for p in r["price"]] == list(prices) and [v["floor"] for v in r["vote"]] == list(votes)
        priced = [p["unknown_priced"] for p in r["price"]]
        assert priced == sorted(priced, reverse=True) and all(0 <= p <= 1 for p in priced)  # higher: never more
        named = [v["unknown, new kind"]["named"] for v in r["vote"]]
        assert named == sorted(named, reverse=True)
    table = space_floors.markdown({"rows": {"synthetic": rows}, "date": "today", "machine": "here"})
    for space, f in (("raw", RAW), ("whitened PCA-256", WHITENED)):
        assert f"| synthetic | {space} | {rows[3]['photos'] if space != 'raw' else rows[1]['photos']} | **{f.price}** |" in table
    assert table.count("**") == 2 * (2 * len(space_floors.SIZES) + 2)  # each raw size and the whitened row
