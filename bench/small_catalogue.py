"""The floors of /estimate and /assist for an index without a projection: a catalogue of under 512 photos.

The builder learns PCA-256 only from 512 photos; a smaller catalogue is indexed in the embedder's raw
descriptors, where unrelated photos score 0.5 and up instead of near 0, so the floors measured in the PCA
space (bench.pricing: a price from 0.6; bench.category_floor: a vote from 0.55) refuse nearly nothing there.
This measures the floors in the raw space on catalogues of that size: catalogues of about 60, 250 and 500
photos drawn from the grocery train photos and the COIL-100 catalogue views (three draws each, half the
products sold, as in those benches), priced and voted on as /estimate and /assist do, against the PCA space
of the whole catalogue at its floors (the behaviour the raw floors should match).

    python -m bench.small_catalogue   # docs/EVALUATION.md's section (seconds once bench.pricing cached the vectors)
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import typer

from bench.category_floor import GROUPS, coil_arrays, grocery_arrays, one_split
from bench.evaluate_grocery import measure_and_document
from bench.grocery import CREDIT
from bench.pricing import estimate_price, judge, make_setup, neighbours
from bench.thresholds import BACKBONE, normalize, projection
from query.floors import PCA, RAW

SIZES = (60, 250, 500)  # catalogue photos: each draw takes twice as many, half the products are sold
DRAWS = 3
PRICE_FLOORS = (0.6, 0.65, 0.7, 0.75)
VOTE_FLOORS = (0.55, 0.6, 0.65, 0.7)
SHARES = ("known_priced", "good_of_all", "unknown_priced")


def raw(_catalogue: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """No projection: what the builder does under 512 photos."""
    return normalize


def drawn(arrays: tuple[np.ndarray, ...], size: int | None, draw: int) -> tuple[np.ndarray, ...]:
    """About 2 x `size` catalogue photos drawn at random (all for None), and the queries of their products."""
    cat_vecs, cat_products, cat_kinds, q_vecs, q_products, q_kinds = arrays
    n = len(cat_vecs)
    pick = np.sort(np.random.default_rng(100 + draw).permutation(n)[:2 * size]) if size else np.arange(n)
    q = np.isin(q_products, cat_products[pick])
    return cat_vecs[pick], cat_products[pick], cat_kinds[pick], q_vecs[q], q_products[q], q_kinds[q]


def measure(arrays: tuple[np.ndarray, ...], size: int | None, fit, price_floors, vote_floors) -> dict:
    """Per price floor, the shares of bench.pricing.judge averaged over the draws; per vote floor, the counts of
    bench.category_floor summed over them; and the mean catalogue size."""
    prices: dict[float, list[dict]] = {f: [] for f in price_floors}
    votes: dict[float, list[dict]] = {f: [] for f in vote_floors}
    photos = []
    for draw in range(DRAWS):
        cv, cp, ck, qv, qp, qk = drawn(arrays, size, draw)
        s = make_setup(cv, cp, ck, qv, qp, seed=draw, fit=fit)
        photos.append(len(s.catalogue))
        known, unknown = neighbours(s.known, s), neighbours(s.unknown, s)
        for f in price_floors:
            prices[f].append(judge([estimate_price(n, f) for n in known], s.known_levels,
                                   [estimate_price(n, f) for n in unknown]))
        for row in one_split(cv, cp, ck, qv, qp, qk, draw, fit=fit, floors=vote_floors):
            votes[row["floor"]].append(row)
    return {"photos": round(float(np.mean(photos))),
            "price": [{"floor": f, **{k: round(float(np.mean([r[k] for r in rows])), 3) for k in SHARES}}
                      for f, rows in prices.items()],
            "vote": [{"floor": f, **{g: {k: sum(r[g][k] for r in rows) for k in rows[0][g]} for g in GROUPS}}
                     for f, rows in votes.items()]}


def measure_data(arrays: tuple[np.ndarray, ...]) -> list[dict]:
    rows = [{"space": "PCA-256, whole catalogue", **measure(arrays, None, projection, (PCA.price,), (PCA.vote,))}]
    return rows + [{"space": "raw", **measure(arrays, size, raw, PRICE_FLOORS, VOTE_FLOORS)} for size in SIZES]


def _pct(x: float) -> str:
    return f"{x:.0%}"


def markdown(result: dict) -> str:
    head = (f"Measured {result['date']} on {result['machine']} with `python -m bench.small_catalogue`: the "
            f"default embedder ({BACKBONE}, regional GeM); catalogues of about {', '.join(map(str, SIZES))} "
            f"photos drawn at random ({DRAWS} draws each, half the products sold, each photo its own sold item; "
            "priced as bench.pricing, voted on as bench.category_floor) in the raw descriptors, as the builder "
            "indexes a catalogue of under 512 photos; first row of each: the whole catalogue in the builder's "
            f"PCA-256 at the PCA floors. Shares are means over the draws, counts sums. Bold: the floors an index "
            f"without projection uses ({RAW.price} and {RAW.vote}). {CREDIT}")
    price = ["| data | space | catalogue photos | price floor | known: priced | within 25% (of all) | unknown: priced |",
             "|---|---|---|---|---|---|---|"]
    vote = ["| data | space | catalogue photos | vote floor | known: right | new product of a sold kind: right "
            "| never-sold kind: named (each wrong) |", "|---|---|---|---|---|---|---|"]
    for data, rows in result["rows"].items():
        for r in rows:
            for p in r["price"]:
                mark = "**" if r["space"] == "raw" and p["floor"] == RAW.price else ""
                price.append(f"| {data} | {r['space']} | {r['photos']} | {mark}{p['floor']}{mark} | "
                             f"{_pct(p['known_priced'])} | {_pct(p['good_of_all'])} | {_pct(p['unknown_priced'])} |")
            for v in r["vote"]:
                mark = "**" if r["space"] == "raw" and v["floor"] == RAW.vote else ""
                cells = [f"{v[g]['right']} of {v[g]['photos']}" for g in GROUPS[:2]]
                new = v[GROUPS[2]]
                vote.append(f"| {data} | {r['space']} | {r['photos']} | {mark}{v['floor']}{mark} | {' | '.join(cells)} "
                            f"| {new['named']} of {new['photos']} |")
    return "\n".join([head, "", *price, "", *vote])


def main(docs: bool = typer.Option(True, help="write the section of docs/EVALUATION.md")) -> None:
    measure_and_document("small-catalogue", lambda: {"rows": {"grocery": measure_data(grocery_arrays()),
                                                               "COIL-100": measure_data(coil_arrays())}},
                         markdown, "## Floors of a small catalogue (no projection)", docs)


if __name__ == "__main__":
    typer.run(main)
