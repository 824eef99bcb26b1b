"""The entry process's memory under a flood of large uploads, this checkout against an older one, in one run.

    python -m bench.upload_flood                 # docs/upload_flood.json, then python -m bench.report
    python -m bench.upload_flood --quick         # a seconds-long smoke run the tests use (no docs)

Each round, `--clients` clients send one /search_batch each at the same moment: three files of random bytes,
`--mb` MB in all (48: under the 50 MB request limit). The guard takes the body, parses and re-encodes it, and
the handler refuses the files (415: not images). The entry process's resident memory (RSS) is sampled every
20 ms: its peak during the round and what it keeps a second after. Each version serves the demo index in a
server of its own, one after the other.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Annotated

import httpx
import typer

from bench.ann_scale import command_line, machine
from bench.overhead import checkout, demo_index, remove_checkout, save
from bench.server import ROOT, Server

DOCS = ROOT / "docs"
BEFORE = "f7653e6"  # the last commit before the guard held a byte budget and freed refused requests' errors
app = typer.Typer(add_completion=False)


async def flood(url: str, clients: int, mb: float) -> Counter:
    """`clients` requests of `mb` MB at once; how many got each status (or error)."""
    blob = os.urandom(int(mb * 2**20) // 3)
    files = [("images", (f"{i}.jpg", blob, "image/jpeg")) for i in range(3)]

    async def one(client: httpx.AsyncClient) -> int | str:
        try:
            return (await client.post("/search_batch", files=files)).status_code
        except httpx.HTTPError as exc:
            return type(exc).__name__

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        return Counter(await asyncio.gather(*(one(client) for _ in range(clients))))


class PeakRss:
    """The highest RSS of `proc` while in the `with` block, sampled every 20 ms."""

    def __init__(self, proc):
        self.proc, self.peak, self._stop = proc, proc.memory_info().rss, threading.Event()

    def __enter__(self) -> "PeakRss":
        threading.Thread(target=self._sample, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.proc.memory_info().rss)


def measure(root: Path, label: str, log: Path, rounds: int, clients: int, mb: float) -> dict:
    with Server(log, root=root).wait() as srv:
        (entry,) = srv.processes()["entry"]
        row = {"code": label, "start_rss": entry.memory_info().rss, "rounds": []}
        for _ in range(rounds):
            with PeakRss(entry) as rss:
                start = time.perf_counter()
                answers = asyncio.run(flood(srv.url, clients, mb))
                took = time.perf_counter() - start
            time.sleep(1)
            row["rounds"].append({"answers": {str(k): v for k, v in sorted(answers.items(), key=str)},
                                  "seconds": round(took, 1), "peak_rss": rss.peak,
                                  "rss_after": entry.memory_info().rss})
        row["serves_after"] = srv.http.get("/readyz").status_code == 200
        return row


@app.command()
def main(before: Annotated[str, typer.Option(help="git ref to compare with ('' for none)")] = BEFORE,
         rounds: Annotated[int, typer.Option(help="floods per version")] = 3,
         clients: Annotated[int, typer.Option(help="requests sent at once")] = 96,
         mb: Annotated[float, typer.Option(help="MB per request")] = 48,
         quick: Annotated[bool, typer.Option(help="tiny run, no docs")] = False,
         out: Annotated[Path, typer.Option(help="where the JSON goes")] = DOCS / "upload_flood.json") -> None:
    if quick:
        rounds, clients, mb = 1, 4, 1
    from model_store import stages

    tmp, _, tag = demo_index("bench-flood-", quick)
    stages.promote(tag, "production", force=True)
    result = {"machine": machine(), "command": command_line("bench.upload_flood"), "clients": clients, "mb": mb,
              "rows": []}
    if before:
        older = checkout(before, tmp / "before")
        try:
            result["rows"].append(measure(older, f"before ({before})", tmp / "before.log", rounds, clients, mb))
        finally:
            remove_checkout(older)
    result["rows"].append(measure(ROOT, "this checkout", tmp / "this.log", rounds, clients, mb))
    save(result, out, quick)
    for row in result["rows"]:
        print(row["code"], [(r["answers"], f"peak {r['peak_rss'] / 2**20:.0f} MiB",
                             f"after {r['rss_after'] / 2**20:.0f} MiB") for r in row["rounds"]])


if __name__ == "__main__":
    app()
