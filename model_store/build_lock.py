"""The lock between builds and prunes of what builds share: the embedding cache and the thumbnail store.

A build holds it, shared with other builds, from the moment it looks in the cache and the store for what it
may reuse until its version is registered: until then nothing records that it needs those vectors and
thumbnails. A prune takes it alone, and refuses while a build holds it; a build that starts during a
prune waits for it and says so. One file, $BENTOML_HOME/build.lock, for both stores: a build uses both.
"""

from __future__ import annotations

import contextlib
import fcntl
import sys
from collections.abc import Iterator
from pathlib import Path

from model_store.registry import bentoml_home


class StoreBusy(RuntimeError):
    """A build (or another prune) is running: what builds share cannot be pruned now."""


def lock_path() -> Path:
    return bentoml_home() / "build.lock"


@contextlib.contextmanager
def building(path: Path | None = None) -> Iterator[None]:
    """Held by a build from choosing what to reuse to registering its version; waits while a prune runs."""
    with _locked(path or lock_path(), fcntl.LOCK_SH, wait=True):
        yield


@contextlib.contextmanager
def pruning(what: str, path: Path | None = None) -> Iterator[None]:
    """Held by a prune of `what` (named in the refusal); StoreBusy at once while a build holds the lock."""
    with _locked(path or lock_path(), fcntl.LOCK_EX, wait=False, what=what):
        yield


@contextlib.contextmanager
def _locked(path: Path, mode: int, wait: bool, what: str = "") -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as lock:
        try:
            fcntl.flock(lock, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                raise StoreBusy(f"a build (or another prune) is running ({path} is locked): prune the {what} once it "
                                "has finished") from None
            print(f"waiting for a prune to finish ({path} is locked)", file=sys.stderr)
            fcntl.flock(lock, mode)
        yield
