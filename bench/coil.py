"""COIL-100 retrieval protocol: catalogue and queries files that point into ../shared (never copied)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

from index_builder.catalogue import COLUMNS

COIL = Path(__file__).resolve().parents[2] / "shared" / "data" / "coil-100"
GALLERY_4 = (0, 90, 180, 270)
QUERIES_4 = (45, 135, 225, 315)


def coil_path(obj: int, angle: int) -> Path:
    return COIL / "images" / f"obj{obj}__{angle}.png"


def non_query_views() -> list[Path]:
    """Every COIL photo whose angle is never a query angle (6,800 photos): a catalogue to learn PCA on."""
    return [coil_path(o, a) for o in range(1, 101) for a in range(0, 360, 5) if a not in QUERIES_4]


def write_split(out: Path, gallery: tuple[int, ...] = GALLERY_4, queries: tuple[int, ...] = QUERIES_4,
                objects: range = range(1, 101)) -> tuple[Path, Path]:
    """catalogue.csv (one item per object, the gallery views) and queries.csv (the query views) in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "catalogue.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for o in objects:
            for a in gallery:  # synthetic prices: COIL has none
                w.writerow([f"obj{o:03d}", coil_path(o, a), f"COIL object {o}", "coil", 10 + o, "USD", "2024-01-01"])
    with open(out / "queries.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_path", "item_id"])
        w.writerows([coil_path(o, a), f"obj{o:03d}"] for o in objects for a in queries)
    return out / "catalogue.csv", out / "queries.csv"


def raw_pixel_top1(gallery: tuple[int, ...] = GALLERY_4, queries: tuple[int, ...] = QUERIES_4,
                   objects: range = range(1, 101), size: int = 32) -> float:
    """Top-1 of cosine similarity on raw size x size RGB pixels: the baseline any CNN must beat."""
    def vec(o: int, a: int) -> np.ndarray:
        v = np.asarray(Image.open(coil_path(o, a)).convert("RGB").resize((size, size)), np.float32).ravel()
        return v / max(np.linalg.norm(v), 1e-9)

    g = np.stack([vec(o, a) for o in objects for a in gallery])
    g_obj = np.repeat(list(objects), len(gallery))
    q = np.stack([vec(o, a) for o in objects for a in queries])
    q_obj = np.repeat(list(objects), len(queries))
    return float(np.mean(g_obj[np.argmax(q @ g.T, axis=1)] == q_obj))
