"""Pruning the embedding cache: the vectors no stored version holds go, the others stay, never under a build.

Each test has a BentoML home of its own (builds and the CLI run as subprocesses), so the shared store's
versions, some of them deliberately broken, and the caches other tests count on take no part.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import lmdb
import numpy as np
import pytest

from index_builder import cache
from index_builder.cache import EmbeddingCache, registered
from model_store import build_lock
from test_build import _new_catalogue
from test_thumbnail_store import Store, photos, replace_first_and_drop_last, sha

pytestmark = pytest.mark.slow


def cache_folder(store: Store, built: dict) -> Path:
    return store.home / "embedding-cache" / built["embedder"].replace(":", "-")


def entries(folder: Path) -> dict[str, set[bytes]]:
    """The vectors' hashes and the photo hashes the cheap keys point to."""
    env = lmdb.open(str(folder), readonly=True, max_dbs=2, lock=False)
    try:
        with env.begin() as txn:
            vectors = set(txn.cursor(env.open_db(b"vectors", txn=txn, create=False)).iternext(values=False))
            seen = {sha for _, sha in txn.cursor(env.open_db(b"seen", txn=txn, create=False)).iternext()}
    finally:
        env.close()
    return {"vectors": vectors, "seen": seen}


def cache_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir())


def test_prune_deletes_the_vectors_no_stored_version_holds(tmp_path, python):
    store = Store(tmp_path, python)
    # photo 2 has an image_url (no thumbnail): only the version's content column says the cache must keep it
    first = _new_catalogue(tmp_path / "cat", 5, {2: "https://cdn.example.com/p2.jpg"}, seed=9600)
    old = store.build(first)
    new = store.build(replace_first_and_drop_last(first))
    folder = cache_folder(store, new)
    used_by_new = {sha(p).encode() for p in photos(first.with_name("nightly.csv"))}
    assert len(used_by_new) == 4 and entries(folder)["vectors"] == used_by_new | {sha(p).encode() for p in photos(first)}

    orphan = EmbeddingCache("image-embedder:nobodyusesthis", 4, store.home / "embedding-cache")
    orphan.put([(None, "ab" * 32, np.ones(4, np.float32))])
    orphan.close()
    registered("image-embedder:nobodyusesthis", store.home / "embedding-cache")  # no build waits to resume it
    shown = store.run("index_builder", "cache")
    assert shown.returncode == 0, shown.stderr
    assert "every vector is used by a stored version" in shown.stdout
    assert "image-embedder-nobodyusesthis" in shown.stdout and "no stored index uses it" in shown.stdout

    assert store.run("model_store", "delete", old["tag"]).returncode == 0
    shown = store.run("index_builder", "cache")
    assert "2 of them used by no stored version" in shown.stdout
    assert len(entries(folder)["vectors"]) == 6  # showing deletes nothing

    typo = store.run("index_builder", "cache", "--prune", "--keep", "image-embedder:nobodyusesthat")
    assert typo.returncode == 2 and typo.stderr.startswith("error: --keep image-embedder-nobodyusesthat: no embedder "
                                                           "has a cache of that name in "), typo.stderr
    assert (store.home / "embedding-cache" / "image-embedder-nobodyusesthis").exists()  # a typo deletes nothing
    kept = store.run("index_builder", "cache", "--prune", "--keep", new["embedder"], "--keep",
                     "image-embedder:nobodyusesthis")
    assert kept.returncode == 0 and kept.stdout.count("kept whole: kept with --keep") == 2
    assert len(entries(folder)["vectors"]) == 6 and (store.home / "embedding-cache" / "image-embedder-nobodyusesthis").exists()

    before = cache_bytes(folder)
    pruned = store.run("index_builder", "cache", "--prune")
    assert pruned.returncode == 0, pruned.stderr
    assert "deleted 2 vectors no stored version holds; compacted to" in pruned.stdout
    assert "deleted: no stored index uses this embedder" in pruned.stdout
    assert not (store.home / "embedding-cache" / "image-embedder-nobodyusesthis").exists()
    left = entries(folder)
    assert left["vectors"] == used_by_new and left["seen"] == used_by_new  # cheap keys of deleted photos go too
    assert cache_bytes(folder) < before  # compacted: LMDB never gives pages back by itself

    # every photo of the version left is still cached, the one with an image_url included
    assert store.build(first.with_name("nightly.csv"))["reused_photos"] == 4
    again = store.build(first)  # the old catalogue embeds exactly the two photos only it had
    assert again["reused_photos"] == 3 and again["photos_indexed"] == 5
    assert "every vector is used" in store.run("index_builder", "cache", "--prune").stdout

    # a nightly --keep of a stored embedder whose cache is gone (an earlier prune, a disk swap) prunes the rest
    orphan = EmbeddingCache("image-embedder:nobodyusesthis", 4, store.home / "embedding-cache")
    orphan.close()
    shutil.rmtree(folder)
    nightly = store.run("index_builder", "cache", "--prune", "--keep", new["embedder"])
    assert nightly.returncode == 0, nightly.stderr
    assert f"{folder.name}           0 vectors         0.0 MB  no cache (a stored embedder named by --keep" \
        in nightly.stdout, nightly.stdout
    assert "deleted: no stored index uses this embedder" in nightly.stdout
    assert not (store.home / "embedding-cache" / "image-embedder-nobodyusesthis").exists()


def test_no_prune_under_a_build_and_an_old_version_keeps_its_cache_whole(tmp_path, python):
    store = Store(tmp_path, python)
    built = store.build(_new_catalogue(tmp_path / "cat", 3, {0: "https://cdn.example.com/p0.jpg"}, seed=9700))
    folder = cache_folder(store, built)
    extra = EmbeddingCache(built["embedder"], 1280, store.home / "embedding-cache")
    extra.put([(None, "cd" * 32, np.ones(1280, np.float32))])  # a vector no version holds
    extra.close()
    registered(built["embedder"], store.home / "embedding-cache")

    with build_lock.building(store.home / "build.lock"):
        refused = store.run("index_builder", "cache", "--prune")
    assert refused.returncode == 2 and "a build (or another prune) is running" in refused.stderr
    assert len(entries(folder)["vectors"]) == 4

    # a version written before photos recorded their content: its image_url photo is known by no hash
    items = next((store.home / "models").glob(f"image-index/{built['tag'].split(':')[1]}/items.sqlite"))
    with sqlite3.connect(items) as conn:
        conn.execute("ALTER TABLE photos DROP COLUMN content")
    conn.close()
    pruned = store.run("index_builder", "cache", "--prune")
    assert pruned.returncode == 0, pruned.stderr
    assert f"kept whole: {built['tag']} does not record all its photos" in pruned.stdout
    assert len(entries(folder)["vectors"]) == 4

    items.unlink()  # unreadable: kept whole, and the message names the version
    pruned = store.run("index_builder", "cache", "--prune")
    assert pruned.returncode == 0 and f"kept whole: {built['tag']}: " in pruned.stdout
    assert len(entries(folder)["vectors"]) == 4


def test_a_prune_keeps_what_a_killed_build_embedded_for_its_rerun(tmp_path, python):
    """The store's first build of an embedder, killed halfway: no version uses the embedder yet, and a prune
    used to delete its whole cache. Its vectors stay until a build of that embedder registers a version."""
    store = Store(tmp_path, python)
    catalogue = _new_catalogue(tmp_path / "cat", 60, seed=9800)
    cmd = [python, "-m", "index_builder", "build", str(catalogue), "--backbone", "efficientnet-lite0", "--weights",
           "random", "--batch-size", "2", "--workers", "0", "--no-progress", "--json"]
    proc = subprocess.Popen(cmd, env=store.env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    deadline, done = time.time() + 180, 0
    while time.time() < deadline and done < 10 and proc.poll() is None:
        time.sleep(0.05)
        folders = list((store.home / "embedding-cache").glob("*/data.mdb"))
        done = cache.entries(folders[0].parent, cache.VECTORS) if folders else 0
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    [folder] = [f.parent for f in (store.home / "embedding-cache").glob("*/data.mdb")]
    done = len(entries(folder)["vectors"])
    assert 10 <= done < 60, "the build must be killed halfway for this test to mean anything"

    shown = store.run("index_builder", "cache")
    assert f"{done} written by a build that registered no version (killed or failed): kept for its rerun" in shown.stdout
    pruned = store.run("index_builder", "cache", "--prune")
    assert pruned.returncode == 0, pruned.stderr
    assert "kept for its rerun" in pruned.stdout and len(entries(folder)["vectors"]) == done

    rerun = subprocess.run(cmd, env=store.env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    built = json.loads(rerun.stdout)
    assert built["reused_photos"] >= done  # the killed build's work was not lost
    assert "every vector is used by a stored version" in store.run("index_builder", "cache", "--prune").stdout
    # registered: nothing is kept for a rerun any more, and a prune deletes what no version holds
    assert store.run("model_store", "delete", built["tag"]).returncode == 0
    pruned = store.run("index_builder", "cache", "--prune")
    assert "deleted: no stored index uses this embedder" in pruned.stdout and not folder.exists(), pruned.stdout


def test_a_version_registered_stays_so_when_the_cache_cannot_record_it(tmp_path, capsys):
    """The build calls registered() after its version is in the store: a cache it cannot write (here not an
    LMDB file at all) must not turn that build into a failure that says nothing was registered."""
    (tmp_path / "image-embedder-broken" / "data.mdb").mkdir(parents=True)
    registered("image-embedder:broken", tmp_path)
    assert "a prune keeps this embedder's vectors no version holds" in capsys.readouterr().err


def test_nightly_prunes_keep_the_file_from_growing(tmp_path):
    """A catalogue that replaces 1% of its photos a night: pruned, the cache file stays the size it was (the
    next night's vectors fill the pages the prune freed); unpruned, it grows by each night's vectors. Vectors of
    1280 numbers, as the default embedder's: LMDB keeps each on pages of its own."""

    def night(store: EmbeddingCache, name: str, n: int) -> list[str]:
        hashes = [hashlib.sha256(f"{name}-{i}".encode()).hexdigest() for i in range(n)]
        for s in range(0, n, 4):  # a build writes a batch at a time
            store.put([(f"{name}/p{i}.jpg", hashes[i], np.ones(1280, np.float32)) for i in range(s, min(s + 4, n))])
        return hashes

    sizes = {}
    for pruned in (True, False):
        root = tmp_path / str(pruned)
        store = EmbeddingCache("image-embedder:nightly", 1280, root)
        live = night(store, "first", 2000)
        store.close()
        data = root / "image-embedder-nightly" / "data.mdb"
        start = data.stat().st_size
        for n in range(15):
            store = EmbeddingCache("image-embedder:nightly", 1280, root)
            live = live[20:] + night(store, f"night{n}", 20)
            store.close()
            registered("image-embedder:nightly", root)  # the night's build registered its version
            if pruned:
                [use] = cache._walk(root, {"image-embedder:nightly": set(live)}, frozenset(), delete=True)
                assert (use.vectors, use.unused, use.compacted) == (2020, 20, False)  # 1%: not compacted
        sizes[pruned] = data.stat().st_size / start
    assert sizes[True] < 1.05 and sizes[False] > 1.1, sizes


@pytest.mark.parametrize("columns, rows, known", [
    ("thumbnail TEXT, image_url TEXT, content TEXT", [("t1", None, "c1"), (None, "https://x/2.jpg", "c2")],
     {"c1", "c2"}),  # format 3: every photo's hash
    ("thumbnail TEXT, image_url TEXT", [("t1", None), ("t2", None)], {"t1", "t2"}),  # format 2, all with thumbnails
    ("thumbnail TEXT, image_url TEXT", [("t1", None), (None, "https://x/2.jpg")], None),  # format 2, one without
    ("image_path TEXT", [("p1.jpg",)], None),  # format 1
])
def test_which_photos_a_version_records(tmp_path, columns, rows, known):
    from model_store.index_artifact import photo_hashes

    with sqlite3.connect(tmp_path / "items.sqlite") as conn:
        conn.execute(f"CREATE TABLE photos ({columns})")
        conn.executemany(f"INSERT INTO photos VALUES ({','.join('?' * len(rows[0]))})", rows)
    conn.close()
    assert photo_hashes(tmp_path) == known
