"""What a pass costs when embedder workers share 2 cores: alone, and beside another worker's pass.

    python -m bench.oversubscribe              # docs/oversubscribe.json
    python -m bench.oversubscribe --quick      # a tiny network, a few passes (the tests')

Two bare embedder processes (bench/bare_worker.py, GOMP_SPINCOUNT as the service sets it). Worker A times
one-photo passes, each after a short pause as between searches, with 2 threads or 1; worker B either idles
or runs one-thread passes back to back meanwhile. The cases alternate round by round, so the VM's drift hits
all of them. A 2-thread pass beside a busy worker is what model_store/core_share.py must never start.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from bench.ann_scale import machine
from bench.overhead import DOCS, BareEmbedders, demo_index
from bench.server import ROOT
from model_store.core_share import SPIN_COUNT

CASES = {"2 threads, alone": (2, False), "2 threads, another worker busy on 1": (2, True),
         "1 thread, alone": (1, False), "1 thread, another worker busy on 1": (1, True)}


def one_case(bare: BareEmbedders, threads: int, beside_busy: bool, calls: int, gap_ms: float) -> list[float]:
    start_at = time.time() + 1.5
    if beside_busy:  # B starts first and outlasts A's passes
        bare.send(1, threads=1, batch=1, seconds=calls * (gap_ms + 80) / 1000 + 1.0, start_at=start_at)
    bare.send(0, threads=threads, batch=1, calls=calls, gap_ms=gap_ms, start_at=start_at + 0.3)
    ms = bare.reply(0)["ms"]
    if beside_busy:
        bare.reply(1)
    return ms


def main(rounds: Annotated[int, typer.Option(help="rounds, each running every case")] = 3,
         calls: Annotated[int, typer.Option(help="passes timed per case and round")] = 100,
         quick: Annotated[bool, typer.Option(help="a tiny network, one short round, no docs")] = False,
         out: Annotated[Path, typer.Option(help="where the JSON goes")] = DOCS / "oversubscribe.json") -> None:
    from model_store.index_artifact import IndexManifest
    from model_store.registry import get_model

    _, _, tag = demo_index("bench-oversub-", quick)
    embedder = IndexManifest.read(Path(get_model(tag).path)).embedder
    os.environ.setdefault(SPIN_COUNT["name"], SPIN_COUNT["value"])
    rounds, calls = (1, 10) if quick else (rounds, calls)
    bare = BareEmbedders(ROOT, embedder, 2)
    ms: dict[str, list[float]] = {case: [] for case in CASES}
    try:
        for _ in range(rounds):
            for case, (threads, beside_busy) in CASES.items():
                ms[case] += one_case(bare, threads, beside_busy, calls, gap_ms=15)
    finally:
        bare.close()
    rows = {case: {"p50_ms": round(statistics.median(v), 1), "p90_ms": round(float(np.percentile(v, 90)), 1),
                   "max_ms": round(max(v), 1), "passes": len(v)} for case, v in ms.items()}
    command = "python -m bench.oversubscribe " + ("--quick" if quick else f"--rounds {rounds} --calls {calls}")
    result = {"machine": machine(), "command": command,
              "embedder": embedder, "spin_count": os.environ[SPIN_COUNT["name"]], "rounds": rounds, "cases": rows}
    print("| worker A's pass of one photo | p50 ms | p90 ms | max ms |\n|---|---|---|---|")
    for case, r in rows.items():
        print(f"| {case} | {r['p50_ms']} | {r['p90_ms']} | {r['max_ms']} |")
    if not quick:
        out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    typer.run(main)
