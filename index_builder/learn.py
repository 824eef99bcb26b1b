"""A projection learned from the catalogue itself: photos of one item should land together.

A marketplace catalogue has several photos of most sold items: free supervision. A linear map (D -> dim),
started from PCA, is trained with a normalised-softmax loss over one proxy per item (Movshovitz-Attias et al.
2017; Zhai & Wu 2019). Items sold tomorrow were never seen by it, so the build checks that it helps on items
it did not learn from (a class-disjoint hold-out) before using it; otherwise the plain PCA is kept.
"""

from __future__ import annotations

import time

import numpy as np

from model_store.index_artifact import Projection

MIN_ITEMS = 20  # items with at least two photos; fewer and the hold-out says nothing
TEMPERATURE = 0.05
HOLDOUT_SHARE = 0.25
MAX_TRAIN_PHOTOS = 20_000  # a full-batch step over 20k photos takes ~0.2 s on 2 cores
MAX_SCORED_PHOTOS = 2_000  # the hold-out's leave-one-out mAP is quadratic in photos


def trainable(item_ids: list[str], dim: int) -> tuple[np.ndarray, str]:
    """Indices of the photos whose item has at least two, and why learning is off ('' when it is on)."""
    ids, counts = np.unique(np.asarray(item_ids), return_counts=True)
    multi = set(ids[counts >= 2])
    keep = np.array([i for i, item in enumerate(item_ids) if item in multi], dtype=np.int64)
    if len(multi) < MIN_ITEMS:
        return keep, f"{len(multi)} items have two or more photos; learning needs at least {MIN_ITEMS}"
    if len(keep) < 2 * dim:
        return keep, f"{len(keep)} photos belong to items with two or more; learning {dim}-d needs {2 * dim}"
    return keep, ""


def fit(vectors: np.ndarray, labels: np.ndarray, dim: int, *, steps: int = 300, lr: float = 3e-4,  # tuned: bench.learned_projection
        temperature: float = TEMPERATURE, seed: int = 0) -> tuple[Projection, dict]:
    """(N, D) L2-normalised vectors and (N,) integer item labels -> a Projection to `dim` and its figures."""
    import torch

    start = time.perf_counter()
    torch.manual_seed(seed)
    pca = Projection.fit(vectors, dim, whiten=False)
    x = torch.from_numpy(vectors - pca.mean)
    w = torch.nn.Parameter(torch.from_numpy(pca.components.T.copy()))  # (D, dim), starts as PCA
    n_items = int(labels.max()) + 1
    y = torch.from_numpy(labels)
    with torch.no_grad():  # proxies start at each item's mean projected photo
        z = torch.nn.functional.normalize(x @ w, dim=1)
        proxies = torch.zeros(n_items, dim).index_add_(0, y, z)
    proxies = torch.nn.Parameter(proxies)
    opt = torch.optim.Adam([w, proxies], lr=lr)
    losses = []
    for _ in range(steps):
        z = torch.nn.functional.normalize(x @ w, dim=1)
        p = torch.nn.functional.normalize(proxies, dim=1)
        loss = torch.nn.functional.cross_entropy(z @ p.T / temperature, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    learned = Projection(pca.mean, w.detach().numpy().T.astype(np.float32).copy(), np.ones(dim, np.float32))
    figures = {"photos": len(vectors), "items": n_items, "dim": dim, "steps": steps, "lr": lr,
               "temperature": temperature, "loss_first": round(losses[0], 4), "loss_last": round(losses[-1], 4),
               "seconds": round(time.perf_counter() - start, 2)}
    return learned, figures


def mean_ap(vectors: np.ndarray, labels: np.ndarray) -> float:
    """Leave-one-out mAP among (N, d) L2-normalised vectors: each photo queries the others."""
    scores = vectors @ vectors.T
    np.fill_diagonal(scores, -np.inf)
    order = np.argsort(-scores, axis=1)[:, :-1]
    hits = labels[order] == labels[:, None]
    precision = np.cumsum(hits, axis=1) / np.arange(1, hits.shape[1] + 1)
    n_rel = hits.sum(axis=1)
    ap = (precision * hits).sum(axis=1) / np.maximum(n_rel, 1)
    return float(ap[n_rel > 0].mean())


def learn(vectors: np.ndarray, item_ids: list[str], dim: int, *, seed: int = 0, steps: int = 300,
          lr: float = 3e-4) -> tuple[Projection | None, dict]:
    """The learned projection when it beats PCA on items it never saw, else None; figures say why either way.

    A quarter of the items (with all their photos) is held out; one projection is learned on the rest, and
    both it and PCA (fitted on the same rest) are scored by leave-one-out mAP on the held-out items. Only when
    the learned one wins is it learned again on every item and returned.
    """
    keep, why_not = trainable(item_ids, dim)
    if why_not:
        return None, {"used": False, "reason": why_not}
    rng = np.random.default_rng(seed)
    if len(keep) > MAX_TRAIN_PHOTOS:
        keep = np.sort(rng.choice(keep, MAX_TRAIN_PHOTOS, replace=False))
    names, labels = np.unique(np.asarray(item_ids)[keep], return_inverse=True)
    held = rng.permutation(len(names))[: max(2, int(len(names) * HOLDOUT_SHARE))]
    is_held = np.isin(labels, held)
    train_v, train_y = vectors[keep][~is_held], labels[~is_held]
    train_y = np.unique(train_y, return_inverse=True)[1]
    test_v, test_y = vectors[keep][is_held][:MAX_SCORED_PHOTOS], labels[is_held][:MAX_SCORED_PHOTOS]
    learned, _ = fit(train_v, train_y, dim, steps=steps, lr=lr, seed=seed)
    pca = Projection.fit(train_v, dim, whiten=False)
    holdout = {"items": int(len(held)), "photos": int(is_held.sum()),
               "mAP_learned": round(mean_ap(learned(test_v), test_y), 4),
               "mAP_pca": round(mean_ap(pca(test_v), test_y), 4)}
    if holdout["mAP_learned"] <= holdout["mAP_pca"]:
        return None, {"used": False, "holdout": holdout,
                      "reason": f"on {holdout['items']} held-out items it scored mAP {holdout['mAP_learned']} "
                                f"against PCA's {holdout['mAP_pca']}"}
    final, figures = fit(vectors[keep], labels, dim, steps=steps, lr=lr, seed=seed)
    return final, {"used": True, "holdout": holdout, **figures}
