"""The builder job end to end: real images, real networks, a real (temporary) BentoML store."""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_env
from index_builder import build as build_module
from index_builder.build import BuildError, build
from index_builder.build import build as build_index
from index_builder.catalogue import read_catalogue
from index_builder.__main__ import _print_summary
from index_builder.evaluate import EvalError
from model_store.backbones import WeightsError, resolve_weights
from model_store.embedder import load_embedder
from model_store.index_artifact import ANNOY_FILE
from query.active import Active
from query.floors import PCA, WHITENED
from query.search_index import SearchIndex
from model_store.preprocess import image_to_pixels, load_image_file
from model_store.registry import bentoml_home, get_model, list_models
from model_store.settings import INDEX_MODEL

pytestmark = pytest.mark.slow


def index_versions() -> set[str]:
    return {str(m.tag) for m in list_models(INDEX_MODEL)}


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_demo_build_is_registered_with_its_metadata(demo_index, demo_catalogue):
    s = demo_index
    assert (s.photos_indexed, s.items, s.bad_rows) == (72, 24, 0)
    model = get_model(s.tag)
    meta, labels = model.info.metadata, model.info.labels
    assert labels["embedder"] == s.embedder and labels["weights"] == "pretrained"
    assert meta["catalogue_sha256"] == hashlib.sha256(demo_catalogue.read_bytes()).hexdigest()
    assert meta["ann_recall_at_10"] >= 0.95 and meta["n_trees"] > 0 and meta["search_k"] > 0
    assert meta["evaluation"]["queries"] == 24 and meta["evaluation"]["recall_at_5"] >= 0.9
    emb = get_model(s.embedder).info.metadata["config"]
    assert emb["backbone"] == "efficientnet-lite2" and emb["weights"]["pretrained"] is True
    assert emb["descriptor"] == "rmac" and emb["dim"] == 1280
    assert len(emb["weights"]["sha256"]) == 64 and emb["preprocess"]["crop"] == 260


def test_a_catalogue_photo_finds_its_own_item_first(demo_index, demo_catalogue):
    index = SearchIndex(Path(get_model(demo_index.tag).path))
    embedder = load_embedder(demo_index.embedder)
    with open(demo_catalogue) as f:
        rows = list(csv.DictReader(f))[::7]
    for row in rows:
        arr = image_to_pixels(load_image_file(demo_catalogue.parent / row["image_path"]), embedder.config.preprocess)
        best = index.search(embedder.embed(arr[None])[0], 5)
        assert best[0].item_id == row["item_id"] and best[0].score > 0.99
        assert len({m.item_id for m in best}) == 5  # several photos of one item count once


def test_same_seed_same_index_and_embedder_reused(demo_index, demo_catalogue, capsys):
    again = build(demo_catalogue, progress=False, workers=0)
    assert again.tag != demo_index.tag and again.embedder == demo_index.embedder
    # 72 photos: no PCA, and the builder says what that changes for the answers
    assert again.projection == "none" and "use the floors measured for raw descriptors" in capsys.readouterr().err
    first, second = (Path(get_model(t).path) / ANNOY_FILE for t in (demo_index.tag, again.tag))
    assert sha(first) == sha(second)


def _engine(engine: str, request: pytest.FixtureRequest):
    """build() on the given engine: Ray builds join the module's local Ray cluster (skipped when the ray extra
    is not installed)."""
    if engine == "ray":
        return functools.partial(build_index, engine=engine, ray_address=request.getfixturevalue("ray_cluster"))
    return functools.partial(build_index, engine=engine)


@pytest.mark.parametrize("engine", ["local", "ray"])
def test_bad_rows_are_reported_and_the_index_still_builds(demo_catalogue, tmp_path, engine, request, capsys):
    build = _engine(engine, request)
    folder = tmp_path / "cat"
    shutil.copytree(demo_catalogue.parent / "photos", folder / "photos")
    # one item's rows spell its category otherwise: it is listed as the other items spell it, not as a 9th
    good = [line.replace(",Ceramics,", ",CERAMICS ,") if line.startswith("item-0001,") else line
            for line in demo_catalogue.read_text().splitlines()]
    (folder / "photos" / "broken.png").write_bytes((folder / "photos" / "item-0000-000.png").read_bytes()[:200])
    (folder / "photos" / "notes.png").write_text("not a picture")
    extra = ["x1,photos/broken.png,Broken,Art,5,USD,2024-01-01", "x2,photos/gone.png,Gone,Art,5,USD,2024-01-01",
             "x3,photos/notes.png,Notes,Art,5,USD,2024-01-01", "x4,photos/item-0000-120.png,Bad price,Art,-1,USD,2024-01-01"]
    (folder / "catalogue.csv").write_text("\n".join(good + extra) + "\n")
    before = index_versions()
    with pytest.raises(BuildError, match=r"4 of 76 rows \(5.3%\) are unusable, over the 4% limit"):
        build(folder / "catalogue.csv", progress=False, workers=0, max_bad_share=0.04)  # the 2 bad rows alone pass
    assert index_versions() == before  # a failed build leaves the store as it was
    summary = build(folder / "catalogue.csv", progress=False, workers=0)
    assert summary.photos_indexed == 72 and summary.bad_rows == 4
    with open(summary.report) as f:
        report = {r["line"]: r["reason"] for r in csv.DictReader(f)}
    assert set(report) == {"74", "75", "76", "77"}
    assert "unreadable image" in report["74"] and "truncated or corrupt" in report["74"]
    assert "image file not found" in report["75"]
    assert "not an image" in report["76"]
    assert "price" in report["77"]
    assert summary.categories_respelled == {"CERAMICS": "Ceramics"}
    index = SearchIndex(Path(get_model(summary.tag).path))
    assert sorted(index.category_names) == sorted({row.split(",")[3] for row in good[1:]} - {"CERAMICS "})
    top = index.nearest(index.item_vector("item-0001"), 1)[0]
    assert (top.item_id, top.category) == ("item-0001", "Ceramics")
    _print_summary(summary)
    assert "  categories    read as most of their items spell them: 'CERAMICS' as 'Ceramics'\n" in capsys.readouterr().err


def test_queries_that_cannot_be_scored_are_listed_and_left_out(demo_catalogue, demo_index, tmp_path, capsys):
    """A query of an item the index lacks could never be found, and one of the catalogue's own photos would find
    itself: scored, they moved every figure; they are listed in the evaluation and the summary instead."""
    folder = demo_catalogue.parent
    unseen = [line.split(",") for line in demo_catalogue.with_name("queries.csv").read_text().splitlines()[1:3]]
    own = demo_catalogue.read_text().splitlines()[1].split(",")
    lines = [f"{folder / path},{item}" for path, item in unseen] + [f"{folder / own[1]},{own[0]}",
                                                                    f"{folder / unseen[0][0]},no-such-item"]
    (tmp_path / "queries.csv").write_text("image_path,item_id\n" + "\n".join(lines) + "\n")
    s = build(demo_catalogue, eval_queries=tmp_path / "queries.csv", progress=False, workers=0)
    assert s.evaluation["queries"] == 2
    assert s.evaluation["skipped"] == [
        f"line 4: {folder / own[1]} is a photo of the catalogue: a query is one the index has not seen",
        "line 5: item 'no-such-item' is not in the index (not in the catalogue, or every row of it was skipped)"]
    _print_summary(s)
    assert ("                2 queries skipped: line 4: " in capsys.readouterr().err)


def test_what_the_catalogue_or_queries_file_alone_decides_fails_before_the_network_loads(demo_catalogue, tmp_path, capsys):
    """Rows alone decide it, or a queries file (--eval) that cannot be used: the build says so at once instead of
    loading the network (seconds; a minute for VGG16) and embedding the catalogue first."""
    folder = tmp_path / "cat"
    folder.mkdir()
    shutil.copy(demo_catalogue.parent / "photos" / "item-0000-000.png", folder / "a.png")
    header = demo_catalogue.read_text().splitlines()[0]
    (folder / "empty.csv").write_text(header + "\n")
    (folder / "bad.csv").write_text(header + "\n" + "x1,a.png,Vase,Ceramics,$340,USD,2024-01-01\n")
    before = index_versions()
    with pytest.raises(BuildError, match="empty.csv: the catalogue has no rows: write one row per photo"):
        build(folder / "empty.csv", progress=False, workers=0)
    with pytest.raises(BuildError, match=r"bad.csv: none of the 1 rows is usable; reasons in .*bad.report.csv"):
        build(folder / "bad.csv", progress=False, workers=0)
    (folder / "some.csv").write_text("\n".join([header, "x1,a.png,Vase,Ceramics,$340,USD,2024-01-01",
                                                "x2,a.png,Vase,Ceramics,340,USD,2024-01-01"]) + "\n")
    with pytest.raises(BuildError, match=r"some.csv: 1 of 2 rows \(50.0%\) are unusable \(its photos not read yet\), "
                                         r"over the 20% limit"):
        build(folder / "some.csv", progress=False, workers=0)
    (folder / "good.csv").write_text(header + "\nx2,a.png,Vase,Ceramics,340,USD,2024-01-01\n")
    (folder / "not-a-photo.png").write_text("version https://git-lfs.github.com/spec/v1\n")  # an LFS pointer
    for queries, message in (("image_path,item\na.png,x2\n", "the header must name image_path,item_id"),
                             ("image_path,item_id\nmissing.png,x2\n", "none of the 1 query photos exists"),
                             # a spreadsheet's header is read as the catalogue's is: the photo is looked for
                             ("Image_Path, Item_ID\nmissing.png,x2\n", "none of the 1 query photos exists"),
                             # another catalogue's queries, or the catalogue's own photos, can score nothing
                             ("image_path,item_id\na.png,x9\n", r"none of the 1 queries can be scored \(line 2: item "
                                                                 r"'x9' is not in the index"),
                             ("image_path,item_id\na.png,x2\n", r"none of the 1 queries can be scored \(line 2: .*a.png "
                                                                 r"is a photo of the catalogue: a query is one the index "
                                                                 r"has not seen\): each query"),
                             # photos that exist but are not photos: the file's line and what is wrong with it
                             ("image_path,item_id\nnot-a-photo.png,x2\nmissing.png,x2\n",
                              r"none of the 2 query photos that could be scored can be read \(line 2: .*not-a-photo.png "
                              r"is not an image Pillow can read")):
        (folder / "queries.csv").write_text(queries)
        with pytest.raises(EvalError, match=message):  # not after embedding the whole catalogue
            build(folder / "good.csv", progress=False, workers=0, eval_queries=folder / "queries.csv")
    with pytest.raises(EvalError, match=r"nowhere.csv: no such queries file$"):
        build(folder / "good.csv", progress=False, workers=0, eval_queries=folder / "nowhere.csv")
    assert "[load embedder]" not in capsys.readouterr().err
    assert "got '$340'" in (folder / "bad.report.csv").read_text()
    assert index_versions() == before


@pytest.mark.parametrize("engine", ["local", "ray"])
def test_a_crash_during_registration_leaves_no_version(tmp_path, monkeypatch, engine, request):
    build = _engine(engine, request)
    catalogue = _new_catalogue(tmp_path / "cat", 8, seed=3200 if engine == "local" else 3700)  # to embed
    build_index(_new_catalogue(tmp_path / "probe", 1, seed=4999), progress=False, workers=0)  # the embedder exists

    def copy_half_then_die(src, dst, **kw):
        shutil.copy(Path(src) / ANNOY_FILE, Path(dst) / ANNOY_FILE)
        raise OSError("disk full")

    monkeypatch.setattr(build_module.shutil, "copytree", copy_half_then_die)
    before = index_versions()
    with pytest.raises(OSError, match="disk full"):
        build(catalogue, progress=False, workers=0)
    assert index_versions() == before
    assert not list((bentoml_home() / "tmp").glob("staging-*"))


@pytest.mark.parametrize("engine", ["local", "ray"])
def test_killed_build_resumes_from_the_embedding_cache(tmp_path, python, engine, request):
    from index_builder.cache import EmbeddingCache

    if engine == "ray":  # this build starts a local Ray of its own, which must die with it
        pytest.importorskip("ray", reason="the ray extra is not installed: pip install '.[ray]'")
        ray_before = _ray_processes()
    seed = 4000 if engine == "local" else 4500
    catalogue = _new_catalogue(tmp_path / "cat", 40, seed=seed)  # photos no other build has embedded
    embedder = build(_new_catalogue(tmp_path / "probe", 1, seed=4999), progress=False, workers=0).embedder
    cache = EmbeddingCache(embedder, 1280)
    start = len(cache)
    cmd = [python, "-m", "index_builder", "build", str(catalogue), "--batch-size", "4", "--workers", "0",
           "--no-progress", "--seed", "7", "--engine", engine]
    before = index_versions()
    proc = subprocess.Popen(cmd, env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while time.time() < deadline and len(cache) - start < 16:
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if engine == "ray":  # the local Ray the killed build started must die with it, not hold the cores
        _wait_for_no_ray_processes_but(ray_before)
    done = len(cache) - start
    cache.close()
    assert 16 <= done < 40, "the build must be killed halfway for this test to mean anything"
    assert index_versions() == before
    if engine == "ray":  # the builds that resume join the module's cluster: a local Ray costs each ~5 s
        cmd += ["--ray-address", request.getfixturevalue("ray_cluster")]
    out = subprocess.run(cmd + ["--json"], env=run_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["reused_photos"] >= done and summary["photos_indexed"] == 40
    assert index_versions() == before | {summary["tag"]}
    human = subprocess.run(cmd, env=run_env(), capture_output=True, text=True, timeout=300)
    assert human.stdout.strip().splitlines()[-1].startswith(f"{INDEX_MODEL}:")
    assert "0 photos embedded, 40 from the embedding cache" in human.stderr


@pytest.mark.parametrize("engine", ["local", "ray"])
def test_a_rebuild_embeds_only_new_and_changed_photos(tmp_path, engine, request):
    from index_builder.demo import draw_object

    build = _engine(engine, request)
    seed = 5000 if engine == "local" else 6000
    catalogue = _new_catalogue(tmp_path / "cat", 100, seed=seed)
    first = build(catalogue, progress=False, workers=0)
    assert first.reused_photos == 0 and first.photos_indexed == 100
    with open(catalogue, "a", newline="") as f:  # the night's 1% of new rows
        draw_object(3, 6, 5, seed=seed + 999).save(tmp_path / "cat" / "new.png")
        csv.writer(f).writerow(["new-item", "new.png", "New thing", "Misc", 12, "USD", "2025-06-01", ""])
    draw_object(0, 6, 9, seed=seed + 998).save(tmp_path / "cat" / "p7.png")  # a photo replaced in place
    second = build(catalogue, progress=False, workers=0)
    assert second.photos_indexed == 101
    assert second.reused_photos == 99 and second.embedded_photos == 2  # the new photo and the changed one
    assert second.thumbnails_made == 2
    # the same photo under another name is recognised by its content, not embedded again, and not listed twice:
    # two items with one photo would be equal matches for every search
    shutil.copy(tmp_path / "cat" / "p3.png", tmp_path / "cat" / "p3-copy.png")
    with open(catalogue, "a", newline="") as f:
        csv.writer(f).writerow(["copy-item", "p3-copy.png", "Copy", "Misc", 12, "USD", "2025-06-01", ""])
    third = build(catalogue, progress=False, workers=0)
    # in-process, nothing is embedded; on Ray the decoding tasks cannot see the driver's cache, so the copy is
    # embedded once more
    assert third.photos_indexed == 101 and third.reused_photos == (102 if engine == "local" else 101)
    assert third.embedded_photos == (0 if engine == "local" else 1)  # the summary said -1 embedded
    with open(third.report) as f:
        report = {r["line"]: r["reason"] for r in csv.DictReader(f)}
    assert report == {"103": "duplicate photo: the same bytes as line 5 (p3.png, item new-3); give each row a photo "
                             "of its own"}
    assert SearchIndex(Path(get_model(third.tag).path)).item_vector("copy-item") is None


def test_vgg16_random_weights_are_labelled_and_pool5_is_the_flat_map(demo_catalogue):
    s = build(demo_catalogue, backbone="vgg16", weights="random", descriptor="pool5", image_size=64,
              pca_dim=0, progress=False, workers=0)
    assert s.pretrained is False and s.dim == 512 * 2 * 2
    emb = get_model(s.embedder)
    assert emb.info.labels["weights"] == "random" and emb.info.metadata["config"]["weights"]["source"] == "random"
    assert get_model(s.tag).info.labels["weights"] == "random"


@pytest.mark.parametrize("whiten, floors", [(False, PCA), (True, WHITENED)])
def test_pca_projection_is_learned_and_applied(demo_catalogue, whiten, floors):
    s = build(demo_catalogue, pca_dim=16, whiten=whiten, progress=False, workers=0)
    assert (s.projection, s.dim) == ("pca-whiten" if whiten else "pca", 16)
    index = SearchIndex(Path(get_model(s.tag).path))
    assert index.project(np.random.default_rng(0).normal(size=(3, 1280)).astype(np.float32)).shape == (3, 16)
    assert Active(index, deployment=None, served=None).floors() == floors  # the floors measured in its space


def test_weights_from_a_file_and_clear_errors(tmp_path):
    net, info = resolve_weights("vgg16", "random")
    path = tmp_path / "vgg16.pt"
    torch.save({f"features.{k}": v for k, v in net.state_dict().items()}, path)  # torchvision's key layout
    _, from_file = resolve_weights("vgg16", str(path))
    assert from_file.pretrained and from_file.source == f"file:{path}" and from_file.sha256 == info.sha256
    with pytest.raises(WeightsError, match="no such file"):
        resolve_weights("vgg16", str(tmp_path / "absent.pt"))
    (tmp_path / "junk.pt").write_text("junk")
    with pytest.raises(WeightsError, match="not a torch state dict"):
        resolve_weights("vgg16", str(tmp_path / "junk.pt"))
    with pytest.raises(WeightsError, match="do not fit efficientnet-lite0"):
        resolve_weights("efficientnet-lite0", str(path))
    with pytest.raises(ValueError, match="unknown backbone 'resnet'"):
        resolve_weights("resnet")


@pytest.mark.parametrize("engine", ["local", "ray"])
def test_a_full_disk_fails_the_build_and_leaves_the_store_as_it_was(demo_index, demo_catalogue, tmp_path, python,
                                                                    engine, request):
    """A real full disk: the store lives on a small tmpfs holding the embedder, then filled up. The Ray build
    joins a running cluster with --ray-address."""
    join = ["--ray-address", request.getfixturevalue("ray_cluster")] if engine == "ray" else []
    home = tmp_path / "small-disk"
    home.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(home)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    try:
        embedder = Path(get_model(demo_index.embedder).path)
        store = home / "bentoml" / "models" / embedder.parent.name
        shutil.copytree(embedder, store / embedder.name)
        (store / "latest").write_text(embedder.name)
        free = shutil.disk_usage(home).free
        (home / "filler").write_bytes(b"\0" * (free - 200_000))
        before = sorted(p.relative_to(home) for p in (home / "bentoml" / "models").rglob("*"))
        out = subprocess.run([python, "-m", "index_builder", "build", str(demo_catalogue), "--workers", "0",
                              "--no-progress", "--engine", engine, *join],
                             env=run_env(BENTOML_HOME=str(home / "bentoml")),
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 1, out.stderr[-2000:]
        assert "No space left on device" in out.stderr and "no version was registered" in out.stderr, out.stderr[-4000:]
        assert "Traceback" not in out.stderr
        after = sorted(p.relative_to(home) for p in (home / "bentoml" / "models").rglob("*"))
        assert after == before
        assert not list((home / "bentoml" / "tmp").glob("staging-*"))
    finally:
        subprocess.run(["umount", str(home)], check=True)


@pytest.mark.parametrize("option, value, message", [
    ("--image-size", "100000", "less than or equal to 1024"),  # allocated 28 GB, then a traceback
    ("--image-size", "0", "greater than or equal to 32"),  # built at the backbone's size, as if left out
    ("--pca-dim", "-5", "greater than or equal to 0"),  # built without a projection, unsaid
    ("--seed", "-1", "greater than or equal to 0"),  # Annoy's "expected non-negative integer", after the embedding
])
def test_absurd_build_options_are_refused_before_any_work(demo_catalogue, option, value, message):
    from typer.testing import CliRunner

    from index_builder.__main__ import app

    result = CliRunner().invoke(app, ["build", str(demo_catalogue), option, value])
    assert result.exit_code == 2 and f"Invalid value for '{option}'" in result.output and message in result.output, \
        result.output


def test_only_the_build_command_loads_torch(python, tmp_path):
    """`--help`, `cache` and `demo` need no network: the CLI starts in well under a second without torch."""
    run = ("import runpy, sys\nsys.argv = ['index_builder', *sys.argv[1:]]\ntry:\n"
           "    runpy.run_module('index_builder', run_name='__main__')\nexcept SystemExit as exc:\n"
           "    print('exit', exc.code)\nprint('torch loaded:', 'torch' in sys.modules)")
    for args in (["--help"], ["build", "--help"], ["cache"], ["demo", str(tmp_path / "demo"), "--items-per-family", "1"]):
        out = subprocess.run([python, "-c", run, *args], cwd=tmp_path, env=run_env(), capture_output=True, text=True,
                             timeout=120)
        assert "torch loaded: False" in out.stdout and "exit 0" in out.stdout, (args, out.stdout[-1000:], out.stderr[-2000:])
    shown = subprocess.run([python, "-m", "index_builder", "build", "--help"], env=run_env(), capture_output=True,
                           text=True, timeout=120).stdout
    assert "[default: rmac]" in shown
    assert "[default: 4 on a" in shown  # a default in an option's own words, which rich markup used to swallow
    options = re.split(r"\n  (?=--)", shown)[1:]  # each option's entry: "--name <type>  help [default: ...]"
    assert len(options) > 15 and all(o.count("[default:") <= 1 for o in options), shown  # --workers showed two


def test_a_demo_folder_that_cannot_be_made_is_an_error_not_a_traceback(python, tmp_path):
    (tmp_path / "taken").write_text("a file where the folder would go")
    out = subprocess.run([python, "-m", "index_builder", "demo", str(tmp_path / "taken")], env=run_env(),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert out.stderr.startswith(f"error: cannot write the demo into {tmp_path / 'taken'}: Not a directory ("), out.stderr


def _ray_processes() -> set[str]:
    """Process ids of the Ray nodes on this machine (a cluster's raylet and GCS server)."""
    return set(subprocess.run(["pgrep", "-f", "raylet|gcs_server"], capture_output=True, text=True).stdout.split())


def _wait_for_no_ray_processes_but(before: set[str], timeout: float = 30) -> None:
    """Wait until no Ray node runs beyond those of `before` (the module's shared cluster, when it runs)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        live = _ray_processes() - before
        if not live:
            return
        time.sleep(0.5)
    pytest.fail(f"Ray processes outlived the killed build: {live}")


def _new_catalogue(folder: Path, n: int, image_url: dict[int, str] | None = None, seed: int = 1000) -> Path:
    """n photos no other test has (new drawings: give each test its own seed), one item each; image_url for
    some rows."""
    from index_builder.demo import draw_object

    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "catalogue.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["item_id", "image_path", "title", "category", "price", "currency", "sold_at", "image_url"])
        for i in range(n):
            draw_object(i % 8, 5, 17 * i, seed=seed + i).save(folder / f"p{i}.png")
            w.writerow([f"new-{i}", f"p{i}.png", f"Thing {i}", "Misc", 10 + i, "USD", "2025-05-01",
                        (image_url or {}).get(i, "")])
    return folder / "catalogue.csv"


def _photo_urls(tag: str) -> dict[str, str | None]:
    index = SearchIndex(Path(get_model(tag).path))
    return {m.item_id: m.photo_url for m in index.nearest(np.asarray(index.vectors[0]), 100)}


@pytest.mark.parametrize("engine", ["local", "ray"])
def test_thumbnails_are_made_once_and_shared_by_every_version(tmp_path, engine, request):
    from model_store.thumbnails import store_dir, store_size, thumbnail_path

    build = _engine(engine, request)
    catalogue = _new_catalogue(tmp_path / "cat", 6, seed=1000 if engine == "local" else 1500)
    before = store_size()
    first = build(catalogue, progress=False, workers=0)
    after_first = store_size()
    assert first.thumbnails_made == 6 and after_first[0] == before[0] + 6 and after_first[1] > before[1]
    second = build(catalogue, seed=1, progress=False, workers=0)
    assert second.thumbnails_made == 0 and store_size() == after_first  # nothing remade
    urls = _photo_urls(first.tag)
    assert urls == _photo_urls(second.tag) and len(urls) == 6
    for item_id, url in urls.items():
        key = url.removeprefix("/photos/").removesuffix(".webp")
        assert key == sha(tmp_path / "cat" / f"p{item_id.split('-')[1]}.png")  # named by the photo's content
        assert thumbnail_path(key).is_file() and thumbnail_path(key).parent.parent == store_dir()
    # nothing of the thumbnails is copied into a version
    assert not list(Path(get_model(second.tag).path).rglob("*.webp"))


@pytest.mark.parametrize("engine", ["local", "ray"])
def test_image_url_is_the_photo_and_thumbnails_can_be_turned_off(tmp_path, engine, request):
    build = _engine(engine, request)
    cdn = {0: "https://cdn.example.com/p0.jpg", 3: "http://img.example.org/x/p3.webp?v=2"}
    catalogue = _new_catalogue(tmp_path / "cat", 5, cdn, seed=2000 if engine == "local" else 2500)
    on = build(catalogue, progress=False, workers=0)
    urls = _photo_urls(on.tag)
    assert urls["new-0"] == cdn[0] and urls["new-3"] == cdn[3]
    assert urls["new-1"].startswith("/photos/") and on.thumbnails_made == 3  # rows with a URL need none
    off = build(catalogue, progress=False, workers=0, thumbnails=False)
    urls = _photo_urls(off.tag)
    assert off.thumbnails == "off" and off.thumbnails_made == 0
    assert urls["new-0"] == cdn[0] and urls["new-1"] is None


def test_a_catalogue_of_iphone_photos_builds(tmp_path):
    """Photos copied off an iPhone are HEIC: each is embedded as its PNG would be and gets a thumbnail."""
    from test_service import heic

    catalogue = _new_catalogue(tmp_path / "cat", 4, seed=3500)
    pngs = sorted(catalogue.parent.glob("p*.png"))
    for png in pngs:
        png.with_suffix(".heic").write_bytes(heic(load_image_file(png), quality=90))
    catalogue.write_text(catalogue.read_text().replace(".png", ".heic"))
    summary = build(catalogue, progress=False, workers=0)
    assert (summary.photos_indexed, summary.bad_rows, summary.thumbnails_made) == (4, 0, 4)
    index = SearchIndex(Path(get_model(summary.tag).path))
    embedder = load_embedder(summary.embedder)
    for png in pngs:
        pixels = image_to_pixels(load_image_file(png), embedder.config.preprocess)
        best = index.search(embedder.embed(pixels[None])[0], 1)
        assert best[0].item_id == f"new-{png.stem[1:]}" and best[0].score > 0.98, (png.name, best[0])


def test_a_bad_image_url_is_a_reported_row(tmp_path):
    catalogue = _new_catalogue(tmp_path / "cat", 4, {1: "ftp://files.example.com/p1.jpg", 2: "not a url"}, seed=3000)
    cat = read_catalogue(catalogue)
    assert sorted(b.line for b in cat.bad) == [3, 4]
    assert all("image_url" in b.reason for b in cat.bad)
