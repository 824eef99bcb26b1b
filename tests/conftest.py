"""Shared fixtures: a temporary BentoML home for the whole session, a demo catalogue, a built index."""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

# Before anything imports bentoml: tests never touch the user's real store.
_HOME = Path(tempfile.mkdtemp(prefix="imagesearch-test-home-"))
os.environ["BENTOML_HOME"] = str(_HOME / "bentoml")
os.environ["BENTOML_DO_NOT_TRACK"] = "True"
os.environ["IMAGESEARCH_STAGES_DIR"] = str(_HOME / "stages")
# Every process the session starts keeps its temporary files there too: a server killed on purpose cannot remove
# BentoML's upload and client folders, nor a local Ray its session. Ray's own goes in a short folder of its own:
# its socket paths must fit 107 bytes. (This process's tempfile already chose /tmp.)
(_HOME / "tmp").mkdir()
os.environ["TMPDIR"] = str(_HOME / "tmp")
_RAY_TMP = Path(tempfile.mkdtemp(prefix="ray-test-", dir="/tmp"))
os.environ["RAY_TMPDIR"] = str(_RAY_TMP)
# Before anything imports ray, which reads it once: Ray 2.60 authenticates with a token (~/.ray/auth_token),
# which a local ray.init() turns on by default for the rest of its process, while a driver given an address
# sends it only when told to. So every Ray of the session uses it (ray_cluster below).
os.environ.setdefault("RAY_AUTH_MODE", "token")
# The session's own token, which every Ray of the session is given: a token made by ray.init() would be
# written to ~/.ray/auth_token, outside the session's temporary folders.
os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))

import pytest  # noqa: E402

from bench.server import Server as BenchServer, deployed_serve_args, python_path  # noqa: E402
from index_builder.build import build  # noqa: E402
from index_builder.demo import make_demo_catalogue  # noqa: E402
from model_store import stages  # noqa: E402
from model_store.settings import get_settings  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "test-admin-token"
EMBEDDER_TOKEN = "test-embedder-token"  # both services get it, as from one Secret (tests/test_deploy.py)
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


async def asgi_call(app, scope: dict, body: bytes = b"", stall: bool = False) -> tuple[int, dict, bytes]:
    """One request through an ASGI app (a middleware of ours), in process: its body sent at once, or never
    (stall). Returns the answer's (status, headers, body)."""
    answer: dict = {"body": b""}

    async def receive():
        if stall:
            await asyncio.sleep(3600)
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        if message["type"] == "http.response.start":
            answer["status"], answer["headers"] = message["status"], dict(message["headers"])
        else:
            answer["body"] += message.get("body", b"")

    await app(scope, receive, send)
    return answer["status"], answer["headers"], answer["body"]


def run_env(**extra: str) -> dict[str, str]:
    """Environment for subprocesses (CLIs, bentoml serve) sharing this session's store."""
    return {**os.environ, "PYTHONPATH": python_path(ROOT), "PYTHONUNBUFFERED": "1", **extra}


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """The session's store, its servers' logs (~240 MB) and its processes' temporary files go with a run that
    passed; a failed one keeps them for a look (pytest_terminal_summary says where). Every fixture, and each
    server it started, has ended."""
    if _passed(exitstatus):
        shutil.rmtree(_HOME, ignore_errors=True)
        shutil.rmtree(_RAY_TMP, ignore_errors=True)


def pytest_terminal_summary(terminalreporter, exitstatus: int) -> None:
    if not _passed(exitstatus):
        terminalreporter.write_line(f"this run's store and server logs are kept in {_HOME}, its local Rays' "
                                    f"logs in {_RAY_TMP}")


def _passed(exitstatus: int) -> bool:
    return exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED)


@pytest.fixture(autouse=True)
def _fresh_settings():
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


@pytest.fixture
def stages_dir(tmp_path, monkeypatch) -> Path:
    """A stage record of the test's own, so promotions in one test never leak into another."""
    monkeypatch.setenv("IMAGESEARCH_STAGES_DIR", str(tmp_path / "stages"))
    get_settings.cache_clear()
    return tmp_path / "stages"


@pytest.fixture(scope="session")
def demo_catalogue(tmp_path_factory) -> Path:
    """8 families x 3 items x 3 views = 72 photos, plus queries.csv with one unseen view per item."""
    return make_demo_catalogue(tmp_path_factory.mktemp("demo"), items_per_family=3)


@pytest.fixture(scope="session")
def demo_index(demo_catalogue):
    """The demo catalogue built with the default (pretrained EfficientNet-Lite0) embedder."""
    return build(demo_catalogue, eval_queries=demo_catalogue.with_name("queries.csv"), progress=False,
                 workers=0)


@pytest.fixture(scope="session")
def second_index(demo_catalogue):
    """Another version of the demo index, same embedder, other seed: for promotions and reloads."""
    return build(demo_catalogue, seed=1, progress=False, workers=0)


@pytest.fixture(scope="session")
def python() -> str:
    return sys.executable


class Server(BenchServer):
    """The service with its own stage record and the test admin token."""

    def __init__(self, stages_dir: Path, log: Path, bento: str = "service:ImageSearch",
                 serve_args: Sequence[str] = (), open_files: int | None = None,
                 command: Sequence[str] = ("bentoml", "serve"), **env: str):
        super().__init__(log, bento, serve_args=serve_args, open_files=open_files, command=command,
                         **{"IMAGESEARCH_STAGES_DIR": str(stages_dir), "IMAGESEARCH_ADMIN_TOKEN": TOKEN,
                            "BENTOML_HOME": os.environ["BENTOML_HOME"], **env})


@pytest.fixture(scope="session")
def served_stages(tmp_path_factory, demo_index):
    folder = tmp_path_factory.mktemp("served-stages")
    os.environ["IMAGESEARCH_STAGES_DIR"], old = str(folder), os.environ["IMAGESEARCH_STAGES_DIR"]
    stages.get_settings.cache_clear()
    stages.promote(demo_index.tag, "production")
    os.environ["IMAGESEARCH_STAGES_DIR"] = old
    stages.get_settings.cache_clear()
    return folder


@pytest.fixture(scope="session")
def server(served_stages, tmp_path_factory):
    # The Embedder guarded by a token (query/embedder_token.py) as deployed, here in one server: the entry sends it
    srv = Server(served_stages, tmp_path_factory.mktemp("logs") / "serve.log", serve_args=deployed_serve_args(),
                 IMAGESEARCH_EMBEDDER_TOKEN=EMBEDDER_TOKEN, IMAGESEARCH_FOLLOW_STAGE_S="0",
                 IMAGESEARCH_HEAD_TIMEOUT_S="3", IMAGESEARCH_UPLOAD_TIMEOUT_S="5",
                 IMAGESEARCH_MAX_IMAGE_BYTES="2000000", IMAGESEARCH_MAX_IMAGE_PIXELS="4000000")
    try:
        srv.wait()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def browser():
    """Debian's Chromium driven by Playwright (which cannot download its own browsers here)."""
    if not Path(CHROMIUM).exists():
        pytest.skip("no Chromium: `apt-get install chromium` (.ci/run does)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-dev-shm-usage"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def ray_cluster() -> str:
    """A real local Ray cluster (`ray start --head`) that builds join with `--ray-address`, as a production
    build joins its cluster; its address. Starting a Ray of their own costs each build ~5 s, so the builds of a
    module share this one. Its own temp folder keeps `ray.init()` elsewhere from finding it; it stops with the
    module, so no idle Ray sits beside the server tests of other modules. It wants the token that
    RAY_AUTH_MODE=token (set above) has every driver send."""
    pytest.importorskip("ray", reason="the ray extra is not installed: pip install '.[ray]'")
    ray_cli = str(Path(sys.executable).parent / "ray")
    subprocess.run([ray_cli, "get-auth-token", "--generate"], env=run_env(), capture_output=True, check=True)
    temp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = temp / "ray-start.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([ray_cli, "start", "--head", "--block", f"--port={port}", f"--temp-dir={temp}",
                                 "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats"],
                                # no drain when it stops: Ray Data's detached actors would have it wait 30 s
                                env=run_env(RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0"),
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield _wait_for_ray(temp, proc, log)
    finally:
        proc.terminate()  # `ray start --block` stops the processes it started
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)


def _wait_for_ray(temp: Path, proc: subprocess.Popen, log: Path, timeout: float = 60) -> str:
    """The address of the cluster `ray start` runs, once it has started (it writes the address last)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"ray start exited with {proc.returncode}: {log.read_text()[-2000:]}")
        if (temp / "ray_current_cluster").is_file() and (address := (temp / "ray_current_cluster").read_text().strip()):
            return address
        time.sleep(0.2)
    pytest.fail(f"the local Ray cluster did not start in {timeout:.0f} s: {log.read_text()[-2000:]}")
