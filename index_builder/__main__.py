"""CLI: python -m index_builder build CATALOGUE [options] | cache [--prune] | demo FOLDER."""

from __future__ import annotations

import errno
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from index_builder import cache
from index_builder.build_defaults import (CPU_BATCH_SIZE, DEFAULT_DESCRIPTOR, DEFAULT_PROJECTION, DEFAULT_WORKERS,
                                          GPU_BATCH_SIZE)
from index_builder.catalogue import CatalogueError
from index_builder.demo import make_demo_catalogue
from model_store.build_lock import StoreBusy
from model_store.registry import run_cli

if TYPE_CHECKING:  # the build imports torch: only `build` loads it (tests/test_build.py)
    from index_builder.build import BuildSummary

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__, rich_markup_mode=None)


def _print_summary(s: BuildSummary) -> None:
    w = sys.stderr
    print(f"\nBuilt {s.tag}", file=w)
    print(f"  embedder      {s.embedder}{'' if s.pretrained else '  (RANDOM WEIGHTS: tests only)'}", file=w)
    print(f"  rows          {s.rows}: {s.photos_indexed} photos of {s.items} items indexed, "
          f"{s.bad_rows} skipped (report: {s.report})", file=w)
    print(f"  vectors       {s.dim}-d ({s.projection}); embedding {s.images_per_second} images/s"
          f" ({s.embedded_photos} photos embedded, {s.reused_photos} from the embedding cache)",
          file=w)
    print(f"  thumbnails    {s.thumbnails_made} made in {s.thumbnails}" if s.thumbnails != "off"
          else "  thumbnails    off (photo_url comes from image_url only)", file=w)
    if s.categories_respelled:
        print("  categories    read as most of their items spell them: " + ", ".join(
            f"{written!r} as {listed!r}" for written, listed in s.categories_respelled.items()), file=w)
    print(f"  ann           n_trees={s.n_trees} search_k={s.search_k} recall@10={s.ann_recall_at_10}", file=w)
    if s.evaluation:
        e = s.evaluation
        print(f"  evaluation    top1={e['top1']} recall@5={e['recall_at_5']} mAP={e['mAP']} "
              f"over {e['queries']} queries", file=w)
        if skipped := e.get("skipped"):
            print(f"                {len(skipped)} queries skipped: " + "; ".join(skipped[:3])
                  + ("; ... (all in the version's metadata: model_store show)" if len(skipped) > 3 else ""), file=w)
    print("  seconds       " + ", ".join(f"{k} {v}" for k, v in s.seconds.items()), file=w)


@app.command("build")
def build_cmd(
    catalogue: Annotated[Path, typer.Argument(help="CSV or JSON Lines: item_id,image_path,title,category,price,currency,sold_at")],
    backbone: Annotated[Optional[str], typer.Option(help="efficientnet-lite0/-lite1/-lite2 or vgg16 [default: IMAGESEARCH_BACKBONE or efficientnet-lite2]")] = None,
    weights: Annotated[str, typer.Option(help="'default' (ImageNet), 'random' (tests only) or a state-dict file")] = "default",
    descriptor: Annotated[str, typer.Option(
        help="rmac (regional GeM), gem (GeM over the whole map) or pool5 (flattened conv map)")] = DEFAULT_DESCRIPTOR,
    pca_dim: Annotated[int, typer.Option(min=0, help="dimension of the projection learned at build time; 0 = none")] = 256,
    projection: Annotated[str, typer.Option(
        help="learned (from the catalogue's items, kept only when it beats PCA on held-out items), pca or none"
    )] = DEFAULT_PROJECTION,
    whiten: Annotated[bool, typer.Option(help="whiten the PCA components")] = False,
    image_size: Annotated[Optional[int], typer.Option(
        min=32, max=1024, help="network input size [default: the backbone's: 224 Lite0, 240 Lite1, 260 Lite2, "
                               "224 VGG16]; smaller only for fast tests")] = None,
    batch_size: Annotated[Optional[int], typer.Option(
        min=1, help=f"photos per forward pass [default: {CPU_BATCH_SIZE} on a CPU, {GPU_BATCH_SIZE} on a GPU]")] = None,
    workers: Annotated[int, typer.Option(min=0, show_default=False,
                                                help="image-decoding worker processes [default: cores - 1, 1..4]")] = DEFAULT_WORKERS,
    seed: Annotated[int, typer.Option(min=0, help="seed of the Annoy trees and samples")] = 0,
    eval: Annotated[Optional[Path], typer.Option("--eval", help="queries CSV image_path,item_id to score")] = None,
    report: Annotated[Optional[Path], typer.Option(help="bad-row report [default: CATALOGUE.report.csv]")] = None,
    max_bad_share: Annotated[Optional[float], typer.Option(min=0, max=1, help="fail above this share of bad rows [default: 0.2]")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the summary as JSON on stdout")] = False,
    progress: Annotated[bool, typer.Option(help="show the progress bar")] = True,
    engine: Annotated[str, typer.Option(help="local (this process and its decoding workers) or ray (Ray Data: "
                                             "pip install '.[ray]')")] = "local",
    ray_address: Annotated[Optional[str], typer.Option(help="with --engine ray: the cluster to join, e.g. "
                                                           "ray://head:10001 or auto [default: a local Ray]")] = None,
    thumbnails: Annotated[bool, typer.Option(
        help="make a thumbnail of each photo without an image_url (shared store $BENTOML_HOME/thumbnails; "
             "existing ones are reused)")] = True,
) -> None:
    """Build an index from CATALOGUE and register it; the last line printed is the new tag."""
    from index_builder.build import BuildError, build
    from index_builder.evaluate import EvalError
    from model_store.backbones import WeightsError

    if descriptor not in ("gem", "rmac", "pool5"):
        raise typer.BadParameter("choose gem, rmac or pool5", param_hint="--descriptor")
    if engine not in ("local", "ray"):
        raise typer.BadParameter("choose local or ray", param_hint="--engine")
    if projection not in ("learned", "pca", "none"):
        raise typer.BadParameter("choose learned, pca or none", param_hint="--projection")
    try:
        summary = build(catalogue, backbone=backbone, weights=weights, descriptor=descriptor, image_size=image_size,
                        pca_dim=pca_dim, whiten=whiten, projection=projection, batch_size=batch_size, workers=workers, seed=seed,
                        eval_queries=eval, report=report, max_bad_share=max_bad_share, progress=progress,
                        thumbnails=thumbnails, engine=engine, ray_address=ray_address)
    except (BuildError, CatalogueError, EvalError, WeightsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise typer.Exit(2)
    except OSError as exc:  # a full disk, a read-only store: nothing was registered
        hint = " (free some space, or point BENTOML_HOME elsewhere)" if exc.errno == errno.ENOSPC else ""
        print(f"error: {exc.strerror or exc}: {exc.filename or ''}{hint}; no version was registered",
              file=sys.stderr)
        raise typer.Exit(1)
    if as_json:
        print(summary.model_dump_json(indent=2))
    else:
        _print_summary(summary)
        print(summary.tag)


@app.command("cache")
def cache_cmd(
    prune: Annotated[bool, typer.Option(help="delete what no stored index version uses: the caches of embedders no "
                                             "version uses, and the vectors of photos no version holds (what a "
                                             "killed or failed build wrote is kept for its rerun)")] = False,
    keep: Annotated[Optional[list[str]], typer.Option(help="an embedder tag whose whole cache is kept")] = None,
) -> None:
    """The embedding cache: vectors and bytes per embedder, and how much no stored index version uses;
    --prune deletes that (not while a build runs)."""
    try:
        caches = cache.prune(frozenset(keep or ())) if prune else cache.usage(frozenset(keep or ()))
    except (StoreBusy, cache.UnknownCache) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise typer.Exit(2)
    for c in caches:
        print(f"{c.embedder}  {c.vectors:>10,} vectors  {c.bytes / 1e6:>10,.1f} MB  {_cache_state(c, prune)}")
    held = sum(c.bytes if c.bytes_after is None else c.bytes_after for c in caches if not (prune and c.whole))
    print(f"{len(caches)} embedder(s): {held / 1e6:,.1f} MB in {cache.cache_root()}{' now' if prune else ''}")


def _cache_state(c: cache.CacheUse, pruned: bool) -> str:
    if c.missing:
        return "no cache (a stored embedder named by --keep: nothing to keep yet)"
    if c.whole:
        return "deleted: no stored index uses this embedder" if pruned else "no stored index uses it (--prune deletes it)"
    if c.unused is None:
        return f"kept whole: {c.why}"
    parts = []
    if c.unused and pruned:
        parts.append(f"deleted {c.unused:,} vectors no stored version holds" + (
            f"; compacted to {c.bytes_after / 1e6:,.1f} MB" if c.compacted else "; the next builds reuse their space"))
    elif c.unused:
        parts.append(f"{c.unused:,} of them used by no stored version (--prune deletes them)")
    if c.unregistered:
        parts.append(f"{c.unregistered:,} written by a build that registered no version (killed or failed): kept "
                     "for its rerun")
    return "; ".join(parts) or "every vector is used by a stored version"


@app.command("demo")
def demo_cmd(folder: Annotated[Path, typer.Argument(help="where to write photos, catalogue.csv, queries.csv")] = Path("demo"),
             items_per_family: int = 6) -> None:
    """Generate the synthetic demo catalogue; prints its path."""
    try:
        print(make_demo_catalogue(folder, items_per_family=items_per_family))
    except OSError as exc:  # a file where the folder should be, a read-only disk: not a traceback
        print(f"error: cannot write the demo into {folder}: {exc.strerror or exc} ({exc.filename}); name a folder "
              "that can be created", file=sys.stderr)
        raise typer.Exit(2)


if __name__ == "__main__":
    run_cli(app)
