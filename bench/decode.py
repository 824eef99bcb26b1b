"""Phone photos into network input: a full JPEG decode against libjpeg's reduced-scale decode, which the builder
and the service use (model_store.preprocess.decode_image with the embedder's spec), and against the photo as the
search page sends it (downscaled in the browser to the index's upload_px). Time, and what each does to retrieval.

    python -m bench.decode            # docs/decode.json and its blocks in PERFORMANCE.md and EVALUATION.md
    python -m bench.decode --quick    # seconds-long smoke run the tests use

Time: photos at phone sizes (demo drawings enlarged, with sensor-like noise, saved as JPEG quality 90), median
ms of decode + resize + crop to the default embedder's input, one core, each way in alternating blocks.
"As the page sends it": the same photo downscaled to a short side of upload_px (Lanczos, as the browser's
high-quality canvas; JPEG quality 90, as the page's toBlob), decoded the service's way.
Retrieval (needs ../shared/data/grocery-store): the val shop photos enlarged 4x (1392 px, JPEG quality 92) as
queries against the train photos, exact cosine on the default embedder's descriptor without its projection:
top-1, recall@5 and mAP with each decode, next to the original 348 px queries (also re-encoded as HEIC), and
how close the vectors of each photo are to its full decode (or to the original's). The test split is never
read.
"""

from __future__ import annotations

import io
import json
import statistics
import time
from pathlib import Path
from typing import Annotated

import numpy as np
import pillow_heif
import typer
from PIL import Image

from bench.evaluate_grocery import machine, replace_block, search_metrics
from bench.grocery import CREDIT, GROCERY, read_split
from model_store.embedder import Embedder, new_embedder
from model_store.preprocess import (BUILD_MAX_BYTES, BUILD_MAX_PIXELS, as_page_sends, decode_image, image_to_pixels,
                                    upload_px)

DOCS = Path(__file__).resolve().parents[1] / "docs"
LIMITS = dict(max_bytes=BUILD_MAX_BYTES, max_pixels=BUILD_MAX_PIXELS)
HEIC_QUALITY = 50  # libheif's default
HEIC_PHOTOS = 2  # encoding a 12-megapixel HEIC takes several seconds
app = typer.Typer(add_completion=False)


def jpeg(img: Image.Image, size: tuple[int, int] | None = None, quality: int = 90, seed: int = 0,
         noise: float = 5) -> bytes:
    """`img` enlarged to `size` with a little noise (as a sensor leaves, standard deviation `noise`), as JPEG
    bytes."""
    if size:
        img = img.resize(size, Image.Resampling.BICUBIC)
        noisy = np.asarray(img, np.float32) + np.random.default_rng(seed).normal(0, noise, (size[1], size[0], 3))
        img = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def heic(img: Image.Image, quality: int = HEIC_QUALITY) -> bytes:
    """`img` as an iPhone saves it: HEIC (HEVC)."""
    buf = io.BytesIO()
    pillow_heif.from_pillow(img).save(buf, quality=quality)
    return buf.getvalue()


def to_pixels(data: bytes, spec, reduced: bool) -> np.ndarray:
    return image_to_pixels(decode_image(data, **LIMITS, spec=spec if reduced else None), spec)


def speed(spec, sizes: list[tuple[int, int]], photos: int, blocks: int) -> list[dict]:
    from index_builder.demo import draw_object

    rows = []
    for size in sizes:
        data = [jpeg(draw_object(i, 0, 30 * i, size=256).convert("RGB"), size, seed=i) for i in range(photos)]
        sent = [as_page_sends(d, upload_px(spec)) for d in data]
        heics = [heic(Image.open(io.BytesIO(d))) for d in data[:HEIC_PHOTOS]]
        ways = {"full": (data, False), "reduced": (data, True), "page": (sent, True), "heic": (heics, True)}
        ms = {way: [] for way in ways}
        for _ in range(blocks):
            for way, (photos_, reduced) in ways.items():
                for d in photos_:
                    start = time.perf_counter()
                    to_pixels(d, spec, reduced)
                    ms[way].append((time.perf_counter() - start) * 1000)
        full, fast, page, heic_ms = (statistics.median(ms[way]) for way in ways)
        decoded = decode_image(data[0], **LIMITS, spec=spec).size
        page_size = Image.open(io.BytesIO(sent[0])).size
        rows.append({"photo": f"{size[0]}x{size[1]}", "kb": round(statistics.mean(map(len, data)) / 1024),
                     "full_ms": round(full, 1), "reduced_ms": round(fast, 1), "speedup": round(full / fast, 1),
                     "reduced_to": f"{decoded[0]}x{decoded[1]}", "page_sends": f"{page_size[0]}x{page_size[1]}",
                     "page_kb": round(statistics.mean(map(len, sent)) / 1024), "page_ms": round(page, 1),
                     "heic_kb": round(statistics.mean(map(len, heics)) / 1024), "heic_ms": round(heic_ms, 1)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def quality(emb: Embedder, quick: bool) -> dict:
    spec = emb.config.preprocess
    gallery, g_labels = read_split("train")
    queries, q_labels = read_split("val")
    if quick:
        gallery, g_labels, queries, q_labels = gallery[::40], g_labels[::40], queries[::20], q_labels[::20]

    def vectors(items: list, prepare) -> np.ndarray:
        out = [emb.embed(np.stack([prepare(x) for x in items[i:i + 16]])) for i in range(0, len(items), 16)]
        return np.concatenate(out)

    g = vectors(gallery, lambda p: to_pixels(p.read_bytes(), spec, True))
    def enlarged(path: Path, seed: int) -> bytes:
        img = Image.open(path).convert("RGB")
        return jpeg(img, (img.width * 4, img.height * 4), 92, seed)

    big = [enlarged(p, i) for i, p in enumerate(queries)]
    full, original = "enlarged 4x, full decode", "original (348 px)"
    rows = {original: vectors(queries, lambda p: to_pixels(p.read_bytes(), spec, True)),
            full: vectors(big, lambda d: to_pixels(d, spec, False)),
            "enlarged 4x, reduced-scale decode": vectors(big, lambda d: to_pixels(d, spec, True)),
            f"enlarged 4x, as the page sends it ({upload_px(spec)} px)":
                vectors(big, lambda d: to_pixels(as_page_sends(d, upload_px(spec)), spec, True)),
            "original (348 px) as HEIC": vectors(queries, lambda p: to_pixels(heic(Image.open(p)), spec, True))}
    out = {name: search_metrics(g, g_labels, q, q_labels) for name, q in rows.items()}
    for name, q in rows.items():
        if name != original:
            cos = np.sum(rows[original if name.startswith(original) else full] * q, axis=1)
            out[name]["cosine_to_full_decode"] = {"min": round(float(cos.min()), 4),
                                                  "median": round(float(np.median(cos)), 4)}
    print(json.dumps(out), flush=True)
    return {"metrics": out, "gallery": len(gallery), "queries": len(queries)}


def write_docs(result: dict) -> None:
    (DOCS / "decode.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"Measured {result['date']} on {result['machine']} with `{result['command']}`; one core, the default "
             f"embedder's input ({result['input']} px); median ms per photo, decode + resize + crop.", "",
             "| photo | JPEG KB | full decode ms | reduced-scale decode ms | faster | decoded at "
             "| as the page sends it | its KB | its decode ms | as HEIC, KB | its decode ms |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['photo']} | {r['kb']} | {r['full_ms']} | {r['reduced_ms']} | {r['speedup']}x | {r['reduced_to']} "
              f"| {r['page_sends']} | {r['page_kb']} | {r['page_ms']} | {r['heic_kb']} | {r['heic_ms']} |"
              for r in result["speed"]]
    perf = (DOCS / "PERFORMANCE.md").read_text()
    (DOCS / "PERFORMANCE.md").write_text(replace_block(perf, "decode", "\n".join(lines), "## Decoding phone photos"))
    q = result.get("quality")
    if not q:
        return
    lines = [f"{CREDIT}", "", f"Machine: {result['machine']}; `{result['command']}`. The {q['queries']} val photos as "
             f"queries against the {q['gallery']} train photos; default embedder, exact cosine, no projection. "
             "Cosine: between each photo's vector and its full decode's (enlarged photos) or the original's (HEIC), "
             "median and lowest.", "",
             "| queries | top-1 | recall@5 | mAP | cosine to the full decode or original: median / lowest |",
             "|---|---|---|---|---|"]
    for name, m in sorted(q["metrics"].items(), key=lambda kv: kv[0].startswith("original")):
        cos = m.get("cosine_to_full_decode")
        close = f"{cos['median']} / {cos['min']}" if cos else ""
        lines.append(f"| {name} | {m['top1']:.3f} | {m['recall_at_5']:.3f} | {m['mAP']:.3f} | {close} |")
    ev = (DOCS / "EVALUATION.md").read_text()
    (DOCS / "EVALUATION.md").write_text(replace_block(ev, "decode", "\n".join(lines),
                                                      "## Phone-sized photos: reduced-scale JPEG decoding"))


@app.command()
def main(quick: Annotated[bool, typer.Option(help="tiny run, no docs")] = False) -> None:
    config, net = new_embedder("efficientnet-lite2", descriptor="rmac")
    emb = Embedder(config, net, "cpu")
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # decoding is timed on one core, as a decoding worker or the entry runs it
    sizes = [(1600, 1200)] if quick else [(1600, 1200), (3024, 4032), (4000, 3000)]
    result = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "command": "python -m bench.decode",
              "input": config.preprocess.crop, "speed": speed(config.preprocess, sizes, 2 if quick else 6,
                                                              1 if quick else 5)}
    torch.set_num_threads(threads)
    if GROCERY.exists():
        result["quality"] = quality(emb, quick)
    if not quick:
        write_docs(result)


if __name__ == "__main__":
    app()
