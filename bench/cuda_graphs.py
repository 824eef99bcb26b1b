"""The embedder's pass kernel by kernel against its CUDA-graph replay, on a CUDA device, in one run.

    python -m bench.cuda_graphs                      # writes docs/cuda_graphs_gpu.json (needs a GPU)

For each embedder (the served default, Lite2 R-MAC, and Lite0 GeM) and batch size: milliseconds per batch of
both, timed round-robin (bench.embedder_speed.interleaved) so that the machine's drift hits both alike, the
host CPU each takes per batch, and how far the replayed vectors are from the kernel-by-kernel ones (cosine).
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import typer

from bench.ann_scale import command_line, machine
from bench.embedder_speed import interleaved
from model_store.embedder import Embedder, new_embedder

DOCS = Path(__file__).resolve().parents[1] / "docs"
EMBEDDERS = (("efficientnet-lite2", "rmac"), ("efficientnet-lite0", "gem"))
app = typer.Typer(add_completion=False)


def cpu_ms(fn, x: np.ndarray, reps: int) -> float:
    """Host CPU time (this process, all threads) per call: what a pass takes from the server's cores."""
    fn(x)
    start = time.process_time()
    for _ in range(reps):
        fn(x)
    return (time.process_time() - start) / reps * 1000


def compare(backbone: str, descriptor: str, batch: int, reps: int) -> dict:
    config, net = new_embedder(backbone, "default", descriptor)
    eager = Embedder(config, copy.deepcopy(net), "cuda", cuda_graphs=False)
    graphs = Embedder(config, net, "cuda", cuda_graphs=True)
    graphs.warm_up((batch,))
    assert graphs.graphs, "the batch shape was not recorded"
    x = np.random.default_rng(batch).integers(0, 256, (batch, 3, config.preprocess.crop, config.preprocess.crop),
                                              dtype=np.uint8)
    cosine = float(np.min(np.sum(eager.embed(x) * graphs.embed(x), axis=1)))
    per_image = interleaved([eager.embed, graphs.embed], batch, config.preprocess.crop, reps)
    eager_ms, graph_ms = (s * batch * 1000 for s in per_image)
    return {"backbone": backbone, "descriptor": descriptor, "batch": batch, "half": graphs.half,
            "eager_ms": round(eager_ms, 3), "graph_ms": round(graph_ms, 3), "speedup": round(eager_ms / graph_ms, 2),
            "eager_cpu_ms": round(cpu_ms(eager.embed, x, reps), 3), "graph_cpu_ms": round(cpu_ms(graphs.embed, x, reps), 3),
            "min_cosine": round(cosine, 6)}


@app.command()
def main(batches: Annotated[str, typer.Option(help="Comma-separated batch sizes.")] = "1,2,4,8,32",
         reps: int = 50, out: Path = DOCS / "cuda_graphs_gpu.json") -> None:
    if not torch.cuda.is_available():
        raise typer.BadParameter("no CUDA device: CUDA graphs need one")
    rows = []
    for backbone, descriptor in EMBEDDERS:
        for batch in map(int, batches.split(",")):
            rows.append(compare(backbone, descriptor, batch, reps))
            print(json.dumps(rows[-1]), flush=True)
    out.write_text(json.dumps({"machine": machine(), "command": command_line("bench.cuda_graphs"), "rows": rows},
                              indent=2) + "\n")


if __name__ == "__main__":
    app()
