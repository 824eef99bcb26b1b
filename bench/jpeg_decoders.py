"""Is there a faster way to decode a phone photo than the one the service uses? Pillow's reduced-scale decode
(model_store.preprocess.decode_image: libjpeg-turbo at 1/4 scale for a 1600x1200 JPEG) against simplejpeg (the
same libjpeg-turbo through its own API, with its fast DCT and upsampling offered), against full decodes, and
against the same photo as the search page uploads it (downscaled to upload_px).

    pip install simplejpeg            # not a dependency of the service; without it its rows are left out
    python -m bench.jpeg_decoders     # prints a Markdown table (docs/PERFORMANCE.md, "Decoding phone photos")

The photos are bench.overhead's phone uploads (demo drawings as 1600x1200 JPEGs with sensor-like noise), decoded
on the one core this process is pinned to, the decoders interleaved photo block by photo block; median ms.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Callable

import typer
from PIL import features

from bench.decode import LIMITS
from bench.evaluate_grocery import machine
from bench.overhead import phone_photos
from index_builder.demo import make_demo_catalogue
from model_store.backbones import get_backbone
from model_store.preprocess import PreprocessSpec, as_page_sends, decode_image, upload_px
from model_store.settings import get_settings

app = typer.Typer(add_completion=False)


def decoders(spec: PreprocessSpec, page_sends: dict[bytes, bytes]) -> dict[str, Callable[[bytes], object]]:
    """Each way to decode a JPEG, by the name its row gets; `spec`: the network's input, `page_sends`: each photo
    as the search page uploads it. Pillow's rows are the service's own decode_image (with the spec: reduced
    scale; without: full)."""
    import torch
    import torchvision.io

    ways = {"Pillow, reduced scale (the service's)": lambda data: decode_image(data, **LIMITS, spec=spec),
            "Pillow, full": lambda data: decode_image(data, **LIMITS),
            "Pillow, reduced scale, the photo as the page sends it": lambda data: decode_image(page_sends[data],
                                                                                               **LIMITS, spec=spec),
            "torchvision.io.decode_jpeg, full": lambda data: torchvision.io.decode_jpeg(
                torch.frombuffer(bytearray(data), dtype=torch.uint8))}
    try:
        import simplejpeg
    except ImportError:
        return ways
    return ways | {
        "simplejpeg, reduced scale": lambda data: simplejpeg.decode_jpeg(data, min_height=spec.resize,
                                                                         min_width=spec.resize),
        "simplejpeg, reduced scale, fast DCT and upsampling": lambda data: simplejpeg.decode_jpeg(
            data, min_height=spec.resize, min_width=spec.resize, fastdct=True, fastupsample=True)}


def median_ms(ways: dict[str, Callable[[bytes], object]], photos: list[bytes], repeats: int) -> dict[str, float]:
    """Median ms per photo of each way, the ways interleaved so that the machine's drift is shared."""
    times: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(repeats):
        for name, decode in ways.items():
            for data in photos:
                start = time.perf_counter()
                decode(data)
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1000 for name, t in times.items()}


@app.command()
def main(repeats: int = typer.Option(7, help="passes over the 24 photos, per decoder"),
         core: int = typer.Option(1, help="the core to pin this process to")) -> None:
    os.sched_setaffinity(0, {core})
    import torch

    torch.set_num_threads(1)
    spec = get_backbone(get_settings().backbone).preprocess
    with tempfile.TemporaryDirectory() as tmp:
        make_demo_catalogue(Path(tmp))
        photos = phone_photos(Path(tmp) / "photos")
    page_sends = {data: as_page_sends(data, upload_px(spec)) for data in photos}
    ms = median_ms(decoders(spec, page_sends), photos, repeats)
    kb = statistics.median(len(p) for p in photos) / 1024
    try:
        simplejpeg = f", simplejpeg {version('simplejpeg')}"
    except PackageNotFoundError:
        simplejpeg = ""
    print(f"{machine()}; libjpeg-turbo {features.version('libjpeg_turbo')} in Pillow{simplejpeg}; "
          "`python -m bench.jpeg_decoders`"
          f"; {len(photos)} 1600x1200 JPEGs (median {kb:.0f} KB), one core, median ms per photo, network input "
          f"{spec.resize} px.\n")
    print("| decoder | ms per photo | against the service's |\n|---|---|---|")
    ours = ms["Pillow, reduced scale (the service's)"]
    for name, t in ms.items():
        print(f"| {name} | {t:.2f} | {t / ours:.2f}x |")


if __name__ == "__main__":
    app()
