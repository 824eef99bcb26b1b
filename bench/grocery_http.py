"""The default build of the grocery train split, served by `bentoml serve`, queried over HTTP with the val photos.

    python -m bench.grocery_http        # writes docs/grocery_http.json

Checks that what the service answers equals what the benchmark (bench.evaluate_grocery) reports for the
default configuration: the same top-1, through Annoy, SQLite and HTTP. Data: bench.grocery.CREDIT.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import typer

from bench.ann_scale import machine
from bench.grocery import CREDIT, read_split, write_catalogue
from bench.server import ROOT, Server
from index_builder.evaluate import metrics, ranks

app = typer.Typer(add_completion=False)


@app.command()
def main() -> None:
    from index_builder.build import build
    from model_store import stages

    tmp = Path(tempfile.mkdtemp(prefix="bench-grocery-http-"))
    os.environ.update(BENTOML_HOME=str(tmp / "home"), IMAGESEARCH_STAGES_DIR=str(tmp / "stages"))
    stages.get_settings.cache_clear()
    val = read_split("val")
    catalogue, queries = write_catalogue(tmp / "grocery", read_split("train"), val)
    summary = build(catalogue, eval_queries=queries)
    stages.promote(summary.tag, "production", force=True)
    ranked, truth, ms = [], [], []
    with Server(tmp / "serve.log").wait() as srv:
        for path, c in zip(*val):
            start = time.perf_counter()
            r = srv.http.post("/search", files={"image": (path.name, path.read_bytes(), "image/jpeg")},
                              data={"k": "100"})
            ms.append((time.perf_counter() - start) * 1000)
            r.raise_for_status()
            ranked.append([m["item_id"] for m in r.json()["results"]])
            truth.append(f"grocery-{c:02d}")
    http = {**metrics(ranks(ranked, truth)), "p50_ms": round(float(np.percentile(ms, 50)), 1),
            "p95_ms": round(float(np.percentile(ms, 95)), 1)}
    result = {"machine": machine(), "credit": CREDIT, "index": summary.tag, "embedder": summary.embedder,
              "projection": summary.projection, "dim": summary.dim, "build": summary.model_dump(mode="json"),
              "in_build_evaluation": summary.evaluation, "over_http": http}
    print(json.dumps({"build evaluation": summary.evaluation, "over HTTP": http}, indent=2))
    (ROOT / "docs" / "grocery_http.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    app()
