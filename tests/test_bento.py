"""`bentoml build` packs the service, its code and the promoted models; the Bento serves without a stage record."""

from __future__ import annotations

import pickle
import re
import subprocess
from pathlib import Path

import bentoml
import httpx
import pytest
import yaml

from bench.server import Server as BenchServer, deployed_args, deployed_containers
from conftest import EMBEDDER_TOKEN, ROOT, TOKEN, run_env
from index_builder.demo import draw_object
from model_store import stages
from model_store.registry import bentoml_home
from test_service import Server, png

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


def build() -> tuple[str, Path]:
    """`bentoml build`: the Bento's tag and folder."""
    out = subprocess.run(["bentoml", "build", "--output", "tag"], cwd=ROOT, env=run_env(), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    tag = out.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    name, version = tag.split(":")
    return tag, bentoml_home() / "bentos" / name / version


def test_bento_carries_code_and_promoted_models_and_serves(pinned, stages_dir, tmp_path):
    tag, folder = build()
    info = yaml.safe_load((folder / "bento.yaml").read_text())
    packed = {m["tag"] for s in info["services"] for m in s["models"]}
    assert packed == {pinned.tag, pinned.embedder}
    for f in ("service.py", "query/models.py", "query/pricing.py", "model_store/index_artifact.py", "served.json",
              "query/static/app.js", "query/api_page/index.html", "query/api_page/api-page.js"):
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


# What `bentoml containerize` makes the image's entrypoint: it runs `start-http-server ARGS $BENTO_PATH` for args
# that begin with start-http-server, as deploy/k8s.yaml's containers' do
ENTRYPOINT = Path(bentoml.__file__).parent / "_internal" / "container" / "frontend" / "dockerfile" / "entrypoint.sh"


def in_a_container(service: str, folder: Path, log: Path, embedder_url: str | None = None, **env: str) -> BenchServer:
    """`service` as its Deployment in deploy/k8s.yaml runs it: BentoML's image entrypoint on the Bento in `folder`,
    the container's args and environment, on 127.0.0.1 (the entry reaching the Embedder at `embedder_url` rather
    than the cluster's Service)."""
    given = {e["name"]: e["value"] for e in deployed_containers()[service]["env"] if "value" in e}
    return BenchServer(log, "start-http-server", command=("bash", str(ENTRYPOINT)), root=folder / "src",
                       serve_args=deployed_args(service, embedder_url),
                       BENTO_PATH=str(folder), BENTOML_CONTAINERIZED="true",
                       **{"IMAGESEARCH_ADMIN_TOKEN": TOKEN, "IMAGESEARCH_EMBEDDER_TOKEN": EMBEDDER_TOKEN, **given,
                          **env})


class Planted:
    """Unpickled, it creates a file: what a caller without the token could make the Embedder run."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return Path.touch, (self.path,)


def pickled_call(server: BenchServer, planted: Path, token: str | None = None) -> httpx.Response:
    """A call to the Embedder's embed as BentoML's client sends one (a pickled body), from someone else."""
    headers = {"Content-Type": "application/vnd.bentoml+pickle"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return server.http.post("/embed", content=pickle.dumps({"batch": Planted(planted)}, protocol=5), headers=headers)


def in_flight_series(server: BenchServer) -> list[str]:
    """The requests-in-flight series the server exports, which deploy/k8s.yaml's ScaledObjects sum."""
    text = server.http.get("/metrics").text
    return re.findall(r"^bentoml_service_request_in_progress\{[^}]*\}", text, re.M)


def test_bento_serves_each_service_apart_as_the_kubernetes_containers_run_it(pinned, stages_dir, tmp_path):
    """Each Deployment's args, given to the image's own entrypoint, start that service alone: the Embedder's
    workers in one server, the entry's in the other, which searches through the first. Each exports the series
    its ScaledObject scales on, labelled with its service (tests/test_deploy.py checks the queries)."""
    tag, folder = build()
    stages.PIN_FILE.unlink()  # no stage record where it runs: the packed served.json says what to serve
    no_stages = str(tmp_path / "no-stages")
    embedder = in_a_container("Embedder", folder, tmp_path / "embedder.log", IMAGESEARCH_STAGES_DIR=no_stages)
    try:
        embedder.wait()
        entry = in_a_container("ImageSearch", folder, tmp_path / "entry.log", embedder.url,
                               IMAGESEARCH_STAGES_DIR=no_stages)
        try:
            entry.wait()
            assert entry.http.get("/index").json()["served"]["index"] == pinned.tag
            assert entry.processes()["embedder"] == [] and embedder.processes()["entry"] == []
            assert embedder.processes()["embedder"] and entry.processes()["entry"]
            assert embedder.http.get("/livez").status_code == 200  # the Embedder's own probes answer
            planted = tmp_path / "planted"
            for token in (None, "a-guess"):  # refused before its body is unpickled
                refused = pickled_call(embedder, planted, token)
                assert refused.status_code == 401 and "IMAGESEARCH_EMBEDDER_TOKEN" in refused.json()["error"]
            assert not planted.exists()
            # An entry given no token, or another, is not ready, and says why
            stray = in_a_container("ImageSearch", folder, tmp_path / "stray.log", embedder.url,
                                   IMAGESEARCH_STAGES_DIR=no_stages, IMAGESEARCH_EMBEDDER_TOKEN="")
            try:
                answer = stray.first_answer("/readyz")
                assert answer.status_code == 503 and "give both services the same IMAGESEARCH_EMBEDDER_TOKEN" in \
                    answer.json()["error"], answer.text
            finally:
                stray.stop()
            found = entry.http.post("/search", files={"image": ("p.png", png(draw_object(3, 0, 30)))}, data={"k": "3"})
            assert found.status_code == 200 and len(found.json()["results"]) == 3, found.text
            for server, service in ((entry, "ImageSearch"), (embedder, "Embedder")):
                series = in_flight_series(server)
                assert series and all(f'runner_name="{service}"' in s for s in series), series
        finally:
            entry.stop()
    finally:
        embedder.stop()
