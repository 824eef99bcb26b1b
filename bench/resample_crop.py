"""What resampling only the cropped part of a photo changed (model_store.preprocess.image_to_pixels): the network
input and descriptor of every photo against resizing the whole photo and then cropping its centre, as before.

    python -m bench.resample_crop            # grocery train + val and all of COIL-100: docs/resample_crop.json, EVALUATION.md
    python -m bench.resample_crop --quick    # a few photos of each, no docs (the tests)

Each photo is decoded as the builder decodes it (the default embedder's spec: JPEGs at reduced scale) and made
into the network's input both ways; for the photos whose input differs, both inputs go through the default
embedder and the cosine between the two descriptors is reported. On the grocery photos, retrieval both ways: the
val photos as queries against the train photos (exact cosine, no projection). The test split is never read.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from PIL import Image

from bench.ann_scale import command_line
from bench.coil import COIL, coil_path
from bench.evaluate_grocery import machine, replace_block, search_metrics
from bench.grocery import CREDIT, GROCERY, read_split
from index_builder.build_defaults import DEFAULT_DESCRIPTOR
from model_store.embedder import Embedder, new_embedder
from model_store.preprocess import PreprocessSpec, image_to_pixels, load_image_file
from model_store.settings import get_settings

DOCS = Path(__file__).resolve().parents[1] / "docs"
app = typer.Typer(add_completion=False)


def resize_whole_then_crop(img: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """image_to_pixels as it was until 2026-12-04: the whole photo resized, then its centre cropped."""
    w, h = img.size
    scale = spec.resize / min(w, h)
    size = (max(spec.crop, round(w * scale)), max(spec.crop, round(h * scale)))
    left, top = (size[0] - spec.crop) // 2, (size[1] - spec.crop) // 2
    img = img.resize(size, Image.Resampling.BILINEAR, reducing_gap=3.0).crop((left, top, left + spec.crop, top + spec.crop))
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))


def compare(name: str, paths: list[Path], emb: Embedder) -> dict:
    """Photos whose input differs, by how much, and the cosine between their old and new descriptors."""
    spec = emb.config.preprocess
    changed: list[tuple[np.ndarray, np.ndarray]] = []
    levels, values = 0, 0
    for path in paths:
        img = load_image_file(path, spec=spec)
        old, new = resize_whole_then_crop(img, spec), image_to_pixels(img, spec)
        diff = np.abs(old.astype(np.int16) - new)
        if diff.any():
            changed.append((old, new))
            levels, values = max(levels, int(diff.max())), values + int((diff > 0).sum())
    cosines = [float(np.dot(*emb.embed(np.stack(pair)))) for pair in changed]
    row = {"photos": name, "n": len(paths), "changed": len(changed), "max_level_difference": levels,
           "values_changed_pct": round(100 * values / max(1, len(paths) * 3 * spec.crop ** 2), 5),
           "lowest_cosine": round(min(cosines), 6) if cosines else None}
    print(json.dumps(row), flush=True)
    return row


def grocery_retrieval(emb: Embedder, quick: bool) -> dict:
    """top-1, recall@5 and mAP of val queries against train photos, with each way of making the input."""
    (gallery, g_labels), (queries, q_labels) = read_split("train"), read_split("val")
    if quick:
        gallery, g_labels, queries, q_labels = gallery[::40], g_labels[::40], queries[::20], q_labels[::20]
    spec = emb.config.preprocess

    def vectors(paths: list[Path], to_pixels) -> np.ndarray:
        return np.concatenate([emb.embed(np.stack([to_pixels(load_image_file(p, spec=spec), spec) for p in paths[i:i + 16]]))
                               for i in range(0, len(paths), 16)])

    out = {name: search_metrics(vectors(gallery, way), g_labels, vectors(queries, way), q_labels)
           for name, way in [("resize whole, then crop (before)", resize_whole_then_crop),
                             ("resample the cropped part (now)", image_to_pixels)]}
    print(json.dumps(out), flush=True)
    return {"gallery": len(gallery), "queries": len(queries), "metrics": out}


def write_docs(result: dict) -> None:
    (DOCS / "resample_crop.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [CREDIT, "", f"Machine: {result['machine']}; `{result['command']}`, {result['date']}; the default "
             f"embedder ({result['embedder']}, input {result['input']} px).", "",
             "| photos | photos | whose input changed | by at most (of 255) | input values changed | lowest cosine, "
             "old to new descriptor |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['photos']} | {r['n']:,} | {r['changed']:,} | {r['max_level_difference']} "
              f"| {r['values_changed_pct']}% | {r['lowest_cosine'] if r['lowest_cosine'] is not None else '-'} |"
              for r in result["rows"]]
    if r := result.get("retrieval"):
        lines += ["", f"Retrieval, the {r['queries']} val photos as queries against the {r['gallery']} train photos "
                  "(exact cosine, no projection):", "", "| input | top-1 | recall@5 | mAP |", "|---|---|---|---|"]
        lines += [f"| {name} | {m['top1']:.4f} | {m['recall_at_5']:.4f} | {m['mAP']:.4f} |" for name, m in r["metrics"].items()]
    ev = (DOCS / "EVALUATION.md").read_text()
    (DOCS / "EVALUATION.md").write_text(replace_block(ev, "resample-crop", "\n".join(lines),
                                                      "## Resampling only the cropped part (2026-12-04)"))


@app.command()
def main(quick: Annotated[bool, typer.Option(help="a few photos of each, no docs")] = False) -> None:
    backbone = get_settings().backbone
    config, net = new_embedder(backbone, descriptor=DEFAULT_DESCRIPTOR)
    emb = Embedder(config, net, "cpu")
    sets = {}
    if GROCERY.exists():
        shop = read_split("train")[0] + read_split("val")[0]
        sets["grocery train + val (shop photos, JPEG)"] = shop[::200] if quick else shop
    if COIL.exists():
        sets["COIL-100 (128 px PNG)"] = [coil_path(o, a) for o in range(1, 101) for a in range(0, 360, 5)][::900 if quick else 1]
    result = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "command": command_line("bench.resample_crop"),
              "embedder": f"{backbone}, {DEFAULT_DESCRIPTOR}", "input": config.preprocess.crop,
              "rows": [compare(name, paths, emb) for name, paths in sets.items()]}
    if GROCERY.exists():
        result["retrieval"] = grocery_retrieval(emb, quick)
    if not quick:
        write_docs(result)


if __name__ == "__main__":
    app()
