"""Several photos of one item as one query (`more_images`): how often the right item comes first with 1, 2 or 3
photos, on shop photos (grocery) and COIL-100.

The query is what the service makes of them (query.search_index.item_query): the mean of the photos' vectors in
the index's space, normalised. Catalogue items are ranked by their best photo, as a search ranks them.
Grocery: catalogue = the train photos, one item per product; a query = 1-3 val photos of one product (the
data set has no second photo of one physical item: photos of one product in the shop stand in for it; the
products with at least 3 val photos).
COIL-100: catalogue = views 0/90/180/270 of each object; a query = 1-3 of its other views (5-degree steps).
Each group of photos is drawn at random, DRAWS per product (object); the same draws for every count.
The vectors and the projection are the builder's defaults (bench.thresholds).

    python -m bench.item_photos     # docs/EVALUATION.md's section (~6 min; seconds with bench/out cached)
"""

from __future__ import annotations

import numpy as np
import typer

from bench.coil import GALLERY_4, coil_path
from bench.evaluate_grocery import measure_and_document, search_metrics
from bench.features import embed_paths
from bench.grocery import CREDIT, read_split
from bench.thresholds import BACKBONE, DESCRIPTOR, projection
from query.search_index import item_query

COUNTS = (1, 2, 3)
DRAWS = 20


def evaluate(catalogue: np.ndarray, items: np.ndarray, photos: np.ndarray, photo_items: np.ndarray,
             draws: int = DRAWS, seed: int = 0) -> list[dict]:
    """Top-1 and recall@5 over the catalogue's distinct items, for queries of 1..3 photos of one item."""
    project = projection(catalogue)
    catalogue, photos = project(catalogue), project(photos)
    rng = np.random.default_rng(seed)
    groups = [rng.permutation(np.flatnonzero(photo_items == item))[:max(COUNTS)]
              for item in np.unique(photo_items) for _ in range(draws)]
    groups = [g for g in groups if len(g) == max(COUNTS)]
    truth = np.array([photo_items[g[0]] for g in groups])
    return [{"photos": n, "items": len(set(truth.tolist())),
             **search_metrics(catalogue, items, np.stack([item_query(photos[g[:n]]) for g in groups]), truth)}
            for n in COUNTS]


def grocery() -> list[dict]:
    (train, t_lab), (val, v_lab) = read_split("train"), read_split("val")
    vecs = embed_paths(train + val, BACKBONE, descriptor=DESCRIPTOR)
    return evaluate(vecs[:len(train)], t_lab, vecs[len(train):], v_lab)


def coil() -> list[dict]:
    views = [a for a in range(0, 360, 5) if a not in GALLERY_4]
    gallery = [coil_path(o, a) for o in range(1, 101) for a in GALLERY_4]
    others = [coil_path(o, a) for o in range(1, 101) for a in views]
    vecs = embed_paths(gallery + others, BACKBONE, descriptor=DESCRIPTOR)
    return evaluate(vecs[:len(gallery)], np.repeat(np.arange(100), len(GALLERY_4)), vecs[len(gallery):],
                    np.repeat(np.arange(100), len(views)))


def markdown(result: dict) -> str:
    lines = [f"Measured {result['date']} on {result['machine']} with `python -m bench.item_photos`: the default "
             f"embedder ({BACKBONE}, regional GeM) and the builder's projection; a query of several photos is their "
             f"mean vector, as the service makes it; {DRAWS} random groups of photos per product (object), the same "
             f"groups for every count. {CREDIT}", "",
             "Grocery: catalogue = the train photos (81 products), queries = val photos of one product. COIL-100: "
             "catalogue = views 0/90/180/270 of each object, queries = its other views.", "",
             "| data | photos in the query | queries (items) | top-1 | recall@5 |", "|---|---|---|---|---|"]
    for data, rows in result["rows"].items():
        lines += [f"| {data} | {r['photos']} | {r['queries']} ({r['items']}) | {r['top1']:.3f} "
                  f"| {r['recall_at_5']:.3f} |" for r in rows]
    return "\n".join(lines)


def main(docs: bool = typer.Option(True, help="write the section of docs/EVALUATION.md")) -> None:
    measure_and_document("item-photos", lambda: {"rows": {"grocery": grocery(), "COIL-100": coil()}}, markdown,
                         "## Several photos of one item", docs)


if __name__ == "__main__":
    typer.run(main)
