"""What the Embedder's per-call records cost: its event loop's CPU per call with BentoML's access log and tracing
on and off (IMAGESEARCH_EMBEDDER_ACCESS_LOG, IMAGESEARCH_EMBEDDER_TRACING).

    python -m bench.embedder_records            # docs/embedder_records.json
    python -m bench.embedder_records --quick    # a tiny network, seconds-long loops (the tests')

A difference of ~0.5 ms a call is lost in the noise of throughput ratios (bench.overhead moves ±5% round to
round), so this reads the CPU itself: one `bentoml serve` with one Embedder worker per row and round, rows
alternating, driven as bench.embedder_hop drives it (the entry's own one-photo call, closed loops of raw-socket
clients, the entry idle). The worker's main thread runs its event loop: BentoML's server reading, batching and
answering each call; the pass runs on its torch thread and torch's own threads, counted apart.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Annotated

import psutil
import typer

from bench.ann_scale import command_line, machine
from bench.embedder_hop import closed_loop, embedder_socket, promoted_demo_index
from bench.overhead import DOCS
from bench.server import Server

ROWS = {"records on (BentoML's defaults)": {"IMAGESEARCH_EMBEDDER_ACCESS_LOG": "true",
                                            "IMAGESEARCH_EMBEDDER_TRACING": "true"},
        "records off (this service's defaults)": {}}


def thread_cpu(proc: psutil.Process) -> tuple[float, float]:
    """(CPU seconds of the main thread, of all the others) of one process."""
    main = other = 0.0
    for t in proc.threads():
        spent = t.user_time + t.system_time
        if t.id == proc.pid:
            main += spent
        else:
            other += spent
    return main, other


def measure(tmp: Path, env: dict[str, str], call: bytes, clients: int, seconds: float) -> dict:
    """One server with `env`: photos/s and the Embedder worker's CPU ms per call, event loop and the rest."""
    with Server(tmp / "serve.log", IMAGESEARCH_EMBEDDER_WORKERS="1", **env).wait() as srv:
        path = embedder_socket(srv)
        worker = srv.processes()["embedder"][0]
        closed_loop(path, call, clients, min(seconds, 3))  # warm-up
        before = thread_cpu(worker)
        r = closed_loop(path, call, clients, seconds)
        after = thread_cpu(worker)
    calls = max(r["answered"], 1)
    return {"photos_per_s": r["photos_per_s"], "failed": r["failed"],
            "event_loop_ms_per_call": round((after[0] - before[0]) * 1000 / calls, 3),
            "other_threads_ms_per_call": round((after[1] - before[1]) * 1000 / calls, 2)}


def main(rounds: Annotated[int, typer.Option(help="alternating rounds of both rows")] = 3,
         clients: Annotated[int, typer.Option(help="closed loop's clients (8: the Embedder saturated)")] = 8,
         seconds: Annotated[float, typer.Option(help="seconds per closed loop")] = 15,
         quick: Annotated[bool, typer.Option(help="a tiny network, one short round, no docs")] = False,
         out: Annotated[Path, typer.Option(help="where the JSON goes")] = DOCS / "embedder_records.json") -> None:
    tmp, _, call = promoted_demo_index("bench-records-", quick)
    rounds, seconds = (1, 2) if quick else (rounds, seconds)
    per_row: dict[str, list[dict]] = {name: [] for name in ROWS}
    for _ in range(rounds):
        for name, env in ROWS.items():
            per_row[name].append(measure(tmp, env, call, clients, seconds))
            print(name, json.dumps(per_row[name][-1]), flush=True)
    result = {"machine": machine(), "command": command_line("bench.embedder_records"), "clients": clients,
              "rows": [{"row": name, "rounds": got,
                        "event_loop_ms_per_call": statistics.median(r["event_loop_ms_per_call"] for r in got),
                        "photos_per_s": statistics.median(r["photos_per_s"] for r in got)}
                       for name, got in per_row.items()]}
    print(json.dumps(result["rows"], indent=1), flush=True)
    if not quick:
        out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    typer.run(main)
