"""Photo decoding and preprocessing shared by the builder and the service, so one photo gives one vector."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pillow_heif
from PIL import Image, ImageOps
from pydantic import BaseModel

# iPhones save photos as HEIC unless told otherwise, and photos copied off one keep that format: pillow-heif
# teaches Pillow to read HEIC and HEIF (Pillow reads AVIF itself). Registered on import, so the builder's
# processes, Ray's workers and the service read the same formats.
pillow_heif.register_heif_opener()

# Transparent areas become white: listing photos are usually shot on light backdrops.
BACKGROUND = (255, 255, 255)
# Limits when building from the catalogue's own photos (uploads have IMAGESEARCH_MAX_IMAGE_BYTES/_PIXELS).
BUILD_MAX_BYTES, BUILD_MAX_PIXELS = 1 << 30, 200_000_000


class ImageError(ValueError):
    """A photo that cannot be used; the message says why and what to do."""


class ImageTooLarge(ImageError):
    """A photo over the byte or pixel limit (or a decompression bomb)."""


class PreprocessSpec(BaseModel):
    """How a photo becomes a network input: resize the short side, centre-crop, normalise."""

    resize: int = 224
    crop: int = 224
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)


# What Pillow opens as JPEG: a JPEG, or an MPO, a JPEG with more pictures after the first in the same file, as
# phones write an HDR gain map or a depth map (Apple's and Android's Ultra HDR JPEGs). Each first picture is an
# ordinary JPEG, which libjpeg can decode at a fraction of its size.
JPEG_FORMATS = ("JPEG", "MPO")


# The formats the service decodes from an upload: what phones, cameras, scanners and browsers save ("JPEG" opens
# MPO files too). Pillow reads some 35 more (PSD, EPS, FITS, JPEG 2000, ...): decoders anyone on the internet
# could reach, for no buyer's photo. The builder reads the operator's own files in any of them.
UPLOAD_FORMATS = ("JPEG", "PNG", "WEBP", "HEIF", "AVIF", "GIF", "TIFF", "BMP")
UPLOAD_FORMAT_NAMES = "JPEG, PNG, WebP, HEIC, AVIF, GIF, TIFF or BMP"
SEND_AN_UPLOAD = f"upload a {UPLOAD_FORMAT_NAMES} photo"  # what an unreadable or empty upload is asked for


def upload_px(spec: PreprocessSpec) -> int:
    """The short side an upload needs: twice what the network sees. decode_image reads such a JPEG at half
    scale and the resize then averages each output pixel over several; more pixels are decoded only to be
    thrown away (a 1600x1200 phone JPEG is ~10x the bytes and ~7x the decoding time, docs/PERFORMANCE.md)."""
    return 2 * spec.resize


def as_page_sends(data: bytes, short_side: int) -> bytes:
    """A photo as the search page uploads it (query/static/app.js, prepareUpload): downscaled to a short side of
    `short_side` (upload_px) and re-encoded as JPEG at quality 90, or as it is when it is no larger and a
    JPEG, PNG or WebP. Load tests and benchmarks send what the page sends."""
    img = Image.open(io.BytesIO(data))
    scale = short_side / min(img.size)
    if scale >= 1 and img.format in (*JPEG_FORMATS, "PNG", "WEBP"):
        return data
    img = img.convert("RGB")
    if scale < 1:
        img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def decode_image(data: bytes, *, max_bytes: int, max_pixels: int, name: str = "image",
                 spec: PreprocessSpec | None = None, min_bytes_per_mp: int = 0,
                 formats: tuple[str, ...] | None = None) -> Image.Image:
    """Bytes of any format Pillow reads -> RGB image; raises ImageError with the reason. With the `spec` the
    pixels are for, a JPEG is decoded at the smallest scale libjpeg offers (1/2, 1/4, 1/8) whose short side
    still reaches spec.resize: a 12-megapixel phone photo decodes in a fraction of the time, and builder and
    service, passing the same spec, get the same pixels. `min_bytes_per_mp`: see _check_density. `formats`:
    the only formats read (None: any Pillow reads)."""
    if not data:
        raise ImageError(f"{name} is empty (0 bytes): {_what_to_send(formats)}")
    smaller = _smaller(formats)
    if len(data) > max_bytes:
        raise ImageTooLarge(f"{name} is {len(data):,} bytes; the limit is {max_bytes:,}: {smaller}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=formats)
            _check_pixels(img, max_pixels, name, smaller)
            _check_density(img, len(data), min_bytes_per_mp, name)
            if spec is not None and img.format in JPEG_FORMATS:
                img.draft(None, (spec.resize, spec.resize))
            img.load()  # decode now, so truncated files fail here and not later
            return to_rgb(img)  # its EXIF too is read from the file
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLarge(f"{name} is a decompression bomb ({exc}): {smaller}") from exc
    except Image.UnidentifiedImageError as exc:
        if formats is not None:
            raise ImageError(f"{name} is not an image in a format the service reads: {SEND_AN_UPLOAD}") from exc
        raise ImageError(f"{name} is not an image Pillow can read: {_what_to_send(formats)}") from exc
    except Exception as exc:  # noqa: BLE001 -- any decoder's error is a bad file; AVIF's is a RuntimeError
        expected = isinstance(exc, (OSError, SyntaxError, ValueError))  # what Pillow raises for a broken file
        reason = str(exc) if expected else f"{type(exc).__name__}: {str(exc)[:200]}"
        raise ImageError(f"{name} could not be decoded ({reason}): the file is truncated or corrupt") from exc


def _what_to_send(formats: tuple[str, ...] | None) -> str:
    """What an error about an unreadable file asks for: a client of the service (reading `formats`) sends a
    photo in one of them; an operator's build (any format) gets the file converted."""
    return "save it as a JPEG or PNG photo" if formats is None else SEND_AN_UPLOAD


def _smaller(formats: tuple[str, ...] | None) -> str:
    """What an error about a file over the limits asks for: a client sends a smaller photo; an operator's build
    is told to save a smaller copy of its file."""
    return "save a smaller copy of the photo" if formats is None else "send a smaller photo"


def load_image_file(path: Path, *, max_bytes: int = BUILD_MAX_BYTES, max_pixels: int = BUILD_MAX_PIXELS,
                    spec: PreprocessSpec | None = None) -> Image.Image:
    """Path -> RGB image (see decode_image for `spec`); raises ImageError naming the file."""
    data = read_photo_file(path)
    return decode_image(data, max_bytes=max_bytes, max_pixels=max_pixels, name=str(path), spec=spec)


def read_photo_file(path: Path) -> bytes:
    """The file's bytes; raises ImageError naming the file."""
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ImageError(f"{path}: cannot read file ({exc.strerror or exc})") from exc


def _check_pixels(img: Image.Image, max_pixels: int, name: str, smaller: str) -> None:
    pixels = img.width * img.height
    if pixels > max_pixels:
        raise ImageTooLarge(
            f"{name} is {img.width}x{img.height} = {pixels:,} pixels; the limit is {max_pixels:,}: {smaller}"
        )


# Below this many pixels a whole decode is cheap (~20 ms on a 2-core VM): any file is let through.
DENSITY_FROM_PIXELS = 2_000_000


def _check_density(img: Image.Image, size: int, min_bytes_per_mp: int, name: str) -> None:
    """Refuse a file of too few bytes for its pixels in a format decoded whole (all but JPEG): such a file holds
    one colour, not a photo, and costs as much to decode as a real photo of megabytes."""
    pixels = img.width * img.height
    least = pixels * min_bytes_per_mp // 1_000_000
    if img.format in JPEG_FORMATS or pixels <= DENSITY_FROM_PIXELS or size >= least:
        return
    raise ImageTooLarge(f"{name} is a {img.width}x{img.height} {img.format} image in only {size:,} bytes (a photo "
                        f"that size takes {least:,} or more): it holds no photo, yet would take as long to decode as "
                        "one; send the photo as the camera saved it")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any mode (L, P, RGBA, CMYK, I;16, F...) -> upright 8-bit RGB; animated images give frame 0, the one
    Image.open reads (asking for n_frames would read every frame's header: 0.6 s for a 4.6 MB GIF of 200,000
    frames)."""
    ImageOps.exif_transpose(img, in_place=True)  # in place: no copy of a photo already upright
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        img = _high_bit_depth_to_l(img)
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img if img.mode == "RGBA" else img.convert("RGBA")
        canvas = Image.new("RGB", img.size, BACKGROUND)
        canvas.paste(rgba, mask=rgba)  # an RGBA mask is its alpha band, without a copy of it
        return canvas
    return img if img.mode == "RGB" else img.convert("RGB")  # convert would copy an RGB image


# 16-bit level -> 8-bit level, floor(x * 255 / 65535): a table, where arithmetic in float64 over a 40-megapixel
# photo took 1.8 s and 1 GB of temporaries (a 75 KB upload), for the same levels.
_SIXTEEN_TO_EIGHT_BITS = (np.arange(65536, dtype=np.uint32) * 255 // 65535).astype(np.uint8)


def _high_bit_depth_to_l(img: Image.Image) -> Image.Image:
    """16-bit, 32-bit or float greyscale -> 8-bit L. 16-bit is scaled by its full range; 32-bit integers and
    floats, whose range no file says, by their brightest value, a float image in 0-1 as it is (a float TIFF
    of 0-255 levels had been read as 0-1: white)."""
    if img.mode.startswith("I;16"):
        return Image.fromarray(_SIXTEEN_TO_EIGHT_BITS[np.asarray(img)])
    arr = np.array(img, dtype=np.float64)  # a copy of its own, changed in place: one image-sized array, not four
    odd = ~np.isfinite(arr)
    brightest = odd & (arr > 0)  # +inf; NaN and -inf become black
    arr[odd] = 0.0
    top = max(arr.max(), 1.0)
    arr[brightest] = top
    arr *= 255.0 / top
    return Image.fromarray(np.clip(arr, 0, 255, out=arr).astype(np.uint8))


def image_to_pixels(img: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """RGB image -> uint8 array (3, crop, crop): the short side resized to spec.resize and the centre
    cropped; the embedder normalises it (a quarter of the bytes of float32 between processes, and on the way
    to a GPU). Only the part of the photo the crop keeps is resampled: the pixels of resizing the whole photo
    and cropping it, at a cost bounded by the crop, where the whole of a 1x20000 strip resized to a short
    side of 260 would be 260x5,200,000 pixels (4 GB)."""
    w, h = img.size
    scale = spec.resize / min(w, h)
    size = (max(spec.crop, round(w * scale)), max(spec.crop, round(h * scale)))
    left, top = (size[0] - spec.crop) // 2, (size[1] - spec.crop) // 2
    to_source_x, to_source_y = w / size[0], h / size[1]
    box = (left * to_source_x, top * to_source_y, (left + spec.crop) * to_source_x, (top + spec.crop) * to_source_y)
    img = img.resize((spec.crop, spec.crop), Image.Resampling.BILINEAR, box=box, reducing_gap=3.0)
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))
