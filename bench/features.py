"""Descriptors of a list of photos for one embedder configuration, cached under bench/out/."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from PIL import Image

from index_builder.cache import EmbeddingCache
from index_builder.extract import extract
from model_store.embedder import Embedder, new_embedder
from model_store.embedder_config import Descriptor

OUT = Path(__file__).resolve().parent / "out"


def embed_paths(paths: list[Path], backbone: str, weights: str = "default", descriptor: Descriptor = "gem",
                batch_size: int = 32, progress: bool = True) -> np.ndarray:
    """(N, D) L2-normalised descriptors; cached by (paths, configuration)."""
    key = hashlib.sha256(f"{backbone}|{weights}|{descriptor}|{'|'.join(map(str, paths))}".encode()).hexdigest()[:16]
    cache = OUT / f"features-{backbone}-{weights}-{descriptor}-{key}.npy"
    if cache.exists():
        return np.load(cache)
    config, net = new_embedder(backbone, weights, descriptor)
    store = EmbeddingCache(f"{backbone}-{weights}-{descriptor}", config.dim, OUT / "embedding-cache")
    result = extract([str(p) for p in paths], Embedder(config, net), store, batch_size=batch_size, workers=1,
                     progress=progress)
    store.close()
    if result.errors:
        raise RuntimeError(f"unreadable photos: {result.errors}")
    np.save(cache, result.vectors)
    return result.vectors


def raw_pixels(paths: list[Path], size: int = 32) -> np.ndarray:
    """(N, size*size*3) L2-normalised raw RGB pixels: the baseline any CNN must beat."""
    rows = [np.asarray(Image.open(p).convert("RGB").resize((size, size)), np.float32).ravel() for p in paths]
    v = np.stack(rows)
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-9)
