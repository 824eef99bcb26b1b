"""Real photos: the default embedder's retrieval on COIL-100 must beat raw pixels by far (skipped without the data)."""

from __future__ import annotations

import pytest

from bench.coil import COIL, raw_pixel_top1, write_split
from index_builder.build import build

pytestmark = [pytest.mark.slow, pytest.mark.coil,
              pytest.mark.skipif(not (COIL / "labels.csv").exists(), reason="../shared/data/coil-100 is absent")]


def test_default_index_beats_raw_pixels_on_other_views(tmp_path):
    objects = range(1, 51)  # half the objects: 200 indexed photos, 200 queries 45 degrees away
    catalogue, queries = write_split(tmp_path, objects=objects)
    summary = build(catalogue, eval_queries=queries, progress=False, workers=0)
    baseline = raw_pixel_top1(objects=objects)
    top1 = summary.evaluation["top1"]
    assert summary.photos_indexed == 200 and summary.evaluation["queries"] == 200
    assert top1 >= 0.9, summary.evaluation
    assert top1 >= baseline + 0.2, (top1, baseline)
