"""The embedding cache: one vector per (photo content, embedder), kept across builds in LMDB.

A build asks it first and embeds only photos it has never embedded with that embedder. Each embedder has
its own LMDB environment under $BENTOML_HOME/embedding-cache/ with three tables:
- vectors: SHA-256 of the photo's bytes -> the embedder's descriptor (float32 bytes);
- seen: a cheap key of the photo as it was read (local: path, size and mtime; remote: URL and ETag, or size
  and Last-Modified) -> that SHA-256, so an unchanged photo is neither read nor hashed again;
- unregistered: the SHA-256 of each vector written since a build of this embedder last registered a version.
Written one transaction per batch as the build goes: a killed build resumes from what it wrote.

On a living catalogue photos are replaced, and the vectors of the old ones stay (~8.5 KB each on disk with
the default embedder). `prune` deletes what no stored index version holds: whole caches of embedders no
version uses, and in the others the vectors of photos no version of that embedder holds (the next builds
reuse their space; a prune that frees a tenth of a file or more compacts it). Only versions that record
every photo's content hash (format 3) can be pruned that way; a store with an older version of an embedder
keeps that embedder's cache whole and says which version. A prune keeps what a killed or failed build wrote
(the unregistered vectors) for its rerun, until a build of that embedder registers a version: hours of
embedding are not lost to a prune between a build that died and the one that resumes it.
"""

from __future__ import annotations

import errno
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import lmdb
import numpy as np

from model_store.build_lock import pruning
from model_store.index_artifact import ArtifactError, photo_hashes
from model_store.registry import bentoml_home, list_models
from model_store.settings import EMBEDDER_MODEL, INDEX_MODEL

MAP_SIZE = 1 << 40  # address space, not disk: LMDB files grow as they are written
VECTORS, SEEN, UNREGISTERED = b"vectors", b"seen", b"unregistered"  # its tables
MAX_DBS = 3
DELETES_PER_TXN = 10_000  # a write transaction holds its dirty pages in memory: prune in steps
# A prune compacts the file when it deletes at least this share of its vectors. Below, the freed pages are left
# for the next builds to fill (a nightly prune stops the growth without copying 8.5 GB a night at a million).
COMPACT_SHARE = 0.1


def cache_root() -> Path:
    return bentoml_home() / "embedding-cache"


class UnknownCache(ValueError):
    """A --keep naming no embedder: neither a cache nor a stored embedder of that name."""


def _folder(embedder_tag: str, root: Path | None) -> Path:
    return (root or cache_root()) / embedder_tag.replace(":", "-")


@dataclass(frozen=True)
class CacheUse:
    """One embedder's cache: `unused` vectors of its `vectors` belong to no stored index version and to no build
    that may be rerun (None when that is not known: `why` says so); `whole`: no stored version uses the
    embedder at all, nor did a build that registered nothing."""

    embedder: str  # the folder's name: the tag with - for :
    vectors: int
    bytes: int
    unused: int | None
    why: str = ""
    whole: bool = False
    missing: bool = False  # named by --keep, a stored embedder with no cache (none yet, or pruned before)
    bytes_after: int | None = None  # on disk after a prune (None: deleted, or not pruned)
    unregistered: int = 0  # vectors no version holds, kept for the rerun of a build that registered nothing
    compacted: bool = False


class EmbeddingCache:
    """The cache of one embedder (its tag names it); vectors have `dim` float32 numbers."""

    def __init__(self, embedder_tag: str, dim: int, root: Path | None = None):
        self.embedder, self.dim = embedder_tag, dim
        self.folder = _folder(embedder_tag, root)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.env = lmdb.open(str(self.folder), map_size=MAP_SIZE, max_dbs=MAX_DBS)
        self.vectors = self.env.open_db(VECTORS)
        self.seen = self.env.open_db(SEEN)
        self.unregistered = self.env.open_db(UNREGISTERED)

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
                    txn.put(sha.encode(), b"", db=self.unregistered)
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


def registered(embedder_tag: str, root: Path | None = None) -> None:
    """A build of this embedder registered a version: what builds wrote before it is no longer kept for a
    rerun (the version holds what it used; a prune may delete the rest). Where that cannot be written (a full
    disk), the version stays registered and a warning says what a prune keeps."""
    try:
        env = lmdb.open(str(_folder(embedder_tag, root)), map_size=MAP_SIZE, max_dbs=MAX_DBS)
        try:
            with env.begin(write=True) as txn:
                txn.drop(env.open_db(UNREGISTERED, txn=txn), delete=False)
        finally:
            env.close()
    except lmdb.Error as exc:
        print(f"warning: the embedding cache could not record that a version was registered ({exc}): a prune "
              "keeps this embedder's vectors no version holds until the next build registers one", file=sys.stderr)


def usage(keep_embedders: frozenset[str] = frozenset(), root: Path | None = None) -> list[CacheUse]:
    """Every embedder's cache, and how much of it no stored index version uses."""
    return _walk(root or cache_root(), used_hashes(), keep_embedders, delete=False)


def prune(keep_embedders: frozenset[str] = frozenset(), root: Path | None = None) -> list[CacheUse]:
    """Delete the caches of embedders no stored index uses (unless in `keep_embedders`: tags) and, in the others,
    the vectors of photos no stored version holds (compacting a file when that frees a tenth of it). Returns
    what each held before and what was deleted.
    StoreBusy while a build runs: its vectors are in no version yet."""
    with pruning("embedding cache"):
        return _walk(root or cache_root(), used_hashes(), keep_embedders, delete=True)


def used_hashes() -> dict[str, set[str] | str]:
    """Embedder tag -> the SHA-256 of every photo its stored index versions hold, or why that is not known."""
    used: dict[str, set[str] | str] = {}
    for model in list_models(INDEX_MODEL):
        tag = model.info.labels.get("embedder", "")
        if isinstance(used.get(tag), str):
            continue
        try:
            hashes = photo_hashes(Path(model.path))
        except ArtifactError as exc:
            used[tag] = f"{model.tag}: {exc}"
            continue
        if hashes is None:
            used[tag] = (f"{model.tag} does not record all its photos (built before 2026-12-05): rebuild its "
                         "catalogue or delete it")
        else:
            used.setdefault(tag, set()).update(hashes)  # type: ignore[union-attr]
    return used


def _walk(root: Path, used: dict[str, set[str] | str], keep_embedders: frozenset[str], delete: bool) -> list[CacheUse]:
    caches = sorted(p for p in root.glob("*") if (p / "data.mdb").exists())
    kept = {_folder(t, root).name for t in keep_embedders}
    missing = sorted(kept - {p.name for p in caches})
    stored = {_folder(str(m.tag), root).name for m in list_models(EMBEDDER_MODEL)} if missing else set()
    if unknown := [name for name in missing if name not in stored]:  # a typo must not let a prune delete what it meant
        raise UnknownCache(f"--keep {unknown[0]}: no embedder has a cache of that name in {root}, nor is one of "
                           f"that name stored; the caches are {', '.join(p.name for p in caches) or 'none'}")
    hashes = {_folder(t, root).name: h for t, h in used.items() if t}
    # a nightly --keep of a stored embedder whose cache no build has written yet (or a prune deleted) keeps nothing
    out = [CacheUse(name, 0, 0, unused=None, missing=True) for name in missing]
    for folder in caches:
        size = disk_bytes(folder)
        need = "kept with --keep" if folder.name in kept else hashes.get(folder.name)
        if need is None and entries(folder, UNREGISTERED):  # no version yet, but a killed first build's vectors
            need = set()
        if need is None:  # no stored version uses this embedder
            out.append(CacheUse(folder.name, entries(folder, VECTORS), size, unused=None, whole=True))
            if delete:
                shutil.rmtree(folder)
        elif isinstance(need, set):
            out.append(_drop_unused(folder, {h.encode() for h in need}, size, delete))
        else:
            out.append(CacheUse(folder.name, entries(folder, VECTORS), size, unused=None, why=need))
    return out


def disk_bytes(folder: Path) -> int:
    """What one embedder's cache takes on disk."""
    return sum(f.stat().st_size for f in folder.iterdir())


def entries(folder: Path, db: bytes) -> int:
    """How many entries table `db` of the cache in `folder` holds (0 for a cache written before it existed)."""
    env = lmdb.open(str(folder), readonly=True, max_dbs=MAX_DBS, lock=False)
    try:
        with env.begin() as txn:
            return txn.stat(env.open_db(db, txn=txn, create=False))["entries"]
    except lmdb.Error:
        return 0
    finally:
        env.close()


def _drop_unused(folder: Path, keep: set[bytes], size: int, delete: bool) -> CacheUse:
    """Count (and with `delete`, delete) the vectors whose hash is not in `keep` nor unregistered (a killed or
    failed build's, kept for its rerun), and the cheap keys that point to them; then compact the file (LMDB
    never shrinks it by itself) if that freed COMPACT_SHARE of it."""
    env = lmdb.open(str(folder), map_size=MAP_SIZE, max_dbs=MAX_DBS, readonly=not delete)
    compacted = False
    try:
        vectors, seen = env.open_db(VECTORS), env.open_db(SEEN)
        with env.begin() as txn:
            total = txn.stat(vectors)["entries"]
            held = _keys(env, txn, UNREGISTERED)
            unused = [k for k in txn.cursor(vectors).iternext(keys=True, values=False) if k not in keep]
            gone = [k for k in unused if k not in held]
            stale = [k for k, sha in txn.cursor(seen).iternext() if sha not in keep and sha not in held]
        if delete and (gone or stale):
            for db, keys in ((vectors, gone), (seen, stale)):
                for s in range(0, len(keys), DELETES_PER_TXN):
                    with env.begin(write=True, db=db) as txn:
                        for k in keys[s:s + DELETES_PER_TXN]:
                            txn.delete(k)
            compacted = len(gone) >= COMPACT_SHARE * total and _compact(env, folder)
    finally:
        env.close()
    after = disk_bytes(folder) if delete else None
    return CacheUse(folder.name, total, size, unused=len(gone), unregistered=len(unused) - len(gone),
                    bytes_after=after, compacted=compacted)


def _keys(env: lmdb.Environment, txn: lmdb.Transaction, db: bytes) -> set[bytes]:
    """The keys of table `db` (none in a cache written before it existed)."""
    try:
        table = env.open_db(db, txn=txn, create=False)
    except lmdb.NotFoundError:
        return set()
    return set(txn.cursor(table).iternext(keys=True, values=False))


def _compact(env: lmdb.Environment, folder: Path) -> bool:
    """Copy the live pages to a new file and put it in place (no build runs: the prune holds the lock). On a
    disk too full for the copy the file stays as it is, its free pages reused by the next builds."""
    tmp = folder.with_name(f".{folder.name}.compacting")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        env.copy(str(tmp), compact=True)
    except lmdb.Error as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        print(f"{folder.name}: not compacted ({exc}); its free pages are reused by the next builds", file=sys.stderr)
        return False
    env.close()
    os.replace(tmp / "data.mdb", folder / "data.mdb")
    (folder / "lock.mdb").unlink(missing_ok=True)  # LMDB makes a new one at the next open
    tmp.rmdir()
    return True
