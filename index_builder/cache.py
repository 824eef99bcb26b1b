"""The embedding cache: one vector per (photo content, embedder), kept across builds in LMDB.

A build asks it first and embeds only photos it has never embedded with that embedder. Each embedder has
its own LMDB environment under $BENTOML_HOME/embedding-cache/ with two tables:
- vectors: SHA-256 of the photo's bytes -> the embedder's descriptor (float32 bytes);
- seen: a cheap key of the photo as it was read (local: path, size and mtime; remote: URL and ETag, or size
  and Last-Modified) -> that SHA-256, so an unchanged photo is neither read nor hashed again.
Written one transaction per batch as the build goes: a killed build resumes from what it wrote.
"""

from __future__ import annotations

import errno
import shutil
from dataclasses import dataclass
from pathlib import Path

import lmdb
import numpy as np

from model_store.registry import bentoml_home

MAP_SIZE = 1 << 40  # address space, not disk: LMDB files grow as they are written


def cache_root() -> Path:
    return bentoml_home() / "embedding-cache"


def _folder(embedder_tag: str, root: Path | None) -> Path:
    return (root or cache_root()) / embedder_tag.replace(":", "-")


@dataclass(frozen=True)
class CacheSize:
    embedder: str
    vectors: int
    bytes: int


class EmbeddingCache:
    """The cache of one embedder (its tag names it); vectors have `dim` float32 numbers."""

    def __init__(self, embedder_tag: str, dim: int, root: Path | None = None):
        self.embedder, self.dim = embedder_tag, dim
        self.folder = _folder(embedder_tag, root)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.env = lmdb.open(str(self.folder), map_size=MAP_SIZE, max_dbs=2)
        self.vectors = self.env.open_db(b"vectors")
        self.seen = self.env.open_db(b"seen")

    def close(self) -> None:
        self.env.close()

    def hashes(self, cheap_keys: list[str | None]) -> list[str | None]:
        """The content hash recorded for each cheap key (None: never seen, or no key)."""
        with self.env.begin(db=self.seen) as txn:
            return [(v.decode() if (v := txn.get(k.encode())) else None) if k else None for k in cheap_keys]

    def fill(self, hashes: list[str], out: np.ndarray) -> np.ndarray:
        """Write the cached vector of each hash into its row of `out` (N, dim); returns which rows were found.
        No vector is held twice: at a million photos the matrix alone is 5 GB."""
        found = np.zeros(len(hashes), bool)
        with self.env.begin(db=self.vectors) as txn:
            for i, h in enumerate(hashes):
                raw = txn.get(h.encode()) if h else None
                if raw is not None and len(raw) == 4 * self.dim:
                    out[i] = np.frombuffer(raw, np.float32)
                    found[i] = True
        return found

    def put(self, entries: list[tuple[str | None, str, np.ndarray]]) -> None:
        """(cheap key or None, content hash, vector) for each photo of a batch, in one transaction."""
        try:
            with self.env.begin(write=True) as txn:
                for cheap, sha, vector in entries:
                    txn.put(sha.encode(), np.ascontiguousarray(vector, np.float32).tobytes(), db=self.vectors)
                    if cheap:
                        txn.put(cheap.encode(), sha.encode(), db=self.seen)
        except lmdb.Error as exc:  # LMDB reports a full disk as an I/O error: say which it was
            full = shutil.disk_usage(self.folder).free < 64 * 1024 * 1024
            raise OSError(errno.ENOSPC if full else errno.EIO,
                          "No space left on device" if full else f"embedding cache write failed ({exc})",
                          str(self.folder)) from exc

    def forget(self, cheap_keys: list[str], hashes: list[str]) -> None:
        """Remove these photos' entries (benchmarks use it to embed the same photos again)."""
        with self.env.begin(write=True) as txn:
            for k in cheap_keys:
                txn.delete(k.encode(), db=self.seen)
            for h in hashes:
                txn.delete(h.encode(), db=self.vectors)

    def __len__(self) -> int:
        with self.env.begin(db=self.vectors) as txn:
            return txn.stat(self.vectors)["entries"]


def sizes(root: Path | None = None) -> list[CacheSize]:
    """Every embedder's cache: vectors held and bytes on disk."""
    out = []
    for folder in sorted((root or cache_root()).glob("*")):
        if not (folder / "data.mdb").exists():
            continue
        env = lmdb.open(str(folder), readonly=True, max_dbs=2, lock=False)
        try:
            with env.begin() as txn:
                entries = txn.stat(env.open_db(b"vectors", txn=txn, create=False))["entries"]
        except lmdb.Error:
            entries = 0
        finally:
            env.close()
        out.append(CacheSize(folder.name, entries, sum(f.stat().st_size for f in folder.iterdir())))
    return out


def prune(keep: set[str], root: Path | None = None) -> list[CacheSize]:
    """Delete the caches of embedders not in `keep` (tags); returns what was deleted."""
    kept = {t.replace(":", "-") for t in keep}
    gone = [s for s in sizes(root) if s.embedder not in kept]
    for s in gone:
        shutil.rmtree((root or cache_root()) / s.embedder)
    return gone
