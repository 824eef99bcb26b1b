"""Uploaded photos -> the uint8 pixels the embedder takes; a photo that cannot be used is a 413 or 415 that
names its field."""

from __future__ import annotations

from http import HTTPStatus
from pathlib import Path

import numpy as np

from model_store.preprocess import (UPLOAD_FORMATS, ImageError, ImageTooLarge, PreprocessSpec, decode_image,
                                    image_to_pixels)
from model_store.settings import Settings
from query.errors import ApiError


def field_names(count: int) -> list[str]:
    """The fields of `count` photos of one request, as errors name them: "image", or "images[0]", ..."""
    return ["image"] if count == 1 else [f"images[{i}]" for i in range(count)]


def upload_pixels(path: Path, name: str, spec: PreprocessSpec, s: Settings) -> np.ndarray:
    """(3, H, W) uint8 pixels of the photo uploaded as `name` (a field, "more_images[1]" for one of a list),
    resized and cropped as `spec` says, within the upload limits of `s`."""
    field = name.split("[")[0]
    try:
        img = decode_image(path.read_bytes(), max_bytes=s.max_image_bytes, max_pixels=s.max_image_pixels, name=name,
                           spec=spec, min_bytes_per_mp=s.min_image_bytes_per_megapixel, formats=UPLOAD_FORMATS)
    except ImageTooLarge as exc:
        raise ApiError(str(exc), HTTPStatus.REQUEST_ENTITY_TOO_LARGE, field) from None
    except ImageError as exc:
        raise ApiError(str(exc), HTTPStatus.UNSUPPORTED_MEDIA_TYPE, field) from None
    return image_to_pixels(img, spec)
