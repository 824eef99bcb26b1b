"""The floors of /estimate and /assist follow the index's vector space; the bench that measured the raw one.

A server on the demo index (no projection: raw descriptors) answers with the raw floors in test_assist.py,
test_service.py and test_ui.py ("a price needs 70%", "a suggestion needs 65%").
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from bench import small_catalogue
from model_store.settings import get_settings
from query.active import Active
from query.floors import PCA, RAW, UNMEASURED, floors_for


def test_each_vector_space_has_its_own_floors():
    assert floors_for("pca") == PCA and (PCA.price, PCA.vote) == (0.6, 0.55)
    assert floors_for("none") == RAW and (RAW.price, RAW.vote) == (0.7, 0.65)
    for unmeasured in ("pca-whiten", "learned"):  # centred like PCA, but not measured: PCA's floors, and it says so
        f = floors_for(unmeasured)
        assert f == UNMEASURED and (f.price, f.vote) == (PCA.price, PCA.vote) and "not measured" in f.space


@pytest.mark.parametrize("projection", ["pca", "none", "learned"])
def test_a_vote_floor_set_in_the_settings_replaces_the_measured_one_only(projection):
    f = floors_for(projection, vote_override=0.42)
    assert f.vote == 0.42 and f.price == floors_for(projection).price and "set to 0.42" in f.space


def test_the_served_index_takes_its_floors_from_its_manifest_and_the_settings(monkeypatch):
    raw_index = SimpleNamespace(manifest=SimpleNamespace(projection="none"))  # all Active.floors reads of it
    assert Active(raw_index, deployment=None, served=None).floors() == RAW
    monkeypatch.setenv("IMAGESEARCH_VOTE_MIN_SIMILARITY", "0.42")
    get_settings.cache_clear()
    assert Active(raw_index, deployment=None, served=None).floors() == floors_for("none", vote_override=0.42)


def test_the_small_catalogue_bench_draws_catalogues_of_the_sizes_it_reports(monkeypatch):
    """Its bookkeeping on clustered vectors: sizes, shares and counts, and the table marks the raw floors."""
    monkeypatch.setattr(small_catalogue, "SIZES", (40, 100))
    monkeypatch.setattr(small_catalogue, "DRAWS", 2)
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(20, 32))
    products = np.repeat(np.arange(20), 30)
    q_products = np.repeat(np.arange(20), 4)

    def unit(v: np.ndarray) -> np.ndarray:
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    arrays = (unit(centres[products] + 0.3 * rng.normal(size=(600, 32))), products, (products % 4).astype(str),
              unit(centres[q_products] + 0.3 * rng.normal(size=(80, 32))), q_products, (q_products % 4).astype(str))
    rows = small_catalogue.measure_data(arrays)
    assert [r["space"] for r in rows] == ["PCA-256, whole catalogue", "raw", "raw"]
    assert rows[0]["photos"] == 300 and 30 <= rows[1]["photos"] <= 50 and 80 <= rows[2]["photos"] <= 120
    assert [p["floor"] for p in rows[1]["price"]] == list(small_catalogue.PRICE_FLOORS)
    for r in rows[1:]:
        priced = [p["unknown_priced"] for p in r["price"]]
        assert priced == sorted(priced, reverse=True)  # a higher floor never prices more
        named = [v["unknown, new kind"]["named"] for v in r["vote"]]
        assert named == sorted(named, reverse=True) and all(0 <= p <= 1 for p in priced)
    table = small_catalogue.markdown({"rows": {"synthetic": rows}, "date": "today", "machine": "here"})
    assert f"| **{RAW.price}** |" in table and f"| **{RAW.vote}** |" in table
    assert table.count("| synthetic | raw |") == 2 * (len(small_catalogue.PRICE_FLOORS) + len(small_catalogue.VOTE_FLOORS))
