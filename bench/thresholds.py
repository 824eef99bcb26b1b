"""How the thresholds of /assist and /compare hold on held-out photos: shop photos (grocery) and COIL-100.

The builder measures each index's thresholds on its own catalogue (index_builder/calibrate.py); here the
same calibration runs on a catalogue and is judged on photos the catalogue does not have: edited copies of
catalogue photos (re-encoded, resized, cropped) for duplicates, held-out photo pairs for compare, held-out
photos for the category vote (several neighbour counts and temperatures).

    python -m bench.thresholds            # writes docs/EVALUATION.md's thresholds section
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Callable

import numpy as np
import typer
from PIL import Image

from bench.coil import GALLERY_4, QUERIES_4, coil_path
from bench.evaluate_grocery import measure_and_document
from bench.features import OUT, embed_paths
from bench.grocery import CREDIT, GROCERY, read_split
from index_builder.calibrate import best_threshold, calibrate
from model_store.index_artifact import Projection, Thresholds, normalize
from query.assist import vote_category
from query.search_index import Match

BACKBONE, DESCRIPTOR, DIM = "efficientnet-lite2", "rmac", 256
BACKBONE_OPTION = typer.Option(BACKBONE, help="measure in another backbone's space (printed and kept in bench/out; "
                                              "the docs hold the default's)")
EDITS: dict[str, Callable[[Image.Image], Image.Image]] = {}


def edit(name: str):
    def register(f: Callable[[Image.Image], Image.Image]):
        EDITS[name] = f
        return f
    return register


@edit("JPEG q30")
def _jpeg(img: Image.Image, quality: int = 30) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


@edit("resized to 40%")
def _resize(img: Image.Image) -> Image.Image:
    return img.resize((max(1, img.width * 2 // 5), max(1, img.height * 2 // 5)), Image.Resampling.BILINEAR)


@edit("cropped to 80%")
def _crop(img: Image.Image) -> Image.Image:
    w, h = img.size
    return img.crop((w // 10, h // 10, w - w // 10, h - h // 10))


@edit("all three")
def _all(img: Image.Image) -> Image.Image:
    return _jpeg(_resize(_crop(img)), 50)


def edited_copies(paths: list[Path], folder: Path) -> dict[str, list[Path]]:
    """Each edit of each photo, written once under bench/out (the copies are made, never the originals)."""
    out: dict[str, list[Path]] = {}
    for n, (name, f) in enumerate(EDITS.items()):
        out[name] = []
        for i, p in enumerate(paths):
            target = folder / f"edit{n}-{i:04d}.png"
            if not target.exists():
                folder.mkdir(parents=True, exist_ok=True)
                f(Image.open(p).convert("RGB")).save(target)
            out[name].append(target)
    return out


def best_other(sims: np.ndarray, q_items: np.ndarray, g_items: np.ndarray) -> np.ndarray:
    """Per query row: the highest similarity to a catalogue photo of another item."""
    return np.where(q_items[:, None] == g_items[None, :], -np.inf, sims).max(axis=1)


def duplicate_rows(t: float, g: np.ndarray, g_items: np.ndarray, sample: np.ndarray, copies: dict[str, np.ndarray],
                   q: np.ndarray, q_items: np.ndarray) -> dict:
    """At threshold t: the share of each kind of copy caught (similarity to its original >= t), and the share
    of new photos and of copies wrongly flagged (a photo of another item >= t)."""
    caught = {name: float(np.mean(np.sum(c * g[sample], axis=1) >= t)) for name, c in copies.items()}
    new = best_other(q @ g.T, q_items, g_items)
    edited = np.concatenate([best_other(c @ g.T, g_items[sample], g_items) for c in copies.values()])
    return {"threshold": round(t, 3), "caught": {k: round(v, 3) for k, v in caught.items()},
            "new_photos_flagged": round(float(np.mean(new >= t)), 4), "new_photos": len(new),
            "copies_flagging_another_item": round(float(np.mean(edited >= t)), 4)}


def compare_rows(t: Thresholds, same: np.ndarray, similar: np.ndarray, different: np.ndarray) -> dict:
    """Verdicts at the calibrated thresholds on held-out pairs: the share of each kind judged right."""
    def verdicts(s: np.ndarray) -> np.ndarray:
        return np.where(s >= t.same, "same", np.where(s >= t.similar, "similar", "different"))

    kinds = {"same": same, "similar": similar, "different": different}
    right = {k: round(float(np.mean(verdicts(v) == k)), 3) for k, v in kinds.items() if len(v)}
    row = {"same": t.same, "similar": t.similar, "right": right, "pairs": {k: len(v) for k, v in kinds.items()},
           "same_vs_rest": round(float((np.mean(same >= t.same) + np.mean(np.concatenate([similar, different])
                                                                           < t.same)) / 2), 3),
           "same_vs_rest_best": round(best_threshold(same, np.concatenate([similar, different]))[1], 3)}
    if len(similar):
        row["three_way_balanced"] = round(float(np.mean(list(right.values()))), 3)
    return row


def pair_similarities(q: np.ndarray, g: np.ndarray, q_lab: np.ndarray, g_lab: np.ndarray, q_kind: np.ndarray,
                      g_kind: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    sims = q @ g.T
    same = q_lab[:, None] == g_lab[None, :]
    kind = q_kind[:, None] == g_kind[None, :]
    return sims[same], sims[kind & ~same], sims[~kind & ~same]


def vote_rows(q: np.ndarray, g: np.ndarray, g_items: np.ndarray, g_cat: np.ndarray, q_cat: np.ndarray,
              counts=(1, 5, 10, 20), temperatures=(0.02, 0.05, 0.1)) -> list[dict]:
    sims = q @ g.T
    rows = []
    for n in counts:
        neighbours = []
        for i in range(len(q)):
            seen, matches = set(), []
            for j in np.argsort(-sims[i]):
                if g_items[j] in seen:
                    continue
                seen.add(g_items[j])
                matches.append(Match(item_id=str(g_items[j]), title="", category=str(g_cat[j]), price=0,
                                     currency="USD", sold_at="2024-01-01", score=float(sims[i, j]), image_path=""))
                if len(matches) == n:
                    break
            neighbours.append(matches)
        for temperature in temperatures if n > 1 else temperatures[:1]:
            # every neighbour votes: what /assist's floor changes is bench.category_floor's measurement
            votes = [vote_category(m, temperature, min_similarity=-1.0) for m in neighbours]
            ok = np.array([v.suggested == str(c) for v, c in zip(votes, q_cat)])
            confident = np.array([v.confidence >= 0.5 for v in votes])
            rows.append({"neighbours": n, "temperature": temperature, "accuracy": round(float(ok.mean()), 3),
                         "confident_share": round(float(confident.mean()), 3),
                         "accuracy_when_confident": round(float(ok[confident].mean()) if confident.any() else 0, 3)})
    return rows


def projection(catalogue: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """What the builder does: PCA-256 learned on the catalogue when it has at least 512 photos, else none."""
    return Projection.fit(catalogue, DIM, whiten=False) if len(catalogue) >= 2 * DIM else normalize


def coarse_names() -> dict[int, str]:
    with open(GROCERY / "classes.csv", newline="") as f:
        return {int(r[1]): r[2] for r in list(csv.reader(f))[1:]}


def grocery() -> dict:
    """Catalogue: the train photos, one item per product, the coarse class as category; held out: val."""
    (train, t_lab), (val, v_lab) = read_split("train"), read_split("val")
    coarse = coarse_names()
    t_kind, v_kind = np.array([coarse[c] for c in t_lab]), np.array([coarse[c] for c in v_lab])
    pca = projection(embed_paths(train, BACKBONE, "default", DESCRIPTOR))
    g, q = pca(embed_paths(train, BACKBONE, "default", DESCRIPTOR)), pca(embed_paths(val, BACKBONE, "default", DESCRIPTOR))
    t = calibrate(g, [str(c) for c in t_lab], list(t_kind))
    sample = np.arange(0, len(train), len(train) // 200)[:200]
    copies = {name: pca(embed_paths(paths, BACKBONE, "default", DESCRIPTOR, progress=False))
              for name, paths in edited_copies([train[i] for i in sample], OUT / "edits-grocery").items()}
    return {"thresholds": t.model_dump(), "duplicates": duplicate_rows(t.duplicate, g, t_lab, sample, copies, q, v_lab),
            "compare": compare_rows(t, *pair_similarities(q, g, v_lab, t_lab, v_kind, t_kind)),
            "vote": vote_rows(q, g, t_lab, t_kind, v_kind)}


def coil() -> dict:
    """Catalogue: views 0/90/180/270 of each object, one item per object; held out: views 45/135/225/315."""
    keys = [(o, a) for o in range(1, 101) for a in (*GALLERY_4, *QUERIES_4)]
    feats = embed_paths([coil_path(o, a) for o, a in keys], BACKBONE, "default", DESCRIPTOR)
    objects = np.array([o for o, _ in keys])
    is_gallery = np.array([a in GALLERY_4 for _, a in keys])
    g_obj, q_obj = objects[is_gallery], objects[~is_gallery]
    pca = projection(feats[is_gallery])
    g, q = pca(feats[is_gallery]), pca(feats[~is_gallery])
    t = calibrate(g, [str(o) for o in g_obj], ["coil"] * len(g_obj))  # no categories: one for all
    paths = [coil_path(o, a) for o, a in keys if a in GALLERY_4]
    sample = np.arange(0, len(paths), 2)[:200]
    copies = {name: pca(embed_paths(p, BACKBONE, "default", DESCRIPTOR, progress=False))
              for name, p in edited_copies([paths[i] for i in sample], OUT / "edits-coil").items()}
    none = np.zeros(0, np.float32)
    same, _, different = pair_similarities(q, g, q_obj, g_obj, q_obj, g_obj)
    views = np.arange(len(g))  # for the vote, each view is an item and the object its category
    return {"thresholds": t.model_dump(), "duplicates": duplicate_rows(t.duplicate, g, g_obj, sample, copies, q, q_obj),
            "compare": compare_rows(t, same, none, different),
            "vote": vote_rows(q, g, views, g_obj, q_obj, counts=(1, 4, 10))}


def markdown(result: dict) -> str:
    g, c = result["grocery"], result["coil"]
    lines = [f"Measured {result['date']} on {result['machine']} with `python -m bench.thresholds` "
             f"({result['seconds']:.0f} s with the descriptors cached in bench/out; about 6 min without): the "
             "default embedder (EfficientNet-Lite2, regional GeM) and the builder's projection, thresholds chosen by the builder on the catalogue alone "
             "(`index_builder/calibrate.py`), judged on held-out photos. " + CREDIT, "",
             "Catalogues: grocery = the 2,640 train photos, one item per product (81), the coarse class as category "
             "(43 kinds: Apple, Milk, ...), held out: the 296 val photos. COIL-100 = views 0/90/180/270 of each "
             "object, one item per object, held out: views 45/135/225/315 (400 photos: too few for PCA-256, so, as "
             "in the builder, no projection).", "",
             "| data | duplicate | same | similar | measured on |", "|---|---|---|---|---|"]
    for name, d in (("grocery", g), ("COIL-100", c)):
        t = d["thresholds"]
        lines.append(f"| {name} | {t['duplicate']} | {t['same']} | {t['similar']} | {t['measured'].get('photos')} "
                     "catalogue photos |")
    lines += ["", "**Duplicates** (`/assist`'s `duplicates`): edited copies of 200 catalogue photos against the "
              "catalogue at the index's duplicate threshold (the similarity 1% of catalogue photos reach with "
              "another item). Caught: the copy scores at least the threshold with its original. Wrongly flagged: a "
              "held-out photo, or a copy, scores at least the threshold with a photo of another item.", "",
              "| data | threshold | " + " | ".join(f"caught: {k}" for k in EDITS) + " | new photos flagged | copies "
              "flagging another item |", "|---|---|" + "---|" * len(EDITS) + "---|---|"]
    for name, d in (("grocery", g["duplicates"]), ("COIL-100", c["duplicates"])):
        lines.append(f"| {name} | {d['threshold']} | " + " | ".join(f"{v:.0%}" for v in d["caught"].values())
                     + f" | {d['new_photos_flagged']:.1%} of {d['new_photos']} | {d['copies_flagging_another_item']:.1%} |")
    lines += ["", "**Compare** (`/compare`'s verdict): held-out photo against catalogue photo pairs, judged at the "
              "index's thresholds. `same` = the same product (object), `similar` = another product of the same "
              "kind, `different` = another kind. Same vs rest: balanced accuracy at the calibrated threshold, and "
              "at the best threshold chosen on the held-out pairs themselves (the ceiling).", "",
              "| data | pairs same / similar / different | right: same | right: similar | right: different | "
              "three verdicts (balanced) | same vs rest | ceiling |", "|---|---|---|---|---|---|---|---|"]
    for name, d in (("grocery", g["compare"]), ("COIL-100", c["compare"])):
        p, r = d["pairs"], d["right"]
        lines.append(f"| {name} | {p['same']:,} / {p['similar']:,} / {p['different']:,} | {_pct(r.get('same'))} | "
                     f"{_pct(r.get('similar'))} | {_pct(r.get('different'))} | {_pct(d.get('three_way_balanced'))} | "
                     f"{_pct(d['same_vs_rest'])} | {_pct(d['same_vs_rest_best'])} |")
    lines += ["", "**Category vote** (`/assist`'s `category`): each of the nearest items votes "
              "exp(-(best similarity - its similarity) / T). Grocery: val photos against the train catalogue, "
              "category = coarse class. COIL-100: held-out views against the catalogue views, each view an item, "
              "category = the object. Default: 10 neighbours, T = 0.05 (`IMAGESEARCH_VOTE_*`).", "",
              "| data | neighbours | T | accuracy | confidence >= 0.5 | accuracy then |", "|---|---|---|---|---|---|"]
    for name, rows in (("grocery", g["vote"]), ("COIL-100", c["vote"])):
        for r in rows:
            lines.append(f"| {name} | {r['neighbours']} | {r['temperature']} | {r['accuracy']:.1%} | "
                         f"{r['confident_share']:.0%} of queries | {r['accuracy_when_confident']:.1%} |")
    return "\n".join(lines)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def main(docs: bool = typer.Option(True, help="write the section of docs/EVALUATION.md")) -> None:
    measure_and_document("thresholds", lambda: {"grocery": grocery(), "coil": coil()}, markdown,
                         "## Thresholds of /assist and /compare", docs)


if __name__ == "__main__":
    typer.run(main)
