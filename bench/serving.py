"""End-to-end HTTP latency and throughput of the service, with adaptive batching on and off.

    python -m bench.serving            # writes docs/serving.json
    python -m bench.serving --quick    # seconds-long smoke run the tests use

Serves the demo catalogue (144 photos) in a temporary BentoML home; Locust runs as a closed loop (no
think time) so throughput at saturation shows. The bare embedder is timed in this process for the
serving-overhead ratio.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from bench.ann_scale import machine
from bench.server import Server

DOCS = Path(__file__).resolve().parents[1] / "docs"
app = typer.Typer(add_completion=False)


def sequential(srv: Server, photos: list[Path], n: int) -> dict:
    times = []
    for i in range(n):
        start = time.perf_counter()
        srv.http.post("/search", files={"image": photos[i % len(photos)].read_bytes()}, data={"k": 10}).raise_for_status()
        times.append((time.perf_counter() - start) * 1000)
    q = np.percentile(times, [50, 95, 99])
    return {"requests": n, "p50_ms": round(q[0], 1), "p95_ms": round(q[1], 1), "p99_ms": round(q[2], 1)}


def bare_embedder(batch: int, reps: int = 5) -> float:
    """Images/s of the default embedder called in process, no HTTP."""
    from bench.embedder_speed import time_batches
    from model_store.embedder import Embedder, new_embedder

    config, net = new_embedder("efficientnet-lite0")
    return round(1 / time_batches(Embedder(config, net).embed, batch, 224, reps), 1)


@app.command()
def main(quick: Annotated[bool, typer.Option(help="tiny run, no docs")] = False,
         users: Annotated[str, typer.Option(help="comma-separated Locust user counts")] = "1,4,16,48",
         run_time: str = "30s") -> None:
    from index_builder.build import build
    from index_builder.demo import make_demo_catalogue
    from loadtests.run import run_locust
    from model_store import stages

    if quick:
        users, run_time = "2", "3s"
    tmp = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    os.environ.update(BENTOML_HOME=str(tmp / "home"), IMAGESEARCH_STAGES_DIR=str(tmp / "stages"))
    stages.get_settings.cache_clear()
    catalogue = make_demo_catalogue(tmp / "demo", items_per_family=2 if quick else 6)
    stages.promote(build(catalogue, progress=False).tag, "production", force=True)
    photos = sorted((tmp / "demo" / "photos").glob("*.png"))
    result = {"machine": machine(), "photos_uploaded": len(photos), "modes": {}}
    for mode, env in (("adaptive batching", {}), ("batching off", {"IMAGESEARCH_EMBED_BATCHING": "false"})):
        with Server(tmp / f"{mode[:8]}.log", **env).wait() as srv:
            row = {"sequential": sequential(srv, photos, 10 if quick else 100), "load": []}
            for n in map(int, users.split(",")):
                r = run_locust(srv.url, n, n, run_time, tmp / "locust" / mode[:8], tmp / "demo" / "photos",
                               extra_env={"LOADTEST_THINK": "0,0"})
                row["load"].append(r.model_dump(exclude={"report"}))
                print(mode, json.dumps(row["load"][-1]), flush=True)
            metrics = srv.http.get("/metrics").text
            row["batch_size_metric"] = [ln for ln in metrics.splitlines()
                                        if ln.startswith("bentoml_service_adaptive_batch_size_sum")
                                        or ln.startswith("bentoml_service_adaptive_batch_size_count")]
        result["modes"][mode] = row
        print(mode, json.dumps(row["sequential"]), flush=True)
    result["bare_embedder_images_per_s"] = {"batch 1": bare_embedder(1, 3 if quick else 10),
                                            "batch 16": bare_embedder(16, 1 if quick else 3)}
    best = max([r["rps"] for r in result["modes"]["adaptive batching"]["load"] if r["failures"] == 0] or [0.0])
    result["saturation_rps_over_bare_embedder_batch1"] = round(best / result["bare_embedder_images_per_s"]["batch 1"], 3)
    print(json.dumps({k: v for k, v in result.items() if k != "modes"}, indent=2))
    if not quick:
        DOCS.mkdir(exist_ok=True)
        (DOCS / "serving.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    app()
