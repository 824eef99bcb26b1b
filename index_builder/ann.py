"""Annoy index building with n_trees and search_k chosen by measured recall@10 against exact search."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from annoy import AnnoyIndex

K = 10
TREE_STEPS = (10, 20, 40, 80, 160)
SEARCH_K_FACTORS = (1, 2, 4, 8, 16, 32)


@dataclass
class AnnChoice:
    index: AnnoyIndex
    n_trees: int
    search_k: int
    recall: float  # mean recall@10 on the sample, self-matches excluded
    query_ms: float  # mean per query at the chosen search_k
    tried: list[dict]  # every (n_trees, search_k, recall, query_ms) measured


def exact_neighbours(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """(Q, k) ids of the k most cosine-similar rows of `vectors` (unit rows) for each query, best first."""
    out = np.empty((len(queries), k), dtype=np.int64)
    chunk = max(1, min(1024, 2**25 // max(len(vectors), 1)))  # bounds the score matrix to ~128 MB
    for s in range(0, len(queries), chunk):
        scores = queries[s:s + chunk] @ vectors.T
        top = np.argpartition(-scores, kth=min(k, scores.shape[1] - 1), axis=1)[:, :k]
        order = np.take_along_axis(scores, top, axis=1).argsort(axis=1)[:, ::-1]
        out[s:s + chunk] = np.take_along_axis(top, order, axis=1)
    return out


def build_annoy(vectors: np.ndarray, n_trees: int, seed: int) -> AnnoyIndex:
    index = AnnoyIndex(vectors.shape[1], "angular")
    index.set_seed(seed)
    for i, v in enumerate(vectors):
        index.add_item(i, v)
    index.build(n_trees, n_jobs=1)  # n_jobs=1 keeps builds deterministic for a given seed
    return index


def measure(index: AnnoyIndex, sample: np.ndarray, truth: np.ndarray, vectors: np.ndarray,
            search_k: int) -> tuple[float, float]:
    """(recall@K, ms per query) of `index` for the sample ids; each query's own id is excluded."""
    hits, start = 0, time.perf_counter()
    for qid, true in zip(sample, truth):
        got = index.get_nns_by_vector(vectors[qid], K + 1, search_k=search_k)
        hits += len(set(got) & set(true))
    ms = (time.perf_counter() - start) * 1000 / max(len(sample), 1)
    return hits / max(truth.size, 1), ms


def choose(vectors: np.ndarray, *, target: float = 0.95, seed: int = 0, sample_size: int = 500) -> AnnChoice:
    """Fewest trees, then smallest search_k, whose measured recall@10 reaches `target`."""
    n = len(vectors)
    rng = np.random.default_rng(seed)
    sample = rng.choice(n, size=min(sample_size, n), replace=False)
    k_eff = min(K, n - 1)
    raw = exact_neighbours(vectors, vectors[sample], k_eff + 1)
    truth = np.array([[j for j in row if j != q][:k_eff] for q, row in zip(sample, raw)])
    tried, best = [], None
    for n_trees in TREE_STEPS:
        index = build_annoy(vectors, n_trees, seed)
        for factor in SEARCH_K_FACTORS:
            search_k = factor * (K + 1) * n_trees
            recall, ms = measure(index, sample, truth, vectors, search_k) if k_eff > 0 else (1.0, 0.0)
            tried.append({"n_trees": n_trees, "search_k": search_k, "recall_at_10": round(recall, 4),
                          "query_ms": round(ms, 4)})
            if best is None or recall > best.recall:
                best = AnnChoice(index, n_trees, search_k, recall, ms, tried)
            if recall >= target:
                return AnnChoice(index, n_trees, search_k, recall, ms, tried)
            if search_k >= n * n_trees:  # already visits every item: more search_k cannot help
                break
    return best  # the target was not reached: the best measured, flagged by its recall
