"""Searching a loaded index artifact: ANN or exact search, filters, one answer per item, photo URLs."""

from __future__ import annotations

import datetime as dt
import math
import sqlite3
import threading
from pathlib import Path
from typing import Any

import numpy as np
from annoy import AnnoyIndex
from pydantic import BaseModel, Field

from model_store.index_artifact import (ANNOY_FILE, ITEMS_FILE, PROJECTION_FILE, VECTORS_FILE,
                                        ArtifactError, IndexManifest, Projection, normalize)
from model_store.thumbnails import SUFFIX

# Filters matching at most this many photos are answered by exact search over those photos:
# 20k dot products of 256 numbers take ~1 ms, and over-fetching from Annoy could take far longer.
EXACT_FILTER_LIMIT = 20_000
PHOTO_ROUTE = "/photos"  # where the service serves thumbnails: /photos/<key>.webp


class Filters(BaseModel):
    """Optional constraints on the items a search returns; None means no constraint."""

    category: str | None = None
    min_price: float | None = None
    max_price: float | None = None
    sold_after: dt.date | None = None
    sold_before: dt.date | None = None

    def sql(self) -> tuple[str, list[Any]]:
        clauses, args = [], []
        for clause, value in (("lower(i.category) = lower(?)", self.category), ("i.price >= ?", self.min_price),
                              ("i.price <= ?", self.max_price), ("i.sold_at >= ?", self.sold_after),
                              ("i.sold_at <= ?", self.sold_before)):
            if value is not None:
                clauses.append(clause)
                args.append(value.isoformat() if isinstance(value, dt.date) else value)
        return " AND ".join(clauses), args


class Match(BaseModel):
    """One sold item similar to the query, through its most similar photo."""

    item_id: str
    title: str
    category: str
    price: float
    currency: str
    sold_at: dt.date
    score: float = Field(description="cosine similarity of the query and the matched photo, -1..1")
    image_path: str = Field(description="the matched photo, as written in the catalogue")
    photo_url: str | None = Field(
        None, description="where to show the matched photo: the catalogue's image_url, else this service's "
                          "thumbnail (/photos/<key>.webp, cached for good); null when neither exists")


def item_query(vectors: np.ndarray) -> np.ndarray:
    """One vector for several photos of one item (N, dim, index space): their mean, L2-normalised. A catalogue
    item's (SearchIndex.item_vector), and a query's from several sides of an item, which finds it more often
    than any one of them (docs/EVALUATION.md, "Several photos of one item")."""
    return normalize(vectors.mean(axis=0))


def cosine_from_angular(distance: float) -> float:
    return 1.0 - distance * distance / 2.0


class SearchIndex:
    """A loaded artifact: Annoy memory-mapped (shared between processes), items in read-only SQLite."""

    def __init__(self, folder: Path, tag: str = ""):
        self.folder, self.tag = Path(folder), tag
        self.manifest = m = IndexManifest.read(self.folder)
        self.projection = Projection.load(self.folder / PROJECTION_FILE) if m.projection != "none" else None
        self.annoy = AnnoyIndex(m.dim, "angular")
        try:
            self.annoy.load(str(self.folder / ANNOY_FILE))
        except OSError as exc:
            raise ArtifactError(f"{self.folder / ANNOY_FILE}: cannot load the Annoy index ({exc})") from exc
        self.vectors = np.load(self.folder / VECTORS_FILE, mmap_mode="r")
        self._local = threading.local()
        n_db = self._db().execute("SELECT count(*) FROM photos").fetchone()[0]
        columns = {r[1] for r in self._db().execute("PRAGMA table_info(photos)")}
        # format 1 artifacts have neither column
        self._photo_columns = "p.thumbnail, p.image_url" if "thumbnail" in columns else "NULL, NULL"
        self.category_names = [r[0] for r in self._db().execute("SELECT DISTINCT category FROM items")]
        self.categories = {c.lower() for c in self.category_names}
        if not (self.annoy.get_n_items() == n_db == len(self.vectors) == m.n_photos):
            raise ArtifactError(
                f"{self.folder}: counts disagree (annoy {self.annoy.get_n_items()}, items {n_db}, "
                f"vectors {len(self.vectors)}, manifest {m.n_photos}): rebuild the index"
            )

    def _db(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            uri = f"file:{self.folder / ITEMS_FILE}?mode=ro&immutable=1"
            try:
                conn = sqlite3.connect(uri, uri=True, check_same_thread=False)
                conn.execute("SELECT 1 FROM photos LIMIT 1")
            except sqlite3.Error as exc:
                raise ArtifactError(f"{self.folder / ITEMS_FILE}: {exc}") from exc
            self._local.conn = conn
        return conn

    def project(self, descriptors: np.ndarray) -> np.ndarray:
        """Embedder output (N, D) -> index space (N, dim), L2-normalised."""
        return self.projection(descriptors) if self.projection is not None else normalize(descriptors)

    def search(self, descriptor: np.ndarray, k: int, filters: Filters | None = None) -> list[Match]:
        """The k most similar distinct items for one embedder descriptor (D,), best first."""
        return self.nearest(self.project(descriptor[None, :])[0], k, filters)

    def nearest(self, query: np.ndarray, k: int, filters: Filters | None = None,
                exclude_item: str | None = None) -> list[Match]:
        """The k most similar distinct items to a vector in index space, best first; `exclude_item` never."""
        where, args = (filters or Filters()).sql()
        if exclude_item is not None:
            where, args = " AND ".join(filter(None, [where, "p.item_id != ?"])), [*args, exclude_item]
        if where:
            ids = [r[0] for r in self._db().execute(
                f"SELECT p.annoy_id FROM photos p JOIN items i USING(item_id) WHERE {where}", args)]
            if len(ids) <= EXACT_FILTER_LIMIT:
                return self._exact(query, np.asarray(ids, dtype=np.int64), k)
        return self._ann(query, k, where, args)

    def item_vector(self, item_id: str) -> np.ndarray | None:
        """The mean of an item's photo vectors (index space, L2-normalised); None for an unknown item."""
        ids = [r[0] for r in self._db().execute("SELECT annoy_id FROM photos WHERE item_id = ?", (item_id,))]
        if not ids:
            return None
        return item_query(np.asarray(self.vectors[sorted(ids)]))

    def has_thumbnail(self, key: str) -> bool:
        """Whether one of this index's photos has the thumbnail `key`."""
        if self._photo_columns.startswith("NULL"):
            return False
        return self._db().execute("SELECT 1 FROM photos WHERE thumbnail = ? LIMIT 1", (key,)).fetchone() is not None

    def _exact(self, query: np.ndarray, ids: np.ndarray, k: int) -> list[Match]:
        if len(ids) == 0:
            return []
        ids = np.sort(ids)  # sorted reads from the memory map are sequential
        scores = np.asarray(self.vectors[ids] @ query)
        order = np.argsort(-scores)
        return self._distinct(ids[order].tolist(), scores[order].tolist(), k, "", [])

    def _ann(self, query: np.ndarray, k: int, where: str, args: list[Any]) -> list[Match]:
        total, n = self.manifest.n_photos, max(4 * k, 20)
        while True:
            n = min(n, total)
            search_k = max(self.manifest.search_k * math.ceil(n / 10), n * self.manifest.n_trees)
            ids, dists = self.annoy.get_nns_by_vector(query.tolist(), n, search_k=search_k, include_distances=True)
            matches = self._distinct(ids, [cosine_from_angular(d) for d in dists], k, where, args)
            if len(matches) >= k or n >= total:
                return matches
            n *= 4

    def _distinct(self, ids: list[int], scores: list[float], k: int, where: str, args: list[Any]) -> list[Match]:
        """Rows for ids (best first), one per item, filters applied, at most k."""
        seen, out = set(), []
        for start in range(0, len(ids), 500):  # chunks: below SQLite's bound-parameter limit, stop early
            chunk = ids[start:start + 500]
            sql = ("SELECT p.annoy_id, p.item_id, i.title, i.category, i.price, i.currency, i.sold_at, p.image_path, "
                   f"{self._photo_columns} FROM photos p JOIN items i USING(item_id) "
                   f"WHERE p.annoy_id IN ({','.join('?' * len(chunk))})")
            sql += f" AND {where}" if where else ""
            rows = {r[0]: r for r in self._db().execute(sql, [*chunk, *args])}
            for pid, score in zip(chunk, scores[start:start + 500]):
                row = rows.get(pid)
                if row is None or row[1] in seen:
                    continue
                seen.add(row[1])
                out.append(Match(item_id=row[1], title=row[2], category=row[3], price=row[4], currency=row[5],
                                 sold_at=row[6], score=round(float(score), 6), image_path=row[7],
                                 photo_url=row[9] or (f"{PHOTO_ROUTE}/{row[8]}{SUFFIX}" if row[8] else None)))
                if len(out) == k:
                    return out
        return out
