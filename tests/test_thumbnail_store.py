"""Pruning the shared thumbnail store: only what no stored version uses goes, never under a running build.

Each test has a BentoML home of its own (builds and the CLI run as subprocesses), so the other tests'
versions, some of them deliberately broken, do not take part.
"""

from __future__ import annotations

import csv
import fcntl
import hashlib
import json
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import run_env
from model_store import build_lock, thumbnails
from test_build import _new_catalogue

pytestmark = pytest.mark.slow


class Store:
    """A BentoML home of the test's own, driven through the two CLIs."""

    def __init__(self, folder: Path, python: str):
        self.home, self.python = folder / "bentoml", python
        self.env = run_env(BENTOML_HOME=str(self.home), IMAGESEARCH_STAGES_DIR=str(folder / "stages"))
        self.thumbnails = self.home / "thumbnails"

    def run(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([self.python, "-m", *args], env=self.env, capture_output=True, text=True, timeout=300)

    def build(self, catalogue: Path) -> dict:
        done = self.run("index_builder", "build", str(catalogue), "--backbone", "efficientnet-lite0", "--weights",
                        "random", "--image-size", "64", "--pca-dim", "0", "--workers", "0", "--no-progress", "--json")
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout)

    def keys(self) -> set[str]:
        return {p.stem for p in self.thumbnails.glob("*/*.webp")}


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def photos(catalogue: Path) -> list[Path]:
    with open(catalogue) as f:
        return [catalogue.parent / r["image_path"] for r in csv.DictReader(f)]


def replace_first_and_drop_last(catalogue: Path) -> Path:
    """The next night's catalogue: the first item's photo re-shot, the last item gone."""
    from index_builder.demo import draw_object

    with open(catalogue) as f:
        rows = list(csv.DictReader(f))
    draw_object(3, 5, 99, seed=7777).save(catalogue.parent / "p0-reshot.png")
    rows = [{**rows[0], "image_path": "p0-reshot.png"}, *rows[1:-1]]
    nightly = catalogue.with_name("nightly.csv")
    with open(nightly, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return nightly


def test_prune_deletes_only_what_no_stored_version_uses(tmp_path, python):
    store = Store(tmp_path, python)
    first = _new_catalogue(tmp_path / "cat", 5, seed=9100)
    old = store.build(first)
    new = store.build(replace_first_and_drop_last(first))
    used_by_new = {sha(p) for p in photos(first.with_name("nightly.csv"))}
    only_old = {sha(p) for p in photos(first)} - used_by_new
    assert len(only_old) == 2 and store.keys() == used_by_new | only_old
    assert new["thumbnails_made"] == 1  # the re-shot photo; the others were there

    shown = store.run("model_store", "thumbnails")
    assert shown.returncode == 0 and "6 thumbnails" in shown.stdout and "every one is used" in shown.stdout
    deleted = store.run("model_store", "delete", old["tag"])
    assert deleted.returncode == 0 and "--prune" in deleted.stdout
    shown = store.run("model_store", "thumbnails")
    assert "2 of them" in shown.stdout and "used by no stored version" in shown.stdout
    assert store.keys() == used_by_new | only_old  # showing deletes nothing

    # half-written thumbnails: one a killed writer left an hour ago, one being written now
    stale, fresh = (store.thumbnails / "00" / f".{name}.tmp" for name in ("stale", "fresh"))
    stale.parent.mkdir(exist_ok=True)
    for tmp in (stale, fresh):
        tmp.write_bytes(b"half")
    os.utime(stale, (time.time() - 2 * thumbnails.STALE_TMP_S,) * 2)

    pruned = store.run("model_store", "thumbnails", "--prune")
    assert pruned.returncode == 0, pruned.stderr
    assert "deleted 2 thumbnails" in pruned.stdout
    assert store.keys() == used_by_new  # every photo of the version left keeps its thumbnail
    assert not stale.exists() and fresh.exists()

    # the old catalogue built again (its vectors still cached) remakes the two thumbnails, and only them
    again = store.build(first)
    assert again["thumbnails_made"] == 2 and again["reused_photos"] == 5
    assert store.keys() == used_by_new | only_old
    assert "deleted 0 thumbnails" in store.run("model_store", "thumbnails", "--prune").stdout


def test_no_prune_while_a_build_holds_the_store_or_a_version_cannot_be_read(tmp_path, python):
    store = Store(tmp_path, python)
    built = store.build(_new_catalogue(tmp_path / "cat", 3, seed=9200))
    (store.thumbnails / "ab").mkdir()
    unused = store.thumbnails / "ab" / f"{'ab' * 32}.webp"
    unused.write_bytes(b"RIFF")

    with build_lock.building(store.home / "build.lock"):
        refused = store.run("model_store", "thumbnails", "--prune")
    assert refused.returncode == 2 and "a build (or another prune) is running" in refused.stderr
    assert "prune the thumbnail store once it has finished" in refused.stderr
    assert unused.exists()

    items = next((store.home / "models").glob(f"image-index/{built['tag'].split(':')[1]}/items.sqlite"))
    items.rename(items.with_suffix(".moved"))
    refused = store.run("model_store", "thumbnails", "--prune")
    assert refused.returncode == 2 and built["tag"] in refused.stderr and "cannot be read" in refused.stderr
    assert unused.exists() and len(store.keys()) == 4
    items.with_suffix(".moved").rename(items)

    assert store.run("model_store", "thumbnails", "--prune").returncode == 0
    assert not unused.exists() and len(store.keys()) == 3


@pytest.mark.parametrize("make_thumbnails", [True, False])
def test_a_build_holds_the_lock_from_choosing_what_to_reuse_to_registering(tmp_path, monkeypatch, make_thumbnails):
    """The embedding cache's prune takes the same lock, so a build without thumbnails holds it too."""
    from index_builder import build as build_module

    def store_held() -> bool:
        with open(build_lock.lock_path(), "a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            return False

    held = []

    def probing(step):
        def probed(*args, **kwargs):
            held.append(store_held())
            return step(*args, **kwargs)
        return probed

    monkeypatch.setattr(build_module, "EmbeddingCache", probing(build_module.EmbeddingCache))
    monkeypatch.setattr(build_module, "extract", probing(build_module.extract))
    monkeypatch.setattr(build_module, "register", probing(build_module.register))
    build_module.build(_new_catalogue(tmp_path / "cat", 2, seed=9300), backbone="efficientnet-lite0",
                       weights="random", image_size=64, pca_dim=0, progress=False, workers=0,
                       thumbnails=make_thumbnails)
    assert held == [True, True, True] and not store_held()


def test_a_build_waits_for_a_prune_to_finish(tmp_path):
    lock = tmp_path / "build.lock"
    entered = threading.Event()

    def build():
        with build_lock.building(lock):
            entered.set()

    with open(lock, "a") as prune_lock:
        fcntl.flock(prune_lock, fcntl.LOCK_EX)  # what a prune holds
        waiting = threading.Thread(target=build)
        waiting.start()
        assert not entered.wait(0.5)
    assert entered.wait(5)
    waiting.join()
    with build_lock.building(lock), build_lock.building(lock):  # builds share the store
        with pytest.raises(build_lock.StoreBusy, match="prune the embedding cache once"):
            with build_lock.pruning("embedding cache", lock):
                pass
