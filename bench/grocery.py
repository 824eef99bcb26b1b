"""Grocery Store Dataset (train, val, iconic), read in place, and conv-map descriptors of its photos cached on disk.

Data: M. Klasson, C. Zhang, H. Kjellström, "A Hierarchical Grocery Store Image Dataset with Visual and Semantic
Labels", WACV 2019 (github.com/marcusklasson/GroceryStoreDataset, MIT licence). The original test split is kept
aside for the product and is never read here.
"""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from index_builder.catalogue import COLUMNS
from model_store.embedder import Embedder
from model_store.pooling import gem, rmac, rmac_regions
from model_store.preprocess import PreprocessSpec, image_to_pixels, load_image_file

GROCERY = Path(__file__).resolve().parents[2] / "shared" / "data" / "grocery-store"
OUT = Path(__file__).resolve().parent / "out"
CREDIT = ("Data: Grocery Store Dataset, M. Klasson, C. Zhang, H. Kjellström, WACV 2019 "
          "(github.com/marcusklasson/GroceryStoreDataset), MIT licence; train and val splits only.")

PhotoSet = tuple[list[Path], np.ndarray]  # paths, (N,) fine class ids


def read_split(name: str) -> PhotoSet:
    """'train' or 'val': (paths, (N,) fine class ids) in file order."""
    paths, labels = [], []
    for line in (GROCERY / f"{name}.txt").read_text().splitlines():
        if line.strip():
            path, fine, _coarse = (s.strip() for s in line.split(","))
            paths.append(GROCERY / path)
            labels.append(int(fine))
    return paths, np.array(labels)


def read_iconic() -> PhotoSet:
    """The 81 iconic catalogue photos: (paths, (81,) class ids), one per class."""
    with open(GROCERY / "classes.csv", newline="") as f:
        rows = list(csv.reader(f))[1:]
    return [GROCERY / r[4].lstrip("/") for r in rows], np.array([int(r[1]) for r in rows])


def class_names() -> dict[int, str]:
    """Fine class id -> class name."""
    with open(GROCERY / "classes.csv", newline="") as f:
        return {int(r[1]): r[0] for r in list(csv.reader(f))[1:]}


def restrict(photos: PhotoSet, classes, per_class: int | None = None) -> PhotoSet:
    """The photos of `classes` only, at most `per_class` per class (first ones in file order)."""
    keep, count, wanted = [], {}, set(int(c) for c in classes)
    for i, c in enumerate(photos[1]):
        if c in wanted and count.get(c, 0) < (per_class or 1 << 30):
            keep.append(i)
            count[c] = count.get(c, 0) + 1
    return [photos[0][i] for i in keep], photos[1][keep]


def l2(x: np.ndarray) -> np.ndarray:
    """(N, D) -> (N, D) float32 rows of unit length."""
    return (x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)).astype(np.float32)


def scaled_spec(spec: PreprocessSpec, scale: float) -> PreprocessSpec:
    """The embedder's preprocessing with resize and crop multiplied by `scale`."""
    size = round(spec.crop * scale)
    return spec.model_copy(update={"resize": size, "crop": size})


def pixels(path: Path, spec: PreprocessSpec) -> np.ndarray:
    """One photo -> (3, crop, crop) uint8, exactly as the builder and the service prepare it."""
    return image_to_pixels(load_image_file(path, spec=spec), spec)


@torch.inference_mode()
def feature_map(emb: Embedder, batch: np.ndarray, flip: bool = False) -> torch.Tensor:
    """(N, 3, H, W) uint8 -> (N, C, h, w) float32 last conv map, inputs normalised as Embedder.embed does."""
    spec = emb.config.preprocess
    mean, std = (torch.tensor(v, device=emb.device).view(1, 3, 1, 1) for v in (spec.mean, spec.std))
    x = torch.from_numpy(np.ascontiguousarray(batch)).to(emb.device).float()
    x = ((x / 255.0 - mean) / std).contiguous(memory_format=torch.channels_last)
    if flip:
        x = torch.flip(x, dims=[3]).contiguous(memory_format=torch.channels_last)
    return emb.net(x.half() if emb.half else x).float()


def rmac_max(fmap: torch.Tensor, levels: int = 3) -> torch.Tensor:
    """(N, C, h, w) -> (N, C): R-MAC with max pooling per region, L2 each, summed, L2."""
    total = 0
    for ys, xs in rmac_regions(fmap.shape[2], fmap.shape[3], levels):
        total = total + torch.nn.functional.normalize(fmap[:, :, ys, xs].amax(dim=(2, 3)), dim=1)
    return torch.nn.functional.normalize(total, dim=1)


POOLS = {"gem": gem, "rmac-max": rmac_max, "rmac-gem": rmac}


def describe_paths(paths: list[Path], emb: Embedder, scale: float = 1.0, flip: bool = False, batch_size: int = 16,
                   label: str = "") -> dict[str, np.ndarray]:
    """{pool name: (N, C) float32 L2 descriptors} for one forward pass per photo; cached under bench/out/."""
    c = emb.config
    key = hashlib.sha256(f"{c.backbone}|{c.weights.sha256}|{c.preprocess.model_dump_json()}|{scale}|{flip}|"
                         f"{'|'.join(map(str, paths))}".encode()).hexdigest()[:16]
    cache = OUT / f"grocery-{c.backbone}-s{scale}-{'flip' if flip else 'plain'}-{key}.npz"
    if cache.exists():
        with np.load(cache) as z:
            return {k: z[k] for k in z.files}
    spec = scaled_spec(c.preprocess, scale)
    parts: dict[str, list[np.ndarray]] = {k: [] for k in POOLS}
    for start in tqdm(range(0, len(paths), batch_size), desc=f"{c.backbone} {label} x{scale}{' flip' if flip else ''}",
                      unit="batch", dynamic_ncols=True, leave=False):
        fmap = feature_map(emb, np.stack([pixels(p, spec) for p in paths[start:start + batch_size]]), flip)
        for name, pool in POOLS.items():
            parts[name].append(pool(fmap).cpu().numpy().astype(np.float32))
    out = {k: np.concatenate(v) for k, v in parts.items()}
    OUT.mkdir(parents=True, exist_ok=True)
    np.savez(cache, **out)
    return out


def write_catalogue(out: Path, gallery: PhotoSet, queries: PhotoSet) -> tuple[Path, Path]:
    """catalogue.csv (one item per product class, its gallery photos) and queries.csv in `out`; paths point
    into ../shared (never copied). Prices and dates are made up: the data set has none."""
    out.mkdir(parents=True, exist_ok=True)
    names = class_names()
    with open(out / "catalogue.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for path, c in zip(*gallery):
            category = path.relative_to(GROCERY).parts[1]  # train/<Fruit|Packages|Vegetables>/...
            w.writerow([f"grocery-{c:02d}", path, names[int(c)].replace("_", " "), category, 1 + int(c) % 9,
                        "USD", f"2025-{1 + int(c) % 12:02d}-15"])
    with open(out / "queries.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_path", "item_id"])
        w.writerows([p, f"grocery-{c:02d}"] for p, c in zip(*queries))
    return out / "catalogue.csv", out / "queries.csv"
