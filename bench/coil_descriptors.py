"""COIL-100 P4 and P1 (bench.evaluate_coil's protocols) for each backbone and descriptor the builder offers,
so a descriptor chosen on shop photos is checked not to hurt the studio ones.

    python -m bench.coil_descriptors        # writes docs/coil_descriptors.json
"""

from __future__ import annotations

import json
from typing import Annotated

import typer

from bench.ann_scale import machine
from bench.coil import COIL, QUERIES_4, coil_path
from bench.evaluate_coil import DOCS, PROTOCOLS, evaluate_features
from bench.features import embed_paths

app = typer.Typer(add_completion=False)


@app.command()
def main(backbones: Annotated[str, typer.Option()] = "efficientnet-lite0,efficientnet-lite2",
         descriptors: Annotated[str, typer.Option()] = "gem,rmac") -> None:
    if not (COIL / "labels.csv").exists():
        raise SystemExit(f"{COIL} is absent: this benchmark needs COIL-100")
    objects = range(1, 101)
    keys = [(o, a) for o in objects for a in sorted({*PROTOCOLS["P4"], *QUERIES_4})]
    rows = []
    for backbone in backbones.split(","):
        for descriptor in descriptors.split(","):
            feats = embed_paths([coil_path(o, a) for o, a in keys], backbone, "default", descriptor)
            rows.append(evaluate_features(f"{backbone} {descriptor}", dict(zip(keys, feats)), objects))
            print(rows[-1]["name"], {p: rows[-1][p] for p in PROTOCOLS}, flush=True)
    (DOCS / "coil_descriptors.json").write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2))


if __name__ == "__main__":
    app()
