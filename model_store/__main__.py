"""CLI: python -m model_store list | show TAG | promote TAG --stage S | rollback --stage S | history | delete TAG |
thumbnails [--prune] | pin --stage S."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer

from model_store import stages, thumbnails
from model_store.build_lock import StoreBusy
from model_store.index_artifact import ArtifactError
from model_store.registry import bentoml_home, get_model, list_models, run_cli
from model_store.settings import EMBEDDER_MODEL, INDEX_MODEL, Stage

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__, rich_markup_mode=None)
StageOpt = Annotated[Stage, typer.Option("--stage", help="staging or production")]


def _fail(exc: Exception) -> None:
    print(f"error: {exc}", file=sys.stderr)
    raise typer.Exit(2)


@app.command("list")
def list_cmd() -> None:
    """Embedders and indexes in the store, newest first, with their stage and key metadata."""
    state = stages.read_state()
    serving = {s: stack[-1].index for s, stack in state.stack.items() if stack}
    indexes, embedders = list_models(INDEX_MODEL), list_models(EMBEDDER_MODEL)
    if not indexes and not embedders:
        print(f"the store ({bentoml_home() / 'models'}) holds no embedder or index yet: build one with `python -m "
              "index_builder build CATALOGUE` (or ./quickstart.sh, which builds a demo)")
        return
    print(f"{'TAG':<42} {'STAGE':<20} {'CREATED':<17} DETAILS")
    for model in indexes:
        m, tag = model.info.metadata, str(model.tag)
        stage = ",".join(s for s, t in serving.items() if t == tag) or "-"
        random = "" if model.info.labels.get("weights") != "random" else " RANDOM-WEIGHTS"
        print(f"{tag:<42} {stage:<20} {model.info.creation_time:%Y-%m-%d %H:%M} "
              f"{m.get('n_photos')} photos/{m.get('n_items')} items, {m.get('dim')}-d, "
              f"recall@10={m.get('ann_recall_at_10')}, embedder={m.get('embedder')}{random}")
    for model in embedders:
        c = model.info.metadata["config"]
        print(f"{str(model.tag):<42} {'-':<20} {model.info.creation_time:%Y-%m-%d %H:%M} "
              f"{c['backbone']} {c['descriptor']} {c['dim']}-d, weights {c['weights']['source']}")


@app.command("show")
def show_cmd(tag: str) -> None:
    """Full metadata of one model version, as JSON."""
    try:
        model = get_model(tag)
    except LookupError as exc:
        _fail(exc)
    print(json.dumps({"tag": str(model.tag), "labels": model.info.labels, "metadata": model.info.metadata,
                      "stages": stages.stage_of(str(model.tag))}, indent=2, default=str))


@app.command("promote")
def promote_cmd(tag: str, stage: StageOpt, force: bool = False, note: str = "") -> None:
    """Put index TAG on STAGE, showing how it differs from what STAGE serves; refuses low recall, an embedder
    change, or a version lacking many of the served items, unless --force."""
    try:
        served = stages.current(stage)
        change = stages.served_diff(str(get_model(tag).tag), served.index) if served else None
        if change is not None:
            print("\n".join(change.lines()))
        d = stages.promote(tag, stage, force=force, note=note)
    except (LookupError, stages.PromotionError) as exc:
        _fail(exc)
    print(f"{stage} now serves {d.index} (embedder {d.embedder})")


@app.command("rollback")
def rollback_cmd(stage: StageOpt, note: str = "") -> None:
    """Return STAGE to the index promoted before the current one."""
    try:
        d = stages.rollback(stage, note=note)
    except stages.PromotionError as exc:
        _fail(exc)
    print(f"{stage} rolled back to {d.index} (embedder {d.embedder})")


@app.command("delete")
def delete_cmd(tag: str, force: bool = False) -> None:
    """Remove version TAG from the store; never one a stage serves (--force: one a stage could roll back to)."""
    try:
        deleted = stages.delete(tag, force=force)
    except (LookupError, stages.PromotionError) as exc:
        _fail(exc)
    print(f"deleted {deleted}")
    if deleted.startswith(f"{INDEX_MODEL}:"):
        print("thumbnails and cached vectors only its photos used stay until `python -m model_store thumbnails "
              "--prune` and `python -m index_builder cache --prune`")


@app.command("thumbnails")
def thumbnails_cmd(prune: Annotated[bool, typer.Option(help="delete the thumbnails no stored index version uses")]
                   = False) -> None:
    """The thumbnail store: its size, and how much of it no stored index version uses; --prune deletes that."""
    root = thumbnails.store_dir()
    try:
        use = thumbnails.prune() if prune else thumbnails.usage()
    except (StoreBusy, ArtifactError) as exc:
        _fail(exc)
    versions = f"{use.versions} index version{'' if use.versions == 1 else 's'}"
    print(f"{root}: {use.thumbnails:,} thumbnails, {_mb(use.bytes)}; {versions} in the store")
    if prune:
        print(f"deleted {use.unused:,} thumbnails no version uses ({_mb(use.unused_bytes)})")
    elif use.unused:
        print(f"{use.unused:,} of them ({_mb(use.unused_bytes)}) are used by no stored version: --prune deletes them")
    else:
        print("nothing to prune: every one is used by a stored version")


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


@app.command("pin")
def pin_cmd(stage: StageOpt) -> None:
    """Write served.json with STAGE's index and embedder, for `bentoml build` to pack and serve."""
    try:
        d = stages.pin(stage)
    except stages.PromotionError as exc:
        _fail(exc)
    print(f"{stages.PIN_FILE}: {d.index} (embedder {d.embedder})")


@app.command("history")
def history_cmd(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Every promotion and rollback: when, who, what."""
    events = stages.read_state().history
    if as_json:
        print(json.dumps([e.model_dump(mode="json") for e in events], indent=2))
        return
    if not events:
        print("no promotion or rollback yet: `python -m model_store promote TAG --stage staging` puts an index "
              "on a stage")
    for e in events:
        flags = " (forced)" if e.forced else ""
        print(f"{e.at:%Y-%m-%d %H:%M:%S} {e.by:<24} {e.action:<8} {e.stage:<10} {e.index}{flags}"
              f"{f'  # {e.note}' if e.note else ''}")


if __name__ == "__main__":
    run_cli(app)
