"""Decoding and preprocessing: every mode to RGB, clear errors, and one vector per photo in builder and service."""

from __future__ import annotations

import io
import os
import random
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bench.resample_crop import resize_whole_then_crop
from index_builder.demo import draw_object
from index_builder.extract import PhotoBatches
from model_store.preprocess import (UPLOAD_FORMATS, ImageError, PreprocessSpec, as_page_sends, decode_image,
                                    image_to_pixels, to_rgb, upload_px)

ROOT = Path(__file__).resolve().parents[1]
LIMITS = dict(max_bytes=5_000_000, max_pixels=4_000_000)


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.fixture
def photo() -> Image.Image:
    return draw_object(2, 1, 30, size=96)


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "LA", "1"])
def test_every_mode_becomes_rgb(photo, mode):
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    img = decode_image(encode(photo.convert(mode), fmt), **LIMITS)
    assert img.mode == "RGB" and img.size == photo.size


def test_sixteen_bit_greyscale_keeps_its_range():
    ramp = (np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)
    img = decode_image(encode(Image.fromarray(ramp)), **LIMITS)
    arr = np.asarray(img)
    assert img.mode == "RGB" and arr.min() == 0 and arr.max() == 255
    every_level = Image.fromarray(np.arange(65536, dtype=np.uint16).reshape(256, 256))
    levels = np.asarray(to_rgb(every_level))[..., 0].ravel().astype(np.int64)
    np.testing.assert_array_equal(levels, np.floor(np.arange(65536) / 65535 * 255))  # each level as a ratio


@pytest.mark.parametrize("top", [1.0, 255.0, 4000.0])
def test_a_float_image_keeps_its_range_whatever_its_levels(top):
    """A float TIFF says nothing of its range: one of 0-255 levels had been read as 0-1, nearly all white."""
    ramp = np.linspace(0, top, 64 * 64, dtype=np.float32).reshape(64, 64)
    arr = np.asarray(decode_image(encode(Image.fromarray(ramp, mode="F"), "TIFF"), **LIMITS))
    assert arr.min() == 0 and arr.max() == 255 and abs(arr.mean() - 127.5) < 1, (arr.min(), arr.max(), arr.mean())


def test_a_float_image_with_nan_and_infinities_is_read_without_a_warning():
    odd = np.array([[np.nan, np.inf], [-np.inf, 0.5]], dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        levels = np.asarray(to_rgb(Image.fromarray(odd, mode="F")))[..., 0]
    np.testing.assert_array_equal(levels, [[0, 255], [0, 127]])


def test_transparent_pixels_become_white():
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    assert to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize("fmt", ["JPEG", "HEIF"])
def test_exif_orientation_is_applied_once(fmt):
    """A phone held upright saves a landscape sensor image and says "rotate 90 CW"; an iPhone's HEIC says it
    in its own box, which the decoder applies, so turning it by the EXIF tag as well would lie it on its side."""
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    img.paste((255, 0, 0), (0, 0, 20, 20))  # red on the left half
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    out = decode_image(encode(img, fmt, exif=exif.tobytes()), **LIMITS)
    assert out.size == (20, 40)
    assert out.getpixel((10, 5))[0] > 200  # red is now on top


@pytest.mark.parametrize("fmt", ["HEIF", "AVIF", "WEBP"])
def test_phone_formats_give_the_photos_pixels(photo, fmt):
    """HEIC is what an iPhone saves (and what a photo copied off one stays); AVIF and WebP what some Android
    phones and apps send. Each decodes to the photo, up to its lossy coding."""
    rgb = photo.convert("RGB")
    out = decode_image(encode(rgb, fmt, quality=90), **LIMITS)
    assert (out.mode, out.size) == ("RGB", rgb.size)
    assert np.abs(np.asarray(out, np.float32) - np.asarray(rgb, np.float32)).mean() < 4


def avif_with_a_corrupt_picture(img: Image.Image) -> bytes:
    """`img` as AVIF with its coded picture (all after the 'mdat' box's name) turned to noise."""
    data = encode(img.convert("RGB"), "AVIF")
    start = data.find(b"mdat") + 4
    return data[:start] + b"\xff" * (len(data) - start)


def test_an_avif_whose_pictures_are_corrupt_is_a_bad_file(photo):
    """libavif's failure comes out of Pillow as a RuntimeError, which the service answered with a 500."""
    with pytest.raises(ImageError, match=r"image could not be decoded \(RuntimeError: Failed to decode frame 0.*\): "
                                         r"the file is truncated or corrupt"):
        decode_image(avif_with_a_corrupt_picture(photo), **LIMITS)


@pytest.mark.parametrize("fmt", UPLOAD_FORMATS)
def test_a_photo_with_bytes_changed_is_decoded_or_refused_as_a_bad_file(photo, fmt):
    """500 seeded corruptions of a photo in each upload format (and of a two-frame one where the format has
    frames): each decodes or raises ImageError (a 4xx in the service), never another exception (a 500)."""
    rgb = photo.convert("RGB")
    kw = {"save_all": True, "append_images": [rgb.rotate(90)]} if fmt in ("GIF", "WEBP", "TIFF") else {}
    original = encode(rgb, fmt, **kw)
    rng = random.Random(fmt)
    for _ in range(500):
        data = bytearray(original)
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        try:
            decode_image(bytes(data), **LIMITS, formats=UPLOAD_FORMATS, spec=PreprocessSpec(resize=32))
        except ImageError:
            pass


def gif_with_a_broken_second_frame(size: int = 16) -> bytes:
    frames = [Image.new("RGB", (size, size), c) for c in [(255, 0, 0), (0, 0, 255)]]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    data = buf.getvalue()
    second = data.find(b"\x21\xf9", data.find(b"\x2c"))  # the second frame's graphic control extension
    return data[:second] + b"\x21\xf9\x04\x00\x00\x00\x00\x00\x2c\x00"  # and an image descriptor cut short


def test_only_the_first_frame_of_an_animation_is_read():
    """Counting frames read every frame's header: a GIF's broken second frame answered 500, and 200,000 frames
    of a pixel (4.6 MB) cost 0.6 s before the first was used."""
    r, g, b = decode_image(gif_with_a_broken_second_frame(), **LIMITS).getpixel((8, 8))
    assert r > 200 and b < 50


def test_animated_gif_uses_the_first_frame():
    frames = [Image.new("RGB", (16, 16), c) for c in [(255, 0, 0), (0, 0, 255)]]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    out = decode_image(buf.getvalue(), **LIMITS)
    r, g, b = out.getpixel((8, 8))
    assert r > 200 and b < 50


def test_a_ten_bit_heic_becomes_eight_bit_rgb():
    """iPhones save HDR photos as 10-bit HEIC: the levels scale down to 8 bits, not wrap or clip."""
    import pillow_heif

    levels = np.zeros((16, 32, 3), np.uint16)
    levels[:, 16:] = 65535  # black on the left, white on the right
    buf = io.BytesIO()
    pillow_heif.from_bytes(mode="RGB;16", size=(32, 16), data=levels.tobytes()).save(buf, quality=-1)
    out = np.asarray(decode_image(buf.getvalue(), **LIMITS))
    assert out.dtype == np.uint8 and out.shape == (16, 32, 3)
    assert out[:, :12].max() < 10 and out[:, 20:].min() > 245


@pytest.mark.parametrize("data, message", [
    (b"", "empty"),
    (b"this is plain text, not a photo", "not an image"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "not an image|could not be decoded"),
])
def test_bad_bytes_raise_image_error(data, message):
    with pytest.raises(ImageError, match=message):
        decode_image(data, **LIMITS)


@pytest.mark.parametrize("data", [b"", b"this is plain text, not a photo"])
def test_what_an_unreadable_file_asks_for(data):
    """A client of the service is asked for a photo in every format the service reads; an operator's build,
    which reads any format Pillow knows, to save the file as a photo."""
    with pytest.raises(ImageError, match=r": upload a JPEG, PNG, WebP, HEIC, AVIF, GIF, TIFF or BMP photo$"):
        decode_image(data, **LIMITS, formats=UPLOAD_FORMATS)
    with pytest.raises(ImageError, match=r": save it as a JPEG or PNG photo$"):
        decode_image(data, **LIMITS)


@pytest.mark.parametrize("fmt", ["JPEG", "HEIF"])
def test_truncated_image_is_refused(photo, fmt):
    data = encode(photo.convert("RGB"), fmt)
    with pytest.raises(ImageError, match="truncated or corrupt|could not be decoded|not an image"):
        decode_image(data[: len(data) // 2], **LIMITS)


def test_byte_and_pixel_limits(photo):
    data = encode(photo)
    with pytest.raises(ImageError, match="the limit is 100"):
        decode_image(data, max_bytes=100, max_pixels=10**9)
    with pytest.raises(ImageError, match="pixels; the limit is 1,000"):
        decode_image(data, max_bytes=10**9, max_pixels=1_000)


def test_decompression_bomb_is_refused():
    # One colour compresses to a few kB but decodes to hundreds of MB.
    big = encode(Image.new("L", (6000, 6000)))
    with pytest.raises(ImageError, match="36,000,000 pixels; the limit is 4,000,000"):
        decode_image(big, max_bytes=10**9, max_pixels=4_000_000)
    bomb = encode(Image.new("L", (20000, 20000)))
    assert len(bomb) < 1_000_000
    with pytest.raises(ImageError, match="decompression bomb .*: send a smaller photo$"):
        decode_image(bomb, max_bytes=10**9, max_pixels=10**10, formats=UPLOAD_FORMATS)
    # a build reads the operator's own file: it is asked for a smaller copy, not to "send" one
    with pytest.raises(ImageError, match="decompression bomb .*: save a smaller copy of the photo$"):
        decode_image(bomb, max_bytes=10**9, max_pixels=10**10)
    with pytest.raises(ImageError, match="36,000,000 pixels; the limit is 4,000,000: save a smaller copy of the photo$"):
        decode_image(big, max_bytes=10**9, max_pixels=4_000_000)


def test_uploads_are_read_only_in_the_formats_photos_come_in(photo):
    """The service decodes an upload only in UPLOAD_FORMATS; the builder reads the operator's files in any."""
    rgb = photo.convert("RGB")
    for fmt in UPLOAD_FORMATS:
        assert decode_image(encode(rgb, fmt), **LIMITS, formats=UPLOAD_FORMATS).size == rgb.size, fmt
    for fmt in ("JPEG2000", "TGA", "PPM", "SGI", "ICO", "PCX"):
        data = encode(rgb, fmt)
        with pytest.raises(ImageError, match=r"image is not an image in a format the service reads: upload a JPEG, "
                                             r"PNG, WebP, HEIC, AVIF, GIF, TIFF or BMP photo"):
            decode_image(data, **LIMITS, formats=UPLOAD_FORMATS)
        assert decode_image(data, **LIMITS).width > 0, fmt  # any format, for the builder


@pytest.mark.parametrize("fmt, kw", [("WEBP", {"lossless": True}), ("AVIF", {}), ("JPEG2000", {})])
def test_a_large_image_of_one_colour_is_refused_before_it_is_decoded(fmt, kw):
    """A few hundred bytes that decode as long as a photo of megabytes (docs/PERFORMANCE.md, "Uploads of few bytes")."""
    flat = encode(Image.new("RGB", (3000, 2000), (250, 250, 250)), fmt, **kw)
    assert len(flat) < 3_000
    with pytest.raises(ImageError, match=rf"image is a 3000x2000 {fmt} image in only [\d,]+ bytes \(a photo that "
                                         r"size takes 3,000 or more\): it holds no photo"):
        decode_image(flat, max_bytes=10**8, max_pixels=10**8, min_bytes_per_mp=500)
    assert decode_image(flat, max_bytes=10**8, max_pixels=10**8).size == (3000, 2000)  # no floor: decoded


def test_what_the_byte_floor_lets_through(photo):
    """Small images, JPEGs (decoded at a fraction of their size) and anything holding a picture, even a 96-pixel
    drawing blown up to 4.3 MP and saved as AVIF (1,540 bytes a megapixel, three times the floor)."""
    floor = dict(max_bytes=10**8, max_pixels=10**8, min_bytes_per_mp=500)
    assert decode_image(encode(Image.new("RGB", (1400, 1400)), "WEBP", lossless=True), **floor).size == (1400, 1400)
    assert decode_image(encode(Image.new("RGB", (3000, 2000)), "JPEG"), **floor).size == (3000, 2000)
    blown_up = photo.convert("RGB").resize((2400, 1800), Image.BICUBIC)
    assert decode_image(encode(blown_up, "AVIF", quality=50), **floor).size == (2400, 1800)


def test_pixels_shape_and_crop(photo):
    spec = PreprocessSpec(resize=64, crop=56)
    arr = image_to_pixels(photo.resize((120, 80)), spec)
    assert arr.shape == (3, 56, 56) and arr.dtype == np.uint8
    resized = np.asarray(photo.resize((120, 80)).resize((96, 64), Image.Resampling.BILINEAR, reducing_gap=3.0))
    np.testing.assert_array_equal(arr.transpose(1, 2, 0), resized[4:60, 20:76])


@pytest.mark.parametrize("size", [(3, 500), (500, 3), (97, 61), (1600, 1200)])
def test_only_the_cropped_part_is_resampled_and_gives_the_pixels_of_resizing_the_whole(photo, size):
    """Within a level or two of the pixels image_to_pixels gave before it resampled the cropped part alone
    (resize the whole photo, then crop its centre), so indexes built before still match new queries
    (measured on real photos: bench.resample_crop, docs/EVALUATION.md)."""
    spec = PreprocessSpec(resize=64, crop=56)
    img = photo.resize(size)
    diff = np.abs(image_to_pixels(img, spec).astype(int) - resize_whole_then_crop(img, spec))
    assert diff.max() <= 2 and (diff > 0).mean() < 0.1


STRIP = """
import resource
import numpy as np
from PIL import Image
from model_store.preprocess import PreprocessSpec, image_to_pixels
resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
strip = Image.new("RGB", (1, 2_000_000), (200, 120, 40))  # resized whole: 260 x 520 million pixels
assert (image_to_pixels(strip, PreprocessSpec(resize=260, crop=260)) == np.array([200, 120, 40])[:, None, None]).all()
"""


def test_a_strip_one_pixel_wide_is_resampled_only_where_the_crop_is():
    """In a process held to 2 GB of address space: resizing the whole strip would need ~400 GB."""
    out = subprocess.run([sys.executable, "-c", STRIP], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OPENBLAS_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-2000:]


@pytest.mark.parametrize("size", [(96, 96), (1600, 1200)])
def test_builder_and_service_give_the_same_input(tmp_path, photo, size):
    """The builder reads files through PhotoBatches; the service decodes uploaded bytes: same array, also for
    a phone-sized JPEG that both decode at a reduced scale."""
    path = tmp_path / "p.jpg"
    photo.resize(size).save(path, "JPEG", quality=90)
    spec = PreprocessSpec()
    _, from_file, error, _, _ = PhotoBatches([str(path)], spec)[[0]][0]
    from_upload = image_to_pixels(decode_image(path.read_bytes(), **LIMITS, spec=spec), spec)
    assert error == ""
    np.testing.assert_array_equal(from_file, from_upload)


def test_a_phone_jpeg_with_a_second_picture_is_decoded_as_a_jpeg(photo):
    """Phones append an HDR gain map or a depth map to their JPEGs (MPO, to Pillow), which were decoded whole:
    the first picture is an ordinary JPEG, decoded at reduced scale to the same pixels."""
    large = photo.convert("RGB").resize((1600, 1200))
    buf = io.BytesIO()
    large.save(buf, "MPO", save_all=True, append_images=[large.resize((400, 300))], quality=90)
    assert Image.open(io.BytesIO(buf.getvalue())).format == "MPO"
    spec = PreprocessSpec(resize=224)
    mpo = decode_image(buf.getvalue(), **LIMITS, spec=spec)
    assert mpo.size == (400, 300)
    plain = decode_image(encode(large, "JPEG", quality=90), **LIMITS, spec=spec)
    np.testing.assert_array_equal(image_to_pixels(mpo, spec), image_to_pixels(plain, spec))


def test_a_large_jpeg_is_decoded_at_the_smallest_scale_that_keeps_the_networks_resolution(photo):
    data = encode(photo.resize((1600, 1200)), "JPEG", quality=90)
    assert decode_image(data, **LIMITS).size == (1600, 1200)
    assert decode_image(data, **LIMITS, spec=PreprocessSpec(resize=224)).size == (400, 300)  # 1/4: 300 >= 224
    assert decode_image(data, **LIMITS, spec=PreprocessSpec(resize=400)).size == (800, 600)  # 1/2
    assert decode_image(data, **LIMITS, spec=PreprocessSpec(resize=700)).size == (1600, 1200)
    png = encode(photo.resize((1600, 1200)))
    assert decode_image(png, **LIMITS, spec=PreprocessSpec(resize=224)).size == (1600, 1200)  # JPEG only


def test_load_tests_send_photos_as_the_page_does(photo):
    """Downscaled to the index's upload_px and re-encoded as JPEG when larger (query/static/app.js), else the
    photo as it is when the service reads its format."""
    spec = PreprocessSpec(resize=260, crop=260)
    phone = encode(photo.resize((1600, 1200)), "JPEG", quality=92)
    sent = Image.open(io.BytesIO(as_page_sends(phone, upload_px(spec))))
    assert sent.format == "JPEG" and sent.size == (693, 520)
    small = encode(photo.resize((400, 300)))
    assert as_page_sends(small, upload_px(spec)) is small
    gif = encode(photo.resize((400, 300)), "GIF")
    assert Image.open(io.BytesIO(as_page_sends(gif, upload_px(spec)))).format == "JPEG"
