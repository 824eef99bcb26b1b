"""Vectors for a build's photos: from the embedding cache where it has them, from the network for the rest.

Photos the cache does not know are read (locally or through fsspec), decoded and preprocessed in DataLoader
workers, a batch at a time, and embedded in this process; each batch's vectors go into the cache at once,
so a killed build resumes where it stopped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from index_builder.build_defaults import CPU_BATCH_SIZE, DEFAULT_WORKERS, GPU_BATCH_SIZE
from index_builder.cache import EmbeddingCache
from index_builder.sources import cheap_keys, read_many
from model_store.embedder import Embedder
from model_store.preprocess import (BUILD_MAX_BYTES, BUILD_MAX_PIXELS, ImageError, PreprocessSpec, decode_image,
                                    image_to_pixels)
from model_store.thumbnails import ensure_thumbnail, photo_key, thumbnail_path



def default_batch_size(gpu: bool) -> int:
    return GPU_BATCH_SIZE if gpu else CPU_BATCH_SIZE

Sample = tuple[int, np.ndarray, str, str, bool]  # index, (3,H,W) uint8 pixels, error, content hash, thumbnail made


class PhotoBatches(Dataset):
    """A list of photo indices -> one Sample per photo. A photo that fails gives zeros and the reason. With
    `thumbnails` (a store folder), each photo not in `no_thumbnail` gets its thumbnail unless the store has it."""

    def __init__(self, sources: list[str] | dict[int, str], spec: PreprocessSpec, thumbnails: Path | None = None,
                 no_thumbnail: frozenset[int] = frozenset()):
        self.sources, self.spec, self.thumbnails, self.no_thumbnail = sources, spec, thumbnails, no_thumbnail

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, batch: list[int]) -> list[Sample]:
        return [self._one(i, data) for i, data in zip(batch, read_many([self.sources[i] for i in batch]))]

    def _one(self, i: int, data: bytes | OSError) -> Sample:
        blank = np.zeros((3, self.spec.crop, self.spec.crop), np.uint8)
        if isinstance(data, OSError):
            return i, blank, f"unreadable photo: {data}", "", False
        try:
            img = decode_image(data, max_bytes=BUILD_MAX_BYTES, max_pixels=BUILD_MAX_PIXELS, name=self.sources[i],
                               spec=self.spec)
        except ImageError as exc:
            return i, blank, f"unreadable image: {str(exc).removeprefix(f'{self.sources[i]} ')}", "", False
        key = photo_key(data)
        made = self.thumbnails is not None and i not in self.no_thumbnail and ensure_thumbnail(key, img, self.thumbnails)
        return i, image_to_pixels(img, self.spec), "", key, made


def _as_is(batch: list[Sample]) -> list[Sample]:
    return batch


@dataclass
class Extraction:
    vectors: np.ndarray  # (N, D) float32; rows of failed photos are zeros
    errors: dict[int, str]  # photo index -> reason
    keys: list[str]  # photo index -> SHA-256 of the photo's bytes ("" when unreadable)
    computed: int  # photos embedded in this run (the others' vectors came from the cache)
    thumbnails_made: int  # thumbnails written in this run (the others were in the store already)
    seconds: float


@dataclass
class Plan:
    """What the cache already holds for a build's photos, and which photos must be read and embedded."""

    cheap: list[str | None]  # photo index -> cheap key
    keys: list[str]  # photo index -> content hash ("" until known)
    vectors: np.ndarray  # (N, D): cached vectors; zeros for the pending photos
    pending: list[int]  # photos to read and embed


def plan(sources: list[str], dim: int, cache: EmbeddingCache, thumbnails: Path | None,
         no_thumbnail: frozenset[int]) -> Plan:
    """A cached photo is reused when its cheap key is known and, if it wants a thumbnail, the store has it."""
    cheap = cheap_keys(sources)
    keys = [k or "" for k in cache.hashes(cheap)]
    vectors = np.zeros((len(sources), dim), np.float32)
    found = cache.fill(keys, vectors)
    pending = []
    for i in range(len(sources)):
        needs_thumbnail = thumbnails is not None and i not in no_thumbnail
        if not found[i] or (needs_thumbnail and not thumbnail_path(keys[i], thumbnails).exists()):
            pending.append(i)
            vectors[i] = 0.0
    return Plan(cheap, keys, vectors, pending)


def extract(sources: list[str], embedder: Embedder, cache: EmbeddingCache, *, batch_size: int = CPU_BATCH_SIZE,
            workers: int = DEFAULT_WORKERS, progress: bool = True, thumbnails: Path | None = None,
            no_thumbnail: frozenset[int] = frozenset()) -> Extraction:
    """A vector for every photo: cached ones are reused; the others are read, embedded and added to the
    cache batch by batch."""
    start = time.perf_counter()
    n = len(sources)
    p = plan(sources, embedder.config.dim, cache, thumbnails, no_thumbnail)
    cheap, keys, vectors, pending = p.cheap, p.keys, p.vectors, p.pending
    errors: dict[int, str] = {}
    made = computed = 0
    batches = [pending[s:s + batch_size] for s in range(0, len(pending), batch_size)]
    loader = DataLoader(PhotoBatches(sources, embedder.config.preprocess, thumbnails, no_thumbnail), sampler=batches,
                        batch_size=None, num_workers=workers, collate_fn=_as_is, persistent_workers=False)
    bar = tqdm(total=n, initial=n - len(pending), unit="img", desc="embedding", disable=not progress,
               dynamic_ncols=True)
    with bar:
        for samples in loader:
            ids, pixels, errs, shas, n_made = zip(*samples)
            good = [j for j, e in enumerate(errs) if not e]
            # a photo read under a new name or date may have content the cache knows
            got = np.zeros((len(good), embedder.config.dim), np.float32)
            new = np.flatnonzero(~cache.fill([shas[j] for j in good], got))
            if len(new):
                got[new] = embedder.embed(np.stack([pixels[good[g]] for g in new]))
                computed += len(new)
            if good:
                cache.put([(cheap[ids[j]], shas[j], got[g]) for g, j in enumerate(good)])
                vectors[[ids[j] for j in good]] = got
            for j, e in enumerate(errs):
                keys[ids[j]] = shas[j]
                if e:
                    errors[ids[j]] = e
            made += sum(n_made)
            bar.update(len(ids))
    return Extraction(vectors, errors, keys, computed, made, time.perf_counter() - start)
