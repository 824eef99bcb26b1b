"""How long the embedding cache's report and prune take at a million photos, through the CLI a user runs.

    python -m bench.cache_prune [--photos 1000000] [--unused-share 0.01 --unused-share 0.2] [--dim 1280]
    python -m bench.cache_prune --quick    # 2,000 photos, no docs: the smoke run the tests use

A BentoML home of its own (in a temporary folder): one embedder's cache of `--photos` vectors of `--dim`
float32 numbers (1280: the default embedder's descriptor), each with the cheap key a local photo leaves, and
one index version whose photo table holds all but `--unused-share` of them (1%: a night's replaced photos;
20%: a catalogue after a big clear-out). The prune deletes those, and compacts the file when they are a tenth
of it or more (a copy of everything kept).
Writes docs/PERFORMANCE.md's cache-prune section.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import time

import numpy as np
import typer

from bench.evaluate_grocery import machine
from index_builder.cache import disk_bytes
from bench.thumbnail_prune import bench_home, show, timed_cli

EMBEDDER = "image-embedder:benchcacheprune"
PUT_BATCH = 10_000


def setup(photos: int, unused: int, dim: int) -> None:
    """Runs in a process whose BENTOML_HOME is the benchmark's: the cache, and a version holding all but `unused`."""
    from index_builder.cache import EmbeddingCache, registered
    from model_store.index_artifact import write_items_db
    from model_store.registry import register
    from model_store.settings import INDEX_MODEL

    keys = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(photos)]
    vector = np.random.default_rng(0).standard_normal(dim).astype(np.float32)
    cache = EmbeddingCache(EMBEDDER, dim)
    for s in range(0, photos, PUT_BATCH):
        cache.put([(f"/catalogue/photos/p{i}.jpg\0{300_000 + i}\0{1_733_000_000 + i}", keys[i], vector)
                   for i in range(s, min(s + PUT_BATCH, photos))])
    cache.close()
    used = keys[unused:]
    rows = [(i, f"item-{i}", f"p{i}.jpg", None, None, key) for i, key in enumerate(used)]
    items = [(f"item-{i}", "Thing", "Misc", 1.0, "USD", "2025-01-01") for i in range(len(used))]
    register(INDEX_MODEL, {"embedder": EMBEDDER}, {"n_photos": len(used)},
             lambda folder: write_items_db(folder / "items.sqlite", rows, items))
    registered(EMBEDDER)  # as a build does once its version is in the store


def measure(photos: int, unused: int, dim: int) -> dict:
    """Set up a home of its own, then time the report and the prune as a user runs them."""
    with tempfile.TemporaryDirectory(prefix="cache-prune-") as tmp:
        home, env = bench_home(tmp)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "bench.cache_prune", "--photos", str(photos), "--unused", str(unused),
                        "--dim", str(dim), "--setup-only"], env=env, check=True)
        made_s = time.perf_counter() - t0
        folder = home / "embedding-cache" / EMBEDDER.replace(":", "-")
        before = disk_bytes(folder)
        report_s, report = timed_cli(env, "index_builder", "cache")
        prune_s, pruned = timed_cli(env, "index_builder", "cache", "--prune")
        after = disk_bytes(folder)
    assert f"deleted {unused:,} vectors" in pruned, pruned
    print(report, pruned, sep="\n", file=sys.stderr)
    return dict(unused=unused, setup_s=made_s, report_s=report_s, prune_s=prune_s, before=before, after=after,
                compacted="compacted" in pruned)


def main(photos: int = 1_000_000, unused_share: list[float] = typer.Option([0.01, 0.2]), dim: int = 1280,
         quick: bool = typer.Option(False, help="2,000 photos, no docs"),
         unused: int = typer.Option(0, hidden=True), setup_only: bool = typer.Option(False, hidden=True)) -> None:
    photos = 2_000 if quick else photos
    if setup_only:
        return setup(photos, unused, dim)
    runs = [measure(photos, round(photos * share), dim) for share in unused_share]
    block = (f"Measured {time.strftime('%Y-%m-%d')} on {machine()} with `python -m bench.cache_prune --photos "
             f"{photos}`: one embedder's cache of {photos:,} vectors ({dim} float32 numbers each, with the cheap key "
             "of a local photo) and one index version holding all but the unused ones; each command timed as a user "
             f"runs it, Python's start included (setting up took {max(r['setup_s'] for r in runs):.0f} s or less).\n\n"
             "| vectors no version holds | `python -m index_builder cache`, s | `python -m index_builder cache "
             "--prune`, s | cache file before | after |\n|---|---|---|---|---|\n")
    for r in runs:
        how = "deleted, file compacted" if r["compacted"] else "deleted, space left for the next builds"
        block += (f"| {r['unused']:,} ({r['unused'] / photos:.0%}): {how} | {r['report_s']:.1f} | {r['prune_s']:.1f} | "
                  f"{r['before'] / 1e9:,.2f} GB | {r['after'] / 1e9:,.2f} GB |\n")
    show(block, "cache-prune", "### Pruning the embedding cache", docs=not quick)


if __name__ == "__main__":
    typer.run(main)
