"""Screenshots of the search page at phone (390x844) and desktop width, for the README.

Builds a catalogue from the grocery photos (each product an item: its clean catalogue photo and its first
train photos; titles from the data set, prices and dates made up), serves it with `bentoml serve` in a store
of its own under bench/out, and photographs /ui in Debian's Chromium after searching with a val photo and a
second val photo of the same product as another side.

    python -m bench.screenshots          # writes docs/screenshots/{phone,phone-results,desktop}.jpg
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import typer

from bench.grocery import CREDIT, GROCERY, class_names, read_iconic, read_split
from bench.server import ROOT, Server, python_path

OUT = ROOT / "bench" / "out" / "screenshots"
DOCS = ROOT / "docs" / "screenshots"
QUERY = "val/Fruit/Apple/Granny-Smith/Granny-Smith_005.jpg"  # a shop photo the catalogue has never seen
SIDE = "val/Fruit/Apple/Granny-Smith/Granny-Smith_006.jpg"  # another photo of it, added as another side
PHOTOS_PER_ITEM = 4


def coarse() -> dict[int, str]:
    with open(GROCERY / "classes.csv", newline="") as f:
        return {int(r[1]): r[2] for r in list(csv.reader(f))[1:]}


def write_catalogue(path: Path) -> Path:
    """One item per product: its iconic photo and its first PHOTOS_PER_ITEM train photos."""
    names, kinds = class_names(), coarse()
    photos: dict[int, list[Path]] = {}
    for p, c in zip(*read_iconic()):
        photos.setdefault(int(c), []).append(p)
    for p, c in zip(*read_split("train")):
        if len(photos[int(c)]) <= PHOTOS_PER_ITEM:
            photos[int(c)].append(p)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["item_id", "image_path", "title", "category", "price", "currency", "sold_at"])
        for c, paths in sorted(photos.items()):
            for p in paths:
                w.writerow([f"grocery-{c:02d}", p, names[c].replace("-", " ").replace("_", " "), kinds[c],
                            f"{2 + (c * 37) % 23 + 0.5 * (c % 2):.2f}", "USD", f"2026-{1 + c % 11:02d}-{1 + c % 27:02d}"])
    return path


def run(*args: str, env: dict) -> str:
    done = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return done.stdout


def shoot(url: str) -> list[Path]:
    from playwright.sync_api import sync_playwright

    DOCS.mkdir(parents=True, exist_ok=True)
    shots = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
        for name, viewport, full in (("phone", {"width": 390, "height": 844}, False),
                                     ("desktop", {"width": 1280, "height": 900}, True)):
            page = browser.new_page(viewport=viewport, device_scale_factor=1)
            page.goto(f"{url}/ui/")
            page.wait_for_function("() => document.querySelector('#served-version').textContent.includes('image-index:')")
            page.set_input_files("#file-input", str(GROCERY / QUERY))
            page.wait_for_function("() => document.querySelectorAll('#results img.result-photo').length > 0", timeout=60_000)
            with page.expect_response(lambda r: r.url.endswith("/assist"), timeout=60_000):
                page.set_input_files("#sides-input", str(GROCERY / SIDE))
            page.wait_for_function("() => document.querySelector('#busy').hidden", timeout=60_000)
            photos = page.locator("#results img.result-photo")
            for i in range(photos.count()):  # they load lazily
                photos.nth(i).scroll_into_view_if_needed()
            page.wait_for_function("() => [...document.querySelectorAll('#results img.result-photo')]"
                                   ".every(i => i.complete && i.naturalWidth > 0)", timeout=60_000)
            page.evaluate("window.scrollTo(0, 0)")
            views = [(name, "")]
            if name == "phone":  # the first screen, then the results as a phone user sees them after scrolling
                views = [("phone", ""), ("phone-results", "document.querySelector('#results-section').scrollIntoView()")]
            for shot, script in views:
                if script:
                    page.evaluate(script)
                target = DOCS / f"{shot}.jpg"
                page.screenshot(path=str(target), full_page=full, type="jpeg", quality=80)
                shots.append(target)
            page.close()
        browser.close()
    return shots


def main(port: int = typer.Option(0, help="port to serve on (0: any free one)")) -> None:
    if not GROCERY.exists():
        raise SystemExit(f"needs the grocery photos at {GROCERY}")
    env = {**os.environ, "BENTOML_HOME": str(OUT / "bentoml"), "IMAGESEARCH_STAGES_DIR": str(OUT / "stages"),
           "BENTOML_DO_NOT_TRACK": "True", "PYTHONPATH": python_path(ROOT)}
    catalogue = write_catalogue(OUT / "catalogue.csv")
    tag = run("-m", "index_builder", "build", str(catalogue), env=env).strip().splitlines()[-1]
    run("-m", "model_store", "promote", tag, "--stage", "production", "--force", "--note", "screenshots", env=env)
    server = Server(OUT / "serve.log", port=port or None, **{k: env[k] for k in ("BENTOML_HOME", "IMAGESEARCH_STAGES_DIR")})
    try:
        server.wait()
        for shot in shoot(server.url):
            print(shot)
    finally:
        server.stop()
    print(CREDIT)


if __name__ == "__main__":
    typer.run(main)
