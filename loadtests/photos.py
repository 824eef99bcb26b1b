"""The photos a load test sends: every JPEG, PNG, WebP, GIF or BMP in one folder, read once."""

from __future__ import annotations

import os
from pathlib import Path

PHOTO_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp"}


def photo_paths(folder: Path | str | None = None) -> list[Path]:
    """Each photo in `folder` (default $LOADTEST_PHOTOS, else demo/photos); ValueError saying what to pass when
    there is none."""
    folder = Path(folder or os.environ.get("LOADTEST_PHOTOS", "demo/photos"))
    if not folder.is_dir():
        raise ValueError(f"no folder {folder}: pass --photos DIR or set LOADTEST_PHOTOS (quickstart.sh writes demo/photos)")
    paths = [p for p in sorted(folder.iterdir()) if p.suffix.lower() in PHOTO_SUFFIXES]
    if not paths:
        raise ValueError(f"no photos in {folder}: pass --photos DIR or set LOADTEST_PHOTOS to a folder of JPEG/PNG files")
    return paths


def load_photos(folder: Path | str | None = None) -> list[tuple[str, bytes]]:
    """(name, bytes) of each of photo_paths(folder)."""
    return [(p.name, p.read_bytes()) for p in photo_paths(folder)]
