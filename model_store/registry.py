"""Crash-safe registration in the BentoML model store, and listing what is there."""

from __future__ import annotations

import os
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import bentoml
from bentoml._internal.configuration.containers import BentoMLContainer
from bentoml._internal.models.model import ModelStore

from model_store.settings import SettingsError


class StoreUnusable(ValueError):
    """BENTOML_HOME names no folder this user can make or write: every command of both CLIs needs one."""


def bentoml_home() -> Path:
    try:
        return Path(BentoMLContainer.bentoml_home.get())
    except OSError as exc:  # BentoML makes the folder on first use; a file in its place, a read-only parent
        raise StoreUnusable(f"the store's folder {exc.filename or os.environ.get('BENTOML_HOME', '~/bentoml')} "
                            f"cannot be used: {exc.strerror or exc}; set BENTOML_HOME to a folder this user can "
                            "create and write") from None


def run_cli(app: Callable[[], None]) -> None:
    """Run a command-line app: a store or a setting (IMAGESEARCH_*) that cannot be used is one error line and
    exit 2, not a traceback."""
    try:
        app()
    except (StoreUnusable, SettingsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


def register(name: str, labels: dict[str, str], metadata: dict[str, Any], write: Callable[[Path], None]) -> str:
    """Create model `name` whose files `write(folder)` puts in place; returns 'name:version'.

    bentoml.models.create copies into the store file by file, so a crash mid-copy would leave a
    half version. Here the version is saved to a staging store on the same filesystem and then
    renamed into the real store in one step: a crash leaves either nothing or the whole version.
    """
    models = Path(BentoMLContainer.model_store.get()._path)
    staging = bentoml_home() / "tmp" / f"staging-{uuid.uuid4().hex}"
    staging.mkdir(parents=True)
    try:
        with bentoml.models.create(name, labels=labels, metadata=metadata, _model_store=ModelStore(staging)) as ref:
            write(Path(ref.path))
        tag = ref.tag
        (models / tag.name).mkdir(parents=True, exist_ok=True)
        os.rename(staging / tag.name / tag.version, models / tag.name / tag.version)
        _write_atomically(models / tag.name / "latest", tag.version)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(tag)


def clean_staging(older_than_s: float = 3600) -> None:
    """Remove staging folders a killed registration left behind (never visible as versions); recent ones
    may belong to a registration running now, so they stay."""
    tmp = bentoml_home() / "tmp"
    for stale in [*tmp.glob("staging-*"), *tmp.glob("builds/*")]:  # and work folders of killed builds
        if time.time() - stale.stat().st_mtime > older_than_s:
            shutil.rmtree(stale, ignore_errors=True)


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    tmp.write_text(text)
    os.replace(tmp, path)


def list_models(name: str) -> list[bentoml.Model]:
    """Versions of `name` in the store, newest first."""
    bentoml_home()  # an unusable store is said as such, not as BentoML's traceback
    models = [m for m in bentoml.models.list() if m.tag.name == name]
    return sorted(models, key=lambda m: m.info.creation_time, reverse=True)


def get_model(tag: str) -> bentoml.Model:
    """The stored model for `tag`; raises LookupError with the tag when absent or not a tag."""
    try:
        bentoml.Tag.from_taglike(tag)
    except (bentoml.exceptions.BentoMLException, ValueError) as exc:  # BentoML's own words, without its traceback
        raise LookupError(f"{tag!r} is not a model tag ({exc}): write it as `python -m model_store list` shows it, "
                          "NAME:VERSION") from None
    bentoml_home()  # an unusable store is said as such, not as BentoML's traceback
    try:
        return bentoml.models.get(tag)
    except bentoml.exceptions.NotFound:
        raise LookupError(f"{tag}: no such model in the store ({bentoml_home()}/models)") from None
