"""What an upload of few bytes can cost to decode: images of one colour against photos of the same size, in each
format the service reads whole (all but JPEG), and which ones the byte floor refuses.

    python -m bench.sparse_images           # docs/sparse_images.json and its block in docs/PERFORMANCE.md
    python -m bench.sparse_images --quick   # small images, no docs (the tests')

A "photo" is a demo drawing enlarged with sensor-like noise (bench.decode.jpeg's), so it compresses as a photo
does; "one colour" is a flat light grey. Decode time: median of `repeat` full decodes (Pillow, one thread).
The floor: `IMAGESEARCH_MIN_IMAGE_BYTES_PER_MEGAPIXEL` (model_store/preprocess.py, _check_density). JPEG 2000 is
measured for the record: the service refuses it in an upload whatever its size (UPLOAD_FORMATS).
"""

from __future__ import annotations

import io
import json
import statistics
import time
from pathlib import Path
from typing import Annotated

import pillow_heif
import typer
from PIL import Image

from bench.decode import jpeg
from bench.evaluate_grocery import machine, replace_block
from index_builder.demo import draw_object
from model_store.preprocess import ImageTooLarge, decode_image
from model_store.settings import get_settings

DOCS = Path(__file__).resolve().parents[1] / "docs"
FORMATS = {"WebP lossless": ("WEBP", {"lossless": True}), "WebP q80": ("WEBP", {"quality": 80}),
           "AVIF q50": ("AVIF", {"quality": 50}), "HEIC q50": ("HEIF", {"quality": 50}),
           "JPEG 2000": ("JPEG2000", {}), "PNG": ("PNG", {}), "GIF": ("GIF", {})}
app = typer.Typer(add_completion=False)


def encoded(img: Image.Image, fmt: str, kw: dict) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def decode_ms(data: bytes, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        Image.open(io.BytesIO(data)).load()
        times.append((time.perf_counter() - start) * 1000)
    return round(statistics.median(times), 1)


def refused(data: bytes, floor: int) -> bool:
    try:
        decode_image(data, max_bytes=1 << 30, max_pixels=1 << 30, min_bytes_per_mp=floor)
    except ImageTooLarge:
        return True
    return False


def table(result: dict) -> str:
    size = result["size"]
    lines = [f"{size[0]}x{size[1]} images ({size[0] * size[1] / 1e6:.1f} MP), floor {result['floor']:,} bytes a "
             f"megapixel. Machine: {result['machine']}. Command: `{result['command']}`.", "",
             "| format | image | bytes | bytes a megapixel | decode ms | refused by the floor |",
             "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['format']} | {r['image']} | {r['bytes']:,} | {r['bytes_per_mp']:,} | {r['decode_ms']} | "
                     f"{'yes' if r['refused'] else 'no'} |")
    return "\n".join(lines)


@app.command()
def main(quick: Annotated[bool, typer.Option(help="small images, no docs")] = False,
         repeat: Annotated[int, typer.Option(min=1)] = 3) -> None:
    pillow_heif.register_heif_opener()
    size = (600, 400) if quick else (6000, 4000)
    floor = get_settings().min_image_bytes_per_megapixel
    photo = Image.open(io.BytesIO(jpeg(draw_object(2, 1, 30, size=96), size)))
    images = {"one colour": Image.new("RGB", size, (250, 250, 250)), "photo": photo.convert("RGB")}
    rows = []
    for label, (fmt, kw) in FORMATS.items():
        for what, img in images.items():
            data = encoded(img.convert("P") if fmt == "GIF" else img, fmt, kw)
            row = {"format": label, "image": what, "bytes": len(data),
                   "bytes_per_mp": round(len(data) / (size[0] * size[1] / 1e6)), "decode_ms": decode_ms(data, repeat),
                   "refused": refused(data, floor)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    result = {"machine": machine(), "command": "python -m bench.sparse_images" + (" --quick" if quick else ""),
              "size": list(size), "floor": floor, "repeat": repeat, "rows": rows}
    print(table(result))
    if quick:
        return
    (DOCS / "sparse_images.json").write_text(json.dumps(result, indent=2) + "\n")
    perf = DOCS / "PERFORMANCE.md"
    perf.write_text(replace_block(perf.read_text(), "sparse-images", table(result),
                                  "## Uploads of few bytes that decode slowly"))


if __name__ == "__main__":
    app()
