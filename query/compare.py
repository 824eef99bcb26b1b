"""How similar are two photos: the cosine of their vectors and a verdict from measured thresholds."""

from __future__ import annotations

import numpy as np

from query.models import CompareThresholds


def verdict(similarity: float, thresholds: CompareThresholds) -> str:
    if similarity >= thresholds.same:
        return "same"
    return "similar" if similarity >= thresholds.similar else "different"


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Of two L2-normalised vectors, rounded for the answer."""
    return round(float(np.clip(a @ b, -1.0, 1.0)), 6)
