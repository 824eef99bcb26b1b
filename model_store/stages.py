"""Stages (staging, production): which index and embedder each serves, promotion, rollback, history.

The BentoML store has no stages, so they live in one JSON file beside it. Every change holds an
exclusive lock and replaces the file atomically, so neither two promotions at once nor a crash
mid-write can corrupt it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import getpass
import os
import socket
import sqlite3
import uuid
from pathlib import Path
from typing import Iterator, Literal

import bentoml
from pydantic import BaseModel

from model_store.diff import IndexDiff, diff
from model_store.index_artifact import ArtifactError
from model_store.registry import bentoml_home, get_model
from model_store.settings import INDEX_MODEL, Stage, get_settings

STATE_FILE = "stages.json"


class PromotionError(RuntimeError):
    """A promotion or rollback that was refused; the message says why and how to override."""


class Deployment(BaseModel):
    """One index (with the embedder it was built with) put on a stage."""

    index: str
    embedder: str
    at: dt.datetime
    by: str


class Event(BaseModel):
    action: Literal["promote", "rollback"]
    stage: Stage
    index: str
    embedder: str
    at: dt.datetime
    by: str
    forced: bool = False
    note: str = ""


class StageState(BaseModel):
    """stack[stage][-1] is what the stage serves; rollback pops it."""

    stack: dict[str, list[Deployment]] = {}
    history: list[Event] = []


def stages_dir() -> Path:
    return get_settings().stages_dir or bentoml_home() / "stages"


def read_state() -> StageState:
    path = stages_dir() / STATE_FILE
    if not path.exists():
        return StageState()
    return StageState.model_validate_json(path.read_text())


@contextlib.contextmanager
def _locked_state() -> Iterator[StageState]:
    folder = stages_dir()
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        state = read_state()
        yield state
        tmp = folder / f".{STATE_FILE}.{uuid.uuid4().hex}"
        tmp.write_text(state.model_dump_json(indent=2))
        with open(tmp) as f:
            os.fsync(f.fileno())
        os.replace(tmp, folder / STATE_FILE)


def current(stage: Stage) -> Deployment | None:
    stack = read_state().stack.get(stage, [])
    return stack[-1] if stack else None


def _who() -> str:
    return f"{getpass.getuser()}@{socket.gethostname()}"


def promote(index_tag: str, stage: Stage, *, force: bool = False, note: str = "") -> Deployment:
    """Put an index on a stage; refuses (unless force) a recall below threshold or an embedder change."""
    model = get_model(index_tag)
    if model.tag.name != INDEX_MODEL:
        raise PromotionError(f"{model.tag} is not an index ({INDEX_MODEL}:...): only indexes are promoted")
    meta = model.info.metadata
    embedder, recall = meta["embedder"], float(meta["ann_recall_at_10"])
    get_model(embedder)  # the embedder must still be in the store
    threshold, max_loss = get_settings().min_promote_recall, get_settings().max_promote_item_loss
    with _locked_state() as state:
        stack = state.stack.setdefault(stage, [])
        problems = []
        change = served_diff(str(model.tag), stack[-1].index) if stack else None
        if change is not None and change.lost_share > max_loss:
            problems.append(f"it lacks {change.items_removed:,} of the {change.items_old:,} items {stage} serves "
                            f"({change.lost_share:.1%}, over the {max_loss:.0%} limit of "
                            "IMAGESEARCH_MAX_PROMOTE_ITEM_LOSS): was its catalogue complete?")
        if recall < threshold:
            problems.append(f"its measured ANN recall@10 is {recall:.3f}, below {threshold} "
                            "(rebuild with more trees, or set IMAGESEARCH_MIN_PROMOTE_RECALL)")
        if stack and stack[-1].embedder != embedder:
            problems.append(f"it was built with embedder {embedder}, but {stage} serves {stack[-1].embedder}: "
                            "the running embedder service must be redeployed with it")
        if problems and not force:
            raise PromotionError(f"refusing to promote {model.tag} to {stage}: " + "; ".join(problems)
                                 + ". Pass --force to promote anyway.")
        now = dt.datetime.now(dt.timezone.utc)
        deployment = Deployment(index=str(model.tag), embedder=embedder, at=now, by=_who())
        stack.append(deployment)
        state.history.append(Event(action="promote", stage=stage, index=deployment.index, embedder=embedder,
                                   at=now, by=deployment.by, forced=bool(problems), note=note))
    return deployment


def served_diff(index_tag: str, served_tag: str) -> IndexDiff | None:
    """How `index_tag` differs from the served version (None when they are one, or the served one is gone)."""
    if index_tag == served_tag:
        return None
    try:
        served = get_model(served_tag)
    except LookupError:
        return None
    try:
        return diff(served_tag, Path(served.path), index_tag, Path(get_model(index_tag).path))
    except (OSError, ValueError, sqlite3.Error, ArtifactError):  # a version without readable files cannot be compared
        return None


def rollback(stage: Stage, *, note: str = "") -> Deployment:
    """Return the stage to the index promoted before the current one."""
    with _locked_state() as state:
        stack = state.stack.get(stage, [])
        if len(stack) < 2:
            raise PromotionError(f"nothing to roll back to: {stage} has {len(stack)} promotion(s) on record")
        stack.pop()
        back = stack[-1]
        state.history.append(Event(action="rollback", stage=stage, index=back.index, embedder=back.embedder,
                                   at=dt.datetime.now(dt.timezone.utc), by=_who(), note=note))
    return back


def delete(tag: str, *, force: bool = False) -> str:
    """Remove a version (index or embedder) from the store. Refuses one that a stage serves, always, and
    one a stage could roll back to, unless force; the check and the removal hold the stage lock, so a
    promotion cannot slip in between."""
    model = get_model(tag)
    tag = str(model.tag)
    with _locked_state() as state:
        serving, fallback = [], []
        for stage, stack in state.stack.items():
            for i, d in enumerate(stack):
                if tag in (d.index, d.embedder):
                    (serving if i == len(stack) - 1 else fallback).append(stage)
        if serving:
            names = sorted(set(serving))
            raise PromotionError(f"refusing to delete {tag}: {' and '.join(names)} "
                                 f"{'serves' if len(names) == 1 else 'serve'} it. Promote another version first.")
        if fallback and not force:
            raise PromotionError(f"refusing to delete {tag}: {' and '.join(sorted(set(fallback)))} could roll back to "
                                 "it. Pass --force to delete it anyway (that rollback would then fail).")
        bentoml.models.delete(tag)
    return tag


def stage_of(tag: str) -> list[str]:
    """The stages whose current index is `tag`."""
    state = read_state()
    return [s for s, stack in state.stack.items() if stack and stack[-1].index == tag]


PIN_FILE = Path(__file__).resolve().parents[1] / "served.json"


def served(stage: Stage) -> Deployment | None:
    """What a service for `stage` should load: the stage record, else the pin packed into a Bento."""
    deployment = current(stage)
    if deployment is None and PIN_FILE.exists():
        deployment = Deployment.model_validate_json(PIN_FILE.read_text())
    return deployment


def pin(stage: Stage) -> Deployment:
    """Write served.json, so a Bento built now serves this stage's index where no stage record exists."""
    deployment = current(stage)
    if deployment is None:
        raise PromotionError(f"nothing is promoted to {stage}: promote an index first")
    PIN_FILE.write_text(deployment.model_dump_json(indent=2))
    return deployment
