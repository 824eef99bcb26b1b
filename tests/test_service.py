"""The HTTP service, through a real `bentoml serve` on 127.0.0.1 with a real index and model."""

from __future__ import annotations

import concurrent.futures as cf
import csv
import http.client
import io
import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
from PIL import Image

from bench.decode import heic  # encodes without Pillow's registry: only the code under test teaches it HEIC
from index_builder.demo import FAMILIES, draw_object
from model_store import stages
from model_store.index_artifact import ANNOY_FILE
from model_store.core_share import available_cores
from model_store.malloc import ONE_ARENA
from model_store.registry import get_model, register
from model_store.settings import INDEX_MODEL, get_settings
from query.bentoml_fixes import METRICS_FOLDERS
from query.floors import RAW
from query.search_index import SearchIndex, item_query

from conftest import ROOT, TOKEN, Server, run_env

pytestmark = pytest.mark.slow


def png(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def noise_png(side: int = 160, seed: int = 0) -> bytes:
    """A PNG of random pixels: a photo like nothing sold, that compresses to nothing less than its pixels."""
    return png(Image.fromarray(np.random.default_rng(seed).integers(0, 255, (side, side, 3), dtype=np.uint8)))


def upload(data: bytes, name: str = "photo.png") -> dict:
    return {"image": (name, data, "application/octet-stream")}


@pytest.fixture(scope="module")
def rows(demo_catalogue) -> list[dict]:
    with open(demo_catalogue) as f:
        return list(csv.DictReader(f))


def photo_bytes(demo_catalogue: Path, rel: str) -> bytes:
    return (demo_catalogue.parent / rel).read_bytes()


def test_a_catalogue_photo_finds_its_item_first(server, demo_catalogue, rows, demo_index):
    row = rows[10]
    r = server.http.post("/search", files=upload(photo_bytes(demo_catalogue, row["image_path"])), data={"k": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    first = body["results"][0]
    assert first["item_id"] == row["item_id"] and first["score"] > 0.99
    assert first["title"] == row["title"] and float(first["price"]) == float(row["price"])
    assert first["image_path"] == row["image_path"] and first["sold_at"] == row["sold_at"]
    assert len(body["results"]) == 5 and len({m["item_id"] for m in body["results"]}) == 5
    assert [m["score"] for m in body["results"]] == sorted((m["score"] for m in body["results"]), reverse=True)
    served = body["served"]
    assert served["index"] == demo_index.tag and served["embedder"] == demo_index.embedder
    assert served["pretrained"] is True and served["warning"] is None and body["took_ms"] > 0


def test_another_view_ranks_its_item_near_the_top(server, demo_catalogue):
    with open(demo_catalogue.with_name("queries.csv")) as f:
        queries = list(csv.DictReader(f))
    found = 0
    for q in queries:
        r = server.http.post("/search", files=upload(photo_bytes(demo_catalogue, q["image_path"])), data={"k": 5})
        found += q["item_id"] in [m["item_id"] for m in r.json()["results"]]
    assert found >= 0.9 * len(queries)


def test_filters_and_k(server, demo_catalogue, rows):
    image = upload(photo_bytes(demo_catalogue, rows[0]["image_path"]))
    r = server.http.post("/search", files=image, data={"k": 3, "category": "furniture"}).json()
    assert len(r["results"]) == 3 and {m["category"] for m in r["results"]} == {"Furniture"}
    r = server.http.post("/search", files=image, data={"k": 4, "min_price": 200, "max_price": 400}).json()
    assert len(r["results"]) == 4 and all(200 <= m["price"] <= 400 for m in r["results"])
    r = server.http.post("/search", files=image, data={"k": 50, "sold_after": "2025-01-01",
                                                       "sold_before": "2025-06-30"}).json()
    expected = {x["item_id"] for x in rows if "2025-01-01" <= x["sold_at"] <= "2025-06-30"}
    assert {m["item_id"] for m in r["results"]} == expected
    r = server.http.post("/search", files=image, data={"k": 100}).json()
    assert len(r["results"]) == 24  # every item once, though each has 3 photos


def test_estimate_lands_near_known_prices(server, demo_catalogue):
    with open(demo_catalogue.with_name("queries.csv")) as f:
        queries = list(csv.DictReader(f))
    for q in queries[::3]:
        family = int(q["item_id"][5:7])
        base = FAMILIES[family][4]
        r = server.http.post("/estimate", files=upload(photo_bytes(demo_catalogue, q["image_path"])))
        assert r.status_code == 200, r.text
        e = r.json()
        assert 0.8 * base <= e["price"] <= 1.2 * base, (q, e["price"], base)
        assert e["low"] <= e["price"] <= e["high"] and e["currency"] == "USD"
        assert 0 < e["confidence"] <= 1 and e["comparables"]


def test_estimate_refuses_when_nothing_is_close(server):
    noise = noise_png()
    e = server.http.post("/estimate", files=upload(noise)).json()
    assert e["price"] is None and e["confidence"] == 0 and "similar enough" in e["reason"]
    assert re.search(r"the closest is [\d.]+% similar, a price needs 70%", e["reason"]), e["reason"]
    none_sold = server.http.post("/estimate", files=upload(noise), data={"sold_before": "1990-01-01"}).json()
    assert none_sold["price"] is None and "matches the filters" in none_sold["reason"], none_sold


def test_search_batch(server, demo_catalogue, rows):
    files = [("images", (f"p{i}.png", photo_bytes(demo_catalogue, rows[i]["image_path"]), "image/png"))
             for i in (0, 20, 40)]
    r = server.http.post("/search_batch", files=files, data={"k": 2})
    assert r.status_code == 200, r.text
    assert [res[0]["item_id"] for res in r.json()["results"]] == [rows[i]["item_id"] for i in (0, 20, 40)]
    files[1] = ("images", ("bad.png", b"garbage", "image/png"))
    r = server.http.post("/search_batch", files=files)
    assert r.status_code == 415 and "images[1]" in r.text


def test_batch_searches_from_several_clients_wait_their_turn_instead_of_failing(server, demo_catalogue, rows):
    """8 clients sending 16 photos each, and 2 sending one: before each embed call waited for room in the
    embedder's queue, the queue held ~128 photos, the calls passed their deadline and 108 of 111 batch requests
    answered 503; with the deadline alone scaled to a call's photos, a lone photo still waited behind them all."""
    batch = [("images", (f"p{i}.png", photo_bytes(demo_catalogue, rows[i]["image_path"]), "image/png"))
             for i in range(16)]
    end = time.time() + 8

    def client(path: str, files: list) -> list[tuple[str, int]]:
        statuses = []
        with httpx.Client(base_url=server.url, timeout=60) as http:
            while time.time() < end:
                statuses.append((path, http.post(path, files=files, data={"k": 1}).status_code))
        return statuses

    work = [("/search_batch", batch)] * 8 + [("/search", [("image", batch[0][1])])] * 2
    with cf.ThreadPoolExecutor(len(work)) as pool:
        statuses = [s for run in pool.map(lambda w: client(*w), work) for s in run]
    failed = [s for s in statuses if s[1] != 200]
    assert {path for path, _ in statuses} == {"/search", "/search_batch"} and not failed, failed


def test_more_photos_of_an_item_are_searched_as_one(server, demo_catalogue, demo_index, rows):
    """Other sides of an item sent with its photo (`more_images`): one query, the normalised mean of their
    vectors in the index's space, as the service's own index and embedder compute it here; /estimate and
    /assist take them too."""
    from model_store.embedder import load_embedder
    from model_store.preprocess import decode_image, image_to_pixels

    item = rows[30]["item_id"]
    with open(demo_catalogue.with_name("queries.csv")) as f:
        unseen = next(q["image_path"] for q in csv.DictReader(f) if q["item_id"] == item)
    views = [unseen, *(r["image_path"] for r in rows if r["item_id"] == item)][:3]
    photos = [photo_bytes(demo_catalogue, v) for v in views]
    files = [("image", ("front.png", photos[0], "image/png"))]
    files += [("more_images", (f"side-{i}.png", p, "image/png")) for i, p in enumerate(photos[1:])]
    r = server.http.post("/search", files=files, data={"k": 5})
    assert r.status_code == 200, r.text
    index = SearchIndex(Path(get_model(demo_index.tag).path), demo_index.tag)
    embedder = load_embedder(demo_index.embedder)
    spec = index.manifest.embedder_config.preprocess
    pixels = np.stack([image_to_pixels(decode_image(p, max_bytes=10**7, max_pixels=10**7, spec=spec), spec)
                       for p in photos])
    expected = index.nearest(item_query(index.project(embedder.embed(pixels))), 5)
    assert [m["item_id"] for m in r.json()["results"]] == [m.item_id for m in expected]
    assert [m["score"] for m in r.json()["results"]] == pytest.approx([m.score for m in expected], abs=1e-4)
    alone = server.http.post("/search", files=files[:1], data={"k": 5}).json()["results"]
    assert [m["score"] for m in alone] != pytest.approx([m.score for m in expected], abs=1e-4)  # not one photo's
    for path in ("/estimate", "/assist"):
        r = server.http.post(path, files=files)
        assert r.status_code == 200, (path, r.text)
    assert r.json()["nearest"][0]["item_id"] == expected[0].item_id == item


def test_index_info(server, demo_index):
    info = server.http.get("/index").json()
    assert info["served"]["index"] == demo_index.tag and info["served"]["stage"] == "production"
    assert (info["photos"], info["items"]) == (72, 24)
    assert "Furniture" in info["categories"] and info["build"]["evaluation"]["queries"] == 24
    spec = SearchIndex(Path(get_model(demo_index.tag).path), demo_index.tag).manifest.embedder_config.preprocess
    assert info["upload_px"] == 2 * spec.resize
    # 72 photos: no PCA, so the floors measured for raw descriptors (query/floors.py)
    assert info["build"]["projection"] == "none" and info["floors"] == RAW.model_dump()


def _bad_requests(good: bytes) -> list[tuple[str, dict, dict, int, str]]:
    jpeg = png(draw_object(1, 1, 0), "JPEG")
    return [
        ("not an image", upload(b"hello, I am text", "notes.txt"), {}, 415, "not an image"),
        ("truncated", upload(jpeg[: len(jpeg) // 2], "cut.jpg"), {}, 415, "truncated or corrupt"),
        ("zero bytes", upload(b"", "empty.png"), {}, 415, "empty"),
        ("bomb", upload(png(Image.new("L", (20000, 20000)))), {}, 413, "decompression bomb|pixels"),
        ("too many bytes", upload(noise_png(1000, seed=1)), {}, 413, "bytes; the limit is 2,000,000"),
        ("too many pixels", upload(png(Image.new("RGB", (3000, 3000)))), {}, 413, "pixels; the limit is 4,000,000"),
        ("missing image", {}, {"k": "3"}, 400, "image"),
        ("k not a number", upload(good), {"k": "ten"}, 400, "k must be an integer from 1 to 100; got 'ten'"),
        ("k zero", upload(good), {"k": "0"}, 400, "k must be an integer from 1 to 100"),
        ("k negative", upload(good), {"k": "-4"}, 400, "k must be an integer from 1 to 100"),
        ("k over limit", upload(good), {"k": "101"}, 400, "k must be an integer from 1 to 100"),
        ("unknown category", upload(good), {"category": "Spaceships"}, 400, "unknown category 'Spaceships'"),
        ("malformed date", upload(good), {"sold_after": "2024-13-45"}, 400, "sold_after"),
        ("price not a number", upload(good), {"min_price": "cheap"}, 400, "min_price"),
        ("price range upside down", upload(good), {"min_price": "50", "max_price": "10"}, 400, "above max_price"),
        ("dates upside down", upload(good), {"sold_after": "2025-01-01", "sold_before": "2024-01-01"}, 400,
         "later than sold_before"),
    ]


def test_every_bad_input_gets_a_clear_4xx_and_the_server_keeps_serving(server, demo_catalogue, rows):
    good = photo_bytes(demo_catalogue, rows[0]["image_path"])
    failures = []
    for name, files, data, status, message in _bad_requests(good):
        r = server.http.post("/search", files=files or None, data=data)
        if r.status_code != status or not re.search(message, r.json()["error"]) or set(r.json()) != {"error", "field"}:
            failures.append(f"{name}: {r.status_code} {r.text[:200]}")
    assert not failures, "\n".join(failures)
    too_many = [("images", (f"{i}.png", good, "image/png")) for i in range(17)]
    r = server.http.post("/search_batch", files=too_many)
    assert r.status_code == 400 and "1 to 16 photos" in r.text
    r = server.http.post("/search", files=upload(good))
    assert r.status_code == 200 and r.json()["results"][0]["item_id"] == rows[0]["item_id"]


def test_a_clients_mistake_is_one_line_of_log(server, demo_catalogue, rows):
    """Not an ERROR with BentoML's traceback (twenty lines, and an alert) for each bad request."""
    good = photo_bytes(demo_catalogue, rows[0]["image_path"])
    start = server.log.stat().st_size
    assert server.http.post("/search", files=upload(good), data={"category": "Spaceships"}).status_code == 400
    assert server.http.post("/search", files=upload(b"hello, I am text", "notes.txt")).status_code == 415
    unreadable = server.http.post("/search", content=b"--nope\r\ngarbage",  # the multipart parser logged a WARNING
                                  headers={"Content-Type": "multipart/form-data; boundary=XyZ"})
    assert unreadable.status_code == 400 and "cannot be read" in unreadable.text
    time.sleep(0.5)  # let the entry's log reach the file
    with open(server.log) as f:
        f.seek(start)
        logged = f.read()
    assert "Traceback" not in logged and "[ERROR]" not in logged and "[WARNING]" not in logged, logged[-3000:]
    assert re.search(r"\[INFO\].*POST /search answered 400: unknown category 'Spaceships'", logged), logged[-3000:]
    assert re.search(r"\[INFO\].*POST /search answered 415: image is not an image", logged), logged[-3000:]


def test_the_embedder_keeps_no_access_log_of_the_entrys_calls(server, demo_catalogue, rows):
    """The entry logs each request; the Embedder's line for each embed call it makes was ~10% of the Embedder's
    event loop per call (docs/PERFORMANCE.md, section 6)."""
    start = server.log.stat().st_size
    assert server.http.post("/search", files=upload(photo_bytes(demo_catalogue, rows[0]["image_path"]))).is_success
    time.sleep(0.5)  # let the entry's log reach the file
    with open(server.log) as f:
        f.seek(start)
        logged = f.read()
    assert re.search(r"\[INFO\].*path=/search\b.*status=200", logged), logged[-3000:]
    assert "/embed" not in logged, logged[-3000:]


@pytest.mark.parametrize("switch", ["", "true"])
def test_the_embedders_call_records_are_off_unless_asked_for(python, switch):
    """BentoML's own configuration, as each Embedder worker loads it: no access log and no OpenTelemetry span
    per call (BentoML records one even with no exporter); IMAGESEARCH_EMBEDDER_ACCESS_LOG / _TRACING turn each
    back on. The access log is seen off on a real server above; a span leaves no trace outside the process."""
    ask = ("import service\nfrom bentoml._internal.configuration.containers import BentoMLContainer as C\n"
           "service.Embedder.inject_config()\n"
           "print(C.api_server_config.logging.access.enabled.get(),"
           " C.tracing_excluded_urls.get().url_disabled('http://127.0.0.1:3000/embed'))")
    env = run_env(IMAGESEARCH_EMBEDDER_ACCESS_LOG=switch or "false", IMAGESEARCH_EMBEDDER_TRACING=switch or "false")
    out = subprocess.run([python, "-c", ask], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-2:] == (["True", "False"] if switch else ["False", "True"]), out.stdout


@pytest.mark.parametrize("mode, fmt", [("CMYK", "JPEG"), ("I;16", "PNG"), ("P", "GIF"), ("LA", "PNG")])
def test_unusual_modes_work(server, demo_catalogue, rows, mode, fmt):
    img = Image.open(demo_catalogue.parent / rows[0]["image_path"])
    img = Image.fromarray((np.asarray(img.convert("L"), np.uint16) * 257)) if mode == "I;16" else img.convert(mode)
    r = server.http.post("/search", files=upload(png(img, fmt)))
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("fmt, name", [("HEIF", "IMG_0001.HEIC"), ("AVIF", "photo.avif")])
def test_a_photo_in_a_phones_own_format_finds_its_item(server, demo_catalogue, rows, fmt, name):
    """HEIC is what an iPhone saves; a photo copied off one to a computer and uploaded stays HEIC."""
    img = Image.open(demo_catalogue.parent / rows[0]["image_path"]).convert("RGB")
    data = heic(img, quality=80) if fmt == "HEIF" else png(img, fmt, quality=80)
    r = server.http.post("/search", files=upload(data, name))
    assert r.status_code == 200 and r.json()["results"][0]["item_id"] == rows[0]["item_id"], r.text[:300]


def test_a_strip_one_pixel_wide_is_answered(server, demo_catalogue):
    """40,000 pixels, far under the limits; resized whole to the network's short side it would be ~1e9
    pixels (3 GB, past the request's 10 s: a 503) before the crop threw nearly all of it away."""
    for size in [(1, 40_000), (40_000, 1)]:
        r = server.http.post("/search", files=upload(png(Image.new("RGB", size, (200, 120, 40)))))
        assert r.status_code == 200 and r.json()["results"], (size, r.status_code, r.text[:200])


def test_animated_gif_uses_the_first_frame(server, demo_catalogue, rows):
    first = Image.open(demo_catalogue.parent / rows[0]["image_path"]).convert("RGB")
    other = Image.open(demo_catalogue.parent / rows[40]["image_path"]).convert("RGB")
    buf = io.BytesIO()
    first.save(buf, "GIF", save_all=True, append_images=[other], duration=100)
    r = server.http.post("/search", files=upload(buf.getvalue(), "anim.gif"))
    assert r.status_code == 200 and r.json()["results"][0]["item_id"] == rows[0]["item_id"]


def test_adaptive_batching_batches_concurrent_requests(server, demo_catalogue, rows):
    image = photo_bytes(demo_catalogue, rows[0]["image_path"])
    # One client for all threads: a client per request spent more CPU on its own set-up (an SSL context each)
    # than the server on a search, so searches reached the embedder one by one and the test failed now and then.
    with httpx.Client(base_url=server.url, timeout=60, limits=httpx.Limits(max_connections=8)) as c:
        def one(_):
            return c.post("/search", files=upload(image), data={"k": 1}).status_code

        with cf.ThreadPoolExecutor(8) as pool:  # 8 in flight: more than the embedder's workers, within its deadline
            assert set(pool.map(one, range(48))) == {200}
    metrics = server.http.get("/metrics").text
    # One histogram per series (each embedder worker has its own): batches of one photo against all batches.
    # Until 2026-12-04 the test compared the largest counts of any series, so one worker's 23 lone batches
    # hid the other's batches of several, and the test failed now and then.
    series: dict[str, dict[float, float]] = {}
    for m in re.finditer(r'bentoml_service_adaptive_batch_size_bucket\{([^}]*)\} (\S+)', metrics):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        series.setdefault(str(sorted((k, v) for k, v in labels.items() if k != "le")), {})[
            float(labels["le"].replace("+Inf", "inf"))] = float(m.group(2))
    assert series, "no adaptive batch-size metric exported"
    assert any(buckets[float("inf")] > buckets[1.0] for buckets in series.values()), \
        f"every batch had one photo: batching did not happen ({series})"


def test_the_entry_decodes_and_searches_on_a_few_threads(server, demo_catalogue, rows):
    """Not on Python's default pool of cores + 4 threads: on a 16-core GPU box its 20 threads contended for
    one interpreter lock and one entry process answered 27% fewer searches (docs/PERFORMANCE.md, section 7).
    The threads are read from the running process with py-spy, by name."""
    image = photo_bytes(demo_catalogue, rows[0]["image_path"])
    with httpx.Client(base_url=server.url, timeout=60, limits=httpx.Limits(max_connections=12)) as c:
        with cf.ThreadPoolExecutor(12) as pool:  # more in flight than either pool has threads
            assert set(pool.map(lambda _: c.post("/search", files=upload(image)).status_code, range(36))) == {200}
    entry = server.processes()["entry"][0]
    dump = subprocess.run(["py-spy", "dump", "--pid", str(entry.pid)], capture_output=True, text=True, timeout=60)
    names = re.findall(r'^Thread \S+ \([^)]*\): "([^"]+)"', dump.stdout, re.M)
    assert names, dump.stdout + dump.stderr
    pool_threads = [n for n in names if n.startswith("entry_")]
    assert 1 <= len(pool_threads) <= get_settings().entry_thread_count(available_cores()), names
    assert not [n for n in names if n.startswith(("asyncio_", "uvloop_"))], names  # the event loop's own pool


def test_reload_needs_the_token(server):
    assert server.http.post("/reload").status_code == 401
    assert server.http.post("/reload", headers={"Authorization": "Bearer wrong"}).status_code == 401
    bare = server.http.post("/reload", headers={"Authorization": TOKEN})  # the scheme is part of what to send
    assert bare.status_code == 401 and "'Authorization: Bearer <IMAGESEARCH_ADMIN_TOKEN>'" in bare.text, bare.text
    assert server.http.post("/reload", headers={"Authorization": f"bearer {TOKEN}"}).status_code == 200  # any case


def test_promote_and_rollback_switch_with_no_failed_request(server, served_stages, demo_index, second_index,
                                                            demo_catalogue, rows, monkeypatch):
    monkeypatch.setenv("IMAGESEARCH_STAGES_DIR", str(served_stages))
    stages.get_settings.cache_clear()
    image = photo_bytes(demo_catalogue, rows[5]["image_path"])
    seen, failures, stop = [], [], threading.Event()

    def client():
        with httpx.Client(base_url=server.url, timeout=60) as c:
            while not stop.is_set():
                r = c.post("/search", files=upload(image), data={"k": 3})
                if r.status_code != 200 or r.json()["results"][0]["item_id"] != rows[5]["item_id"]:
                    failures.append(r.text[:200])
                else:
                    seen.append(r.json()["served"]["index"])

    auth = {"Authorization": f"Bearer {TOKEN}"}
    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(1)
        stages.promote(second_index.tag, "production")
        r = server.http.post("/reload", headers=auth)
        assert r.status_code == 200 and r.json()["changed"] and r.json()["served"]["index"] == second_index.tag
        time.sleep(1.5)
        stages.rollback("production")
        r = server.http.post("/reload", headers=auth)
        assert r.json()["served"]["index"] == demo_index.tag and r.json()["previous"] == second_index.tag
        time.sleep(1.5)
        assert server.http.post("/reload", headers=auth).json()["changed"] is False
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not failures
    assert seen[0] == demo_index.tag and seen[-1] == demo_index.tag and second_index.tag in seen
    assert len(seen) > 20


def test_replicas_follow_the_stage_record_without_reload(tmp_path, demo_index, second_index, demo_catalogue, rows,
                                                        monkeypatch):
    """With IMAGESEARCH_FOLLOW_STAGE_S each replica notices a promotion itself; no request fails meanwhile."""
    monkeypatch.setenv("IMAGESEARCH_STAGES_DIR", str(tmp_path / "stages"))
    stages.get_settings.cache_clear()
    stages.promote(demo_index.tag, "production")
    image = upload(photo_bytes(demo_catalogue, rows[3]["image_path"]))
    srv = Server(tmp_path / "stages", tmp_path / "serve.log", IMAGESEARCH_FOLLOW_STAGE_S="0.5")
    try:
        srv.wait()
        assert srv.http.post("/search", files=image).json()["served"]["index"] == demo_index.tag
        stages.promote(second_index.tag, "production")
        seen = []
        for _ in range(40):
            r = srv.http.post("/search", files=image)
            assert r.status_code == 200, r.text
            seen.append(r.json()["served"]["index"])
            if seen[-1] == second_index.tag:
                break
            time.sleep(0.25)
        assert seen[-1] == second_index.tag, seen
    finally:
        srv.stop()


def corrupt_copy(tag: str) -> str:
    """A new index version whose Annoy file is cut short."""
    source = Path(get_model(tag).path)

    def write(folder: Path) -> None:
        shutil.copytree(source, folder, dirs_exist_ok=True)
        data = (folder / ANNOY_FILE).read_bytes()
        (folder / ANNOY_FILE).write_bytes(data[: len(data) // 3])

    model = get_model(tag)
    return register(INDEX_MODEL, model.info.labels, model.info.metadata, write)


def test_corrupt_or_missing_index_is_never_served(tmp_path, demo_index, monkeypatch):
    monkeypatch.setenv("IMAGESEARCH_STAGES_DIR", str(tmp_path / "stages"))
    stages.get_settings.cache_clear()
    bad = corrupt_copy(demo_index.tag)
    stages.promote(bad, "production")
    srv = Server(tmp_path / "stages", tmp_path / "serve.log")
    try:
        srv.wait("/livez")
        time.sleep(2)
        assert srv.http.get("/readyz").status_code == 503
        good = png(draw_object(0, 0, 0))
        assert srv.http.post("/search", files=upload(good)).status_code == 503
        # promoting a good index and reloading makes it ready, with no restart
        stages.promote(demo_index.tag, "production")
        deadline = time.time() + 60
        while True:  # as the 503 says: the embedder workers may still be starting; retry in a few seconds
            r = srv.http.post("/reload", headers={"Authorization": f"Bearer {TOKEN}"})
            if r.status_code != 503 or time.time() > deadline:
                break
            assert "embedder" in r.json()["error"]
            time.sleep(2)
        assert r.status_code == 200, r.text
        srv.wait("/readyz", timeout=30)
        assert srv.http.post("/search", files=upload(good)).status_code == 200
    finally:
        srv.stop()
    empty = Server(tmp_path / "nothing-promoted", tmp_path / "serve2.log", IMAGESEARCH_ADMIN_TOKEN="")
    try:
        empty.wait("/livez")
        assert empty.http.get("/readyz").status_code == 503
        assert empty.http.get("/index").status_code == 503
        # without a token of its own the server says that reload is off, not that the caller's token is missing
        off = empty.http.post("/reload", headers={"Authorization": f"Bearer {TOKEN}"})
        assert off.status_code == 403 and off.json() == {"field": None, "error": (
            "reload is off: this server has no IMAGESEARCH_ADMIN_TOKEN (it follows promotions on its own within 5 s); "
            "to switch at once, set the token where it runs and send it as 'Authorization: Bearer <token>'")}, off.text
    finally:
        empty.stop()


def test_random_weights_are_announced(demo_catalogue):
    from index_builder.build import build
    from query.active import load_active

    s = build(demo_catalogue, backbone="vgg16", weights="random", image_size=64, pca_dim=0, progress=False,
              workers=0)
    deployment = stages.Deployment(index=s.tag, embedder=s.embedder, at="2026-01-01T00:00:00Z", by="test")
    served = load_active(deployment, None, "production").served
    assert served.pretrained is False and "RANDOM" in served.warning


def test_loadtest_runner_judges_the_slo(server, demo_catalogue, tmp_path, python):
    cmd = [python, "-m", "loadtests.run", "--host", server.url, "--users", "2", "--spawn-rate", "2",
           "--run-time", "4s", "--photos", str(demo_catalogue.parent / "photos"), "--out", str(tmp_path)]
    ok = subprocess.run(cmd + ["--slo-ms", "60000"], cwd=ROOT, env=run_env(), capture_output=True, text=True,
                        timeout=120)
    assert ok.returncode == 0, ok.stdout + ok.stderr[-2000:]
    assert "PASS" in ok.stdout and "failures=0" in ok.stdout and (tmp_path / "users2.html").exists()
    strict = subprocess.run(cmd + ["--slo-ms", "1"], cwd=ROOT, env=run_env(), capture_output=True, text=True,
                            timeout=120)
    assert strict.returncode == 1 and "FAIL" in strict.stdout


def test_loadtest_runner_refuses_a_run_that_cannot_mean_anything(demo_catalogue, tmp_path):
    """No photos, or no service at --host: exit 2 saying which, before Locust starts (against a dead port it
    reported 1 request at 196 requests/s, and no photo folder was a FileNotFoundError traceback)."""
    from typer.testing import CliRunner

    from bench.server import free_port
    from loadtests import run

    photos = str(demo_catalogue.parent / "photos")
    dead = f"http://127.0.0.1:{free_port()}"
    for args, message in ((["--photos", str(tmp_path / "none")], "no folder "),
                          (["--photos", str(tmp_path)], "no photos in "),
                          (["--photos", photos], f"cannot reach {dead} (ConnectError): start the service")):
        result = CliRunner().invoke(run.app, ["--host", dead, "--out", str(tmp_path / "out"), *args])
        assert result.exit_code == 2 and message in result.output, result.output
    no_scheme = CliRunner().invoke(run.app, ["--host", "localhost:3000", "--photos", photos, "--out",
                                             str(tmp_path / "out")])
    assert no_scheme.exit_code == 2, no_scheme.output
    assert "--host localhost:3000 is not an http(s) URL: write it as http://localhost:3000" in no_scheme.output
    for bad in ("abc", "0s", "5 min"):  # failed inside Locust, after the service check
        no_time = CliRunner().invoke(run.app, ["--host", dead, "--run-time", bad, "--photos", photos])
        assert no_time.exit_code == 2 and f"'{bad}': write a duration over zero" in no_time.output, no_time.output
    assert "cannot reach" in CliRunner().invoke(run.app, ["--host", dead, "--run-time", "1h30m", "--photos",
                                                          photos]).output  # past the duration's check
    assert not (tmp_path / "out").exists()


def test_the_slo_holds_only_when_every_kind_of_request_holds_it():
    """Thumbnails are many and fast: a p95 over all requests can hide searches over the SLO."""
    from loadtests.run import RunResult, Stats

    def kind(name: str, p95: float) -> Stats:
        return Stats(name=name, requests=50, failures=0, rps=5, p50_ms=p95 / 3, p95_ms=p95, p99_ms=p95, max_ms=p95)

    run = RunResult(**kind("all", 400).model_dump(), users=4, report="users4.html",
                    kinds=[kind("POST /assist (page)", 1500), kind("GET /photos/[sha256].webp", 20)])
    assert not run.holds(1000) and run.holds(1500)
    assert not run.model_copy(update={"failures": 1}).holds(1500)
    assert not run.model_copy(update={"errors": ["3x KeyError('nearest')"]}).holds(1500)  # a broken user


def test_page_visitors_request_what_the_page_does_and_each_kind_is_judged(server, demo_catalogue, tmp_path, python):
    cmd = [python, "-m", "loadtests.run", "--host", server.url, "--mix", "page", "--users", "2", "--spawn-rate", "2",
           "--run-time", "6s", "--photos", str(demo_catalogue.parent / "photos"), "--out", str(tmp_path),
           "--slo-ms", "60000"]
    done = subprocess.run(cmd, cwd=ROOT, env=run_env(LOADTEST_THINK="0,0.2"), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
    run = json.loads((tmp_path / "summary.json").read_text())["run"]
    kinds = {k["name"]: k for k in run["kinds"]}
    assert {"GET /ui/", "GET /ui/app.js", "GET /index", "POST /assist (page)", "GET /photos/[sha256].webp"} <= set(kinds)
    assert run["failures"] == 0 and run["errors"] == [] and kinds["POST /assist (page)"]["requests"] >= 2
    assert "POST /search" not in kinds  # the API users are not in this mix
    assert "POST /assist (page)" in done.stdout  # each kind is printed


def test_the_entry_workers_never_load_torch(server):
    """A child process asks torch whether there is a GPU; supervisor and entry workers inherit the answer."""
    def loads_torch(p: psutil.Process) -> bool:
        return any("libtorch" in m.path for m in p.memory_maps())

    procs = server.processes()
    torch_loaded = {role: [loads_torch(p) for p in procs[role]] for role in ("entry", "embedder")}
    assert torch_loaded["entry"] and not any(torch_loaded["entry"]), torch_loaded
    assert torch_loaded["embedder"] and all(torch_loaded["embedder"]), torch_loaded
    assert not loads_torch(psutil.Process(server.proc.pid))  # the supervisor


def test_a_second_server_on_the_store_leaves_the_first_ones_metrics(server, demo_catalogue, rows, tmp_path):
    """BentoML empties one Prometheus folder per BENTOML_HOME whenever a server starts: a server started beside
    this one (staging beside production) used to delete this one's files, and its /metrics lost its workers'
    series until a restart (query/bentoml_fixes.py). A folder left by a server no longer running goes."""
    def embedder_series() -> list[str]:
        text = server.http.get("/metrics").text
        return re.findall(r'^bentoml_service_adaptive_batch_size_count\{[^}]*\}', text, re.M)

    assert server.http.post("/search", files=upload(photo_bytes(demo_catalogue, rows[0]["image_path"]))).is_success
    before = embedder_series()
    assert before, "the embedder exported no batch sizes"
    folders = Path(os.environ["BENTOML_HOME"]) / METRICS_FOLDERS
    left = folders / f"{socket.gethostname()}-{2 ** 22 + 1}"  # above Linux's largest process id: never running
    left.mkdir(parents=True)
    with Server(tmp_path / "stages", tmp_path / "serve.log") as other:
        other.wait("/livez")
        assert embedder_series() == before
        assert not left.exists()
        assert {f.name.split("-")[-1] for f in folders.iterdir()} >= {str(server.proc.pid), str(other.proc.pid)}


def test_torch_is_asked_about_a_gpu_only_where_there_may_be_one(python):
    """Where no GPU driver is, the service knows it without the child process that imports torch (~3 s of each
    start); where one may be, or one is asked for, the child asks torch. Each import in a process of its own:
    this one's environment would keep the answer (gpu_probe.ANSWER) for every server the tests start."""
    ask = ("import os, sys; seen = []\n"
           "sys.addaudithook(lambda e, a: e == 'subprocess.Popen' and 'pick_device' in str(a) and seen.append(a))\n"
           "import service; from model_store import gpu_probe\n"
           "print(len(seen), service.EMBED_ON_GPU, any(map(os.path.exists, gpu_probe.GPU_DEVICE_FILES)))")
    for device in ("cpu", "cuda", "auto"):
        env = {k: v for k, v in run_env(IMAGESEARCH_DEVICE=device).items() if not k.startswith("_IMAGESEARCH")}
        out = subprocess.run([python, "-c", ask], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        probes, on_gpu, driver = out.stdout.split()[-3:]
        auto = ("1", on_gpu) if driver == "True" else ("0", "False")  # with a driver, torch tells
        assert (probes, on_gpu) == {"cpu": ("0", "False"), "cuda": ("1", "True"), "auto": auto}[device], out.stdout


def test_embedder_workers_start_with_one_malloc_arena(server):
    """Their torch thread then allocates from the main heap, which keeps what a pass frees for the next one
    (model_store/malloc.py): served at 16 clients, 4-32 page faults per search instead of 1,400-3,600."""
    workers = server.processes()["embedder"]
    assert workers and all(p.environ().get(ONE_ARENA["name"]) == ONE_ARENA["value"] for p in workers)


def livez_on(conn: http.client.HTTPConnection) -> int:
    """GET /livez on this one connection (never a new one behind the caller's back): its status."""
    conn.request("GET", "/livez")
    answer = conn.getresponse()
    answer.read()
    return answer.status


def test_idle_connections_outlive_uvicorns_keep_alive(server):
    """Served as deployed (the entry container's server options in deploy/k8s.yaml), an idle connection is still
    open after uvicorn's default keep-alive of 5 s: a load balancer keeping it longer must not send a request into
    a close."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    answers = []
    try:
        for idle_s in (0, 6):
            time.sleep(idle_s)
            try:
                answers.append(livez_on(conn))
            except (http.client.HTTPException, OSError) as exc:
                answers.append(f"after {idle_s} s idle: {exc!r}")
            if idle_s == 0:
                first = conn.sock
        assert answers == [200, 200] and conn.sock is first, answers
    finally:
        conn.close()
