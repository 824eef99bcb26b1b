"""The entry's work off its event loop, on thread pools of several sizes: throughput and CPU per search.

    python -m bench.entry_threads                          # 32 searches at once; pools of 1, 2, 4, 8 and 20 threads
    python -m bench.entry_threads --out docs/entry_threads_gpu.json   # where the JSON goes
    python -m bench.entry_threads --quick                  # seconds-long smoke run the tests use

Each search does what an entry process does beside the HTTP work: decode a photo as the search page sends it
(a 1600x1200 phone-like JPEG scaled to upload_px) into the embedder's pixels on a pool thread, wait 4 ms (the
embedder's hop, with the event loop free), then search a 5,000-item Annoy index on a pool thread. One event
loop, `--clients` searches in flight, rounds alternating the pool sizes. Python's default pool has cores + 4
threads (at most 32): 6 on a 2-core VM, 20 on a 16-core GPU box; the service sets its own (entry_threads).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from annoy import AnnoyIndex

from bench.ann_scale import command_line, machine
from bench.decode import jpeg
from bench.server import ROOT
from index_builder.ann import build_annoy
from index_builder.demo import draw_object
from model_store.preprocess import PreprocessSpec, as_page_sends, decode_image, image_to_pixels, upload_px

app = typer.Typer(add_completion=False)
SPEC = PreprocessSpec(resize=260, crop=260)  # the default embedder's input


def photos(n: int) -> list[bytes]:
    return [as_page_sends(jpeg(draw_object(i % 8, i, 0).convert("RGB"), (1600, 1200), 90, seed=i, noise=6),
                          upload_px(SPEC)) for i in range(n)]


def annoy_index(items: int, dim: int = 256) -> AnnoyIndex:
    """Random vectors, built as the builder builds a catalogue's index."""
    return build_annoy(np.random.default_rng(0).standard_normal((items, dim)).astype(np.float32), 20, seed=0)


async def closed_loop(threads: int, clients: int, seconds: float, uploads: list[bytes], index: AnnoyIndex) -> dict:
    """Searches per second and CPU ms per search of `clients` searches in flight on a pool of `threads`."""
    loop = asyncio.get_running_loop()
    loop.set_default_executor(ThreadPoolExecutor(threads))
    query = np.random.default_rng(1).standard_normal(index.f)
    done, stop = 0, time.perf_counter() + seconds

    def prepare(data: bytes) -> np.ndarray:
        return image_to_pixels(decode_image(data, max_bytes=1 << 24, max_pixels=1 << 26, spec=SPEC), SPEC)

    async def client(i: int) -> None:
        nonlocal done
        while time.perf_counter() < stop:
            await asyncio.to_thread(prepare, uploads[i % len(uploads)])
            await asyncio.sleep(0.004)
            await asyncio.to_thread(index.get_nns_by_vector, query, 10, search_k=2000)
            i, done = i + clients, done + 1

    cpu, start = time.process_time(), time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(clients)))
    cpu, elapsed = time.process_time() - cpu, time.perf_counter() - start
    return {"searches_per_s": round(done / elapsed, 1), "cpu_ms_per_search": round(cpu / max(done, 1) * 1000, 2)}


@app.command()
def main(clients: Annotated[int, typer.Option(help="searches in flight")] = 32,
         threads: Annotated[str, typer.Option(help="pool sizes, comma-separated")] = "1,2,4,8,20",
         seconds: Annotated[float, typer.Option(help="seconds per pool and round")] = 4,
         rounds: Annotated[int, typer.Option(help="rounds, each trying every pool size")] = 2,
         quick: Annotated[bool, typer.Option(help="tiny run, no docs")] = False,
         out: Annotated[Path, typer.Option(help="where the JSON goes")] = ROOT / "docs" / "entry_threads.json") -> None:
    sizes = [int(x) for x in threads.split(",")]
    uploads, index = photos(4 if quick else 16), annoy_index(500 if quick else 5000)
    seconds, rounds = (0.5, 1) if quick else (seconds, rounds)
    runs: dict[int, list[dict]] = {n: [] for n in sizes}
    for _ in range(rounds):
        for n in sizes:
            runs[n].append(asyncio.run(closed_loop(n, clients, seconds, uploads, index)))
            print(json.dumps({"threads": n, **runs[n][-1]}), flush=True)
    rows = [{"threads": n, "rounds": r, **{k: round(statistics.median(x[k] for x in r), 2) for k in r[0]}}
            for n, r in runs.items()]
    print("| pool threads | searches/s | CPU ms per search |\n|---|---|---|")
    for r in rows:
        print(f"| {r['threads']} | {r['searches_per_s']} | {r['cpu_ms_per_search']} |")
    if not quick:
        out.write_text(json.dumps({"machine": machine(), "clients": clients, "seconds": seconds, "rows": rows,
                                   "command": command_line("bench.entry_threads")}, indent=2))


if __name__ == "__main__":
    app()
