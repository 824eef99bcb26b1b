"""The projection learned from the catalogue's own items (index_builder/learn.py)."""

from __future__ import annotations

import numpy as np

from index_builder import learn
from index_builder.build import build
from model_store.index_artifact import Projection
from query.search_index import SearchIndex
from model_store.registry import get_model


def nuisance_world(n_items: int = 60, per_item: int = 4, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """Items told apart by 8 quiet dimensions, drowned in 56 loud ones that PCA will prefer."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_items, 8))
    rows, ids = [], []
    for i in range(n_items):
        for _ in range(per_item):
            rows.append(np.concatenate([centres[i] + 0.3 * rng.normal(size=8), 3.0 * rng.normal(size=56)]))
            ids.append(f"item-{i}")
    v = np.asarray(rows, np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True), ids


def test_learned_projection_beats_pca_on_items_it_never_saw():
    vectors, ids = nuisance_world()
    projection, figures = learn.learn(vectors, ids, dim=8, steps=200, lr=1e-2)  # far from PCA: larger steps
    assert projection is not None and figures["used"] is True, figures
    held = figures["holdout"]
    assert held["mAP_learned"] > 1.5 * held["mAP_pca"], held
    assert figures["loss_last"] < figures["loss_first"]
    out = projection(vectors[:5])
    assert out.shape == (5, 8) and np.allclose(np.linalg.norm(out, axis=1), 1, atol=1e-5)


def test_pca_is_kept_when_learning_does_not_help_or_cannot_learn():
    rng = np.random.default_rng(1)
    noise = rng.normal(size=(200, 32)).astype(np.float32)
    projection, figures = learn.learn(noise / np.linalg.norm(noise, axis=1, keepdims=True),
                                      [f"i{k // 4}" for k in range(200)], dim=8, steps=50)
    if projection is None:  # random labels: nothing to learn that holds on unseen items
        assert "held-out" in figures["reason"]
    one_photo_each = [f"i{k}" for k in range(200)]
    projection, figures = learn.learn(noise, one_photo_each, dim=8)
    assert projection is None and "0 items have two or more photos" in figures["reason"]


def test_a_build_records_what_it_learned_or_why_not(demo_catalogue):
    s = build(demo_catalogue, pca_dim=16, projection="learned", progress=False, workers=0)
    index = SearchIndex(get_model(s.tag).path)
    m = index.manifest
    assert m.projection in ("learned", "pca") and m.projection_training is not None
    assert "holdout" in m.projection_training or "reason" in m.projection_training
    assert isinstance(index.projection, Projection) and index.manifest.dim == 16
