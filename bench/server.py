"""A real `bentoml serve` of this project in its own process group: for benchmarks and integration tests."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import httpx
import psutil
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s.yaml"


def deployed_containers() -> dict[str, dict]:
    """deploy/k8s.yaml's containers by the service each runs (the `--service-name` of its args)."""
    found = {}
    for doc in yaml.safe_load_all(K8S.read_text()):
        if doc and doc["kind"] == "Deployment":
            (container,) = doc["spec"]["template"]["spec"]["containers"]
            args = container["args"]
            found[args[args.index("--service-name") + 1]] = container
    return found


def deployed_args(service: str, embedder_url: str | None = None) -> list[str]:
    """The args `service`'s container gives start-http-server (deploy/k8s.yaml), the Embedder's address in the
    cluster replaced by `embedder_url` where given."""
    command, *args = deployed_containers()[service]["args"]
    if command != "start-http-server":
        raise ValueError(f"{K8S.name}: the {service} container's args begin with {command!r}, not start-http-server")
    if embedder_url is not None:
        args = [f"Embedder={embedder_url}" if a.startswith("Embedder=") else a for a in args]
    return args


# What a container's args choose rather than how its server runs: `bentoml serve` runs every service
SERVICE_CHOICE = ("--service-name", "--depends")


def deployed_serve_args() -> list[str]:
    """The server options the entry's container runs with (deploy/k8s.yaml), to serve as deployed with
    `bentoml serve`: its args less the choice of service and of the Embedder's address."""
    args = deployed_args("ImageSearch")
    return [a for i, a in enumerate(args) if a not in SERVICE_CHOICE and (i == 0 or args[i - 1] not in SERVICE_CHOICE)]


def python_path(*folders: Path) -> str:
    """PYTHONPATH that imports from `folders` first, then from wherever this environment's PYTHONPATH points
    (packages installed into a folder of their own, as on a borrowed GPU machine)."""
    return os.pathsep.join([*map(str, folders), *filter(None, [os.environ.get("PYTHONPATH")])])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`bentoml serve TARGET [SERVE_ARGS]` (or another `command` taking a target, --host and --port) on 127.0.0.1
    from `root` (this checkout, or another version of it) with extra environment, and `open_files` as its soft limit
    on open files if given (a container's may be 1,024); stop() ends every process it started."""

    def __init__(self, log: Path, target: str = "service:ImageSearch", port: int | None = None,
                 root: Path = ROOT, serve_args: Sequence[str] = (), open_files: int | None = None,
                 command: Sequence[str] = ("bentoml", "serve"), **env: str):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = Path(log)
        self.proc = subprocess.Popen(
            [*command, target, "--host", "127.0.0.1", "--port", str(self.port), *serve_args],
            cwd=root, env={**os.environ, "PYTHONPATH": python_path(root), "BENTOML_DO_NOT_TRACK": "True", **env},
            stdout=open(self.log, "w"), stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=(lambda: _soft_open_files(open_files)) if open_files else None)
        self.http = httpx.Client(base_url=self.url, timeout=60)
        self.while_starting: list[tuple[int, str]] = []  # what wait() and first_answer() were answered: status, body

    def wait(self, path: str = "/readyz", timeout: float = 180, every: float = 0.5) -> "Server":
        self._poll(path, timeout, every, lambda r: r.status_code == 200, "not 200")
        return self

    def first_answer(self, path: str = "/readyz", timeout: float = 120, every: float = 0.2) -> httpx.Response:
        """The first answer at `path` of a starting server, whatever its status (a 503 that says why)."""
        return self._poll(path, timeout, every, lambda r: True, "not answered")

    def _poll(self, path: str, timeout: float, every: float, done: Callable[[httpx.Response], bool],
              failed: str) -> httpx.Response:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited:\n{self.log.read_text()[-3000:]}")
            try:
                r = self.http.get(path)
                self.while_starting.append((r.status_code, r.text))
                if done(r):
                    return r
            except httpx.TransportError:
                pass
            time.sleep(every)
        raise TimeoutError(f"{path} {failed} after {timeout}s:\n{self.log.read_text()[-3000:]}")

    def processes(self) -> dict[str, list[psutil.Process]]:
        """The live processes of this server by role: supervisor (`bentoml serve` itself and any helper it
        runs), entry (ImageSearch workers), embedder (Embedder workers). A child that has just exited (a
        zombie not yet reaped, whose command line cannot be read) is left out."""
        roles: dict[str, list[psutil.Process]] = {"supervisor": [], "entry": [], "embedder": []}
        root = psutil.Process(self.proc.pid)
        for p in [root, *root.children(recursive=True)]:
            try:
                if p.status() == psutil.STATUS_ZOMBIE:
                    continue
                cmd = " ".join(p.cmdline())
            except psutil.Error:
                continue
            worker = "_bentoml_impl.worker" in cmd
            role = "supervisor" if not worker else "embedder" if "--service-name Embedder" in cmd else "entry"
            roles[role].append(p)
        return roles

    def stop(self) -> None:
        """SIGTERM, as an orchestrator stops it. Once the entry workers have gone, nothing is left for the
        embedder workers' drain (IMAGESEARCH_EMBEDDER_DRAIN_S) to finish: a second SIGTERM stops them at once
        instead of ~3 s later (a test run stops some thirty servers)."""
        self.http.close()
        try:
            workers = self.processes()
        except psutil.NoSuchProcess:  # it has exited already
            workers = {"entry": [], "embedder": []}
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            psutil.wait_procs(workers["entry"], timeout=10)
            for p in workers["embedder"]:
                with contextlib.suppress(psutil.Error):
                    p.send_signal(signal.SIGTERM)
            self.proc.wait(20)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


# What a Bento's image runs for one service of it (`bentoml containerize`, BentoCloud): its workers, not the others'
ONE_SERVICE = (sys.executable, "-m", "bentoml_cli._internal.start", "start-http-server")


class ServedApart:
    """The Embedder and the entry (ImageSearch) as two servers, the way a Bento's image runs each service on
    instances of its own (deploy/bentocloud.yaml; deploy/k8s.yaml, whose containers' args they are given): each
    on `cores` of its own, with the Embedder's `envs` as the image sets them (a row's own environment wins); the
    entry reaches the Embedder at its URL. Has what the benchmarks use of a Server: url, http, processes() (both
    servers' processes by role) and stop()."""

    def __init__(self, log_dir: Path, embedder_cores: set[int], entry_cores: set[int], **env: str):
        from service import Embedder

        log_dir.mkdir(parents=True, exist_ok=True)
        image = {"BENTOML_CONTAINERIZED": "true", **env}
        envs = {e.name: e.value for e in Embedder.envs}
        with on_cores(embedder_cores):
            self.embedder = Server(log_dir / "embedder.log", command=ONE_SERVICE, serve_args=deployed_args("Embedder"),
                                   **{**envs, **image})
        try:
            self.embedder.wait()
            with on_cores(entry_cores):
                self.entry = Server(log_dir / "entry.log", command=ONE_SERVICE, **image,
                                    serve_args=deployed_args("ImageSearch", self.embedder.url))
        except BaseException:
            self.embedder.stop()
            raise
        self.url, self.http = self.entry.url, self.entry.http

    def wait(self) -> "ServedApart":
        try:
            self.entry.wait()
        except BaseException:
            self.stop()
            raise
        return self

    def processes(self) -> dict[str, list[psutil.Process]]:
        entry, embedder = self.entry.processes(), self.embedder.processes()
        return {role: entry[role] + embedder[role] for role in entry}

    def stop(self) -> None:
        self.entry.stop()
        self.embedder.stop()

    def __enter__(self) -> "ServedApart":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


@contextlib.contextmanager
def on_cores(cores: set[int]) -> Iterator[None]:
    """This process, and what it starts meanwhile, on `cores` only (Linux's CPU affinity, which children inherit)."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cores)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def _soft_open_files(n: int) -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (n, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
