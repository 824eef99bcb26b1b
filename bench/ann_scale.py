"""Annoy at a million vectors: build time, size per item, query latency and recall@10 against exact search.

    python -m bench.ann_scale              # 1,000,000 vectors; writes docs/ann_scale.json and the plot
    python -m bench.ann_scale --quick      # 20,000 vectors from 400 photos: the smoke run the tests use

The vectors are REAL features with noise: EfficientNet-Lite0 GeM descriptors of the 6,800 non-query
COIL-100 photos, PCA-256 (as the builder does), each copied ~147 times with Gaussian noise scaled so a
copy keeps cosine ~0.9 with its source (about what two views of one object score). Queries are 1,000
fresh noisy copies that are not in the index. Without COIL the bases are random unit vectors (say so).
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from annoy import AnnoyIndex

from index_builder.ann import exact_neighbours
from model_store.index_artifact import Projection, normalize

DOCS = Path(__file__).resolve().parents[1] / "docs"
K = 10
app = typer.Typer(add_completion=False)


def base_vectors(dim: int, every: int = 1) -> tuple[np.ndarray, str]:
    """Unit base vectors: every `every`-th non-query COIL photo's features (all 6,800 by default)."""
    from bench.coil import COIL, non_query_views

    if (COIL / "labels.csv").exists():
        from bench.features import embed_paths

        feats = embed_paths(non_query_views()[::every], "efficientnet-lite0", progress=False)
        return Projection.fit(feats, dim, whiten=False)(feats), "COIL-100 Lite0 GeM PCA-256 + noise"
    rng = np.random.default_rng(1)
    return normalize(rng.normal(size=(5000, dim)).astype(np.float32)), "random unit vectors + noise"


def noisy_copies(bases: np.ndarray, n: int, cos: float, seed: int) -> np.ndarray:
    """n unit vectors, each a base plus isotropic noise giving E[cosine with the base] ~ cos."""
    rng = np.random.default_rng(seed)
    dim = bases.shape[1]
    sigma = np.sqrt((1 / cos**2 - 1) / dim)
    out = np.empty((n, dim), np.float32)
    for s in range(0, n, 100_000):
        idx = rng.integers(0, len(bases), size=min(100_000, n - s))
        out[s:s + len(idx)] = normalize(bases[idx] + rng.normal(scale=sigma, size=(len(idx), dim)).astype(np.float32))
    return out


def latency_and_recall(index: AnnoyIndex, queries: np.ndarray, truth: np.ndarray, search_k: int) -> dict:
    times, hits = [], 0
    for q, t in zip(queries, truth):
        start = time.perf_counter()
        got = index.get_nns_by_vector(q, K, search_k=search_k)
        times.append((time.perf_counter() - start) * 1000)
        hits += len(set(got) & set(t))
    times.sort()
    return {"search_k": search_k, "recall_at_10": round(hits / truth.size, 4),
            "p50_ms": round(statistics.median(times), 3), "p95_ms": round(times[int(0.95 * len(times))], 3)}


def size_per_item(dim: int, n: int = 2000, n_trees: int = 10) -> float:
    """Bytes per item of an Annoy file at this dimension (e.g. the 25088-d VGG16 pool5 descriptor)."""
    index = AnnoyIndex(dim, "angular")
    rng = np.random.default_rng(0)
    for i in range(n):
        index.add_item(i, rng.normal(size=dim).astype(np.float32))
    index.build(n_trees, n_jobs=-1)
    with tempfile.TemporaryDirectory() as tmp:
        index.save(f"{tmp}/x.ann")
        return os.path.getsize(f"{tmp}/x.ann") / n


@app.command()
def main(n: Annotated[int, typer.Option(help="vectors in the index")] = 1_000_000,
         dim: int = 256, queries: int = 1000,
         trees: Annotated[str, typer.Option(help="comma-separated n_trees to build")] = "10,25,50",
         search_ks: Annotated[str, typer.Option(help="comma-separated search_k values")] =
         "1000,2500,5000,10000,20000,40000",
         quick: Annotated[bool, typer.Option(help="20,000 vectors from 400 bases, 100 queries, no docs")] = False,
         ) -> None:
    if quick:
        n, queries, trees, search_ks = 20_000, 100, "5,10", "200,1000"
    bases, source = base_vectors(dim, every=17 if quick else 1)
    data = noisy_copies(bases, n, cos=0.9, seed=0)
    qs = noisy_copies(bases, queries, cos=0.9, seed=1)
    start = time.perf_counter()
    truth = exact_neighbours(data, qs, K)
    exact_batch_ms = (time.perf_counter() - start) * 1000 / queries
    one = []
    for q in qs[:20]:
        s = time.perf_counter()
        np.argpartition(-(data @ q), K)[:K]
        one.append((time.perf_counter() - s) * 1000)
    result = {"n": n, "dim": dim, "queries": queries, "data": source, "machine": machine(),
              "exact": {"single_query_p50_ms": round(statistics.median(one), 2),
                        "batched_ms_per_query": round(exact_batch_ms, 3)},
              "bytes_per_item_25088d_10_trees": round(size_per_item(25088, n=200 if quick else 2000)),
              "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        for n_trees in map(int, trees.split(",")):
            index = AnnoyIndex(dim, "angular")
            index.set_seed(0)
            start = time.perf_counter()
            for i, v in enumerate(data):
                index.add_item(i, v)
            index.build(n_trees, n_jobs=-1)
            build_s = time.perf_counter() - start
            path = f"{tmp}/index-{n_trees}.ann"
            index.save(path)
            index.unload()
            served = AnnoyIndex(dim, "angular")
            served.load(path)  # memory-mapped, as the service loads it
            run = {"n_trees": n_trees, "build_s": round(build_s, 1), "bytes_per_item": round(os.path.getsize(path) / n),
                   "points": [latency_and_recall(served, qs, truth, int(sk)) for sk in search_ks.split(",")]}
            served.unload()
            os.remove(path)
            print(json.dumps(run), flush=True)
            result["runs"].append(run)
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))
    if not quick:
        DOCS.mkdir(exist_ok=True)
        (DOCS / "ann_scale.json").write_text(json.dumps(result, indent=2))
        plot(result, DOCS / "ann_recall_vs_latency.png")


def plot(result: dict, path: Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for run in result["runs"]:
        ax.plot([p["p50_ms"] for p in run["points"]], [p["recall_at_10"] for p in run["points"]], marker="o",
                label=f"n_trees={run['n_trees']}")
    ax.axhline(0.95, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("query time p50 (ms, one core)")
    ax.set_ylabel("recall@10 vs exact")
    ax.set_title(f"Annoy, {result['n']:,} x {result['dim']}-d ({result['data']})", fontsize=8)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# the settings a run was started with (read at import, before a benchmark sets any of its own)
_STARTED_WITH = {k: v for k, v in os.environ.items() if k.startswith("IMAGESEARCH_")}


def command_line(module: str) -> str:
    """The command this run was started with, as `[IMAGESEARCH_...=...] python -m module ARGS`: what makes its
    figures again."""
    settings = [f"{k}={shlex.quote(v)}" for k, v in sorted(_STARTED_WITH.items())]
    return " ".join([*settings, "python -m " + module, *map(shlex.quote, sys.argv[1:])])


def machine() -> str:
    """This machine in words: processor, cores, Python, and its GPU when torch sees one."""
    words = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    import torch

    if torch.cuda.is_available():
        words += f", {torch.cuda.get_device_name()}, torch {torch.__version__}"
    return words


if __name__ == "__main__":
    app()
