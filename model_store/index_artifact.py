"""The index artifact: its files, its manifest, its projection and its item table (query/search_index.py reads it)."""

from __future__ import annotations

import contextlib
import datetime as dt
import math
import re
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, Field

from model_store.embedder_config import EmbedderConfig

ANNOY_FILE = "index.ann"
ITEMS_FILE = "items.sqlite"
VECTORS_FILE = "vectors.npy"
PROJECTION_FILE = "projection.npz"
MANIFEST_FILE = "manifest.json"
REPORT_FILE = "bad_rows.csv"
CHUNK = 65_536  # rows projected at a time
# 2: photos carry a thumbnail key and an optional image_url; 3: and the SHA-256 of their bytes (1 and 2 are read)
FORMAT_VERSION = 3
# A sale's date, as catalogues and requests must write it: items.sqlite keeps sold_at as this text, which
# SQLite compares with the date filters' own. pydantic alone also reads a number (seconds since 1970) or a
# midnight time as a date.
ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
# The highest price a catalogue row may hold and a request may filter on, in any currency: a trillion is past
# any sale, and a price of 1e30 (a typo, an exponent) would be an estimate's comparable no filter could reach.
MAX_PRICE = 1e12


class ArtifactError(RuntimeError):
    """An index artifact that is missing, corrupt or inconsistent."""


class Thresholds(BaseModel):
    """Cosine thresholds of /assist and /compare, measured on the catalogue (index_builder/calibrate.py)."""

    duplicate: float = Field(description="a photo at least this similar to a catalogue photo may be a duplicate")
    same: float = Field(description="two photos at least this similar show the same item")
    similar: float = Field(description="two photos at least this similar show alike items (same category)")
    measured: dict[str, Any] = Field(default_factory=dict, description="how each was measured")


class IndexManifest(BaseModel):
    """What an index holds and how it was built; stored as manifest.json and as model metadata."""

    format_version: int = FORMAT_VERSION
    embedder: str
    embedder_config: EmbedderConfig
    dim: int
    projection: Literal["none", "pca", "pca-whiten", "learned"]
    projection_training: dict[str, Any] | None = Field(None, description="figures of a learned projection")
    n_photos: int
    n_items: int
    n_trees: int
    search_k: int
    ann_recall_at_10: float
    ann_query_ms: float
    catalogue: str
    catalogue_sha256: str
    bad_rows: int
    seed: int
    seconds: dict[str, float]
    evaluation: dict[str, Any] | None = None
    thresholds: Thresholds | None = Field(None, description="similarity thresholds measured on this catalogue")
    built_at: dt.datetime

    @classmethod
    def read(cls, folder: Path) -> "IndexManifest":
        """The manifest of the artifact in `folder`; ArtifactError names the file when it is missing or unreadable."""
        try:
            return cls.model_validate_json((Path(folder) / MANIFEST_FILE).read_text())
        except (OSError, ValueError) as exc:
            raise ArtifactError(f"{folder}: unreadable {MANIFEST_FILE} ({exc})") from exc


class Projection:
    """Optional PCA learned at build time: (D,) descriptor -> (d,) L2-normalised vector."""

    def __init__(self, mean: np.ndarray, components: np.ndarray, scale: np.ndarray):
        self.mean, self.components, self.scale = mean, components, scale

    @classmethod
    def fit(cls, vectors: np.ndarray, dim: int, whiten: bool) -> Projection:
        mean = vectors.mean(axis=0)
        _, s, vt = np.linalg.svd(vectors - mean, full_matrices=False)
        std = s[:dim] / math.sqrt(max(len(vectors) - 1, 1))
        scale = 1.0 / np.maximum(std, 1e-6) if whiten else np.ones(dim)
        return cls(mean.astype(np.float32), vt[:dim].astype(np.float32), scale.astype(np.float32))

    def __call__(self, vectors: np.ndarray) -> np.ndarray:
        """(N, D) -> (N, d), in chunks: no temporary copy of a million raw vectors."""
        out = np.empty((len(vectors), len(self.components)), np.float32)
        for s in range(0, len(vectors), CHUNK):
            out[s:s + CHUNK] = normalize(((vectors[s:s + CHUNK] - self.mean) @ self.components.T) * self.scale)
        return out

    def save(self, path: Path) -> None:
        np.savez(path, mean=self.mean, components=self.components, scale=self.scale)

    @classmethod
    def load(cls, path: Path) -> Projection:
        with np.load(path) as z:
            return cls(z["mean"], z["components"], z["scale"])


def normalize(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float32)


def thumbnail_keys(folder: Path) -> set[str]:
    """The thumbnails an artifact's photos point to (none for format 1); ArtifactError when its photo table
    cannot be read."""
    with _photo_table(folder) as (conn, columns):
        if "thumbnail" not in columns:
            return set()
        return {k for (k,) in conn.execute("SELECT DISTINCT thumbnail FROM photos WHERE thumbnail IS NOT NULL")}


@contextlib.contextmanager
def _photo_table(folder: Path) -> Iterator[tuple[sqlite3.Connection, set[str]]]:
    """The artifact's item table, read only, and its photo table's columns; ArtifactError when unreadable."""
    try:
        conn = sqlite3.connect(f"file:{folder / ITEMS_FILE}?mode=ro", uri=True)
        try:
            columns = {row[1] for row in conn.execute("PRAGMA table_info(photos)")}
            if not columns:
                raise ArtifactError(f"{folder / ITEMS_FILE} has no photo table")
            yield conn, columns
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise ArtifactError(f"{folder / ITEMS_FILE} cannot be read: {exc}") from None


def photo_hashes(folder: Path) -> set[str] | None:
    """The SHA-256 of every photo an artifact holds (what its embedder's cache must keep), or None when the
    artifact does not record them all (formats 1 and 2 know only the photos that have a thumbnail);
    ArtifactError when its photo table cannot be read."""
    with _photo_table(folder) as (conn, columns):
        if "content" in columns:
            return {k for (k,) in conn.execute("SELECT DISTINCT content FROM photos")}
        if "thumbnail" not in columns or conn.execute("SELECT 1 FROM photos WHERE thumbnail IS NULL LIMIT 1").fetchone():
            return None
        return {k for (k,) in conn.execute("SELECT DISTINCT thumbnail FROM photos")}


def write_items_db(path: Path, photos: list[tuple[int, str, str, str | None, str | None, str]],
                   items: list[tuple]) -> None:
    """photos: (annoy_id, item_id, image_path, thumbnail key or None, image_url or None, SHA-256 of the bytes);
    items: (item_id, title, category, price, currency, sold_at)."""
    conn = sqlite3.connect(path)
    with conn:
        conn.executescript("""
            CREATE TABLE items (item_id TEXT PRIMARY KEY, title TEXT NOT NULL, category TEXT NOT NULL,
                                price REAL NOT NULL, currency TEXT NOT NULL, sold_at TEXT NOT NULL);
            CREATE TABLE photos (annoy_id INTEGER PRIMARY KEY, item_id TEXT NOT NULL REFERENCES items,
                                 image_path TEXT NOT NULL, thumbnail TEXT, image_url TEXT,
                                 content TEXT NOT NULL);
            CREATE INDEX items_category ON items(lower(category));
            CREATE INDEX items_price ON items(price);
            CREATE INDEX items_sold_at ON items(sold_at);
            CREATE INDEX photos_item ON photos(item_id);
            CREATE INDEX photos_thumbnail ON photos(thumbnail);
        """)
        conn.executemany("INSERT INTO items VALUES (?,?,?,?,?,?)", items)
        conn.executemany("INSERT INTO photos VALUES (?,?,?,?,?,?)", photos)
    conn.close()
