"""The builder job: catalogue -> embeddings -> Annoy index + item table -> a new version in the model store."""

from __future__ import annotations

import datetime as dt
import shutil
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Literal

import numpy as np
from pydantic import BaseModel

from index_builder import ann, learn
from index_builder.calibrate import calibrate
from index_builder.catalogue import BadRow, Catalogue, Photo, read_catalogue, repeats, write_report
from index_builder.evaluate import evaluate, read_queries
from index_builder.cache import EmbeddingCache
from index_builder.cache import registered as cache_registered
from index_builder.build_defaults import DEFAULT_DESCRIPTOR, DEFAULT_PROJECTION, DEFAULT_WORKERS, ProjectionKind
from index_builder.extract import Extraction, default_batch_size, extract
from model_store.embedder_config import Descriptor
from model_store.build_lock import building
from model_store.embedder import Embedder, new_embedder, save_embedder
from model_store.index_artifact import (ANNOY_FILE, MANIFEST_FILE, PROJECTION_FILE, REPORT_FILE, VECTORS_FILE,
                                        ITEMS_FILE, IndexManifest, Projection, normalize, write_items_db)
from model_store.registry import bentoml_home, clean_staging, register
from model_store.settings import INDEX_MODEL, get_settings
from model_store.thumbnails import store_dir
from query.search_index import SearchIndex

PCA_FIT_SAMPLE = 20_000  # photos used to learn the projection; more changes it little


class BuildError(RuntimeError):
    """A build that cannot produce a trustworthy index; the message says what to fix."""


class BuildSummary(BaseModel):
    tag: str
    embedder: str
    pretrained: bool
    rows: int
    photos_indexed: int
    items: int
    bad_rows: int
    report: str
    dim: int
    projection: str
    n_trees: int
    search_k: int
    ann_recall_at_10: float
    images_per_second: float
    embedded_photos: int  # embedded in this run
    reused_photos: int  # their vectors read from the embedding cache (a skipped copy of a photo included)
    thumbnails: str = "off"
    thumbnails_made: int = 0
    categories_respelled: dict[str, str] = {}  # a category as the catalogue wrote it -> as it is listed
    seconds: dict[str, float]
    evaluation: dict[str, Any] | None = None


class _Timer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str, log: bool = True) -> Iterator[None]:
        if log:
            print(f"[{name}] ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - start, 3)


def build(catalogue_path: Path, *, backbone: str | None = None, weights: str = "default",
          descriptor: Descriptor = DEFAULT_DESCRIPTOR, image_size: int | None = None, pca_dim: int = 256, whiten: bool = False,
          projection: ProjectionKind = DEFAULT_PROJECTION,
          batch_size: int | None = None, workers: int = DEFAULT_WORKERS, seed: int = 0, eval_queries: Path | None = None,
          report: Path | None = None, max_bad_share: float | None = None, progress: bool = True,
          thumbnails: bool = True, engine: Literal["local", "ray"] = "local",
          ray_address: str | None = None) -> BuildSummary:
    """Run every stage and register the result; the store is untouched unless every stage succeeds.
    With `thumbnails`, each photo without an image_url gets a thumbnail in the shared thumbnail store
    (made once per distinct photo, whatever the version)."""
    settings = get_settings()
    backbone = backbone or settings.backbone
    max_bad_share = settings.max_bad_row_share if max_bad_share is None else max_bad_share
    timer = _Timer()
    clean_staging()
    with timer.stage("read catalogue"):
        cat = read_catalogue(catalogue_path)
    report = report or cat.path.with_name(f"{cat.path.stem}.report.csv")
    write_report(report, cat.bad)
    _check_bad_share(cat, cat.bad, max_bad_share, report, " (its photos not read yet)")  # before the network loads
    # a bad queries file fails now, not at the end
    queries = read_queries(eval_queries, cat.photos) if eval_queries is not None else None
    with timer.stage("load embedder"):
        config, net = new_embedder(backbone, weights, descriptor, image_size)
        embedder_tag = save_embedder(config, net)
        embedder = Embedder(config, net, settings.device, settings.half_precision)
    if not config.weights.pretrained:
        print(f"WARNING: {embedder_tag} has RANDOM weights: for tests only, retrieval will be poor",
              file=sys.stderr)
    sources = [p.path for p in cat.photos]
    work = bentoml_home() / "tmp" / "builds" / uuid.uuid4().hex
    thumbs = dict(thumbnails=store_dir() if thumbnails else None,
                  no_thumbnail=frozenset(i for i, p in enumerate(cat.photos) if p.row.image_url))
    # from choosing which vectors and thumbnails to reuse until the version that records them is registered
    with building():
        cache = EmbeddingCache(embedder_tag, config.dim)
        with timer.stage("embed"):
            ext = _embed(engine, sources, embedder, cache, batch_size=batch_size, workers=workers, progress=progress,
                         ray_address=ray_address, thumbs=thumbs)
        cache.close()
        errors = ext.errors | _same_photo_again(cat.photos, ext.keys, ext.errors)
        good = [i for i in range(len(sources)) if i not in errors]
        bad = cat.bad + [BadRow(cat.photos[i].line, cat.photos[i].row.image_path, r) for i, r in errors.items()]
        write_report(report, bad)
        _check_bad_share(cat, bad, max_bad_share, report)
        photos = [cat.photos[i] for i in good]
        hashes = [ext.keys[i] for i in good]
        vectors = ext.vectors if len(good) == len(sources) else ext.vectors[good]  # 5 GB at a million: no copy
        with timer.stage("project"):
            kind, projection, training = _fit_projection(vectors, [p.row.item_id for p in photos], projection,
                                                         pca_dim, whiten, seed)
            vectors = projection(vectors) if projection else normalize(vectors)
        with timer.stage("build ann"):
            choice = ann.choose(vectors, target=settings.target_recall, seed=seed)
        with timer.stage("calibrate"):
            thresholds = calibrate(vectors, [p.row.item_id for p in photos], [p.row.category for p in photos], seed)
        artifact = work / "artifact"
        shutil.rmtree(artifact, ignore_errors=True)
        artifact.mkdir(parents=True)
        with timer.stage("write artifact"):
            n_items = _write_artifact(artifact, choice.index, vectors, projection, photos, hashes, thumbnails, report)
        manifest = IndexManifest(
            embedder=embedder_tag, embedder_config=config, dim=vectors.shape[1],
            projection=kind, projection_training=training, thresholds=thresholds,
            n_photos=len(photos), n_items=n_items, n_trees=choice.n_trees, search_k=choice.search_k,
            ann_recall_at_10=round(choice.recall, 4), ann_query_ms=round(choice.query_ms, 4),
            catalogue=str(cat.path), catalogue_sha256=cat.sha256, bad_rows=len(bad), seed=seed,
            seconds=timer.seconds, built_at=dt.datetime.now(dt.timezone.utc))
        (artifact / MANIFEST_FILE).write_text(manifest.model_dump_json(indent=2))
        if eval_queries is not None:
            with timer.stage("evaluate"):
                manifest.evaluation = evaluate(eval_queries, queries, SearchIndex(artifact), embedder, photos)
        with timer.stage("register"):
            manifest.seconds = timer.seconds
            (artifact / MANIFEST_FILE).write_text(manifest.model_dump_json(indent=2))
            tag = register(INDEX_MODEL, _labels(manifest), manifest.model_dump(mode="json", exclude_none=True),
                           lambda folder: shutil.copytree(artifact, folder, dirs_exist_ok=True))
            cache_registered(embedder_tag)  # a prune keeps no earlier build's vectors for a rerun any more
    shutil.rmtree(work, ignore_errors=True)
    return BuildSummary(
        tag=tag, embedder=embedder_tag, pretrained=config.weights.pretrained, rows=cat.n_rows,
        photos_indexed=len(photos), items=n_items, bad_rows=len(bad), report=str(report), dim=manifest.dim,
        projection=manifest.projection, n_trees=choice.n_trees, search_k=choice.search_k,
        ann_recall_at_10=manifest.ann_recall_at_10,
        images_per_second=round(ext.computed / ext.seconds, 2) if ext.computed else 0.0,
        embedded_photos=ext.computed, reused_photos=len(sources) - ext.computed - len(ext.errors),
        thumbnails=str(store_dir()) if thumbnails else "off", thumbnails_made=ext.thumbnails_made,
        categories_respelled=cat.respelled, seconds=timer.seconds, evaluation=manifest.evaluation)


def _same_photo_again(photos: list[Photo], keys: list[str], errors: dict[int, str]) -> dict[int, str]:
    """Photos whose bytes an earlier row's photo has (a file copied under another name, one photo at two URLs):
    skipped as a repeated image_path is (index_builder/catalogue.py), each with the line it repeats. Two items
    with one photo come up as equal matches for every search that finds them, and a placeholder photo ("no
    photo yet") matches every item that has it."""
    again = repeats(None if i in errors or not key else key for i, key in enumerate(keys))
    return {i: (f"duplicate photo: the same bytes as line {photos[j].line} ({photos[j].row.image_path}, item "
                f"{photos[j].row.item_id}); give each row a photo of its own") for i, j in again.items()}


def _embed(engine: Literal["local", "ray"], sources: list[str], embedder: Embedder, cache: EmbeddingCache, *,
           batch_size: int | None, workers: int, progress: bool, ray_address: str | None, thumbs: dict) -> Extraction:
    """Every photo's vector (the cache's where it has one), on this machine's processes or on a Ray cluster."""
    if engine == "ray":
        from index_builder.ray_engine import extract_ray

        settings = get_settings()
        return extract_ray(sources, embedder, cache, batch_size=batch_size, progress=progress, address=ray_address,
                           device=settings.device, half=settings.half_precision, **thumbs)
    batch_size = batch_size or default_batch_size(embedder.device.type == "cuda")
    return extract(sources, embedder, cache, batch_size=batch_size, workers=workers, progress=progress, **thumbs)


def _write_artifact(artifact: Path, index: Any, vectors: np.ndarray, projection: Projection | None,
                    photos: list[Photo], hashes: list[str], thumbnails: bool, report: Path) -> int:
    """The index's files in `artifact` (all but the manifest); returns how many items it holds. A photo with an
    image_url is shown from there, any other from its thumbnail (by its hash) when thumbnails are made."""
    index.save(str(artifact / ANNOY_FILE))
    np.save(artifact / VECTORS_FILE, vectors)
    if projection:
        projection.save(artifact / PROJECTION_FILE)
    items = {p.row.item_id: p.row.item_fields() for p in photos}
    write_items_db(artifact / ITEMS_FILE,
                   [(i, p.row.item_id, p.row.image_path,
                     None if p.row.image_url or not thumbnails else sha, p.row.image_url, sha)
                    for i, (p, sha) in enumerate(zip(photos, hashes))], list(items.values()))
    shutil.copy(report, artifact / REPORT_FILE)
    return len(items)


def _check_bad_share(cat: Catalogue, bad: list[BadRow], limit: float, report: Path, unread: str = "") -> None:
    """Fail the build when no row, or too few, can be indexed; `unread`: what the count does not cover yet."""
    share = len(bad) / max(cat.n_rows, 1)
    if cat.n_rows == 0:
        raise BuildError(f"{cat.path}: the catalogue has no rows: write one row per photo under its header")
    if cat.n_rows == len(bad):
        raise BuildError(f"{cat.path}: none of the {cat.n_rows} rows is usable; reasons in {report}")
    if share > limit:
        raise BuildError(f"{cat.path}: {len(bad)} of {cat.n_rows} rows ({share:.1%}) are unusable{unread}, over the "
                         f"{limit:.0%} limit (--max-bad-share); reasons in {report}")


def _fit_projection(vectors: np.ndarray, item_ids: list[str], kind: ProjectionKind, dim: int, whiten: bool,
                    seed: int) -> tuple[str, Projection | None, dict | None]:
    """(what the manifest calls it, the projection or None, the learning figures) for --projection `kind`:
    PCA to `dim` when it shrinks the vectors and there are at least 2*dim photos; 'learned' when the
    catalogue's items teach a better one (index_builder/learn.py), else PCA with a message saying why."""
    if kind == "none" or dim <= 0 or dim >= vectors.shape[1] or len(vectors) < 2 * dim:
        if kind != "none" and 0 < dim < vectors.shape[1]:
            print(f"[project] skipped: a {dim}-d projection needs at least {2 * dim} photos, have {len(vectors)}; "
                  "/estimate and /assist use the floors measured for raw descriptors (query/floors.py)", file=sys.stderr)
        elif kind != "none" and dim >= vectors.shape[1]:
            print(f"[project] skipped: --pca-dim {dim} does not shrink the {vectors.shape[1]}-d vectors",
                  file=sys.stderr)
        return "none", None, None
    training = None
    if kind == "learned":
        learned, training = learn.learn(vectors, item_ids, dim, seed=seed)
        if learned is not None:
            print(f"[project] learned from {training['items']} items: held-out mAP "
                  f"{training['holdout']['mAP_learned']} against PCA's {training['holdout']['mAP_pca']}",
                  file=sys.stderr)
            return "learned", learned, training
        print(f"[project] kept PCA, not learned: {training['reason']}", file=sys.stderr)
    rng = np.random.default_rng(seed)
    sample = vectors if len(vectors) <= PCA_FIT_SAMPLE else vectors[rng.choice(len(vectors), PCA_FIT_SAMPLE, False)]
    return "pca-whiten" if whiten else "pca", Projection.fit(sample, dim, whiten), training


def _labels(m: IndexManifest) -> dict[str, str]:
    return {"embedder": m.embedder, "backbone": m.embedder_config.backbone, "dim": str(m.dim),
            "photos": str(m.n_photos), "weights": "pretrained" if m.embedder_config.weights.pretrained else "random"}
