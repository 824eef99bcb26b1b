"""How long the thumbnail store's report and prune take at a million photos, through the CLI a user runs.

    python -m bench.thumbnail_prune [--photos 1000000] [--unused-share 0.01]
    python -m bench.thumbnail_prune --quick    # 2,000 photos, no docs: the smoke run the tests use

A BentoML home of its own (in a temporary folder): one index version whose photo table points to all but
`--unused-share` of `--photos` thumbnails, the rest used by no version (a night's replaced photos). The
thumbnails are 1 KB files, not ~15 KB ones: the time goes to listing and deleting files, not to their bytes.
Writes docs/PERFORMANCE.md's thumbnail-prune section.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import typer

from bench.evaluate_grocery import machine, replace_block

DOCS = Path(__file__).resolve().parents[1] / "docs" / "PERFORMANCE.md"


def setup(home: Path, photos: int, unused: int) -> None:
    """Runs in a process whose BENTOML_HOME is `home`: the thumbnails, and a version using all but `unused`."""
    from model_store.index_artifact import write_items_db
    from model_store.registry import register
    from model_store.settings import INDEX_MODEL
    from model_store.thumbnails import store_dir, thumbnail_path

    keys = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(photos)]
    blob = b"\0" * 1024
    for key in keys:
        path = thumbnail_path(key, store_dir())
        path.parent.mkdir(exist_ok=True, parents=True)
        path.write_bytes(blob)
    used = keys[unused:]
    rows = [(i, f"item-{i}", f"p{i}.jpg", key, None, key) for i, key in enumerate(used)]
    items = [(f"item-{i}", "Thing", "Misc", 1.0, "USD", "2025-01-01") for i in range(len(used))]
    register(INDEX_MODEL, {}, {"n_photos": len(used)}, lambda folder: write_items_db(folder / "items.sqlite", rows, items))


def timed_cli(env: dict, *args: str) -> tuple[float, str]:
    """Seconds and output of `python -m ARGS` as a user runs it (Python's start included)."""
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", *args], env=env, capture_output=True, text=True, check=True)
    return time.perf_counter() - t0, done.stdout.strip()


def show(block: str, name: str, heading: str, docs: bool) -> None:
    """Print a result block and, with `docs`, put it in docs/PERFORMANCE.md's block NAME."""
    print(block)
    if docs:
        DOCS.write_text(replace_block(DOCS.read_text(), name, block, heading))


def bench_home(tmp: str) -> tuple[Path, dict]:
    """A BentoML home of the benchmark's own in `tmp`, and the environment that points the CLIs to it."""
    home = Path(tmp) / "bentoml"
    return home, {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "True",
                  "IMAGESEARCH_STAGES_DIR": str(Path(tmp) / "stages")}


def main(photos: int = 1_000_000, unused_share: float = 0.01,
         quick: bool = typer.Option(False, help="2,000 photos, no docs"),
         setup_home: Path | None = typer.Option(None, hidden=True)) -> None:
    photos = 2_000 if quick else photos
    unused = round(photos * unused_share)
    if setup_home is not None:
        return setup(setup_home, photos, unused)
    with tempfile.TemporaryDirectory(prefix="thumbnail-prune-") as tmp:
        home, env = bench_home(tmp)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "bench.thumbnail_prune", "--photos", str(photos), "--unused-share",
                        str(unused_share), "--setup-home", str(home)], env=env, check=True)
        made_s = time.perf_counter() - t0
        report_s, report = timed_cli(env, "model_store", "thumbnails")
        prune_s, pruned = timed_cli(env, "model_store", "thumbnails", "--prune")
        left = sum(1 for _ in (home / "thumbnails").glob("*/*.webp"))
    assert left == photos - unused, (left, photos, unused)
    print(report, pruned, sep="\n", file=sys.stderr)
    block = (f"Measured {time.strftime('%Y-%m-%d')} on {machine()} with `python -m bench.thumbnail_prune --photos "
             f"{photos}`: {photos:,} thumbnails (1 KB files) in one store, one index version whose photo table points "
             f"to all but {unused:,} of them ({unused_share:.0%}); each command timed as a user runs it, Python's "
             f"start included (setting up took {made_s:.0f} s).\n\n"
             "| command | seconds |\n|---|---|\n"
             f"| `python -m model_store thumbnails` (counts them, reads the version's photo table) | {report_s:.1f} |\n"
             f"| `python -m model_store thumbnails --prune` (deletes the {unused:,} unused) | {prune_s:.1f} |\n")
    show(block, "thumbnail-prune", "### Pruning the thumbnail store", docs=not quick)


if __name__ == "__main__":
    typer.run(main)
