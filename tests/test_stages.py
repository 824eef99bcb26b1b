"""Promotion, rollback and history: refusals, atomicity, concurrent promotions, and the CLI."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from concurrent.futures import ProcessPoolExecutor

import pytest

from conftest import run_env
from index_builder.build import build
from model_store import stages
from model_store.registry import get_model, register
from model_store.settings import INDEX_MODEL

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def random_vgg_index(demo_catalogue):
    return build(demo_catalogue, backbone="vgg16", weights="random", image_size=64, pca_dim=0, progress=False,
                 workers=0)


def low_recall_index(embedder: str) -> str:
    """A registered index whose metadata claims a poor ANN recall (stage logic reads only metadata)."""
    meta = {"n_photos": 1, "n_items": 1, "dim": 4, "embedder": embedder, "ann_recall_at_10": 0.5}
    return register(INDEX_MODEL, {"embedder": embedder}, meta, lambda folder: None)


def test_promote_rollback_history(stages_dir, demo_index, second_index):
    assert stages.current("production") is None
    stages.promote(demo_index.tag, "production", note="first")
    stages.promote(second_index.tag, "production")
    stages.promote(demo_index.tag, "staging")
    assert stages.current("production").index == second_index.tag
    assert stages.current("staging").index == demo_index.tag
    back = stages.rollback("production")
    assert back.index == demo_index.tag == stages.current("production").index
    with pytest.raises(stages.PromotionError, match="nothing to roll back to"):
        stages.rollback("production")
    history = stages.read_state().history
    assert [(e.action, e.stage, e.index) for e in history] == [
        ("promote", "production", demo_index.tag), ("promote", "production", second_index.tag),
        ("promote", "staging", demo_index.tag), ("rollback", "production", demo_index.tag)]
    assert history[0].note == "first" and "@" in history[0].by


def test_refuses_another_embedder_unless_forced(stages_dir, demo_index, random_vgg_index):
    stages.promote(demo_index.tag, "production")
    with pytest.raises(stages.PromotionError, match="built with embedder .* but production serves .*--force"):
        stages.promote(random_vgg_index.tag, "production")
    assert stages.current("production").index == demo_index.tag
    forced = stages.promote(random_vgg_index.tag, "production", force=True)
    assert forced.embedder == random_vgg_index.embedder and stages.read_state().history[-1].forced


def test_refuses_low_recall_unless_forced(stages_dir, demo_index):
    tag = low_recall_index(demo_index.embedder)
    with pytest.raises(stages.PromotionError, match="recall@10 is 0.500, below 0.9"):
        stages.promote(tag, "staging")
    assert stages.current("staging") is None
    stages.promote(tag, "staging", force=True)
    assert stages.current("staging").index == tag


def test_refuses_unknown_tags_and_embedders(stages_dir, demo_index):
    with pytest.raises(LookupError, match="no such model"):
        stages.promote(f"{INDEX_MODEL}:doesnotexist", "production")
    with pytest.raises(stages.PromotionError, match="not an index"):
        stages.promote(demo_index.embedder, "production")


def _promote(args):
    tag, stage = args
    return stages.promote(tag, stage).index


def test_concurrent_promotions_lose_nothing(stages_dir, demo_index, second_index):
    jobs = [(demo_index.tag if i % 2 else second_index.tag, "staging") for i in range(16)]
    with ProcessPoolExecutor(4) as pool:
        list(pool.map(_promote, jobs))
    state = stages.read_state()
    assert len(state.history) == 16 and len(state.stack["staging"]) == 16


def test_a_crash_mid_write_keeps_the_old_state(stages_dir, demo_index, second_index, monkeypatch):
    stages.promote(demo_index.tag, "production")
    monkeypatch.setattr(stages.os, "replace", lambda *a: (_ for _ in ()).throw(OSError("power cut")))
    with pytest.raises(OSError, match="power cut"):
        stages.promote(second_index.tag, "production")
    assert stages.current("production").index == demo_index.tag
    assert len(stages.read_state().history) == 1


def test_cli(stages_dir, demo_index, second_index, python):
    env = run_env()

    def cli(*args):
        return subprocess.run([python, "-m", "model_store", *args], env=env, capture_output=True, text=True,
                              timeout=120)

    assert cli("promote", demo_index.tag, "--stage", "production").returncode == 0
    assert cli("promote", second_index.tag, "--stage", "production", "--note", "new build").returncode == 0
    listing = cli("list").stdout
    line = next(ln for ln in listing.splitlines() if ln.startswith(second_index.tag))
    assert "production" in line and "recall@10=" in line
    rolled = cli("rollback", "--stage", "production")
    assert rolled.returncode == 0 and demo_index.tag in rolled.stdout
    events = json.loads(cli("history", "--json").stdout)
    assert [e["action"] for e in events] == ["promote", "promote", "rollback"]
    assert "new build" in cli("history").stdout
    bad = cli("promote", "image-index:nope", "--stage", "production")
    assert bad.returncode == 2 and "no such model" in bad.stderr
    for command in (("show",), ("delete",), ("promote", "--stage", "staging")):  # BentoML's traceback before
        malformed = cli(*command, "image-index:")
        assert malformed.returncode == 2 and "'image-index:' is not a model tag" in malformed.stderr, malformed.stderr
        assert "Traceback" not in malformed.stderr
    assert cli("promote", demo_index.tag, "--stage", "prod").returncode == 2
    shown = json.loads(cli("show", demo_index.tag).stdout)
    assert shown["stages"] == ["production"] and shown["metadata"]["embedder"] == demo_index.embedder


def test_an_empty_store_says_how_to_fill_it(tmp_path, python):
    """A new user's first `list` and `history` printed a bare header, or nothing at all."""
    env = run_env(BENTOML_HOME=str(tmp_path / "bentoml"), IMAGESEARCH_STAGES_DIR=str(tmp_path / "stages"))

    def cli(*args):
        return subprocess.run([python, "-m", "model_store", *args], env=env, capture_output=True, text=True,
                              timeout=120)

    listed, history = cli("list"), cli("history")
    assert listed.returncode == 0 and "holds no embedder or index yet: build one with `python -m index_builder build" \
        in listed.stdout, listed.stdout + listed.stderr
    assert history.returncode == 0 and "no promotion or rollback yet" in history.stdout
    assert json.loads(cli("history", "--json").stdout) == []


def test_the_registry_cli_starts_without_torch(python):
    """Promotions and listings answer in about a second: manifests are read without loading the network."""
    code = "import sys, model_store.__main__; assert 'torch' not in sys.modules, 'the CLI imported torch'"
    done = subprocess.run([python, "-c", code], env=run_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("cli", [["model_store", "list"], ["model_store", "show", "image-index:x"],
                                 ["model_store", "promote", "image-index:x", "--stage", "staging"],
                                 ["model_store", "delete", "image-index:x"], ["index_builder", "cache"]])
def test_a_store_folder_that_cannot_be_used_is_one_error_line(python, tmp_path, cli):
    """BENTOML_HOME naming a file (or a folder that cannot be made) was a traceback from inside BentoML."""
    (tmp_path / "home").write_text("a file, not a folder")
    out = subprocess.run([python, "-m", *cli], env=run_env(BENTOML_HOME=str(tmp_path / "home")), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert out.stderr == (f"error: the store's folder {tmp_path / 'home'} cannot be used: {tmp_path / 'home'} is not a "
                          "directory; set BENTOML_HOME to a folder this user can create and write\n"), out.stderr


def test_a_setting_that_cannot_be_read_is_one_error_line(python):
    out = subprocess.run([python, "-m", "model_store", "list"], env=run_env(IMAGESEARCH_MAX_K="abc"),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.startswith("error: IMAGESEARCH_MAX_K='abc': Input should be a valid "
                                                         "integer") and "Traceback" not in out.stderr, out.stderr


def test_delete_never_removes_what_a_stage_serves(stages_dir, demo_index, python):
    env = run_env()

    def cli(*args):
        return subprocess.run([python, "-m", "model_store", *args], env=env, capture_output=True, text=True,
                              timeout=120)

    served, newer, spare = (low_recall_index(demo_index.embedder) for _ in range(3))
    stages.promote(served, "staging", force=True)
    refused = cli("delete", served)
    assert refused.returncode == 2 and "staging serves it" in refused.stderr
    assert cli("delete", served, "--force").returncode == 2  # not even forced
    embedder = cli("delete", demo_index.embedder, "--force")
    assert embedder.returncode == 2 and "serves it" in embedder.stderr
    stages.promote(newer, "staging", force=True)
    fallback = cli("delete", served)
    assert fallback.returncode == 2 and "could roll back to it" in fallback.stderr
    assert cli("delete", served, "--force").returncode == 0
    gone = cli("delete", spare)
    assert gone.returncode == 0 and spare in gone.stdout
    for tag in (served, spare):
        with pytest.raises(LookupError):
            get_model(tag)
    assert get_model(newer) and stages.current("staging").index == newer


def _partial_catalogue(demo_catalogue, folder, keep_items: int, extra: int = 0):
    """The demo catalogue with its first `keep_items` items, plus `extra` new ones."""
    import csv

    from index_builder.demo import draw_object

    folder.mkdir(parents=True, exist_ok=True)
    with open(demo_catalogue) as f:
        rows = list(csv.DictReader(f))
    kept = sorted({r["item_id"] for r in rows})[:keep_items]
    with open(folder / "catalogue.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows:
            if r["item_id"] in kept:
                w.writerow({**r, "image_path": str(demo_catalogue.parent / r["image_path"])})
        for i in range(extra):
            draw_object(i % 8, 7, 3 * i, seed=8000 + i).save(folder / f"extra{i}.png")
            w.writerow({**rows[0], "item_id": f"extra-{i}", "image_path": str(folder / f"extra{i}.png")})
    return folder / "catalogue.csv"


def test_promote_shows_the_change_and_refuses_a_version_that_lost_items(stages_dir, demo_index, demo_catalogue,
                                                                         tmp_path, python):
    stages.promote(demo_index.tag, "production")
    grown = build(_partial_catalogue(demo_catalogue, tmp_path / "grown", 24, extra=2), progress=False, workers=0)
    change = stages.served_diff(grown.tag, demo_index.tag)
    assert (change.items_added, change.items_removed, change.photos_added, change.photos_removed) == (2, 0, 2, 0)
    shrunk = build(_partial_catalogue(demo_catalogue, tmp_path / "shrunk", 18), progress=False, workers=0)
    cli = subprocess.run([python, "-m", "model_store", "promote", shrunk.tag, "--stage", "production"],
                         env=run_env(), capture_output=True, text=True, timeout=120)
    assert cli.returncode == 2 and "lacks 6 of the 24 items" in cli.stderr and "--force" in cli.stderr
    assert "items   24 -> 18 (+0 -6, 25.0% of the served items gone)" in cli.stdout
    assert "photos  +0 -18" in cli.stdout
    assert stages.current("production").index == demo_index.tag
    forced = subprocess.run([python, "-m", "model_store", "promote", shrunk.tag, "--stage", "production", "--force"],
                            env=run_env(), capture_output=True, text=True, timeout=120)
    assert forced.returncode == 0, forced.stderr
    assert stages.current("production").index == shrunk.tag
    assert stages.promote(grown.tag, "production").index == grown.tag  # more items: no question asked


def test_a_version_with_an_unreadable_manifest_is_named_and_not_compared(stages_dir, demo_index, tmp_path):
    import shutil
    from pathlib import Path

    from model_store.diff import diff
    from model_store.index_artifact import MANIFEST_FILE, ArtifactError, IndexManifest

    broken = shutil.copytree(Path(get_model(demo_index.tag).path), tmp_path / "broken")
    (broken / MANIFEST_FILE).write_text('{"format_version": 2, "embedder": ')
    with pytest.raises(ArtifactError, match=f"broken: unreadable {MANIFEST_FILE}"):
        IndexManifest.read(broken)
    with pytest.raises(ArtifactError, match="broken"):
        diff(demo_index.tag, Path(get_model(demo_index.tag).path), "broken", broken)
    (broken / MANIFEST_FILE).unlink()
    with pytest.raises(ArtifactError, match="No such file"):
        IndexManifest.read(broken)


def test_the_diff_knows_a_photo_by_its_content_even_with_an_image_url(demo_index, tmp_path):
    """Format 3 records every photo's SHA-256: a photo moved to another path is the same photo, whether it has a
    thumbnail or an image_url; a re-shot one is a new photo."""
    from model_store.diff import diff
    from model_store.index_artifact import MANIFEST_FILE, write_items_db

    items = [("a", "Lamp", "Lighting", 10.0, "USD", "2025-01-01"), ("b", "Vase", "Decor", 20.0, "USD", "2025-01-01")]
    versions = {"old": [(0, "a", "a.jpg", None, "https://cdn.example.com/a.jpg", "1" * 64),
                        (1, "b", "b.jpg", "2" * 64, None, "2" * 64)],
                "new": [(0, "a", "moved/a.jpg", None, "https://cdn.example.com/a.jpg", "1" * 64),  # moved
                        (1, "b", "b.jpg", "3" * 64, None, "3" * 64)]}  # re-shot
    for name, photos in versions.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / MANIFEST_FILE).write_text((Path(get_model(demo_index.tag).path) / MANIFEST_FILE).read_text())
        write_items_db(tmp_path / name / "items.sqlite", photos, items)
    change = diff("old", tmp_path / "old", "new", tmp_path / "new")
    assert (change.items_added, change.items_removed, change.photos_added, change.photos_removed) == (0, 0, 1, 1)
