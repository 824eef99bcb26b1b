"""Batched, resumable feature extraction: decoding in DataLoader workers, the network in this process."""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from model_store.embedder import Embedder
from model_store.preprocess import ImageError, PreprocessSpec, decode_image, image_to_pixels, read_photo_file
from model_store.thumbnails import ensure_thumbnail, photo_key


# Measured (docs/PERFORMANCE.md, builder): one decoding worker per spare core; batch 16 beats 32 on CPU.
DEFAULT_WORKERS = max(1, min(4, (os.cpu_count() or 2) - 1))
DEFAULT_BATCH_SIZE = 16


Sample = tuple[int, np.ndarray, str, str, bool]  # index, (3,H,W) uint8 pixels, error, photo key, thumbnail made


class PhotoDataset(Dataset):
    """Item i -> Sample; a photo that fails gives zeros and the reason. With `thumbnails` (a store folder),
    the thumbnail of each photo not in `no_thumbnail` is made from the decoded image unless the store has it."""

    def __init__(self, paths: list[Path], spec: PreprocessSpec, thumbnails: Path | None = None,
                 no_thumbnail: frozenset[int] = frozenset()):
        self.paths, self.spec, self.thumbnails, self.no_thumbnail = paths, spec, thumbnails, no_thumbnail

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Sample:
        path = self.paths[i]
        try:
            data = read_photo_file(path)
            img = decode_image(data, max_bytes=1 << 30, max_pixels=200_000_000, name=str(path))
            key = photo_key(data)
            wanted = self.thumbnails is not None and i not in self.no_thumbnail
            made = wanted and ensure_thumbnail(key, img, self.thumbnails)
            return i, image_to_pixels(img, self.spec), "", key, made
        except ImageError as exc:
            reason = str(exc).removeprefix(f"{path} ")
            return i, np.zeros((3, self.spec.crop, self.spec.crop), np.uint8), f"unreadable image: {reason}", "", False


def _collate(samples: list[Sample]) -> tuple[list[int], np.ndarray, list[str], list[str], int]:
    ids, arrays, errors, keys, made = zip(*samples)
    return list(ids), np.stack(arrays), list(errors), list(keys), sum(made)


@dataclass
class Extraction:
    vectors: np.ndarray  # (N, D) float32; rows of failed photos are zeros
    errors: dict[int, str]  # photo index -> reason
    keys: list[str]  # photo index -> SHA-256 of the photo's bytes ("" when unreadable)
    computed: int  # photos embedded in this run (the rest came from finished batches)
    thumbnails_made: int  # thumbnails written in this run (the others were in the store already)
    seconds: float


def work_key(paths: list[Path], embedder_tag: str, batch_size: int) -> str:
    """Identifies one extraction job: same photos (path, size, mtime), embedder and batching."""
    digest = hashlib.sha256(f"v2|{embedder_tag}|{batch_size}".encode())
    for p in paths:
        st = p.stat() if p.exists() else None
        digest.update(f"|{p}|{st and st.st_size}|{st and st.st_mtime_ns}".encode())
    return digest.hexdigest()[:24]


def extract(paths: list[Path], embedder: Embedder, cache: Path, *, batch_size: int = DEFAULT_BATCH_SIZE,
            workers: int = DEFAULT_WORKERS, progress: bool = True, thumbnails: Path | None = None,
            no_thumbnail: frozenset[int] = frozenset()) -> Extraction:
    """Embed every photo; each finished batch is saved in `cache`, and a rerun skips those batches.
    With `thumbnails` (the store's folder), the thumbnail of each photo not in `no_thumbnail` is made there
    unless it exists."""
    cache.mkdir(parents=True, exist_ok=True)
    batches = [list(range(s, min(s + batch_size, len(paths)))) for s in range(0, len(paths), batch_size)]
    pending = [b for n, b in enumerate(batches) if not (cache / f"batch-{n:06d}.npz").exists()]
    loader = DataLoader(PhotoDataset(paths, embedder.config.preprocess, thumbnails, no_thumbnail), batch_sampler=pending,
                        num_workers=workers, collate_fn=_collate, persistent_workers=False)
    start = time.perf_counter()
    bar = tqdm(total=len(paths), initial=len(paths) - sum(map(len, pending)), unit="img",
               desc="embedding", disable=not progress, dynamic_ncols=True)
    made = 0
    with bar:
        for ids, arrays, errors, keys, n_made in loader:
            vectors = embedder.embed(arrays)
            vectors[[bool(e) for e in errors]] = 0.0
            _save_batch(cache / f"batch-{ids[0] // batch_size:06d}.npz", vectors, errors, keys)
            made += n_made
            bar.update(len(ids))
    seconds = time.perf_counter() - start
    return _assemble(cache, len(batches), embedder.config.dim, sum(map(len, pending)), made, seconds)


def _save_batch(path: Path, vectors: np.ndarray, errors: list[str], keys: list[str]) -> None:
    tmp = path.with_name(f".{path.name}.tmp.npz")
    np.savez(tmp, vectors=vectors, errors=np.asarray(json.dumps(errors)), keys=np.asarray(json.dumps(keys)))
    os.replace(tmp, path)  # a batch file exists whole or not at all


def _assemble(cache: Path, n_batches: int, dim: int, computed: int, made: int, seconds: float) -> Extraction:
    parts, errors, keys = [], {}, []
    for n in range(n_batches):
        with np.load(cache / f"batch-{n:06d}.npz") as z:
            vectors, batch_errors = z["vectors"], json.loads(str(z["errors"]))
            batch_keys = json.loads(str(z["keys"])) if "keys" in z else [""] * len(vectors)  # older batch files
        if vectors.shape[1] != dim:
            raise RuntimeError(f"{cache}: batch {n} has dimension {vectors.shape[1]}, expected {dim}; delete it")
        errors.update({len(keys) + i: e for i, e in enumerate(batch_errors) if e})
        parts.append(vectors)
        keys.extend(batch_keys)
    vectors = np.concatenate(parts) if parts else np.zeros((0, dim), np.float32)
    return Extraction(vectors, errors, keys, computed, made, seconds)

