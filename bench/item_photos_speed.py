"""What more photos of an item cost: /assist over HTTP (the page's request) with the item's photo and 0, 1 or 2
more (`more_images`), one request at a time, the counts taking turns, on the demo index (default embedder).

    python -m bench.item_photos_speed           # docs/PERFORMANCE.md's block, and docs/item_photos_speed.json
    python -m bench.item_photos_speed --quick   # seconds-long smoke run the tests use (tiny network, no docs)
"""

from __future__ import annotations

import json
import statistics
import time
from typing import Annotated

import typer

from bench.evaluate_grocery import machine, replace_block
from bench.overhead import demo_index
from bench.server import ROOT, Server

DOCS = ROOT / "docs"
COUNTS = (1, 2, 3)


def assist_ms(srv: Server, photos: list[bytes], rounds: int) -> dict[int, list[float]]:
    """ms per /assist with 1, 2, 3 photos of one item, the counts taking turns round by round."""
    ms: dict[int, list[float]] = {n: [] for n in COUNTS}
    for i in range(rounds):
        for n in COUNTS:
            group = [photos[(3 * i + j) % len(photos)] for j in range(n)]
            files = [("image", ("p0.png", group[0], "image/png"))]
            files += [("more_images", (f"p{j}.png", p, "image/png")) for j, p in enumerate(group[1:], 1)]
            start = time.perf_counter()
            r = srv.http.post("/assist", files=files, data={"k": "48"})
            ms[n].append((time.perf_counter() - start) * 1000)
            r.raise_for_status()
    return ms


def main(quick: Annotated[bool, typer.Option(help="tiny run, no docs")] = False,
         rounds: Annotated[int, typer.Option(help="requests per count")] = 60) -> None:
    from model_store import stages

    tmp, folder, tag = demo_index("bench-item-photos-", quick)
    stages.promote(tag, "production", force=True)
    photos = [p.read_bytes() for p in sorted(folder.glob("*.png"))]
    with Server(tmp / "serve.log").wait() as srv:
        assist_ms(srv, photos, 2)  # warm-up: every batch size once
        ms = assist_ms(srv, photos, 3 if quick else rounds)
    p50 = {n: statistics.median(v) for n, v in ms.items()}
    rows = [{"photos": n, "requests": len(ms[n]), "p50_ms": round(p50[n], 1),
             "p90_ms": round(statistics.quantiles(ms[n], n=10)[-1], 1), "over_one_photo": round(p50[n] / p50[1], 2)}
            for n in COUNTS]
    result = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "command": "python -m bench.item_photos_speed",
              "index": tag, "rows": rows}
    print(json.dumps(result, indent=2))
    if not quick:
        (DOCS / "item_photos_speed.json").write_text(json.dumps(result, indent=2) + "\n")
        lines = [f"Measured {result['date']} on {result['machine']} with `{result['command']}`: the demo index "
                 "(default embedder), server and client on the same cores, one request at a time, the counts "
                 "taking turns; /assist with k=48, as the page asks.", "",
                 "| photos of the item | requests | p50 ms | p90 ms | p50 over one photo |", "|---|---|---|---|---|"]
        lines += [f"| {r['photos']} | {r['requests']} | {r['p50_ms']} | {r['p90_ms']} | {r['over_one_photo']}x |"
                  for r in rows]
        perf = DOCS / "PERFORMANCE.md"
        perf.write_text(replace_block(perf.read_text(), "item-photos-speed", "\n".join(lines),
                                      "## Several photos of one item: what they cost"))


if __name__ == "__main__":
    typer.run(main)
