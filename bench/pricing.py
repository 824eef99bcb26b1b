"""How well /estimate prices a photo, and how often it prices what the catalogue never sold: shop photos
(grocery) and COIL-100.

Neither data set has prices. Each product (object) gets a made-up price level, log-uniform from $2 to $500,
and each catalogue photo is a one-of-a-kind sold item at its product's level times a lognormal spread
(sigma 0.2): an item sells near what its kind sells for. Half of the products are in the catalogue: photos
of those (held out from it) should get a price near their level; photos of the other half show things the
catalogue never sold, and their estimates should be refused or come with a low confidence.
What is compared is the similarity floor comparables must reach (query/pricing.py): a fixed cosine of 0.6
around the default of 0.6, the thresholds the builder measures on the index's own catalogue
(index_builder/calibrate.py), and the median similarity of a catalogue photo to its nearest photo of another
product (how close a product the catalogue never sold typically comes). Vectors and projection are the builder's defaults
(bench.thresholds); neighbours are the 20 nearest items, as /estimate looks at.
Also measured: whether the confidence, calibrated on the catalogue's own items (each priced from the others,
an isotonic map to the share within 25% of its price), would hold as a chance for the query photos (it holds
for sold products, not for never-sold ones: docs/EVALUATION.md, so it is not shipped).

    python -m bench.pricing          # docs/EVALUATION.md's pricing section (~6 min; seconds with bench/out cached)
    python -m bench.pricing --backbone efficientnet-lite0   # the same in another backbone's space
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable

import numpy as np
import typer

from bench.coil import QUERIES_4, coil_path
from bench.evaluate_grocery import measure_and_document
from bench.features import embed_paths
from bench.grocery import CREDIT, read_split
from bench.thresholds import BACKBONE, BACKBONE_OPTION, DESCRIPTOR, coarse_names, projection
from index_builder.calibrate import calibrate
from model_store.index_artifact import Thresholds
from query.assist import ESTIMATE_NEIGHBOURS
from query.models import Estimate
from query.pricing import MIN_SIMILARITY, estimate_price
from query.search_index import Match

SPREAD = 0.2  # sigma of log(item price / its product's level)
GOOD = 0.25  # an estimate within 25% of the level is good
CONFIDENCE_EDGES = (0, 0.05, 0.1, 0.2, 0.4, 1)
CHANCE_EDGES = (0, 0.2, 0.4, 0.6, 0.8, 1)
CALIBRATION_ITEMS = 1000  # catalogue items priced from the others to calibrate the confidence
CALIBRATION_BIN = 20  # priced items per bin before the isotonic fit
Fit = Callable[[np.ndarray], Callable[[np.ndarray], np.ndarray]]  # catalogue -> its projection


@dataclass
class Setup:
    """A catalogue of one-of-a-kind sold items and two sets of query photos, in index space."""

    catalogue: np.ndarray
    categories: np.ndarray
    prices: np.ndarray
    thresholds: Thresholds
    known: np.ndarray  # photos of products the catalogue sold
    known_levels: np.ndarray
    unknown: np.ndarray  # photos of products it never sold
    unknown_levels: np.ndarray
    nearest_other: float  # median over catalogue photos of the best similarity to another product's photo
    calibration: Calibration | None  # what a confidence meant on the catalogue's own items


@dataclass
class Calibration:
    """An isotonic map from an estimate's confidence to the share of estimates within 25% of the sold price."""

    knots: np.ndarray
    chances: np.ndarray
    measured: dict

    def chance(self, confidence: float) -> float:
        return float(np.interp(confidence, self.knots, self.chances))


def rising(means: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The non-decreasing sequence closest to `means` in weighted least squares (pool adjacent violators)."""
    blocks: list[list[float]] = []  # [mean, weight, count]
    for m, w in zip(means.tolist(), weights.tolist()):
        blocks.append([m, w, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (m2, w2, n2), (m1, w1, n1) = blocks.pop(), blocks.pop()
            blocks.append([(m1 * w1 + m2 * w2) / (w1 + w2), w1 + w2, n1 + n2])
    return np.repeat([b[0] for b in blocks], [int(b[2]) for b in blocks])


def leave_one_out(catalogue: np.ndarray, categories: np.ndarray, prices: np.ndarray, seed: int) -> Calibration | None:
    """Up to CALIBRATION_ITEMS catalogue items, each priced from the others as /estimate would price a photo
    of it; the share within 25% of its own sold price, as a rising function of the confidence (fitted over
    bins of CALIBRATION_BIN). What a builder could measure on any catalogue."""
    picked = np.random.default_rng(seed).permutation(len(catalogue))[:CALIBRATION_ITEMS]
    conf, good = [], []
    for i, n in zip(picked, nearest_items(catalogue[picked], catalogue, categories, prices, ESTIMATE_NEIGHBOURS + 1)):
        e = estimate_price([m for m in n if m.item_id != str(i)][:ESTIMATE_NEIGHBOURS])
        if e.price is not None:
            conf.append(e.confidence)
            good.append(abs(e.price - prices[i]) <= GOOD * prices[i])
    if len(conf) < CALIBRATION_BIN:
        return None
    conf, good = np.array(conf), np.array(good, dtype=float)
    bins = np.array_split(np.argsort(conf, kind="stable"), len(conf) // CALIBRATION_BIN)
    x = np.array([conf[b].mean() for b in bins])
    y = rising(np.array([good[b].mean() for b in bins]), np.array([len(b) for b in bins], float))
    return Calibration(x, y, {"items": len(picked), "priced": len(conf), "within": round(float(good.mean()), 4)})


def levels(products: np.ndarray, seed: int) -> dict[int, float]:
    rng = np.random.default_rng(seed)
    return {int(p): float(np.exp(rng.uniform(np.log(2), np.log(500)))) for p in np.unique(products)}


def sold_half(products: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Which of `products` (one per photo) the catalogue sold: half of the distinct ones, drawn with `rng`."""
    distinct = np.unique(products)
    return np.isin(products, rng.choice(distinct, len(distinct) // 2, replace=False))


def make_setup(cat_vecs: np.ndarray, cat_products: np.ndarray, cat_kinds: np.ndarray, q_vecs: np.ndarray,
               q_products: np.ndarray, seed: int = 0, fit: Fit = projection) -> Setup:
    """Half of the products (drawn with `seed`) form the catalogue; queries of the rest are the unknown. `fit`
    learns the index space from the catalogue (the builder's default: PCA-256 from 512 photos)."""
    rng = np.random.default_rng(seed)
    products = np.unique(cat_products)
    in_cat = sold_half(cat_products, rng)
    known = np.isin(q_products, cat_products[in_cat])
    project = fit(cat_vecs[in_cat])
    catalogue, level = project(cat_vecs[in_cat]), levels(products, seed)
    prices = np.array([level[int(p)] for p in cat_products[in_cat]]) * np.exp(rng.normal(0, SPREAD, in_cat.sum()))
    # calibrated as bench.thresholds does: photos of one product count as one item
    thresholds = calibrate(catalogue, [str(p) for p in cat_products[in_cat]], list(cat_kinds[in_cat]))
    queries = project(q_vecs)
    own = cat_products[in_cat]
    sims = np.where(own[:, None] == own[None, :], -np.inf, catalogue @ catalogue.T)
    q_levels = np.array([level[int(p)] for p in q_products])
    calibration = leave_one_out(catalogue, cat_kinds[in_cat], prices, seed)
    return Setup(catalogue, cat_kinds[in_cat], prices, thresholds, queries[known], q_levels[known],
                 queries[~known], q_levels[~known], float(np.median(sims.max(axis=1))), calibration)


def grocery() -> Setup:
    """Catalogue: train photos, the coarse class as category; queries: val photos."""
    (train, t_lab), (val, v_lab) = read_split("train"), read_split("val")
    coarse = coarse_names()
    return make_setup(embed_paths(train, BACKBONE, "default", DESCRIPTOR), t_lab,
                      np.array([coarse[c] for c in t_lab]), embed_paths(val, BACKBONE, "default", DESCRIPTOR), v_lab)


def coil() -> Setup:
    """Catalogue: every 10th degree of each object, one category for all (COIL has none); queries: views
    45/135/225/315."""
    g_keys = [(o, a) for o in range(1, 101) for a in range(0, 360, 10)]
    q_keys = [(o, a) for o in range(1, 101) for a in QUERIES_4]
    feats = embed_paths([coil_path(o, a) for o, a in g_keys + q_keys], BACKBONE, "default", DESCRIPTOR)
    g_obj, q_obj = np.array([o for o, _ in g_keys]), np.array([o for o, _ in q_keys])
    return make_setup(feats[:len(g_keys)], g_obj, np.array(["coil"] * len(g_obj)), feats[len(g_keys):], q_obj)


def nearest_items(queries: np.ndarray, catalogue: np.ndarray, categories: np.ndarray, prices: np.ndarray,
                  k: int = ESTIMATE_NEIGHBOURS) -> list[list[Match]]:
    """The nearest k catalogue photos (each its own sold item) of each query, best first, exactly."""
    sims = queries @ catalogue.T
    order = np.argsort(-sims, axis=1)[:, :k]
    return [[Match(item_id=str(j), title="", category=str(categories[j]), price=float(prices[j]),
                   currency="USD", sold_at="2024-01-01", score=float(sims[i, j]), image_path="") for j in row]
            for i, row in enumerate(order)]


def neighbours(queries: np.ndarray, s: Setup) -> list[list[Match]]:
    """The nearest ESTIMATE_NEIGHBOURS items of each query, best first, as the index answers them."""
    return nearest_items(queries, s.catalogue, s.categories, s.prices)


def floors(s: Setup) -> dict[str, float]:
    """Fixed cosines around the default, the index's calibrated thresholds, and a per-catalogue candidate."""
    t = s.thresholds
    return {"0.5": 0.5, "0.6 (default)": 0.6, "0.65": 0.65, "0.7": 0.7,
            f"index: similar ({t.similar:.3f})": t.similar, f"index: same ({t.same:.3f})": t.same,
            f"catalogue: median best other product ({s.nearest_other:.3f})": s.nearest_other}


def judge(known: list[Estimate], known_levels: np.ndarray, unknown: list[Estimate]) -> dict:
    """Coverage and error of the estimates of known products; how often unknown ones were priced."""
    priced = np.array([e.price is not None for e in known])
    est = np.array([e.price if e.price is not None else np.nan for e in known])
    error = np.abs(est - known_levels) / known_levels
    in_range = np.array([e.price is not None and e.low <= lvl <= e.high for e, lvl in zip(known, known_levels)])
    conf_known = [e.confidence for e in known if e.price is not None]
    conf_unknown = [e.confidence for e in unknown if e.price is not None]
    return {"known_priced": round(float(priced.mean()), 3),
            "median_error": round(float(np.nanmedian(error)), 3) if priced.any() else None,
            "good": round(float(np.mean(error[priced] <= GOOD)), 3) if priced.any() else None,
            "good_of_all": round(float(np.sum(error[priced] <= GOOD) / len(known)), 3),
            "level_in_range": round(float(in_range[priced].mean()), 3) if priced.any() else None,
            "unknown_priced": round(float(np.mean([e.price is not None for e in unknown])), 3),
            "median_confidence_known": round(float(np.median(conf_known)), 3) if conf_known else None,
            "median_confidence_unknown": round(float(np.median(conf_unknown)), 3) if conf_unknown else None}


def confidence_bins(known: list[Estimate], known_levels: np.ndarray, unknown: list[Estimate]) -> list[dict]:
    """What a confidence means: of the prices given (known and unknown products), how many are good per bin."""
    conf, good = [], []
    for e, level in [*zip(known, known_levels), *((e, None) for e in unknown)]:
        if e.price is not None:
            conf.append(e.confidence)
            good.append(level is not None and abs(e.price - level) / level <= GOOD)
    conf, good = np.array(conf), np.array(good)
    return [{"confidence": label, "estimates": int(inside.sum()),
             "good": round(float(good[inside].mean()), 3) if inside.any() else None}
            for label, inside in bins_of(conf, CONFIDENCE_EDGES)]


def bins_of(values: np.ndarray, edges: tuple[float, ...]) -> list[tuple[str, np.ndarray]]:
    """("low-high", which values lie in [low, high)) for each pair of edges; the last bin includes its top."""
    return [(f"{low:g}-{high:g}", (values >= low) & ((values < high) if high < edges[-1] else (values <= high)))
            for low, high in itertools.pairwise(edges)]


def chance_check(s: Setup, known: list[Estimate], unknown: list[Estimate], seed: int = 0) -> dict | None:
    """Does the chance measured on the catalogue's own items hold for photos it never held? `known` and
    `unknown` are the default estimates for s.known and s.unknown. Each query photo is taken as an item sold
    at its product's level times the spread; of the prices given, the share within 25% of that sale, per bin
    of the chance given, for sold and never-sold products; and the Brier score of the chance against that of
    the raw confidence read as one."""
    if s.calibration is None:
        return None
    sold = np.concatenate([s.known_levels, s.unknown_levels])
    sold = sold * np.exp(np.random.default_rng(seed + 1).normal(0, SPREAD, len(sold)))
    estimates = [*known, *unknown]
    of_sold_product = np.arange(len(sold)) < len(known)
    given = np.array([e.price is not None for e in estimates])
    chance = np.array([s.calibration.chance(e.confidence) if e.price is not None else np.nan for e in estimates])
    conf = np.array([e.confidence for e in estimates])
    good = np.array([e.price is not None and abs(e.price - p) <= GOOD * p for e, p in zip(estimates, sold)],
                    dtype=float)
    rows = [{"chance": label, "estimates": int(inside.sum()),
             "mean_chance": round(float(chance[inside].mean()), 3) if inside.any() else None,
             "good": round(float(good[inside].mean()), 3) if inside.any() else None}
            for label, inside in bins_of(chance, CHANCE_EDGES)]  # no price, no chance: NaN lies in no bin

    def subset(mask: np.ndarray) -> dict:
        m = mask & given
        if not m.any():
            return {"priced": 0, "mean_chance": None, "good": None}
        return {"priced": int(m.sum()), "mean_chance": round(float(chance[m].mean()), 3),
                "good": round(float(good[m].mean()), 3)}

    return {"build": s.calibration.measured, "bins": rows,
            "all": subset(np.ones_like(of_sold_product)), "known": subset(of_sold_product),
            "unknown": subset(~of_sold_product),
            "brier_chance": round(float(np.mean((chance[given] - good[given]) ** 2)), 4),
            "brier_confidence": round(float(np.mean((conf[given] - good[given]) ** 2)), 4)}


def evaluate(s: Setup) -> dict:
    known, unknown = neighbours(s.known, s), neighbours(s.unknown, s)
    rows = [{"floor": name, "value": round(value, 4),
             **judge([estimate_price(n, value) for n in known], s.known_levels,
                     [estimate_price(n, value) for n in unknown])}
            for name, value in floors(s).items()]
    at_default = [estimate_price(n) for n in known], [estimate_price(n) for n in unknown]
    return {"floors": rows, "confidence": confidence_bins(at_default[0], s.known_levels, at_default[1]),
            "chance": chance_check(s, *at_default)}


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.0%}"


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def markdown(result: dict) -> str:
    setup = ("Grocery: catalogue = train photos of 40 products (coarse class as category), known = their val "
             "photos, unknown = val photos of the other 41. COIL-100: catalogue = every 10th degree of 50 objects "
             "(one category), known / unknown = views 45/135/225/315 of those and of the other 50.")
    header = (f"Measured {result['date']} on {result['machine']} with `python -m bench.pricing`: the default "
              f"embedder ({BACKBONE}, regional GeM) and the builder's projection; made-up prices (log-uniform "
              f"$2-$500 per product, each sold item x lognormal sigma {SPREAD}); half the products in the "
              f"catalogue, each catalogue photo its own sold item. {CREDIT}")
    lines = [header, "", setup, "",
             ("| data | comparables' floor | known: priced | median error | within 25% (of priced) "
              "| within 25% (of all) | level in low-high | unknown: priced | median confidence: known / unknown |"),
             "|---|---|---|---|---|---|---|---|---|"]
    for data, rows in result["rows"].items():
        for r in rows["floors"]:
            lines.append(f"| {data} | {r['floor']} | {_pct(r['known_priced'])} | {_pct(r['median_error'])} | "
                         f"{_pct(r['good'])} | {_pct(r['good_of_all'])} | {_pct(r['level_in_range'])} | "
                         f"{_pct(r['unknown_priced'])} | {_num(r['median_confidence_known'])} / "
                         f"{_num(r['median_confidence_unknown'])} |")
    bins = [r["confidence"] for r in next(iter(result["rows"].values()))["confidence"]]
    meaning = (f"What the confidence means at the default floor ({MIN_SIMILARITY}): of the prices given (photos "
               "of sold and never-sold products together), the share within 25% of the product's level.")
    lines += ["", meaning, "",
              "| data | " + " | ".join(f"confidence {b}" for b in bins) + " |", "|---|" + "---|" * len(bins)]
    for data, rows in result["rows"].items():
        lines.append(f"| {data} | " + " | ".join(f"{_pct(r['good'])} good of {r['estimates']}"
                                                  for r in rows["confidence"]) + " |")
    return "\n".join(lines + chance_markdown(result))


def chance_markdown(result: dict) -> list[str]:
    checks = {data: rows["chance"] for data, rows in result["rows"].items() if rows.get("chance")}
    if not checks:
        return []
    bins = [b["chance"] for b in next(iter(checks.values()))["bins"]]
    lines = ["", ("A confidence calibrated on the catalogue's own items (tried 2026-12-04, not shipped): up to "
                  f"{CALIBRATION_ITEMS:,} catalogue photos, each its own sold item, priced from the others; the "
                  "share within 25% of their own price, fitted as a rising function of the confidence (isotonic), "
                  "gives each estimate a chance. Held against the query photos, each taken as an item sold at its "
                  "product's level times the same spread: per bin of the chance given, the mean chance / the share "
                  "within 25% of that sale, of so many prices."),
             "", "| data | catalogue: within 25% (of priced items) | " + " | ".join(f"chance {b}" for b in bins)
             + " | all: chance / within | sold products | never-sold products | Brier: chance / confidence |",
             "|---|---|" + "---|" * len(bins) + "---|---|---|---|"]
    for data, c in checks.items():
        b = c["build"]
        cells = [f"{_pct(r['mean_chance'])} / {_pct(r['good'])} of {r['estimates']}" if r["estimates"] else "-"
                 for r in c["bins"]]
        sub = [f"{_pct(c[k]['mean_chance'])} / {_pct(c[k]['good'])} of {c[k]['priced']}"
               for k in ("all", "known", "unknown")]
        lines.append(f"| {data} | {_pct(b['within'])} of {b['priced']} (of {b['items']}) | " + " | ".join(cells)
                     + " | " + " | ".join(sub) + f" | {c['brier_chance']:.3f} / {c['brier_confidence']:.3f} |")
    return lines


def main(docs: bool = typer.Option(True, help="write the section of docs/EVALUATION.md"),
         backbone: str = BACKBONE_OPTION) -> None:
    global BACKBONE
    other, BACKBONE = backbone if backbone != BACKBONE else None, backbone
    measure_and_document("pricing", lambda: {"rows": {"grocery": evaluate(grocery()), "COIL-100": evaluate(coil())}},
                         markdown, "## Price estimates", docs, other)


if __name__ == "__main__":
    typer.run(main)
