"""The floors of /estimate and /assist in the vector spaces other than the builder's PCA-256.

A cosine means different things in different spaces, and the floors were first measured in PCA-256
(bench.pricing: a price from 0.6; bench.category_floor: a vote from 0.55). Two other spaces are built:
- raw descriptors: the builder learns PCA only from 512 photos, so a smaller catalogue is indexed in the
  embedder's own vectors, which are not centred and score higher. Measured on catalogues of about 60, 250 and
  500 photos drawn from the grocery train photos and the COIL-100 catalogue views (three draws each);
- whitened PCA-256 (`--whiten`): each component scaled to unit variance, which spreads cosines around 0.
  Measured on the whole catalogue.
Half the products are sold, as in those benches; photos are priced and voted on as /estimate and /assist
do; the first row of each data set is PCA-256 at its floors, the behaviour the other spaces' floors should
match.

    python -m bench.space_floors   # docs/EVALUATION.md's section (seconds once bench.pricing cached the vectors)
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import typer

from bench.category_floor import GROUPS, coil_arrays, grocery_arrays, one_split
from bench.evaluate_grocery import measure_and_document
from bench.grocery import CREDIT
from bench.pricing import judge, make_setup, neighbours
from bench.thresholds import BACKBONE, DIM, normalize, projection
from model_store.index_artifact import Projection
from query.floors import PCA, RAW, WHITENED, Floors
from query.pricing import estimate_price

SIZES = (60, 250, 500)  # raw: catalogue photos; each draw takes twice as many, half the products are sold
DRAWS = 3
SWEEPS = {"raw": ((0.6, 0.65, 0.7, 0.75), (0.55, 0.6, 0.65, 0.7)),  # (price floors, vote floors)
          "whitened PCA-256": ((0.2, 0.25, 0.275, 0.3, PCA.price), (0.2, 0.225, 0.25, 0.3, PCA.vote))}
CHOSEN: dict[str, Floors] = {"raw": RAW, "whitened PCA-256": WHITENED}
SHARES = ("known_priced", "good_of_all", "unknown_priced")


def raw(_catalogue: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """No projection: what the builder does under 512 photos."""
    return normalize


def whitened(catalogue: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """What the builder does with --whiten."""
    return Projection.fit(catalogue, DIM, whiten=True)


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
    rows = [{"space": "PCA-256", **measure(arrays, None, projection, (PCA.price,), (PCA.vote,))}]
    rows += [{"space": "raw", **measure(arrays, size, raw, *SWEEPS["raw"])} for size in SIZES]
    return rows + [{"space": "whitened PCA-256", **measure(arrays, None, whitened, *SWEEPS["whitened PCA-256"])}]


def _pct(x: float) -> str:
    return f"{x:.0%}"


def _mark(space: str, floor: float, chosen: str) -> str:
    """The floor in bold where it is the one the service uses in that space."""
    return f"**{floor}**" if space in CHOSEN and getattr(CHOSEN[space], chosen) == floor else str(floor)


def markdown(result: dict) -> str:
    head = (f"Measured {result['date']} on {result['machine']} with `python -m bench.space_floors`: the default "
            f"embedder ({BACKBONE}, regional GeM); half the products sold, each photo its own sold item, priced as "
            "bench.pricing and voted on as bench.category_floor. PCA-256 (at its floors) and whitened PCA-256: the "
            f"whole catalogue; raw descriptors: catalogues of about {', '.join(map(str, SIZES))} photos drawn at "
            f"random, as the builder indexes a catalogue of under 512 photos. Each row: {DRAWS} draws of the sold "
            "half (and of the raw rows' photos); shares are means over the draws, counts sums. Bold: the floors the "
            f"service uses in that space. {CREDIT}")
    price = ["| data | space | catalogue photos | price floor | known: priced | within 25% (of all) | unknown: priced |",
             "|---|---|---|---|---|---|---|"]
    vote = ["| data | space | catalogue photos | vote floor | known: right | new product of a sold kind: right "
            "| never-sold kind: named (each wrong) |", "|---|---|---|---|---|---|---|"]
    for data, rows in result["rows"].items():
        for r in rows:
            where = f"| {data} | {r['space']} | {r['photos']} |"
            for p in r["price"]:
                price.append(f"{where} {_mark(r['space'], p['floor'], 'price')} | {_pct(p['known_priced'])} | "
                             f"{_pct(p['good_of_all'])} | {_pct(p['unknown_priced'])} |")
            for v in r["vote"]:
                cells = [f"{v[g]['right']} of {v[g]['photos']}" for g in GROUPS[:2]]
                vote.append(f"{where} {_mark(r['space'], v['floor'], 'vote')} | {' | '.join(cells)} | "
                            f"{v[GROUPS[2]]['named']} of {v[GROUPS[2]]['photos']} |")
    return "\n".join([head, "", *price, "", *vote])


def main(docs: bool = typer.Option(True, help="write the section of docs/EVALUATION.md")) -> None:
    measure_and_document("space-floors", lambda: {"rows": {"grocery": measure_data(grocery_arrays()),
                                                            "COIL-100": measure_data(coil_arrays())}},
                         markdown, "## Floors of the other vector spaces: a small catalogue, whitened PCA", docs)


if __name__ == "__main__":
    typer.run(main)
