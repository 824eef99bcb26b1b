"""What serving costs on top of the network: HTTP search latency over the bare forward pass, and
throughput at saturation over the bare embedder's, for this checkout and an older one, in one run.

    python -m bench.overhead                       # this checkout against 0c70920 (before the guard); docs/overhead.json
    python -m bench.overhead --before ''           # this checkout only
    python -m bench.overhead --quick               # seconds-long smoke run the tests use
    IMAGESEARCH_DEVICE=cuda python -m bench.overhead --before '' --out docs/overhead_gpu.json   # on a GPU

Both servers serve the same demo index from one temporary BentoML home. Latency: one request at a time,
timed in blocks that alternate with blocks of bare forward passes in this process (an idle torch process
keeps its threads spinning for a while, so interleaving them one by one would make each slow the other).
Throughput: a closed loop of N concurrent uploads (httpx, no think time) for a fixed time; the bare
embedder runs back to back in this process at batch 1 and 8 and its best rate is the reference.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Annotated

import httpx
import numpy as np
import typer

from bench.ann_scale import machine
from bench.server import ROOT, Server

DOCS = ROOT / "docs"
BEFORE = "0c70920"
app = typer.Typer(add_completion=False)


def bare_embedder(tag: str):
    """The stored embedder in this process on the device the service uses (IMAGESEARCH_DEVICE), and its
    inputs: a (1, 3, H, W) uint8 batch and a batch of 8."""
    from model_store.embedder import load_embedder
    from model_store.settings import get_settings

    settings = get_settings()
    embedder = load_embedder(tag, settings.device, settings.half_precision)
    crop = embedder.config.preprocess.crop
    one = np.random.default_rng(0).integers(0, 256, (8, 3, crop, crop), dtype=np.uint8)
    return embedder, one[:1], one


def timed(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        out.append((time.perf_counter() - start) * 1000)
    return out


def latency(srv: Server, embedder, x1: np.ndarray, photos: list[bytes], blocks: int, per_block: int) -> dict:
    """p50 of HTTP /search (one at a time) and of the bare forward pass, timed in alternating blocks."""
    http_ms, bare_ms, i = [], [], 0
    for _ in range(blocks):
        time.sleep(0.3)
        bare_ms += timed(lambda: embedder.embed(x1), per_block)
        time.sleep(0.3)
        for _ in range(per_block):
            data = photos[i % len(photos)]
            i += 1
            start = time.perf_counter()
            srv.http.post("/search", files={"image": ("p.png", data, "image/png")}, data={"k": "10"}).raise_for_status()
            http_ms.append((time.perf_counter() - start) * 1000)
    h, b = statistics.median(http_ms), statistics.median(bare_ms)
    return {"http_p50_ms": round(h, 1), "http_p95_ms": round(float(np.percentile(http_ms, 95)), 1),
            "bare_forward_p50_ms": round(b, 1), "http_over_bare": round(h / b, 2)}


async def closed_loop(url: str, photos: list[bytes], concurrency: int, seconds: float) -> dict:
    """`concurrency` clients posting photos back to back for `seconds`; answers per second."""
    done, failed, stop = [0], [0], time.perf_counter() + seconds

    async def client(c: httpx.AsyncClient, k: int) -> None:
        while time.perf_counter() < stop:
            r = await c.post("/search", files={"image": ("p.png", photos[k % len(photos)], "image/png")},
                             data={"k": "10"})
            done[0] += r.status_code == 200
            failed[0] += r.status_code != 200
            k += concurrency

    start = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=httpx.Limits(max_connections=concurrency)) as c:
        await asyncio.gather(*(client(c, k) for k in range(concurrency)))
    elapsed = time.perf_counter() - start
    return {"concurrency": concurrency, "answered": done[0], "failed": failed[0], "rps": round(done[0] / elapsed, 1)}


def bare_throughput(embedder, x1: np.ndarray, x8: np.ndarray, seconds: float) -> dict:
    """Images/s of the bare embedder back to back, at batch 1 and 8."""
    out = {}
    for name, x in (("batch 1", x1), ("batch 8", x8)):
        embedder.embed(x)
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            embedder.embed(x)
            n += len(x)
        out[name] = round(n / (time.perf_counter() - start), 1)
    return out


def checkout(ref: str, where: Path) -> Path:
    subprocess.run(["git", "worktree", "add", "--detach", str(where), ref], cwd=ROOT, check=True,
                   capture_output=True)
    return where


def measure(root: Path, label: str, tag: str, tmp: Path, photos: list[bytes], quick: bool) -> dict:
    """One row: `root`'s code serving index `tag`, against the bare embedder of that index."""
    from model_store import stages
    from model_store.registry import get_model

    stages.promote(tag, "production", force=True)
    embedder, x1, x8 = bare_embedder(get_model(tag).info.metadata["embedder"])
    bare = bare_throughput(embedder, x1, x8, 2 if quick else 10)
    seconds = 3 if quick else 20
    with Server(tmp / (re.sub(r"\W+", "-", label).strip("-") + ".log"), root=root).wait() as srv:
        lat = latency(srv, embedder, x1, photos, 2 if quick else 8, 5 if quick else 25)
        loads = [asyncio.run(closed_loop(srv.url, photos, c, seconds)) for c in ((4,) if quick else (4, 8, 16))]
    best = max(r["rps"] for r in loads)
    row = {"code": label, "device": str(embedder.device), "half": embedder.half, **lat, "saturation": loads, "best_rps": best, "bare_images_per_s": bare,
           "served_over_bare": round(best / max(bare.values()), 3)}
    print(json.dumps(row), flush=True)
    return row


@app.command()
def main(before: Annotated[str, typer.Option(help="git ref to compare with ('' for none)")] = BEFORE,
         quick: Annotated[bool, typer.Option(help="tiny run, no docs")] = False,
         out: Annotated[Path, typer.Option(help="where the JSON goes")] = DOCS / "overhead.json",
         lite0: Annotated[bool, typer.Option(help="also the Lite0 GeM rows")] = True) -> None:
    from index_builder.build import build
    from index_builder.demo import make_demo_catalogue
    from model_store import stages
    from model_store.settings import get_settings

    tmp = Path(tempfile.mkdtemp(prefix="bench-overhead-"))
    os.environ.update(BENTOML_HOME=str(tmp / "home"), IMAGESEARCH_STAGES_DIR=str(tmp / "stages"))
    stages.get_settings.cache_clear()
    catalogue = make_demo_catalogue(tmp / "demo", items_per_family=2 if quick else 6)
    photos = [p.read_bytes() for p in sorted((tmp / "demo" / "photos").glob("*.png"))]
    # The old code knows Lite0 GeM only: code against code on that index, then the default on this checkout.
    old_default = build(catalogue, backbone="efficientnet-lite0", descriptor="gem", progress=False).tag
    rows = [measure(ROOT, "this checkout, Lite0 GeM", old_default, tmp, photos, quick)] if lite0 or quick else []
    if before:
        rows.append(measure(checkout(before, tmp / "before"), f"before ({before}), Lite0 GeM", old_default, tmp,
                            photos, quick))
        subprocess.run(["git", "worktree", "remove", "--force", str(tmp / "before")], cwd=ROOT, capture_output=True)
    if not quick:
        rows.append(measure(ROOT, "this checkout, default (Lite2 R-MAC)", build(catalogue, progress=False).tag, tmp,
                            photos, quick))
    result = {"machine": machine(), "photos": len(photos), "rows": rows,
              "search_workers": get_settings().search_workers,
              "command": "python -m bench.overhead" + (f" --before {before}" if before != BEFORE else "")}
    if not quick:
        out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    app()
