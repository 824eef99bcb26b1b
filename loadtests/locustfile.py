"""Locust users: buyers searching, sellers asking for a price, with think time between photos.

Photos come from LOADTEST_PHOTOS (a folder, default ./demo/photos), read once per process.
Think time between requests: LOADTEST_THINK="MIN,MAX" seconds (default "1,3"; "0,0" for a closed loop).
"""

from __future__ import annotations

import os
import random
from pathlib import Path

from locust import HttpUser, between, task

PHOTO_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp"}


def load_photos(folder: str | None = None) -> list[tuple[str, bytes]]:
    folder = Path(folder or os.environ.get("LOADTEST_PHOTOS", "demo/photos"))
    photos = [(p.name, p.read_bytes()) for p in sorted(folder.iterdir()) if p.suffix.lower() in PHOTO_SUFFIXES]
    if not photos:
        raise SystemExit(f"no photos in {folder}: set LOADTEST_PHOTOS to a folder of JPEG/PNG files")
    return photos


PHOTOS = load_photos()
THINK = tuple(float(x) for x in os.environ.get("LOADTEST_THINK", "1,3").split(","))


class MarketplaceUser(HttpUser):
    """One person on the site: takes a photo, looks at the answer for a few seconds, takes another."""

    abstract = True
    wait_time = between(*THINK)

    def photo(self) -> dict:
        name, data = random.choice(PHOTOS)
        return {"image": (name, data, "application/octet-stream")}

    def post(self, path: str, data: dict | None = None) -> None:
        with self.client.post(path, files=self.photo(), data=data or {}, name=path, catch_response=True) as r:
            if r.status_code != 200:
                r.failure(f"{r.status_code}: {r.text[:200]}")
            elif "served" not in r.json():
                r.failure("answer without 'served'")


class Buyer(MarketplaceUser):
    """Most traffic: searches, sometimes narrowed by price."""

    weight = 4

    @task(5)
    def search(self) -> None:
        self.post("/search", {"k": 10})

    @task(1)
    def search_under_a_price(self) -> None:
        self.post("/search", {"k": 10, "max_price": random.choice([100, 250, 500])})


class Seller(MarketplaceUser):
    """Sellers and cataloguers: ask what an item is worth."""

    weight = 1

    @task
    def estimate(self) -> None:
        self.post("/estimate")
