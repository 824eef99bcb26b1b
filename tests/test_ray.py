"""`build --engine ray`: Ray Data on a real local Ray, against the in-process engine."""

from __future__ import annotations

import numpy as np
import pytest

from index_builder.cache import EmbeddingCache
from index_builder.extract import extract
from model_store.embedder import Embedder, new_embedder
from test_build import _new_catalogue

pytestmark = pytest.mark.slow
ray = pytest.importorskip("ray", reason="the ray extra is not installed: pip install '.[ray]'")


def test_ray_gives_the_same_vectors_as_the_in_process_engine(tmp_path):
    from index_builder.ray_engine import extract_ray

    catalogue = _new_catalogue(tmp_path / "cat", 20, seed=9000)
    sources = sorted(str(p) for p in catalogue.parent.glob("*.png")) + [str(tmp_path / "cat" / "missing.png")]
    config, net = new_embedder("efficientnet-lite0", "default", "rmac")
    embedder = Embedder(config, net, "cpu", False)
    local = extract(sources, embedder, EmbeddingCache("t", config.dim, tmp_path / "local-cache"), batch_size=8,
                    workers=0, progress=False)
    remote = extract_ray(sources, embedder, EmbeddingCache("t", config.dim, tmp_path / "ray-cache"), batch_size=8,
                         progress=False, thumbnails=None, no_thumbnail=frozenset(), address=None, device="cpu",
                         half=False)
    assert remote.computed == local.computed == 20
    assert remote.keys == local.keys and set(remote.errors) == set(local.errors) == {20}
    assert "not found" in remote.errors[20] or "No such file" in remote.errors[20]
    np.testing.assert_allclose(remote.vectors, local.vectors, atol=1e-5)
