"""The learned projection against PCA on classes it never saw, for the default descriptor, over a few settings.

    python -m bench.learned_projection      # writes docs/learned_projection.json (reuses bench/out/ descriptors)

Grocery train photos of half the classes teach it (index_builder.learn.fit, the builder's code); the other
half's val photos query (a) their train photos, (b) their iconic photos; then the halves swap; means shown.
"""

from __future__ import annotations

import json

import numpy as np
import typer

from bench import evaluate_grocery as eg
from bench.ann_scale import machine
from bench.grocery import CREDIT, describe_paths, read_iconic, read_split
from index_builder import learn
from model_store.embedder import Embedder, new_embedder
from model_store.index_artifact import Projection

app = typer.Typer(add_completion=False)
SETTINGS = [(1e-2, 300, 0.05), (1e-3, 100, 0.05), (1e-3, 300, 0.1), (3e-4, 300, 0.05), (3e-3, 100, 0.1)]


@app.command()
def main(backbone: str = "efficientnet-lite2", pool: str = "rmac-gem") -> None:
    config, net = new_embedder(backbone)
    emb = Embedder(config, net, "cpu")
    sets = {"train": read_split("train"), "val": read_split("val"), "iconic": read_iconic()}
    base = {k: describe_paths(v[0], emb, label=k)[pool] for k, v in sets.items()}
    labels = sets["train"][1]
    halves = eg.class_halves(np.unique(labels))

    def unseen(make) -> dict:
        runs = []
        for seen, test in (halves, halves[::-1]):
            mask = np.isin(labels, seen)
            runs.append(eg.unseen_metrics(make(base["train"][mask], labels[mask]), base, sets, test))
        return {p: {m: round(float(np.mean([r[p][m] for r in runs])), 4) for m in ("top1", "mAP")}
                for p in eg.PROTOCOLS}

    rows = [{"method": "no projection", **unseen(lambda v, y: eg.l2)},
            {"method": "PCA-256", **unseen(lambda v, y: Projection.fit(v, 256, False))}]
    for lr, steps, t in SETTINGS:
        fit = lambda v, y: learn.fit(v, np.unique(y, return_inverse=True)[1], 256, steps=steps, lr=lr,  # noqa: E731
                                     temperature=t)[0]
        rows.append({"method": f"learned: lr {lr:g}, {steps} steps, temperature {t:g}", **unseen(fit)})
    for r in rows:
        print(r, flush=True)
    out = {"machine": machine(), "credit": CREDIT, "backbone": backbone, "descriptor": pool, "rows": rows}
    (eg.DOCS / "learned_projection.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    app()
