"""Catalogues whose photos are URLs: a real local HTTP server and a real local S3 endpoint (moto's server)."""

from __future__ import annotations

import csv
import functools
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from bench.server import free_port
from index_builder.build import build
from index_builder.demo import draw_object

pytestmark = pytest.mark.slow


def photos(folder: Path, n: int, seed: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        draw_object(i % 8, 4, 11 * i, seed=seed + i).save(folder / f"r{i}.png")
        names.append(f"r{i}.png")
    return names


def write_catalogue(path: Path, urls: list[str]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["item_id", "image_path", "title", "category", "price", "currency", "sold_at"])
        for i, url in enumerate(urls):
            w.writerow([f"remote-{i}", url, f"Remote thing {i}", "Misc", 20 + i, "USD", "2025-07-01"])
    return path


def report_rows(report: str) -> dict[str, str]:
    with open(report) as f:
        return {r["image_path"]: r["reason"] for r in csv.DictReader(f)}


@pytest.fixture
def http_server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(root))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.mark.parametrize("engine", ["local", "ray"])
def test_a_catalogue_of_http_photos_builds_and_reports_what_cannot_be_fetched(http_server, tmp_path, engine,
                                                                              request):
    join = {"ray_address": request.getfixturevalue("ray_cluster")} if engine == "ray" else {}  # Ray tasks fetch
    root, url = http_server
    names = photos(root, 10, seed=7000 if engine == "local" else 7500)
    dead = f"http://127.0.0.1:{free_port()}/gone.png"  # nothing listens there
    catalogue = write_catalogue(tmp_path / "cat.csv", [f"{url}/{n}" for n in names] + [f"{url}/missing.png", dead])
    first = build(catalogue, progress=False, workers=1, engine=engine, **join)  # a forked worker, or a Ray task
    assert first.photos_indexed == 10 and first.bad_rows == 2 and first.reused_photos == 0
    bad = report_rows(first.report)
    assert "not found" in bad[f"{url}/missing.png"]
    assert "cannot fetch" in bad[dead] and "tried 3 times" in bad[dead]
    # unchanged photos are recognised from one HEAD request each (size and Last-Modified): nothing embedded
    second = build(catalogue, progress=False, workers=0, engine=engine, **join)
    assert second.reused_photos == 10 and second.photos_indexed == 10


def test_a_catalogue_of_s3_photos_builds(tmp_path, monkeypatch):
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        for name, value in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
                            "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}.items():
            monkeypatch.setenv(name, value)
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket="catalogue-photos")
        names = photos(tmp_path / "local", 6, seed=7100)
        for n in names:
            s3.upload_file(str(tmp_path / "local" / n), "catalogue-photos", f"2025/{n}")
        urls = [f"s3://catalogue-photos/2025/{n}" for n in names] + ["s3://catalogue-photos/2025/missing.png"]
        summary = build(write_catalogue(tmp_path / "cat.csv", urls), progress=False, workers=0)
        assert summary.photos_indexed == 6 and summary.bad_rows == 1
        assert "not found" in report_rows(summary.report)["s3://catalogue-photos/2025/missing.png"]
        again = build(write_catalogue(tmp_path / "cat.csv", urls), progress=False, workers=0)
        assert again.reused_photos == 6  # by ETag, without reading the photos
    finally:
        server.stop()


def test_a_catalogue_of_gcs_photos_builds(tmp_path, monkeypatch):
    """gs:// through gcsfs, against a real local Cloud Storage emulator (gcp-storage-emulator) on 127.0.0.1."""
    pytest.importorskip("gcsfs")
    emulator = pytest.importorskip("gcp_storage_emulator.server")
    import fsspec

    from index_builder import sources

    port = free_port()
    server = emulator.create_server("127.0.0.1", port, in_memory=True, default_bucket="catalogue-photos")
    server.start()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")
    sources._filesystem.cache_clear()  # a filesystem made before would talk to the real service
    try:
        gcs = fsspec.filesystem("gs", skip_instance_cache=True)
        names = photos(tmp_path / "local", 6, seed=7200)
        for n in names:
            gcs.put_file(str(tmp_path / "local" / n), f"catalogue-photos/2025/{n}")
        urls = [f"gs://catalogue-photos/2025/{n}" for n in names] + ["gs://catalogue-photos/2025/missing.png"]
        summary = build(write_catalogue(tmp_path / "cat.csv", urls), progress=False, workers=0)
        assert summary.photos_indexed == 6 and summary.bad_rows == 1
        assert "not found" in report_rows(summary.report)["gs://catalogue-photos/2025/missing.png"]
        again = build(write_catalogue(tmp_path / "cat.csv", urls), progress=False, workers=0)
        assert again.reused_photos == 6  # by the objects' ETags, without reading the photos
    finally:
        sources._filesystem.cache_clear()
        server.stop()
