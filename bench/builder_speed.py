"""Whole-build throughput (decode + embed + index + register) against the bare embedder, per workers/batch.

    python -m bench.builder_speed           # 512 COIL photos per build; writes docs/builder_speed.json
    python -m bench.builder_speed --quick   # 32 demo photos: the smoke run the tests use
    python -m bench.builder_speed --synthetic 6000 --backbone efficientnet-lite2 --plans 14:64 \
        --out docs/builder_speed_gpu.json   # a GPU machine: 6,000 distinct 1024x768 JPEGs
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import tempfile
from multiprocessing import Pool
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from PIL import Image

from bench.ann_scale import machine

DOCS = Path(__file__).resolve().parents[1] / "docs"
app = typer.Typer(add_completion=False)


def _write_photo(args: tuple[Path, int]) -> None:
    """A phone-sized JPEG: a drawn object upscaled, with a stamp that makes its bytes (and hash) unique."""
    from index_builder.demo import FAMILIES, draw_object

    path, i = args
    img = draw_object(i % len(FAMILIES), i % 7, (i * 37) % 360, size=256).resize((1024, 768))
    pixels = np.asarray(img).copy()
    pixels[:4, :32] = np.random.default_rng(i).integers(0, 256, (4, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=90)


def synthetic_catalogue(folder: Path, n: int) -> Path:
    """n distinct 1024x768 JPEG photos, one item each: decoding costs what a real photo's does."""
    from index_builder.catalogue import COLUMNS

    (folder / "photos").mkdir(parents=True, exist_ok=True)
    paths = [folder / "photos" / f"{i:07d}.jpg" for i in range(n)]
    with Pool() as pool:
        pool.map(_write_photo, [(p, i) for i, p in enumerate(paths)], chunksize=64)
    with open(folder / "catalogue.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        for i, p in enumerate(paths):
            writer.writerow([f"item-{i}", p.relative_to(folder), f"thing {i}", "Things", 10.0, "USD", "2024-01-01"])
    return folder / "catalogue.csv"


@app.command()
def main(quick: Annotated[bool, typer.Option(help="tiny run, no docs")] = False,
         plans: Annotated[str, typer.Option(help="workers:batch pairs")] = "0:16,1:16,2:16,2:32",
         synthetic: Annotated[int, typer.Option(help="build this many synthetic 1024x768 JPEGs instead")] = 0,
         backbone: Annotated[str, typer.Option(help="the embedder's backbone")] = "efficientnet-lite0",
         out: Annotated[Path, typer.Option(help="where the JSON goes")] = DOCS / "builder_speed.json") -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bench-builder-"))
    os.environ["BENTOML_HOME"] = str(tmp / "home")
    from bench.coil import COIL, write_split
    from bench.embedder_speed import time_batches
    from index_builder.build import build
    from index_builder.cache import cache_root
    from index_builder.demo import make_demo_catalogue
    from model_store.embedder import Embedder, new_embedder

    if synthetic:
        catalogue, source = synthetic_catalogue(tmp / "synthetic", synthetic), f"{synthetic} synthetic 1024x768 JPEGs"
    elif quick or not (COIL / "labels.csv").exists():
        catalogue, source = make_demo_catalogue(tmp / "demo", items_per_family=1), "demo catalogue"
        plans = "0:8" if quick else plans
    else:
        catalogue, _ = write_split(tmp / "coil", gallery=tuple(range(0, 360, 45)), objects=range(1, 65))
        source = "COIL-100, 64 objects x 8 views"
    rows = []
    for plan in plans.split(","):
        workers, batch = map(int, plan.split(":"))
        shutil.rmtree(cache_root(), ignore_errors=True)  # every plan embeds every photo: no cache, no thumbnails
        s = build(catalogue, backbone=backbone, batch_size=batch, workers=workers, pca_dim=0, progress=False,
                  thumbnails=False)
        rows.append({"workers": workers, "batch": batch, "photos": s.photos_indexed,
                     "embed_images_per_s": s.images_per_second,
                     "whole_build_images_per_s": round(s.photos_indexed / sum(s.seconds.values()), 1),
                     "seconds": s.seconds})
        print(json.dumps(rows[-1]), flush=True)
    config, net = new_embedder(backbone)
    embedder, size = Embedder(config, net), config.preprocess.crop
    bare = {b: round(1 / time_batches(embedder.embed, b, size, 2 if quick else 5), 1)
            for b in sorted({r["batch"] for r in rows})}
    result = {"machine": machine(), "device": str(embedder.device), "half": embedder.half, "backbone": backbone,
              "catalogue": source, "bare_embedder_images_per_s": bare, "rows": rows}
    print(json.dumps(result, indent=2))
    if not quick:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    app()
