"""Catalogue thumbnails in a content-addressed store that every index version shares.

A thumbnail is named by the SHA-256 of its photo's bytes, so a rebuild finds the thumbnails of unchanged
photos already there (nothing remade, nothing copied), and a name can never point outside the store.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import uuid
from pathlib import Path

from PIL import Image

from model_store.registry import bentoml_home

THUMBNAIL_SIDE = 320  # longest side, pixels: two columns of results on a phone at 2x density
THUMBNAIL_QUALITY = 80  # WebP quality: bytes per photo in docs/PERFORMANCE.md
MEDIA_TYPE = "image/webp"
SUFFIX = ".webp"
KEY = re.compile(r"^[0-9a-f]{64}$")


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
    files = [p for p in (root or store_dir()).glob(f"*/*{SUFFIX}")]
    return len(files), sum(p.stat().st_size for p in files)
