"""A million photos end to end: the nightly rebuild, then search over HTTP at 1M against the small demo index.

Embedding a million real photos takes about 16 hours on this 2-core CPU, so the benchmark says plainly what it
fakes: it writes a 1M-row catalogue whose photos are small placeholder files, except NEW real photos (drawn
objects), and seeds the embedding cache with a vector for every placeholder (mixtures of 256 real descriptors
of drawn objects, plus noise: a continuum, so nearest neighbours are not ties). Then the real builder runs as a
subprocess on the whole catalogue: it reads and validates a million rows, takes 1M - NEW vectors from the cache,
embeds the NEW photos, learns the projection, builds and measures Annoy, calibrates, writes the item table and
registers the version. The result is promoted and served by `bentoml serve`, beside the demo index served by a
second server, and /search is timed over HTTP on both in the same run.

    python -m bench.million [--photos 1000000] [--new 2000]   # writes docs/PERFORMANCE.md's million section

Thumbnails are off in this build (the placeholders are not images); the new photos' thumbnail cost is in the
thumbnails section (12 ms each).
"""

from __future__ import annotations

import csv
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out" / "million"
if __name__ == "__main__":  # a store of its own, set before anything imports BentoML
    os.environ.update(BENTOML_HOME=str(OUT / "bentoml"), IMAGESEARCH_STAGES_DIR=str(OUT / "stages"))

import numpy as np  # noqa: E402
import typer  # noqa: E402

from bench.evaluate_grocery import machine, replace_block  # noqa: E402
from bench.server import Server, python_path  # noqa: E402

DOCS = ROOT / "docs" / "PERFORMANCE.md"
BASES = 256
NOISE = 0.35
FAMILIES = ["Ceramics", "Glassware", "Furniture", "Jewelry", "Lighting", "Art", "Silver", "Textiles"]


def env() -> dict[str, str]:
    return {**os.environ, "BENTOML_HOME": str(OUT / "bentoml"), "IMAGESEARCH_STAGES_DIR": str(OUT / "stages"),
            "BENTOML_DO_NOT_TRACK": "True", "PYTHONPATH": python_path(ROOT)}


def placeholder(i: int) -> Path:
    return OUT / "photos" / f"{i // 1000:04d}" / f"seeded-{i:07d}.txt"


def write_photos(n: int, new: int) -> list[Path]:
    """n - new placeholders (never read: the cache knows them) and `new` real drawings."""
    from index_builder.demo import draw_object

    paths = []
    for i in range(n - new):
        p = placeholder(i)
        if not p.exists():
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(f"placeholder photo {i}\n".encode())
        paths.append(p)
    for j in range(new):
        p = OUT / "new" / f"new-{j:05d}.png"
        if not p.exists():
            p.parent.mkdir(parents=True, exist_ok=True)
            draw_object(j % 8, j % 5, (37 * j) % 360, seed=100_000 + j).save(p)
        paths.append(p)
    return paths


def write_catalogue(paths: list[Path]) -> Path:
    """Two photos per item; prices and dates made up."""
    rnd = random.Random(0)
    path = OUT / "catalogue.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["item_id", "image_path", "title", "category", "price", "currency", "sold_at"])
        for i, p in enumerate(paths):
            if i % 2 == 0:
                family = FAMILIES[(i // 2) % 8]
                item = (f"m{i // 2:07d}", f"{family} lot {i // 2}", family, f"{rnd.uniform(5, 900):.2f}",
                        f"20{rnd.randint(15, 26)}-{rnd.randint(1, 12):02d}-{rnd.randint(1, 28):02d}")
            w.writerow([item[0], p, item[1], item[2], item[3], "USD", item[4]])
    return path


def seed_cache(paths: list[Path], n_seeded: int) -> tuple[str, float]:
    """Vectors for the placeholders, under the default embedder's tag, as the builder would have stored them."""
    from index_builder.cache import EmbeddingCache
    from index_builder.demo import draw_object
    from index_builder.sources import cheap_key
    from model_store.embedder import Embedder, new_embedder, save_embedder
    from model_store.preprocess import image_to_pixels
    from model_store.settings import get_settings
    from model_store.thumbnails import photo_key

    config, net = new_embedder(get_settings().backbone, "default", "rmac")
    tag = save_embedder(config, net)
    cache = EmbeddingCache(tag, config.dim)
    start = time.perf_counter()
    if len(cache) < n_seeded:
        emb = Embedder(config, net)
        drawings = [draw_object(b % 8, (b // 8) % 6, (b * 29) % 360, seed=200_000 + b) for b in range(BASES)]
        bases = np.concatenate([emb.embed(np.stack([image_to_pixels(d, config.preprocess) for d in drawings[s:s + 16]]))
                                for s in range(0, BASES, 16)])
        bases /= np.linalg.norm(bases, axis=1, keepdims=True)
        rng = np.random.default_rng(0)
        for s in range(0, n_seeded, 10_000):
            idx = range(s, min(s + 10_000, n_seeded))
            a, b = rng.integers(0, BASES, len(idx)), rng.integers(0, BASES, len(idx))
            w = rng.uniform(0, 1, (len(idx), 1)).astype(np.float32)
            v = w * bases[a] + (1 - w) * bases[b]
            v += rng.normal(0, NOISE / np.sqrt(config.dim), v.shape).astype(np.float32)
            v /= np.linalg.norm(v, axis=1, keepdims=True)
            cache.put([(cheap_key(str(paths[i])), photo_key(paths[i].read_bytes()), v[k]) for k, i in enumerate(idx)])
            print(f"seeded {idx.stop:,} / {n_seeded:,}", file=sys.stderr, flush=True)
    # the new photos must be new to the build, also when the benchmark runs again
    new = paths[n_seeded:]
    cache.forget([cheap_key(str(p)) or "" for p in new], [photo_key(p.read_bytes()) for p in new])
    cache.close()
    return tag, time.perf_counter() - start


def build_watching_memory(catalogue: Path) -> tuple[dict, dict[str, float]]:
    """The real builder as a subprocess; its peak memory sampled every 0.2 s from /proc: RssAnon (its own
    memory) and RssFile (pages of files it maps, the embedding cache's LMDB above all: the kernel can drop
    them at will)."""
    proc = subprocess.Popen([sys.executable, "-m", "index_builder", "build", str(catalogue), "--no-thumbnails",
                             "--json", "--no-progress"], cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    peak = {"anon": 0, "file": 0, "total": 0}
    while proc.poll() is None:
        try:
            fields = dict(line.split(":", 1) for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines())
            anon, file = (int(fields[k].split()[0]) * 1024 for k in ("RssAnon", "RssFile"))
            peak = {"anon": max(peak["anon"], anon), "file": max(peak["file"], file),
                    "total": max(peak["total"], anon + file)}
        except (OSError, KeyError, ValueError):
            pass
        time.sleep(0.2)
    out, err = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"the build failed:\n{err[-3000:]}")
    return json.loads(out), {k: round(v / 1e9, 2) for k, v in peak.items()}


def run(*args: str) -> str:
    done = subprocess.run([sys.executable, *args], cwd=ROOT, env=env(), capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return done.stdout


def server_rss_mb(server: Server) -> float:
    import psutil

    from loadtests.soak import sample_rss  # skips a worker that exits while it is read

    return round(sample_rss(psutil.Process(server.proc.pid), 0.0).total_bytes / 1e6, 1)


def time_searches(servers: dict[str, Server], photo: bytes, n: int) -> dict[str, dict[str, float]]:
    """n sequential /search calls on each server, interleaved so both see the same machine state."""
    times: dict[str, list[float]] = {name: [] for name in servers}
    for _ in range(n):
        for name, server in servers.items():
            start = time.perf_counter()
            r = server.http.post("/search", files={"image": ("q.png", photo)}, data={"k": 10})
            times[name].append((time.perf_counter() - start) * 1000)
            assert r.status_code == 200, r.text
    return {name: {"p50_ms": round(float(np.percentile(t, 50)), 1), "p95_ms": round(float(np.percentile(t, 95)), 1)}
            for name, t in times.items()}


def main(photos: int = typer.Option(1_000_000, help="catalogue photos in all"),
         new: int = typer.Option(2_000, help="photos the cache does not know: embedded by the build"),
         searches: int = typer.Option(300, help="timed /search calls per server")) -> None:
    result: dict = {"photos": photos, "new": new}
    start = time.perf_counter()
    paths = write_photos(photos, new)
    catalogue = write_catalogue(paths)
    result["prepare_s"] = round(time.perf_counter() - start, 1)
    _, result["seed_s"] = seed_cache(paths, photos - new)
    start = time.perf_counter()
    summary, peaks = build_watching_memory(catalogue)
    result["build_s"] = round(time.perf_counter() - start, 1)
    result["build_peak_gb"] = peaks
    result["summary"] = summary
    from model_store.registry import get_model  # noqa: E402 -- after BENTOML_HOME is set

    folder = Path(get_model(summary["tag"]).path)
    result["artifact_bytes_per_photo"] = round(sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
                                               / summary["photos_indexed"])
    demo = run("-m", "index_builder", "demo", str(OUT / "demo")).strip().splitlines()[-1]
    demo_tag = run("-m", "index_builder", "build", demo, "--no-progress").strip().splitlines()[-1]
    run("-m", "model_store", "promote", summary["tag"], "--stage", "production", "--force")
    run("-m", "model_store", "promote", demo_tag, "--stage", "staging", "--force")
    started = time.perf_counter()
    big = Server(OUT / "serve-1m.log", **{k: env()[k] for k in ("BENTOML_HOME", "IMAGESEARCH_STAGES_DIR")})
    small = None
    try:
        big.wait(timeout=600)
        result["service_start_s"] = round(time.perf_counter() - started, 1)
        small = Server(OUT / "serve-demo.log", IMAGESEARCH_STAGE="staging",
                       **{k: env()[k] for k in ("BENTOML_HOME", "IMAGESEARCH_STAGES_DIR")}).wait()
        photo = (OUT / "new" / "new-00003.png").read_bytes()
        time_searches({"1M": big, "demo": small}, photo, 20)  # warm-up
        result["search"] = time_searches({"1M": big, "demo": small}, photo, searches)
        result["service_rss_mb"] = {"1M": server_rss_mb(big), "demo": server_rss_mb(small)}
    finally:
        big.stop()
        if small:
            small.stop()
    result.update(machine=machine(), date=time.strftime("%Y-%m-%d"))
    print(json.dumps(result, indent=2))
    (OUT / "million.json").write_text(json.dumps(result, indent=2))
    DOCS.write_text(replace_block(DOCS.read_text(), "million", markdown(result), "## A million photos end to end"))


def markdown(r: dict) -> str:
    s, q = r["summary"], r["search"]
    stages = ", ".join(f"{k} {v:.1f}" for k, v in s["seconds"].items())
    return "\n".join([
        f"Measured {r['date']} on {r['machine']} with `python -m bench.million --photos {r['photos']} --new {r['new']}`. "
        f"What is real and what is not: the catalogue has {r['photos']:,} rows (two photos per item); "
        f"{r['photos'] - r['new']:,} photos are placeholder files whose vectors were put in the embedding cache "
        "beforehand (synthetic: mixtures of 256 real descriptors of drawn objects plus noise; embedding a million "
        f"real photos takes about 16 hours here), and {r['new']:,} are new image files the build decodes and embeds (drawn objects, 160 px PNG: cheaper to "
        f"decode than phone photos). Everything "
        "else is the real builder and the real service. Thumbnails off (placeholders are not images).", "",
        "| measure | value |", "|---|---|",
        f"| nightly rebuild, whole (`index_builder build` as a subprocess) | **{r['build_s']:.0f} s** "
        f"({r['build_s'] / 60:.1f} min) |",
        f"| its stages, s | {stages} |",
        f"| photos embedded / from the cache | {s['photos_indexed'] - s['reused_photos']:,} / {s['reused_photos']:,} "
        f"({s['images_per_second']} photos/s) |",
        f"| peak memory of the build (its process, sampled every 0.2 s) | **{r['build_peak_gb']['anon']} GB** of its "
        f"own (RssAnon), {r['build_peak_gb']['file']} GB of mapped file pages (RssFile: the embedding cache's LMDB, "
        f"reclaimable), {r['build_peak_gb']['total']} GB together |",
        f"| index | {s['dim']}-d {s['projection']}, n_trees={s['n_trees']}, search_k={s['search_k']}, measured "
        f"recall@10 {s['ann_recall_at_10']} |",
        f"| artifact bytes per photo | {r['artifact_bytes_per_photo']:,} |",
        f"| service start-up with the 1M index (to /readyz 200) | {r['service_start_s']} s |",
        f"| service memory (all processes, RSS) | 1M: {r['service_rss_mb']['1M']:,} MB; demo: "
        f"{r['service_rss_mb']['demo']:,} MB |",
        f"| `/search` over HTTP, k=10, sequential, interleaved | 1M: p50 **{q['1M']['p50_ms']} ms**, p95 "
        f"{q['1M']['p95_ms']} ms; demo (72 photos): p50 {q['demo']['p50_ms']} ms, p95 {q['demo']['p95_ms']} ms |",
        f"| preparing the fake catalogue / seeding the cache | {r['prepare_s']} s / {r['seed_s']:.0f} s "
        "(not part of the build) |"])


if __name__ == "__main__":
    typer.run(main)
