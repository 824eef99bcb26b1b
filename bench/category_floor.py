"""How often /assist's category vote names a category for something the catalogue never sold, by the
similarity a neighbour must reach to vote: shop photos (grocery) and COIL-100.

Half of the products (objects) form the catalogue, each catalogue photo its own sold item. Photos of those
products, held out from it, should get their category. Photos of the other half show things the catalogue
never sold. On grocery many of them are of a kind it did sell (another apple, another milk), and naming that
kind is right; the others, and on COIL-100 (each object its own category) all of them, are of a kind it
never sold: any category named is wrong, and "no suggestion" is the right answer.
The vote is /assist's own (query/assist.py, the default neighbours and temperature); the vectors and the
projection are the builder's defaults, as in bench.pricing.

    python -m bench.category_floor     # docs/EVALUATION.md's section (~6 min; seconds with bench/out cached)
    python -m bench.category_floor --backbone efficientnet-lite1   # the same in another backbone's space
"""

from __future__ import annotations

import numpy as np
import typer

from bench.coil import QUERIES_4, coil_path
from bench.evaluate_grocery import measure_and_document
from bench.features import embed_paths
from bench.grocery import CREDIT, read_split
from bench.pricing import Fit, nearest_items, sold_half
from bench.thresholds import BACKBONE, BACKBONE_OPTION, DESCRIPTOR, coarse_names, projection
from model_store.settings import get_settings
from query.assist import vote_category
from query.floors import PCA

FLOORS = (None, 0.5, 0.55, 0.6, 0.65, 0.7)
GROUPS = ("known", "unknown, sold kind", "unknown, new kind")
SPLITS = 5  # draws of the sold half; the counts are summed over them


def evaluate(cat_vecs: np.ndarray, cat_products: np.ndarray, cat_kinds: np.ndarray, q_vecs: np.ndarray,
             q_products: np.ndarray, q_kinds: np.ndarray, splits: int = SPLITS) -> list[dict]:
    """Per floor, summed over `splits` draws of the sold half: how many photos of each group get a
    suggestion, and how many the right one."""
    runs = [one_split(cat_vecs, cat_products, cat_kinds, q_vecs, q_products, q_kinds, seed) for seed in range(splits)]
    return [{"floor": rows[0]["floor"], **{g: {k: sum(r[g][k] for r in rows) for k in rows[0][g]} for g in GROUPS}}
            for rows in zip(*runs)]


def one_split(cat_vecs: np.ndarray, cat_products: np.ndarray, cat_kinds: np.ndarray, q_vecs: np.ndarray,
              q_products: np.ndarray, q_kinds: np.ndarray, seed: int, fit: Fit = projection,
              floors: tuple[float | None, ...] = FLOORS) -> list[dict]:
    s = get_settings()
    in_cat = sold_half(cat_products, np.random.default_rng(seed))
    project = fit(cat_vecs[in_cat])
    catalogue, kinds = project(cat_vecs[in_cat]), cat_kinds[in_cat]
    neighbours = nearest_items(project(q_vecs), catalogue, kinds, np.zeros(len(catalogue)), s.vote_neighbours)
    known = np.isin(q_products, cat_products[in_cat])
    groups = dict(zip(GROUPS, (known, ~known & np.isin(q_kinds, kinds), ~known & ~np.isin(q_kinds, kinds))))
    rows = []
    for floor in floors:
        votes = [vote_category(n, s.vote_temperature, -1.0 if floor is None else floor) for n in neighbours]
        named = np.array([v.suggested is not None for v in votes])
        right = np.array([v.suggested == k for v, k in zip(votes, q_kinds)])
        rows.append({"floor": floor, **{g: {"photos": int(m.sum()), "named": int(named[m].sum()),
                                            "right": int(right[m].sum())} for g, m in groups.items()}})
    return rows


def grocery_arrays() -> tuple[np.ndarray, ...]:
    """Catalogue: train photos, the coarse class as category; queries: val photos. (vectors, products, kinds)
    of each."""
    (train, t_lab), (val, v_lab) = read_split("train"), read_split("val")
    coarse = coarse_names()
    return (embed_paths(train, BACKBONE, "default", DESCRIPTOR), t_lab, np.array([coarse[c] for c in t_lab]),
            embed_paths(val, BACKBONE, "default", DESCRIPTOR), v_lab, np.array([coarse[c] for c in v_lab]))


def coil_arrays() -> tuple[np.ndarray, ...]:
    """Catalogue: every 10th degree of each object, each object its own category; queries: views
    45/135/225/315. (vectors, objects, kinds) of each."""
    g_keys = [(o, a) for o in range(1, 101) for a in range(0, 360, 10)]
    q_keys = [(o, a) for o in range(1, 101) for a in QUERIES_4]
    feats = embed_paths([coil_path(o, a) for o, a in g_keys + q_keys], BACKBONE, "default", DESCRIPTOR)
    g_obj, q_obj = np.array([o for o, _ in g_keys]), np.array([o for o, _ in q_keys])
    return feats[:len(g_keys)], g_obj, g_obj.astype(str), feats[len(g_keys):], q_obj, q_obj.astype(str)


def grocery() -> list[dict]:
    """The train photos of half the products as the catalogue; queries: all val photos."""
    return evaluate(*grocery_arrays())


def coil() -> list[dict]:
    """Every 10th degree of half the objects as the catalogue; queries: views 45/135/225/315 of every object."""
    return evaluate(*coil_arrays())


def _pct(count: int, of: int) -> str:
    return f"{count / of:.0%}"


def markdown(result: dict) -> str:
    s = get_settings()
    header = (f"Measured {result['date']} on {result['machine']} with `python -m bench.category_floor`: the default "
              f"embedder ({BACKBONE}, regional GeM) and the builder's projection; /assist's vote of the "
              f"{s.vote_neighbours} nearest items at T = {s.vote_temperature}, only those at or above the floor "
              f"voting; half the products in the catalogue, each catalogue photo its own sold item; {SPLITS} draws "
              f"of that half, photos counted over all of them. {CREDIT}")
    setup = ("Grocery: catalogue = train photos of 40 of the 81 products (coarse class as category: 43 kinds), "
             "queries = all val photos. COIL-100: catalogue = every 10th degree of 50 objects (each its own "
             "category), queries = views 45/135/225/315 of all 100. Named: a category is suggested; right: it is "
             "the photo's own category (for a kind the catalogue never sold none is right, and naming none is).")
    lines = [header, "", setup, "",
             "| data | floor | known products: named / right | unknown products of a sold kind: named / right "
             "| unknown products of a new kind: named (all wrong) | suggestions right |", "|---|---|---|---|---|---|"]
    for data, rows in result["rows"].items():
        for r in rows:
            floor = {None: "none (before)", PCA.vote: f"{r['floor']} (default)"}.get(r["floor"], r["floor"])
            cells = [f"{_pct(r[g]['named'], r[g]['photos'])} / {_pct(r[g]['right'], r[g]['photos'])} of "
                     f"{r[g]['photos']}" if r[g]["photos"] else "-" for g in GROUPS[:2]]
            new = r[GROUPS[2]]
            named, right = (sum(r[g][k] for g in GROUPS) for k in ("named", "right"))
            lines.append(f"| {data} | {floor} | {' | '.join(cells)} | {_pct(new['named'], new['photos'])} of "
                         f"{new['photos']} | {_pct(right, named)} of {named} |")
    return "\n".join(lines)


def main(docs: bool = typer.Option(True, help="write the section of docs/EVALUATION.md"),
         backbone: str = BACKBONE_OPTION) -> None:
    global BACKBONE
    other, BACKBONE = backbone if backbone != BACKBONE else None, backbone
    measure_and_document("category-floor", lambda: {"rows": {"grocery": grocery(), "COIL-100": coil()}}, markdown,
                         "## A category only from items similar enough", docs, other)


if __name__ == "__main__":
    typer.run(main)
