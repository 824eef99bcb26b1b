"""The README's quick start, `bash quickstart.sh`, run as a new user runs it: from a copy of this checkout, with a
BentoML store of its own, up to a search on the server it leaves running."""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench.server import Server, free_port
from conftest import ROOT

pytestmark = pytest.mark.slow


def working_tree_copy(to: Path) -> Path:
    """The files of this checkout a clone would have, as they are now (committed or not), without what is
    ignored (a demo/ made earlier, caches)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        if (ROOT / name).is_file():  # a tracked file deleted in the working tree is left out
            (to / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, to / name)
    return to


def python3_without_pip(folder: Path) -> Path:
    """A `python3` that runs this interpreter, except `python3 -m pip`: the session is installed already (.ci/run
    installs the same extras), and an editable install from the copy would point the session's package at it."""
    folder.mkdir()
    shim = folder / "python3"
    shim.write_text(f'#!/bin/sh\nif [ "$1" = "-m" ] && [ "$2" = "pip" ]; then exit 0; fi\nexec {sys.executable} "$@"\n')
    shim.chmod(0o755)
    return folder


def test_quickstart_builds_promotes_and_serves_the_demo(tmp_path):
    repo = working_tree_copy(tmp_path / "repo")
    shims = python3_without_pip(tmp_path / "bin")
    home = tmp_path / "bentoml"
    port = free_port()
    # The script takes no arguments (the port comes from PORT): Server's --host and --port after it are ignored
    srv = Server(tmp_path / "quickstart.log", "quickstart.sh", port=port, root=repo, command=("bash",),
                 PORT=str(port), BENTOML_HOME=str(home), IMAGESEARCH_STAGES_DIR=str(home / "stages"),
                 PATH=f"{shims}:{Path(sys.executable).parent}:/usr/bin:/bin")
    try:
        srv.wait(timeout=300)
        log = srv.log.read_text()
        assert "production now serves image-index:" in log and "evaluation    top1=" in log, log[-3000:]
        with open(repo / "demo" / "catalogue.csv") as f:
            first = next(csv.DictReader(f))
        photo = repo / "demo" / first["image_path"]
        r = srv.http.post("/search", files={"image": (photo.name, photo.read_bytes())})
        assert r.status_code == 200, r.text
        answer = r.json()
        assert answer["results"][0]["item_id"] == first["item_id"]  # a catalogue photo finds its own item
        assert answer["served"]["stage"] == "production" and answer["served"]["pretrained"], answer["served"]
        assert srv.http.get("/ui/").status_code == 200
    finally:
        srv.stop()
