"""Whole-build throughput (decode + embed + index + register) against the bare embedder, per workers/batch.

    python -m bench.builder_speed           # 512 COIL photos per build; writes docs/builder_speed.json
    python -m bench.builder_speed --quick   # 32 demo photos: the smoke run the tests use
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Annotated

import typer

from bench.ann_scale import machine

DOCS = Path(__file__).resolve().parents[1] / "docs"
app = typer.Typer(add_completion=False)


@app.command()
def main(quick: Annotated[bool, typer.Option(help="tiny run, no docs")] = False,
         plans: Annotated[str, typer.Option(help="workers:batch pairs")] = "0:16,1:16,2:16,2:32") -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bench-builder-"))
    os.environ["BENTOML_HOME"] = str(tmp / "home")
    from bench.coil import COIL, write_split
    from bench.embedder_speed import time_batches
    from index_builder.build import build
    from index_builder.cache import cache_root
    from index_builder.demo import make_demo_catalogue
    from model_store.embedder import Embedder, new_embedder

    if quick or not (COIL / "labels.csv").exists():
        catalogue, source = make_demo_catalogue(tmp / "demo", items_per_family=1), "demo catalogue"
        plans = "0:8" if quick else plans
    else:
        catalogue, _ = write_split(tmp / "coil", gallery=tuple(range(0, 360, 45)), objects=range(1, 65))
        source = "COIL-100, 64 objects x 8 views"
    rows = []
    for plan in plans.split(","):
        workers, batch = map(int, plan.split(":"))
        shutil.rmtree(cache_root(), ignore_errors=True)  # every plan embeds every photo: no cache, no thumbnails
        s = build(catalogue, batch_size=batch, workers=workers, pca_dim=0, progress=False, thumbnails=False)
        rows.append({"workers": workers, "batch": batch, "photos": s.photos_indexed,
                     "embed_images_per_s": s.images_per_second,
                     "whole_build_images_per_s": round(s.photos_indexed / sum(s.seconds.values()), 1),
                     "seconds": s.seconds})
        print(json.dumps(rows[-1]), flush=True)
    config, net = new_embedder("efficientnet-lite0")
    bare = {b: round(1 / time_batches(Embedder(config, net).embed, b, 224, 2 if quick else 5), 1)
            for b in sorted({r["batch"] for r in rows})}
    result = {"machine": machine(), "catalogue": source, "bare_embedder_images_per_s": bare, "rows": rows}
    print(json.dumps(result, indent=2))
    if not quick:
        DOCS.mkdir(exist_ok=True)
        (DOCS / "builder_speed.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    app()
