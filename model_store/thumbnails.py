"""Catalogue thumbnails in a content-addressed store that every index version shares.

A thumbnail is named by the SHA-256 of its photo's bytes, so a rebuild finds the thumbnails of unchanged
photos already there (nothing remade, nothing copied), and a name can never point outside the store.

On a living catalogue photos are replaced and versions deleted, and the thumbnails no version points to any
more stay behind (15 KB each: 150 MB a night where 10,000 photos change). `prune` deletes them. It keeps
the thumbnail of every photo of every index version in the store, so any version a stage could roll back to
keeps its photos. Builds and prunes exclude each other through model_store/build_lock.py.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from model_store.build_lock import pruning
from model_store.index_artifact import ArtifactError, thumbnail_keys
from model_store.registry import bentoml_home, list_models
from model_store.settings import INDEX_MODEL

THUMBNAIL_SIDE = 320  # longest side, pixels: two columns of results on a phone at 2x density
THUMBNAIL_QUALITY = 80  # WebP quality: bytes per photo in docs/PERFORMANCE.md
MEDIA_TYPE = "image/webp"
SUFFIX = ".webp"
KEY = re.compile(r"^[0-9a-f]{64}$")
STALE_TMP_S = 3600  # a half-written thumbnail this old belongs to a writer that was killed


def store_dir() -> Path:
    """$BENTOML_HOME/thumbnails, beside the model store it serves."""
    return bentoml_home() / "thumbnails"


def photo_key(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def thumbnail_path(key: str, root: Path | None = None) -> Path:
    """Where the thumbnail of photo `key` lives; ValueError for anything but a SHA-256 hex name."""
    if not KEY.match(key):
        raise ValueError(f"not a thumbnail name: {key!r}")
    return (root or store_dir()) / key[:2] / f"{key}{SUFFIX}"


def ensure_thumbnail(key: str, img: Image.Image, root: Path | None = None) -> bool:
    """Write the thumbnail of `img` under `key` unless it is there; True when it was made now.
    Written to a temporary name and renamed, so a reader never sees half a file."""
    path = thumbnail_path(key, root)
    if path.exists():
        return False
    small = img.copy()
    small.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE), Image.Resampling.LANCZOS, reducing_gap=3.0)
    buf = io.BytesIO()
    small.save(buf, "WEBP", quality=THUMBNAIL_QUALITY, method=4)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{uuid.uuid4().hex}.tmp")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, path)
    return True


def store_size(root: Path | None = None) -> tuple[int, int]:
    """(thumbnails, bytes) in the store."""
    counted = _usage(root or store_dir(), keep=set(), versions=0)  # the walk a prune makes, deleting nothing
    return counted.thumbnails, counted.bytes


@dataclass
class Usage:
    thumbnails: int
    bytes: int
    unused: int  # thumbnails no stored index version points to
    unused_bytes: int
    versions: int  # index versions whose photos were looked at


def usage(root: Path | None = None) -> Usage:
    """What the store holds, and how much of it no stored index version uses."""
    keep, versions = used_keys()
    return _usage(root or store_dir(), keep, versions)


def prune(root: Path | None = None) -> Usage:
    """Delete every thumbnail no stored index version points to (and half-written files of killed writers);
    returns what was deleted. StoreBusy while a build runs; ArtifactError for a version whose photos
    cannot be read (its thumbnails cannot be told apart, so nothing is deleted)."""
    root = root or store_dir()
    with pruning("thumbnail store"):
        keep, versions = used_keys()  # read under the lock: every version registered before it is counted
        gone = _usage(root, keep, versions, delete=True)
        for tmp in root.glob("*/.*.tmp"):
            if time.time() - tmp.stat().st_mtime > STALE_TMP_S:
                tmp.unlink(missing_ok=True)
    return gone


def used_keys() -> tuple[set[str], int]:
    """The thumbnails the photos of every stored index version point to, and how many versions there are."""
    keep: set[str] = set()
    models = list_models(INDEX_MODEL)
    for model in models:
        try:
            keep |= thumbnail_keys(Path(model.path))
        except ArtifactError as exc:
            raise ArtifactError(f"{model.tag}: {exc}. Its thumbnails cannot be told from unused ones, so none are "
                                f"deleted: delete the version (python -m model_store delete {model.tag}) or "
                                "restore it, then prune again") from None
    return keep, len(models)


def _usage(root: Path, keep: set[str], versions: int, delete: bool = False) -> Usage:
    n = total = unused = unused_bytes = 0
    for path in root.glob(f"*/*{SUFFIX}"):
        size = path.stat().st_size
        n, total = n + 1, total + size
        if path.stem not in keep:
            unused, unused_bytes = unused + 1, unused_bytes + size
            if delete:
                path.unlink(missing_ok=True)
    return Usage(n, total, unused, unused_bytes, versions)
