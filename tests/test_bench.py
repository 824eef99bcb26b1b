"""Smoke runs of every benchmark (--quick), so none rots; they check that each runs, not its timings."""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
import time

import pytest

from bench.coil import COIL
from conftest import ROOT, run_env

pytestmark = pytest.mark.slow


def quick(module: str, python: str, *args: str, timeout: int = 600) -> str:
    """A benchmark's --quick run, whose catalogues, stores and server logs (~20 MB) go with it: its TMPDIR is a
    folder of its own, removed after (short: a Unix socket's path in it must fit 107 bytes)."""
    with tempfile.TemporaryDirectory(prefix="bq-", dir="/tmp", ignore_cleanup_errors=True) as temp:
        out = subprocess.run([python, "-m", module, "--quick", *args], cwd=ROOT, env=run_env(TMPDIR=temp),
                             capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_ann_scale(python):
    assert '"n": 20000' in quick("bench.ann_scale", python)


def test_embedder_speed(python):
    assert "matmul_peak_gflops" in quick("bench.embedder_speed", python)


@pytest.mark.skipif(not (COIL / "labels.csv").exists(), reason="../shared/data/coil-100 is absent")
def test_evaluate_coil(python):
    assert "raw pixels" in quick("bench.evaluate_coil", python)


def test_serving(python):
    assert "saturation_rps_over_bare_embedder_batch1" in quick("bench.serving", python)


def test_builder_speed(python):
    assert "whole_build_images_per_s" in quick("bench.builder_speed", python)


def test_overhead(python):
    out = quick("bench.overhead", python, "--before", "", "--upload", "page",  # phone photos, downscaled as the page does
                "--layout", "1x2 IMAGESEARCH_ENTRY_THREADS=2",  # the CPU's own layout, named
                "--backbone", "efficientnet-lite0", "--weights", "default")  # as the VGG16 run names its network
    assert '"served_over_bare"' in out and '"http_over_bare"' in out
    assert '"this checkout, 1 entry x 2 embedder processes, IMAGESEARCH_ENTRY_THREADS=2"' in out


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="--apart gives each service a core of its own")
def test_overhead_with_each_service_apart_on_cores_of_its_own(python):
    out = quick("bench.overhead", python, "--before", "", "--apart")
    row, cores = json.loads(out.strip().splitlines()[-1]), sorted(os.sched_getaffinity(0))
    assert row["code"].startswith("this checkout, apart: the Embedder on core"), row
    half = len(cores) // 2
    assert (row["layout"]["embedder_cores"], row["layout"]["entry_cores"]) == (cores[:half], cores[half:]), row
    assert row["served_over_bare"]["one process"] > 0 and row["http_over_bare"] > 0


def test_upload_flood(python):
    out = quick("bench.upload_flood", python, "--before", "")
    assert "this checkout [({'415': 4}, 'peak " in out, out  # 4 requests of 1 MB: each refused by the handler


def test_overhead_reads_a_layout_and_names_its_row():
    import typer
    from bench.overhead import layout_label, parse_layout

    env = parse_layout("8x4 IMAGESEARCH_ENTRY_THREADS=4 IMAGESEARCH_EMBED_BATCH=16")
    assert env == {"IMAGESEARCH_SEARCH_WORKERS": "8", "IMAGESEARCH_EMBEDDER_WORKERS": "4",
                   "IMAGESEARCH_ENTRY_THREADS": "4", "IMAGESEARCH_EMBED_BATCH": "16"}
    assert layout_label(env) == ("this checkout, 8 entry x 4 embedder processes, IMAGESEARCH_ENTRY_THREADS=4, "
                                 "IMAGESEARCH_EMBED_BATCH=16")
    assert layout_label({}) == "this checkout"
    for bad in ("8", "0x4", "8x4 ENTRY_THREADS=4", "2x2 IMAGESEARCH_X"):
        with pytest.raises(typer.BadParameter, match="entry x embedder processes"):
            parse_layout(bad)


def test_ab_serving(python):
    out = quick("bench.ab_serving", python, "--env", "IMAGESEARCH_EMBED_DEADLINE_S=2",
                "--backbone", "efficientnet-lite0", "--weights", "default")  # as the slow-network run names VGG16
    assert '"before (HEAD)"' in out and '"this checkout IMAGESEARCH_EMBED_DEADLINE_S=2"' in out
    assert '"median_embedder_cpu_ms"' in out and '"median_p99_ms"' in out
    assert '"failed": 0' in out and not re.search(r'"failed": [1-9]', out)  # wrk's non-2xx answers, socket errors


def test_oversubscribe(python):
    out = quick("bench.oversubscribe", python)
    assert "| 2 threads, another worker busy on 1 |" in out and "| 1 thread, alone |" in out


def test_embedder_hop(python):
    """The Embedder, reached on its Unix socket with the entry's own call, answers every photo of the loop."""
    out = quick("bench.embedder_hop", python)
    answered = re.search(r'"answered": (\d+), "failed": (\d+)', out)
    assert answered and int(answered.group(1)) > 0 and answered.group(2) == "0", out[-2000:]
    assert '"served_over_bare"' in out


def test_embedder_records(python):
    """Both rows serve every call, and the Embedder's event loop is read apart from its other threads."""
    out = quick("bench.embedder_records", python)
    rows = re.findall(r'^records (on|off) .*"failed": (\d+), "event_loop_ms_per_call": ([\d.]+), '
                      r'"other_threads_ms_per_call": ([\d.]+)', out, re.M)
    assert [(row, failed) for row, failed, *_ in rows] == [("on", "0"), ("off", "0")], out[-2000:]
    assert all(0 < float(loop) < float(other) for *_, loop, other in rows), out[-2000:]


def test_startup(python):
    out = quick("bench.startup", python)
    assert '"seconds_to_ready"' in out and '"this checkout": [' in out


def test_freed_memory(python):
    out = quick("bench.freed_memory", python)
    assert "| efficientnet-lite0 | 64 | 1 | 1 |" in out and "kept / handed back" in out


def test_entry_threads(python):
    out = quick("bench.entry_threads", python, "--threads", "1,2")
    assert "| pool threads | searches/s | CPU ms per search |" in out and '"threads": 2' in out


def test_sparse_images(python):
    out = quick("bench.sparse_images", python)
    assert "| WebP lossless | one colour |" in out and "| JPEG 2000 | photo |" in out


def test_decode(python):
    out = quick("bench.decode", python)
    assert '"reduced_ms"' in out and '"page_ms"' in out and '"heic_ms"' in out


def test_item_photos_speed(python):
    out = quick("bench.item_photos_speed", python)
    assert '"over_one_photo"' in out and '"photos": 3' in out


def test_thumbnail_prune(python):
    assert "deletes the 20 unused" in quick("bench.thumbnail_prune", python)


def test_cache_prune(python):
    out = quick("bench.cache_prune", python)
    assert "| 20 (1%): deleted, space left for the next builds |" in out
    assert "| 400 (20%): deleted, file compacted |" in out


def test_resample_crop(python):
    out = quick("bench.resample_crop", python)
    assert '"max_level_difference"' in out or not out  # without ../shared/data it has no photos to compare


def _wrk_against(answer_s: float, seconds: float):
    """bench/wrk.py's closed loop of 2 clients against a real HTTP server that takes `answer_s` to answer and
    fails every third search: (what each request carried was a search, the loop's result)."""
    import http.server
    import threading

    from bench.wrk import closed_loop

    seen, counting = [], threading.Lock()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            with counting:  # each request its own number, whichever thread gets the interpreter first
                seen.append(self.path == "/search" and b'name="image"' in body and b"PHOTO" in body)
                n = len(seen)
            time.sleep(answer_s)
            status = 500 if n % 3 == 0 else 200
            self.send_response(status)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        return seen, closed_loop(f"http://127.0.0.1:{srv.server_port}", [b"PHOTO"], 2, seconds)
    finally:
        srv.shutdown()


def test_wrk_counts_failed_searches_as_failures():
    seen, r = _wrk_against(0, 1)
    assert seen and all(seen)
    assert r["answered"] > 0 and r["failed"] > 0 and abs(r["failed"] - r["answered"] / 2) <= 2
    assert r["p50_ms"] > 0 and r["load_generator_cpu_s"] >= 0


def test_wrk_reads_latencies_of_a_second_and_more():
    """wrk writes "1.20s " (a space after it) where it writes "41.2ms": both are read."""
    _, r = _wrk_against(1.05, 2)
    assert 1000 <= r["p50_ms"] < 3000 and 1000 <= r["p99_ms"] < 3000
