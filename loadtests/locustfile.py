"""Locust users: buyers and sellers calling the API, and people on the search page, with think time.

Buyer and Seller post photos to /search and /estimate as an API client would. PageVisitor does what the search
page (/ui) does for a person: the page's files and /index once, then for each photo one /assist for 48 items
with the photo downscaled as the page sends it, the thumbnails of the 12 results shown, and sometimes another
side of the item (a second /assist) or "More like this" (/similar). `python -m loadtests.run --mix` picks them.

Photos come from LOADTEST_PHOTOS (a folder, default ./demo/photos), read once per process.
Think time between requests: LOADTEST_THINK="MIN,MAX" seconds (default "1,3"; "0,0" for a closed loop).
"""

from __future__ import annotations

import functools
import os
import random
from urllib.parse import quote

import requests
from locust import HttpUser, between, events, task

from loadtests.photos import load_photos
from model_store.preprocess import as_page_sends

try:
    PHOTOS = load_photos()
except ValueError as exc:
    raise SystemExit(str(exc)) from None
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


PAGE_K, PAGE_SHOWN = 48, 12  # what the page asks /assist and /similar for, and how many cards it shows first
SIDE_SHARE, MORE_LIKE_THIS_SHARE = 0.3, 0.25  # visits that add another side, and that open "More like this"
DEFAULT_UPLOAD_PX = 520  # the default index's, for a service that does not say


@functools.cache
def page_photos(upload_px: int) -> list[tuple[str, bytes, str]]:
    """The load-test photos as the page uploads them to an index that needs `upload_px`."""
    out = []
    for name, data in PHOTOS:
        sent = as_page_sends(data, upload_px)
        out.append((name, sent, "image/jpeg" if sent is not data else "application/octet-stream"))
    return out


@events.test_start.add_listener
def prepare_page_photos(environment, **_) -> None:
    """Downscale the photos before any user starts: done by the first visit, it held every user of this process
    for ~1 s (24 phone photos), and the requests they had in flight looked ~1 s slow."""
    if PageVisitor in environment.user_classes and environment.host:
        page_photos(served_upload_px(environment.host))


def served_upload_px(host: str) -> int:
    try:
        return upload_px_of(requests.get(f"{host.rstrip('/')}/index", timeout=30).json())
    except (requests.RequestException, ValueError):
        return DEFAULT_UPLOAD_PX


def upload_px_of(index: dict | None) -> int:
    """The upload size a GET /index answer names (None: no answer)."""
    return int((index or {}).get("upload_px") or DEFAULT_UPLOAD_PX)


class PageVisitor(HttpUser):
    """One person on the search page: each photo is one /assist; they look at the results, and then may add
    another side of the item or open "More like this" on a result, looking again each time."""

    weight = 2
    wait_time = between(*THINK)

    def on_start(self) -> None:
        self.cached: set[str] = set()  # the browser's cache: thumbnails are immutable, fetched once
        for path in ("/ui/", "/ui/app.js", "/ui/style.css"):
            self.get(path)
        served = self.get("/index")
        self.upload_px = upload_px_of(served)

    @task
    def visit(self) -> None:
        photos = page_photos(self.upload_px)
        form = [("image", random.choice(photos))]
        filters = {"max_price": random.choice([100, 250, 500])} if random.random() < 1 / 6 else {}
        answer = self.assist(form, filters)
        if answer is None:
            return
        if random.random() < SIDE_SHARE:
            self.wait()
            answer = self.assist([*form, ("more_images", random.choice(photos))], filters) or answer
        if random.random() < MORE_LIKE_THIS_SHARE and answer["nearest"]:
            self.wait()
            item = random.choice(answer["nearest"][:PAGE_SHOWN])["item_id"]
            similar = self.get(f"/similar/{quote(str(item), safe='')}?k={PAGE_K}", name="/similar/[item_id]")
            if similar:
                self.thumbnails(similar["results"])

    def assist(self, form: list, filters: dict) -> dict | None:
        with self.client.post("/assist", files=form, data={"k": PAGE_K, **filters}, name="/assist (page)",
                              catch_response=True) as r:
            if r.status_code != 200:
                r.failure(f"{r.status_code}: {r.text[:200]}")
                return None
            answer = r.json()
        self.thumbnails(answer["nearest"])
        return answer

    def thumbnails(self, matches: list[dict]) -> None:
        for m in matches[:PAGE_SHOWN]:
            url = m.get("photo_url")
            if url and url.startswith("/photos/") and url not in self.cached:
                self.cached.add(url)
                self.get(url, name="/photos/[sha256].webp")

    def get(self, path: str, name: str | None = None) -> dict | None:
        """GET path; its JSON when it is JSON, else None; anything but 200 is a failure."""
        with self.client.get(path, name=name or path, catch_response=True) as r:
            if r.status_code != 200:
                r.failure(f"{r.status_code}: {r.text[:200]}")
                return None
            return r.json() if r.headers.get("content-type", "").startswith("application/json") else None
