"""Similarity thresholds measured on the catalogue itself, stored in the index's manifest.

A cosine means different things in different vector spaces (a PCA-256 space is centred, so unrelated photos
score near 0; raw descriptors score 0.5 and up), so /assist and /compare take their thresholds from the
index they serve, measured when it was built:
- duplicate: the similarity that at most 1% of catalogue photos reach with a photo of another item;
- same: the cut that best separates photo pairs of one item from pairs of different items;
- similar: the cut that best separates pairs of one category (or one item) from pairs of other categories.
The accuracy of each on held-out photos is in docs/EVALUATION.md (python -m bench.thresholds).
"""

from __future__ import annotations

import numpy as np

from model_store.index_artifact import Thresholds

SAMPLE = 3000  # photos the pairs are drawn from: 4.5M pairs, a second of work
FALSE_FLAGS = 0.01  # share of catalogue photos a duplicate threshold may wrongly flag
MIN_PAIRS = 10  # fewer same-item or same-category pairs than this: that threshold is not measured


def best_threshold(pos: np.ndarray, neg: np.ndarray) -> tuple[float, float]:
    """(threshold, balanced accuracy) of `score >= threshold` separating pos from neg, best of all cut points."""
    cuts = np.unique(np.concatenate([pos, neg]))
    pos_at_or_above = len(pos) - np.searchsorted(np.sort(pos), cuts, side="left")
    neg_below = np.searchsorted(np.sort(neg), cuts, side="left")
    accuracy = (pos_at_or_above / len(pos) + neg_below / len(neg)) / 2
    i = int(np.argmax(accuracy))
    return float(cuts[i]), float(accuracy[i])


def calibrate(vectors: np.ndarray, item_ids: list[str], categories: list[str], seed: int = 0) -> Thresholds | None:
    """Thresholds for L2-normalised index vectors; None when the catalogue has fewer than two items."""
    items, cats = np.unique(item_ids, return_inverse=True)[1], np.unique(categories, return_inverse=True)[1]
    if items.max(initial=0) < 1:
        return None
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(vectors), SAMPLE, replace=False)) if len(vectors) > SAMPLE else np.arange(len(vectors))
    v, items, cats = np.asarray(vectors[pick], np.float32), items[pick], cats[pick]
    sims = v @ v.T
    upper = np.triu(np.ones_like(sims, dtype=bool), k=1)
    same_item = (items[:, None] == items[None, :])
    same_cat = (cats[:, None] == cats[None, :])
    nearest_other = np.where(same_item, -np.inf, sims).max(axis=1)
    duplicate = float(np.quantile(nearest_other[np.isfinite(nearest_other)], 1 - FALSE_FLAGS))
    measured: dict[str, float | int | str] = {"photos": len(v), "duplicate_false_flags": FALSE_FLAGS}
    pairs_same = sims[upper & same_item]
    if len(pairs_same) >= MIN_PAIRS:
        same, acc = best_threshold(pairs_same, sims[upper & ~same_item])
        measured.update(same_pairs=len(pairs_same), same_balanced_accuracy=round(acc, 4))
    else:  # items of one photo each: only a duplicate is surely the same item
        same = duplicate
        measured["same"] = "items have one photo each: same = duplicate"
    alike, different = sims[upper & same_cat], sims[upper & ~same_cat]
    if len(alike) >= MIN_PAIRS and len(different) >= MIN_PAIRS:
        similar, acc = best_threshold(alike, different)
        measured.update(similar_pairs=len(alike), similar_balanced_accuracy=round(acc, 4))
    else:
        similar = float(np.median(nearest_other[np.isfinite(nearest_other)]))
        measured["similar"] = "one category: similar = median similarity of the nearest other item"
    return Thresholds(duplicate=round(duplicate, 4), same=round(same, 4), similar=round(min(similar, same), 4),
                      measured=measured)
