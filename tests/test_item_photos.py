"""bench.item_photos' counting, on vectors made so that one photo of an item misleads and any two do not."""

from __future__ import annotations

import numpy as np

from bench.item_photos import evaluate
from model_store.index_artifact import normalize


def test_a_photo_that_misleads_alone_is_outvoted_by_the_items_other_photos():
    e1, e2, e3 = np.eye(3)
    catalogue, items = np.stack([e1, e2]), np.array([0, 1])
    photos = normalize(np.stack([e1 + 0.1 * e3, e1 - 0.1 * e3, 0.5 * e1 + 0.6 * e2,  # item 0: the last looks like 1
                                 e2 + 0.1 * e3, e2 - 0.1 * e3, e2 + 0.1 * e1]))
    rows = evaluate(catalogue, items, photos, np.array([0, 0, 0, 1, 1, 1]), draws=20)
    assert [r["photos"] for r in rows] == [1, 2, 3] and all(r["queries"] == 40 and r["items"] == 2 for r in rows)
    assert 0.5 < rows[0]["top1"] < 1 and rows[1]["top1"] == rows[2]["top1"] == 1.0
