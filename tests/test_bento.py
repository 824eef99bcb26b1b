"""`bentoml build` packs the service, its code and the promoted models; the Bento serves without a stage record."""

from __future__ import annotations

import subprocess

import pytest
import yaml

from conftest import ROOT, run_env
from model_store import stages
from model_store.registry import bentoml_home
from test_service import Server

pytestmark = pytest.mark.slow


@pytest.fixture
def pinned(stages_dir, demo_index):
    stages.promote(demo_index.tag, "production")
    before = stages.PIN_FILE.read_bytes() if stages.PIN_FILE.exists() else None
    stages.pin("production")
    yield demo_index
    if before is None:
        stages.PIN_FILE.unlink(missing_ok=True)
    else:
        stages.PIN_FILE.write_bytes(before)


def test_bento_carries_code_and_promoted_models_and_serves(pinned, stages_dir, tmp_path):
    out = subprocess.run(["bentoml", "build", "--output", "tag"], cwd=ROOT, env=run_env(), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    tag = out.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    name, version = tag.split(":")
    folder = bentoml_home() / "bentos" / name / version
    info = yaml.safe_load((folder / "bento.yaml").read_text())
    packed = {m["tag"] for s in info["services"] for m in s["models"]}
    assert packed == {pinned.tag, pinned.embedder}
    for f in ("service.py", "query/models.py", "query/pricing.py", "model_store/index_artifact.py", "served.json"):
        assert (folder / "src" / f).is_file(), f
    assert not (folder / "src" / "tests").exists()
    stages.PIN_FILE.unlink()  # what is served must come from inside the Bento
    # no stage record where it runs (as in a container, whose variable it also gets): the packed served.json says
    # what to serve
    srv = Server(tmp_path / "no-stages", tmp_path / "bento.log", bento=tag, BENTOML_CONTAINERIZED="true")
    try:
        srv.wait()
        assert srv.http.get("/index").json()["served"]["index"] == pinned.tag
        killed = srv.processes()["embedder"]
        for p in killed:
            p.kill()
        srv.wait()  # BentoML starts no dead worker again in a container; this Bento's service has it do so
        workers = srv.processes()["embedder"]
        assert len(workers) == len(killed) and {p.pid for p in workers}.isdisjoint(p.pid for p in killed)
    finally:
        srv.stop()
