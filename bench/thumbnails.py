"""Bytes and time per catalogue thumbnail (WebP, longest side 320 px), on grocery shop photos.

    python -m bench.thumbnails [--photos 500]     # writes docs/PERFORMANCE.md's thumbnails section
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import typer

from bench.evaluate_grocery import machine, replace_block
from bench.grocery import CREDIT, GROCERY, read_split
from model_store.preprocess import load_image_file
from model_store.thumbnails import THUMBNAIL_QUALITY, THUMBNAIL_SIDE, ensure_thumbnail, photo_key, store_size

DOCS = Path(__file__).resolve().parents[1] / "docs" / "PERFORMANCE.md"


def measure(paths: list[Path]) -> dict:
    decode, make, originals, sides = [], [], [], []
    with tempfile.TemporaryDirectory() as root:
        for p in paths:
            data = p.read_bytes()
            t0 = time.perf_counter()
            img = load_image_file(p)
            t1 = time.perf_counter()
            ensure_thumbnail(photo_key(data), img, Path(root))
            make.append(time.perf_counter() - t1)
            decode.append(t1 - t0)
            originals.append(len(data))
            sides.append(max(img.size))
        n, total = store_size(Path(root))
    per_photo = total / n
    return {"photos": n, "bytes_per_thumbnail": round(per_photo), "original_bytes_per_photo": round(np.mean(originals)),
            "original_longest_side": round(float(np.median(sides))),
            "ms_per_thumbnail": round(1000 * float(np.mean(make)), 2), "ms_to_decode": round(1000 * float(np.mean(decode)), 2),
            "gb_per_million": round(per_photo * 1e6 / 1e9, 2)}


def main(photos: int = typer.Option(500, help="grocery train photos to measure (evenly spread)")) -> None:
    paths = read_split("train")[0]
    paths = paths[:: max(1, len(paths) // photos)][:photos]
    r = measure(paths)
    print(r)
    body = (f"Measured {time.strftime('%Y-%m-%d')} on {machine()} with `python -m bench.thumbnails --photos {photos}`: "
            f"{r['photos']} grocery shop photos (JPEG, {r['original_bytes_per_photo']:,} bytes and "
            f"{r['original_longest_side']} px on the longest side, median: smaller than a phone's photos, whose "
            "thumbnails cost about the same bytes but more time to shrink). "
            f"{CREDIT}\n\n"
            "| thumbnail | bytes per photo | a million photos | ms to make (after decoding) | ms to decode the photo |\n"
            "|---|---|---|---|---|\n"
            f"| WebP q{THUMBNAIL_QUALITY}, longest side {THUMBNAIL_SIDE} px | {r['bytes_per_thumbnail']:,} | "
            f"{r['gb_per_million']} GB | {r['ms_per_thumbnail']} | {r['ms_to_decode']} |\n\n"
            "The builder makes each thumbnail from the photo it has already decoded for embedding, in its decoding "
            "workers, and only for photos whose content (SHA-256) the store has not seen: a nightly rebuild pays "
            "only for new photos. Rows with an `image_url` get none.")
    DOCS.write_text(replace_block(DOCS.read_text(), "thumbnails", body, "## Thumbnails"))


if __name__ == "__main__":
    if not GROCERY.exists():
        raise SystemExit(f"needs the grocery photos at {GROCERY}")
    typer.run(main)
