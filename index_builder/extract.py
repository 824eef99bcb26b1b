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
from model_store.preprocess import ImageError, PreprocessSpec, image_to_pixels, load_image_file


# Measured (docs/PERFORMANCE.md, builder): one decoding worker per spare core; batch 16 beats 32 on CPU.
DEFAULT_WORKERS = max(1, min(4, (os.cpu_count() or 2) - 1))
DEFAULT_BATCH_SIZE = 16


class PhotoDataset(Dataset):
    """Item i -> (i, (3,H,W) uint8 pixels, error); a photo that fails gives zeros and the reason."""

    def __init__(self, paths: list[Path], spec: PreprocessSpec):
        self.paths, self.spec = paths, spec

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, np.ndarray, str]:
        try:
            return i, image_to_pixels(load_image_file(self.paths[i]), self.spec), ""
        except ImageError as exc:
            reason = str(exc).removeprefix(f"{self.paths[i]} ")
            return i, np.zeros((3, self.spec.crop, self.spec.crop), np.uint8), f"unreadable image: {reason}"


def _collate(samples: list[tuple[int, np.ndarray, str]]) -> tuple[list[int], np.ndarray, list[str]]:
    ids, arrays, errors = zip(*samples)
    return list(ids), np.stack(arrays), list(errors)


@dataclass
class Extraction:
    vectors: np.ndarray  # (N, D) float32; rows of failed photos are zeros
    errors: dict[int, str]  # photo index -> reason
    computed: int  # photos embedded in this run (the rest came from finished batches)
    seconds: float


def work_key(paths: list[Path], embedder_tag: str, batch_size: int) -> str:
    """Identifies one extraction job: same photos (path, size, mtime), embedder and batching."""
    digest = hashlib.sha256(f"{embedder_tag}|{batch_size}".encode())
    for p in paths:
        st = p.stat() if p.exists() else None
        digest.update(f"|{p}|{st and st.st_size}|{st and st.st_mtime_ns}".encode())
    return digest.hexdigest()[:24]


def extract(paths: list[Path], embedder: Embedder, cache: Path, *, batch_size: int = DEFAULT_BATCH_SIZE,
            workers: int = DEFAULT_WORKERS, progress: bool = True) -> Extraction:
    """Embed every photo; each finished batch is saved in `cache`, and a rerun skips those batches."""
    cache.mkdir(parents=True, exist_ok=True)
    batches = [list(range(s, min(s + batch_size, len(paths)))) for s in range(0, len(paths), batch_size)]
    pending = [b for n, b in enumerate(batches) if not (cache / f"batch-{n:06d}.npz").exists()]
    loader = DataLoader(PhotoDataset(paths, embedder.config.preprocess), batch_sampler=pending,
                        num_workers=workers, collate_fn=_collate, persistent_workers=False)
    start = time.perf_counter()
    bar = tqdm(total=len(paths), initial=len(paths) - sum(map(len, pending)), unit="img",
               desc="embedding", disable=not progress, dynamic_ncols=True)
    with bar:
        for ids, arrays, errors in loader:
            vectors = embedder.embed(arrays)
            vectors[[bool(e) for e in errors]] = 0.0
            _save_batch(cache / f"batch-{ids[0] // batch_size:06d}.npz", vectors, errors)
            bar.update(len(ids))
    seconds = time.perf_counter() - start
    return _assemble(cache, len(batches), embedder.config.dim, sum(map(len, pending)), seconds)


def _save_batch(path: Path, vectors: np.ndarray, errors: list[str]) -> None:
    tmp = path.with_name(f".{path.name}.tmp.npz")
    np.savez(tmp, vectors=vectors, errors=np.asarray(json.dumps(errors)))
    os.replace(tmp, path)  # a batch file exists whole or not at all


def _assemble(cache: Path, n_batches: int, dim: int, computed: int, seconds: float) -> Extraction:
    parts, errors, offset = [], {}, 0
    for n in range(n_batches):
        with np.load(cache / f"batch-{n:06d}.npz") as z:
            vectors, batch_errors = z["vectors"], json.loads(str(z["errors"]))
        if vectors.shape[1] != dim:
            raise RuntimeError(f"{cache}: batch {n} has dimension {vectors.shape[1]}, expected {dim}; delete it")
        errors.update({offset + i: e for i, e in enumerate(batch_errors) if e})
        parts.append(vectors)
        offset += len(vectors)
    vectors = np.concatenate(parts) if parts else np.zeros((0, dim), np.float32)
    return Extraction(vectors, errors, computed, seconds)

