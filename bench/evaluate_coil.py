"""Retrieval quality on COIL-100, in process (exact cosine) and through the running service (Annoy).

    python -m bench.evaluate_coil            # writes docs/EVALUATION.md and docs/evaluation.json
    python -m bench.evaluate_coil --quick    # 10 objects, no service: the smoke run the tests use

Protocols: P4 indexes 4 views per object (0, 90, 180, 270 degrees) and queries with the 45-degree
offsets (400 queries); P1 indexes only the 0-degree view and asks the same 400 queries.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from bench.coil import COIL, QUERIES_4, coil_path, non_query_views, write_split
from bench.features import embed_paths, raw_pixels
from index_builder.evaluate import metrics, ranks
from model_store.index_artifact import Projection

DOCS = Path(__file__).resolve().parents[1] / "docs"
PROTOCOLS = {"P4": (0, 90, 180, 270), "P1": (0,)}
app = typer.Typer(add_completion=False)


def exact_ranking(gallery: np.ndarray, g_items: list[str], queries: np.ndarray, depth: int = 100) -> list[list[str]]:
    """Distinct items ranked by their best photo's cosine similarity to each query."""
    scores = queries @ gallery.T
    out = []
    for row in scores:
        seen, ranked = set(), []
        for j in np.argsort(-row):
            if g_items[j] not in seen:
                seen.add(g_items[j])
                ranked.append(g_items[j])
                if len(ranked) == depth:
                    break
        out.append(ranked)
    return out


def evaluate_features(name: str, vectors: dict[tuple[int, int], np.ndarray], objects: range) -> dict:
    rows = {}
    for proto, gallery_angles in PROTOCOLS.items():
        g_keys = [(o, a) for o in objects for a in gallery_angles]
        q_keys = [(o, a) for o in objects for a in QUERIES_4]
        ranked = exact_ranking(np.stack([vectors[k] for k in g_keys]), [f"obj{o:03d}" for o, _ in g_keys],
                               np.stack([vectors[k] for k in q_keys]))
        rows[proto] = metrics(ranks(ranked, [f"obj{o:03d}" for o, _ in q_keys]))
    return {"name": name, **rows}


def through_service(objects: range, workdir: Path) -> dict:
    """Build each protocol's index with the builder, serve it, send every query over HTTP."""
    from bench.server import Server
    from index_builder.build import build
    from model_store import stages

    rows = {}
    for proto, gallery_angles in PROTOCOLS.items():
        catalogue, _ = write_split(workdir / proto, gallery=gallery_angles, objects=objects)
        summary = build(catalogue, pca_dim=0, progress=False)
        os.environ["IMAGESEARCH_STAGES_DIR"] = str(workdir / proto / "stages")
        stages.get_settings.cache_clear()
        stages.promote(summary.tag, "production", force=True)
        ranked, truth, ms = [], [], []
        with Server(workdir / f"{proto}.log").wait() as srv:
            for o in objects:
                for a in QUERIES_4:
                    start = time.perf_counter()
                    r = srv.http.post("/search", files={"image": coil_path(o, a).read_bytes()}, data={"k": 100})
                    ms.append((time.perf_counter() - start) * 1000)
                    r.raise_for_status()
                    ranked.append([m["item_id"] for m in r.json()["results"]])
                    truth.append(f"obj{o:03d}")
        rows[proto] = {**metrics(ranks(ranked, truth)), "index": summary.tag, "n_trees": summary.n_trees,
                       "search_k": summary.search_k, "http_p50_ms": round(float(np.percentile(ms, 50)), 1)}
    return {"name": "EfficientNet-Lite0 GeM 1280-d, Annoy, through bentoml serve", **rows}


@app.command()
def main(quick: Annotated[bool, typer.Option(help="10 objects, no service, no docs")] = False,
         service: Annotated[bool, typer.Option(help="also evaluate through the running service")] = True) -> None:
    if not (COIL / "labels.csv").exists():
        raise SystemExit(f"{COIL} is absent: this benchmark needs COIL-100")
    objects = range(1, 11) if quick else range(1, 101)
    keys = [(o, a) for o in objects for a in sorted({*PROTOCOLS["P4"], *QUERIES_4})]
    paths = [coil_path(o, a) for o, a in keys]
    as_dict = lambda v: dict(zip(keys, v))  # noqa: E731
    results = [evaluate_features("raw pixels 32x32 (baseline)", as_dict(raw_pixels(paths)), objects)]
    configs = [("efficientnet-lite0", "default", "gem", "EfficientNet-Lite0 ImageNet, GeM 1280-d"),
               ("efficientnet-lite0", "default", "pool5", "EfficientNet-Lite0 ImageNet, pool5 flattened 62720-d"),
               ("efficientnet-lite0", "random", "gem", "EfficientNet-Lite0 RANDOM weights, GeM (control)")]
    for backbone, weights, descriptor, name in configs[: 1 if quick else None]:
        feats = embed_paths(paths, backbone, weights, descriptor, progress=not quick)
        results.append(evaluate_features(name, as_dict(feats), objects))
        if descriptor == "gem" and weights == "default" and not quick:
            # PCA-256 as the builder learns it on a large catalogue: fitted on every COIL view that is
            # never a query (6,800 photos), applied to gallery and queries alike.
            others = embed_paths(non_query_views(), backbone, weights, descriptor)
            for whiten, label in ((False, "+ PCA-256"), (True, "+ PCA-256 whitened")):
                proj = Projection.fit(others, 256, whiten=whiten)
                results.append(evaluate_features(f"{name} {label}", as_dict(proj(feats)), objects))
    if service and not quick:
        with tempfile.TemporaryDirectory() as tmp:
            results.append(through_service(objects, Path(tmp)))
    for r in results:
        print(f"{r['name']:<62} " + "  ".join(f"{p}: top1={r[p]['top1']:.3f} r@5={r[p]['recall_at_5']:.3f} "
                                              f"mAP={r[p]['mAP']:.3f}" for p in PROTOCOLS))
    if not quick:
        write_docs(results)


def write_docs(results: list[dict]) -> None:
    DOCS.mkdir(exist_ok=True)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}"
    (DOCS / "evaluation.json").write_text(json.dumps({"machine": machine, "results": results}, indent=2))
    lines = ["| descriptor | P4 top-1 | P4 recall@5 | P4 mAP | P1 top-1 | P1 recall@5 | P1 mAP |", "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['name']} | " + " | ".join(f"{r[p][m]:.3f}" for p in PROTOCOLS
                                                       for m in ("top1", "recall_at_5", "mAP")) + " |")
    table = "\n".join(lines)
    text = (DOCS / "EVALUATION.md").read_text() if (DOCS / "EVALUATION.md").exists() else ""
    start, end = "<!-- evaluation:start -->", "<!-- evaluation:end -->"
    if start in text:
        text = text[: text.index(start) + len(start)] + "\n" + table + "\n" + text[text.index(end):]
    else:
        text += f"\n{start}\n{table}\n{end}\n"
    (DOCS / "EVALUATION.md").write_text(text)


if __name__ == "__main__":
    app()
