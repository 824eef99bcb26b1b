"""Retrieval quality of a built index on labelled query photos: top-1, recall@5 and mAP over items."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from index_builder.catalogue import Photo, spreadsheet_csv
from model_store.embedder import Embedder
from query.search_index import SearchIndex
from model_store.preprocess import ImageError, image_to_pixels, load_image_file

RANK_DEPTH = 100  # mAP: an item not in the first 100 distinct items counts as not found


class EvalError(ValueError):
    """A queries file that cannot be used."""


@dataclass(frozen=True)
class Query:
    line: int
    path: Path
    item_id: str


def read_queries(path: Path, photos: list[Photo]) -> list[Query]:
    """CSV with columns image_path,item_id; paths relative to the file's folder. Some query must be usable
    against the catalogue's `photos` (one of another catalogue would score 0, not fail)."""
    path = Path(path)
    if not path.is_file():  # as the catalogue's: not Python's "[Errno 2] No such file or directory"
        raise EvalError(f"{path}: no such queries file")
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = spreadsheet_csv(f)
            if not {"image_path", "item_id"} <= set(reader.fieldnames):
                raise EvalError(f"{path}: the header must name image_path,item_id")
            queries = [Query(reader.line_num, (path.parent / r["image_path"].strip()).resolve(), r["item_id"].strip())
                       for r in reader]
    except OSError as exc:
        raise EvalError(f"{path}: cannot read queries ({exc})") from exc
    if not queries:
        raise EvalError(f"{path}: no queries")
    if not any(q.path.is_file() for q in queries):  # some missing are skipped (and listed) when evaluating
        raise EvalError(f"{path}: none of the {len(queries)} query photos exists (line {queries[0].line}: "
                        f"{queries[0].path}): image_path is relative to the queries file's folder")
    unusable = Unusable(photos)
    scorable = [q for q in queries if not unusable(q)]
    if not scorable:
        raise EvalError(f"{path}: none of the {len(queries)} queries can be scored ({unusable(queries[0])}): each "
                        "query is a photo of a catalogued item, not in the catalogue itself, with that item's item_id")
    if why := _none_reads(scorable):
        raise EvalError(f"{path}: none of the {len(scorable)} query photos that could be scored can be read ({why})")
    return queries


def _none_reads(queries: list[Query]) -> str:
    """Why the first of `queries` cannot be read when none of their photos decodes, else "". It decodes up to
    the first photo that reads (one, as a rule), so a queries file of unreadable photos fails before the
    catalogue is embedded, not after."""
    first = ""
    for q in queries:
        try:
            load_image_file(q.path)
            return ""
        except ImageError as exc:
            first = first or f"line {q.line}: {exc}"
    return first


class Unusable:
    """Why a query cannot be scored against an index of `photos`, or "": it names an item not in the index
    (it could never be found: scored, it would only lower every figure), or it is one of the index's own photos
    (it would find itself: scored, it would only raise them)."""

    def __init__(self, photos: list[Photo]):
        self.items, self.paths = {p.row.item_id for p in photos}, {p.path for p in photos}

    def __call__(self, q: Query) -> str:
        if q.item_id not in self.items:
            return (f"line {q.line}: item {q.item_id!r} is not in the index (not in the catalogue, or every row of "
                    "it was skipped)")
        if str(q.path) in self.paths:
            return f"line {q.line}: {q.path} is a photo of the catalogue: a query is one the index has not seen"
        return ""


def ranks(ranked: list[list[str]], truth: list[str]) -> np.ndarray:
    """1-based rank of the true item in each ranked list of distinct item ids; 0 = not found."""
    return np.array([r.index(t) + 1 if t in r else 0 for r, t in zip(ranked, truth)])


def metrics(rank: np.ndarray) -> dict[str, float]:
    """One relevant item per query, so average precision is 1/rank."""
    found = rank > 0
    return {
        "queries": int(len(rank)),
        "top1": round(float(np.mean(rank == 1)), 4),
        "recall_at_5": round(float(np.mean(found & (rank <= 5))), 4),
        "mAP": round(float(np.mean(np.where(found, 1.0 / np.maximum(rank, 1), 0.0))), 4),
    }


def evaluate(queries_file: Path, queries: list[Query], index: SearchIndex, embedder: Embedder,
             indexed: list[Photo]) -> dict:
    """Embed each query photo (`queries`, as read_queries read `queries_file`), search the index, score the
    ranking. Queries that are unreadable, name an item not in the index or are one of its own photos
    (`indexed`) are listed, not scored."""
    ranked, truth, skipped, spec = [], [], [], embedder.config.preprocess
    unusable = Unusable(indexed)
    for q in queries:
        if reason := unusable(q):
            skipped.append(reason)
            continue
        try:
            arr = image_to_pixels(load_image_file(q.path, spec=spec), spec)
        except ImageError as exc:
            skipped.append(f"line {q.line}: {exc}")
            continue
        matches = index.search(embedder.embed(arr[None])[0], RANK_DEPTH)
        ranked.append([m.item_id for m in matches])
        truth.append(q.item_id)
    if not truth:
        raise EvalError(f"{queries_file}: none of the {len(queries)} queries could be used ({skipped[0]})")
    return {**metrics(ranks(ranked, truth)), "skipped": skipped, "queries_file": str(Path(queries_file).resolve())}
