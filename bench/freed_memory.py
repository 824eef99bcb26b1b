"""What it costs the network on a CPU when glibc hands the memory a pass frees back to the kernel: page faults
and time per photo with IMAGESEARCH_KEEP_FREED_MEMORY on (model_store/malloc.py) and off.

    python -m bench.freed_memory           # docs/freed_memory.json and its block in docs/PERFORMANCE.md
    python -m bench.freed_memory --quick   # a tiny network, a few passes (the tests')

Every measurement is a fresh process (the setting is process-wide): it loads the embedder, runs four passes
of each size (the heap settles in two or three), then times `passes` more and counts the page faults they
take. Cases: batches of 1, 2 and 4 on one thread (a served worker beside a busy one), and one photo on torch's default
threads (a lone search). The two settings alternate case by case and round by round, so the VM's drift hits
both; the table gives medians of rounds.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer

from bench.ann_scale import machine
from bench.evaluate_grocery import replace_block
from bench.overhead import DOCS
from bench.server import ROOT, python_path

CASES = ((1, 1), (2, 1), (4, 1), (1, 0))  # (batch, torch threads; 0 = torch's default)
ONE_PROCESS = """
import json, resource, sys, time
from concurrent.futures import ThreadPoolExecutor
import numpy as np, torch
from model_store.embedder import Embedder, new_embedder
backbone, size, cycle = sys.argv[1], int(sys.argv[2]), [int(n) for n in sys.argv[3].split(",")]
threads, passes, where = int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
if threads:
    torch.set_num_threads(threads)

def measure():
    config, net = new_embedder(backbone, image_size=size or None)
    embedder, crop = Embedder(config, net, "cpu"), config.preprocess.crop
    x = np.random.default_rng(0).integers(0, 256, (max(cycle), 3, crop, crop), dtype=np.uint8)
    for _ in range(4):  # the heap settles in a few passes of each size
        for n in cycle:
            embedder.embed(x[:n])
    faults, ms = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, []
    for _ in range(passes):
        for n in cycle:
            start = time.perf_counter()
            embedder.embed(x[:n])
            ms.append((time.perf_counter() - start) * 1000 / n)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / len(ms)
    return {"faults_per_pass": faults, "ms_per_photo": sorted(ms)[len(ms) // 2], "crop": crop}

# "thread": on a thread of its own, as the embedder service runs its passes
print(json.dumps(ThreadPoolExecutor(1).submit(measure).result() if where == "thread" else measure()))
"""
app = typer.Typer(add_completion=False)


def one_process(keep: bool, backbone: str, size: int, batches: str, threads: int, passes: int,
                where: str = "main", **env: str) -> dict:
    """Page faults and median ms per photo of `passes` cycles of `batches` ("4", or mixed: "4,1,3,2") in a fresh
    process, on its main thread or a thread of its own (`where`), with the setting `keep` and extra `env`."""
    env = {**os.environ, "PYTHONPATH": python_path(ROOT), "IMAGESEARCH_KEEP_FREED_MEMORY": str(keep).lower(), **env}
    run = subprocess.run([sys.executable, "-c", ONE_PROCESS, backbone, str(size), batches, str(threads), str(passes),
                          where], cwd=ROOT, env=env, capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"the measuring process failed:\n{run.stderr[-2000:]}")
    return json.loads(run.stdout.splitlines()[-1])


def table(result: dict) -> str:
    lines = [f"Machine: {result['machine']}; `{result['command']}`; fresh process per measurement, the settings "
             f"alternating; medians of {result['rounds']} rounds, {result['passes']} passes each.", "",
             "| backbone | px | batch | torch threads | page faults per pass: handed back / kept | ms per photo: "
             "handed back / kept | **kept / handed back** |", "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        off, on = r["handed back"], r["kept"]
        lines.append(f"| {r['backbone']} | {r['crop']} | {r['batch']} | {r['threads'] or 'default'} | "
                     f"{off['faults_per_pass']:,.0f} / {on['faults_per_pass']:,.0f} | {off['ms_per_photo']:.1f} / "
                     f"{on['ms_per_photo']:.1f} | **{on['ms_per_photo'] / off['ms_per_photo']:.2f}** |")
    return "\n".join(lines)


@app.command()
def main(backbones: Annotated[str, typer.Option(help="comma-separated")] = "efficientnet-lite0,efficientnet-lite2",
         rounds: Annotated[int, typer.Option()] = 3, passes: Annotated[int, typer.Option()] = 20,
         quick: Annotated[bool, typer.Option(help="tiny run, no docs")] = False,
         out: Annotated[Path, typer.Option(help="where the JSON goes")] = DOCS / "freed_memory.json") -> None:
    names, size = backbones.split(","), 64 if quick else 0
    cases = CASES[:1] if quick else CASES
    rounds, passes = (1, 3) if quick else (rounds, passes)
    runs: dict[tuple, dict[str, list[dict]]] = {}
    for rnd in range(rounds):
        for name in names[:1] if quick else names:
            for batch, threads in cases:
                for keep in ((False, True) if rnd % 2 == 0 else (True, False)):
                    r = one_process(keep, name, size, str(batch), threads, passes)
                    runs.setdefault((name, batch, threads), {}).setdefault("kept" if keep else "handed back",
                                                                          []).append(r)
                    print(json.dumps({"round": rnd, "backbone": name, "batch": batch, "threads": threads,
                                      "keep": keep, **r}), flush=True)
    rows = [{"backbone": name, "batch": batch, "threads": threads, "crop": by["kept"][0]["crop"],
             **{k: {m: statistics.median(x[m] for x in v) for m in ("faults_per_pass", "ms_per_photo")}
                for k, v in by.items()}} for (name, batch, threads), by in runs.items()]
    result = {"machine": machine(), "command": "python -m bench.freed_memory" + (" --quick" if quick else ""),
              "rounds": rounds, "passes": passes, "rows": rows}
    print(table(result))
    if quick:
        return
    out.write_text(json.dumps(result, indent=2) + "\n")
    perf = DOCS / "PERFORMANCE.md"
    perf.write_text(replace_block(perf.read_text(), "freed-memory", table(result), "### Memory the network frees"))


if __name__ == "__main__":
    app()
