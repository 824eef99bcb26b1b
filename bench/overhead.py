"""What serving costs on top of the network, as ratios measured in one run, for this checkout and an older one.

    python -m bench.overhead                     # this checkout against f431bba (before this work); docs/overhead.json
    python -m bench.overhead --before ''         # this checkout only
    python -m bench.overhead --upload phone      # 1600x1200 JPEG uploads (a phone photo sent as is) instead of demo PNGs
    python -m bench.overhead --upload page       # the same photos as the search page sends them (upload_px)
    python -m bench.overhead --quick             # seconds-long smoke run the tests use
    python -m bench.overhead --before '' --backbone vgg16 --weights random --out docs/overhead_vgg16.json
                                                 # the original design's network (no weights here: speed only)
    python -m bench.overhead --before '' --layout 1x1 --layout 8x4 --clients 8 --clients 16 --clients 32
                                                 # rows of this checkout served by 1 entry and 1 embedder process,
                                                 # then 8 and 4 (a GPU box's spare cores), driven harder
    IMAGESEARCH_DEVICE=cuda python -m bench.overhead --before '' --out docs/overhead_gpu.json   # on a GPU
    python -m bench.overhead --before '' --upload page --apart --out docs/overhead_apart_page.json
                                                 # each service on cores of its own, as both manifests deploy them

Every row serves the same demo index (the default embedder) from one temporary BentoML home, with the code
of that row, and compares it with that code's own bare network:
- latency: HTTP /search p50, one request at a time, over the bare forward pass p50 (one photo, torch's default
  threads), timed in blocks that alternate (an idle torch process keeps its threads spinning for a while, so
  timing them one by one would make each slow the other);
- throughput: the best of 4, 8 and 16 clients (`--clients`) posting back to back (wrk, bench/wrk.py: a load generator in C,
  whose own CPU is not taken from the server) over the bare network's best rate on the same cores, in two
  layouts: one process with torch's default threads (the embedder as bench.embedder_speed times it), and one
  single-threaded process per core (on a GPU: as many processes as the row's embedder workers, when more than
  one, sharing the GPU and the cores); batches of 1, 2, 4 and 8. The bare networks run in helper processes
  (bench/bare_worker.py) importing the row's code.
With --apart each service runs as deploy/bentocloud.yaml deploys it, a server of its own on cores of its own
(bench.server.ServedApart): the Embedder on the first half of this process's cores, the entry and the load
generator on the rest; the bare network runs on the Embedder's cores.
Rounds alternate bare and served measurements, so the machine's drift hits both; ratios are taken per round
and the median is reported with every round's. At saturation the CPU each server process spends per request
is read with psutil, and wrk's own from its resource usage: where the cores go.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
import psutil
import typer

from bench.ann_scale import command_line, machine
from bench.report import cores_label
from bench.server import ROOT, ServedApart, Server, on_cores, python_path
from bench.wrk import closed_loop
from model_store.core_share import available_cores, worker_count
from model_store.embedder import pick_device

DOCS = ROOT / "docs"
BEFORE = "f431bba"
BATCHES = (1, 2, 4, 8)
LEAD_S, QUICK_LEAD_S = 2.0, 0.3  # BareEmbedders' lead_s: a --quick run's tiny network warms up within 0.3 s
app = typer.Typer(add_completion=False)


class BareEmbedders:
    """`n` bare embedder processes of the code at `root`, each loading embedder `tag`, with the row's settings
    (IMAGESEARCH_ variables) where they touch the network (IMAGESEARCH_CUDA_GRAPHS, say). A rate's workers get
    its job `lead_s` before they start together, time each warms up in (a --quick run's tiny network: little)."""

    def __init__(self, root: Path, tag: str, n: int, settings: dict[str, str] | None = None,
                 lead_s: float = LEAD_S):
        self.lead_s = lead_s
        env = {**os.environ, **(settings or {}), "PYTHONPATH": python_path(root)}
        self.procs = [subprocess.Popen([sys.executable, str(ROOT / "bench" / "bare_worker.py"), tag], cwd=root,
                                       env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                      for _ in range(n)]
        self.info = [self._reply(p) for p in self.procs][0]

    @staticmethod
    def _reply(proc: subprocess.Popen) -> dict:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"a bare embedder exited with {proc.wait()}")
        return json.loads(line)

    def send(self, worker: int, **job) -> None:
        """Start a job (bench/bare_worker.py's keys) on one worker; `reply(worker)` waits for its result."""
        self.procs[worker].stdin.write(json.dumps(job) + "\n")
        self.procs[worker].stdin.flush()

    def reply(self, worker: int) -> dict:
        return self._reply(self.procs[worker])

    def rate(self, processes: int, threads: int, batch: int, seconds: float) -> float:
        """Images/s of `processes` workers running back to back together, each with `threads` threads."""
        start_at = time.time() + self.lead_s
        for w in range(processes):
            self.send(w, threads=threads, batch=batch, seconds=seconds, start_at=start_at)
        return sum(self.reply(w)["images_per_s"] for w in range(processes))

    def forward_ms(self, calls: int, gap_ms: float = 0) -> list[float]:
        """Milliseconds of `calls` forward passes of one photo, torch's default threads, each after `gap_ms` idle."""
        self.send(0, threads=0, batch=1, calls=calls, gap_ms=gap_ms)
        return self.reply(0)["ms"]

    def close(self) -> None:
        for p in self.procs:
            p.stdin.close()
            p.wait(30)


@dataclass(frozen=True)
class Plan:
    """What every row of one run posts and how hard: the photos, rounds, client counts and seconds per loop."""
    photos: list[bytes]
    ctype: str
    rounds: int
    quick: bool
    clients: tuple[int, ...] = (4, 8, 16)
    seconds: float = 15
    bare_seconds: float = 6
    apart: tuple[set[int], set[int]] | None = None  # --apart: (the Embedder's cores, the entry's and load's)


def split_cores() -> tuple[set[int], set[int]]:
    """--apart's cores: the first half of this process's for the Embedder, the rest for the entry and the load."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        raise typer.BadParameter(f"--apart needs 2 cores or more, one for each service; this process has {len(cores)}")
    return set(cores[:len(cores) // 2]), set(cores[len(cores) // 2:])


def bare_processes(cores: int, gpu: bool, embedder_workers: int) -> int:
    """Bare embedder processes a row needs: one per core on a CPU, one per served embedder worker on a GPU."""
    return max(1, embedder_workers) if gpu else cores


def layouts(cores: int, gpu: bool, processes: int) -> list[tuple[str, int, int]]:
    """(name, processes, threads per process) of the bare network; threads 0 = torch's default."""
    if gpu:  # each process drives the GPU from its share of the cores
        more = [(f"{processes} processes", processes, max(1, cores // processes))] if processes > 1 else []
        return [("one process", 1, 0), *more]
    if cores == 1:
        return [("one process", 1, 0)]
    return [("one process", 1, 0), (f"{cores} processes x 1 thread", cores, 1)]


def bare_rates(bare: BareEmbedders, cores: int, seconds: float) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    for name, processes, threads in layouts(cores, bare.info["device"].startswith("cuda"), len(bare.procs)):
        out[name] = {b: round(bare.rate(processes, threads, b, seconds), 1) for b in BATCHES}
    return out


PROCESSES = ("IMAGESEARCH_SEARCH_WORKERS", "IMAGESEARCH_EMBEDDER_WORKERS")  # a --layout's ENTRYxEMBEDDER


def parse_layout(text: str) -> dict[str, str]:
    """'ENTRYxEMBEDDER [NAME=VALUE ...]' (8x4: 8 entry and 4 embedder processes; then settings of the row's
    own) -> the environment that serves so."""
    head, *extra = text.split()
    m = re.fullmatch(r"(\d+)x(\d+)", head)
    if not m or "0" in (m[1], m[2]) or not all(re.fullmatch(r"IMAGESEARCH_\w+=\S*", x) for x in extra):
        raise typer.BadParameter(f"--layout {text!r}: give entry x embedder processes, both from 1, then any "
                                 "IMAGESEARCH_NAME=value settings, e.g. '8x4' or '1x1 IMAGESEARCH_ENTRY_THREADS=2'")
    return {PROCESSES[0]: m[1], PROCESSES[1]: m[2], **dict(x.split("=", 1) for x in extra)}


def layout_label(env: dict[str, str]) -> str:
    """The row's name for a parse_layout environment: its processes, then its other settings."""
    if not env:
        return "this checkout"
    settings = "".join(f", {k}={v}" for k, v in env.items() if k not in PROCESSES)
    return f"this checkout, {env[PROCESSES[0]]} entry x {env[PROCESSES[1]]} embedder processes{settings}"


def upload(srv: Server, data: bytes, ctype: str) -> None:
    srv.http.post("/search", files={"image": ("photo", data, ctype)}, data={"k": "10"}).raise_for_status()


def latency(srv: Server, bare: BareEmbedders, photos: list[bytes], ctype: str, blocks: int, per_block: int) -> dict:
    """p50 of HTTP /search (one at a time) and of the bare forward pass, timed in alternating blocks. The bare
    pass twice: back to back, and spaced: each pass after as much idle time as a lone search leaves the
    server's network (the last HTTP block's median less the bare pass's), since on this VM a pass after a
    pause runs slower than one right after another (caches, sleeping threads and cores)."""
    http_ms, bare_ms, spaced_ms, i = [], [], [], 0
    upload(srv, photos[0], ctype)
    for _ in range(blocks):
        time.sleep(0.3)
        bare_ms += bare.forward_ms(per_block)
        time.sleep(0.3)
        block = []
        for _ in range(per_block):
            start = time.perf_counter()
            upload(srv, photos[i % len(photos)], ctype)
            block.append((time.perf_counter() - start) * 1000)
            i += 1
        http_ms += block
        gap = max(0.0, statistics.median(block) - statistics.median(bare_ms[-per_block:]))
        spaced_ms += bare.forward_ms(per_block, gap)
    h, b, s = statistics.median(http_ms), statistics.median(bare_ms), statistics.median(spaced_ms)
    return {"http_p50_ms": round(h, 1), "http_p95_ms": round(float(np.percentile(http_ms, 95)), 1),
            "bare_forward_p50_ms": round(b, 1), "http_over_bare": round(h / b, 2),
            "bare_spaced_p50_ms": round(s, 1), "http_over_bare_spaced": round(h / s, 2)}


def cpu_seconds(srv: Server) -> dict[str, float]:
    """CPU seconds so far of the server's processes by role."""
    roles = {}
    for role, procs in srv.processes().items():
        roles[role] = 0.0
        for p in procs:
            try:
                t = p.cpu_times()
            except psutil.Error:
                continue
            roles[role] += t.user + t.system
    return roles


def cpu_ms_per_request(before: dict[str, float], after: dict[str, float], loop: dict) -> dict[str, float]:
    """Milliseconds of CPU per answered request of each server role, from two cpu_seconds readings around a
    closed loop, and of the loop's load generator."""
    spent = {**{k: after[k] - before[k] for k in after}, "load generator": loop["load_generator_cpu_s"]}
    return {k: round(v / max(loop["answered"], 1) * 1000, 1) for k, v in spent.items()}


def saturation(srv: Server, photos: list[bytes], ctype: str, seconds: float, levels: tuple[int, ...]) -> dict:
    """Closed loops at each concurrency; the CPU per answered request of each role at the best one."""
    loads = []
    for c in levels:
        before = cpu_seconds(srv)
        r = closed_loop(srv.url, photos, c, seconds, ctype)
        after = cpu_seconds(srv)
        r["cpu_ms_per_request"] = cpu_ms_per_request(before, after, r)
        loads.append(r)
    best = max(loads, key=lambda r: r["rps"])
    return {"loads": loads, "best_rps": best["rps"], "cpu_ms_per_request": best["cpu_ms_per_request"]}


def checkout(ref: str, where: Path) -> Path:
    subprocess.run(["git", "worktree", "add", "--detach", str(where), ref], cwd=ROOT, check=True,
                   capture_output=True)
    return where


def remove_checkout(where: Path) -> None:
    """Undo checkout(): the worktree and git's record of it."""
    subprocess.run(["git", "worktree", "remove", "--force", str(where)], cwd=ROOT, capture_output=True, check=False)


def pinned(root: Path) -> set[str]:
    """Names of the packages root's requirements.txt pins."""
    lines = (root / "requirements.txt").read_text().splitlines()
    return {re.split(r"[=<>\[ ]", line.strip())[0].lower() for line in lines if line.strip() and line[0] != "#"}


def hide_newer_packages(root: Path, folder: Path) -> dict[str, str]:
    """Environment for serving older code as it shipped: packages this checkout added to requirements.txt
    (uvloop, httptools, which uvicorn uses when it can import them) are hidden from it by stubs that fail to
    import. Returns the PYTHONPATH to serve `root` with."""
    for name in sorted(pinned(ROOT) - pinned(root)):
        if importlib.util.find_spec(name) is None:  # a distribution whose module has another name
            continue
        (folder / name).mkdir(parents=True, exist_ok=True)
        (folder / name / "__init__.py").write_text(f"raise ImportError('{name} is not in this version')\n")
    return {"PYTHONPATH": python_path(root, folder)}


def measure(root: Path, label: str, tag: str, tmp: Path, plan: Plan, layout: dict[str, str]) -> dict:
    """One row: `root`'s code serving index `tag` with the environment `layout` (parse_layout; {} for the
    settings' own), against the bare embedder of that code."""
    from model_store import stages
    from model_store.registry import get_model
    from model_store.settings import Settings

    stages.promote(tag, "production", force=True)
    embedder_cores, entry_cores = plan.apart or (os.sched_getaffinity(0),) * 2
    settings = Settings(**{k.removeprefix("IMAGESEARCH_").lower(): v for k, v in layout.items()})
    with on_cores(embedder_cores):  # the bare network, and the Embedder's layout, on the Embedder's cores
        cores = 1 if plan.quick else available_cores()
        served = serving_layout(settings)
        if root != ROOT:  # older code may have no such setting
            served.pop("entry_threads")
        gpu = pick_device(served["device"]).type == "cuda"
        bare = BareEmbedders(root, get_model(tag).info.metadata["embedder"],
                             bare_processes(cores, gpu, served["embedder_workers"]),
                             {k: v for k, v in layout.items() if k not in PROCESSES},
                             QUICK_LEAD_S if plan.quick else LEAD_S)
    if plan.apart:
        served["entry_threads"] = settings.entry_thread_count(len(entry_cores))
    seconds, levels = (2, (4,)) if plan.quick else (plan.seconds, plan.clients)
    photos, ctype, per_round = plan.photos, plan.ctype, []
    env = {**(hide_newer_packages(root, tmp / f"hidden-{root.name}") if root != ROOT else {}), **layout}
    log = tmp / re.sub(r"\W+", "-", label).strip("-")
    try:
        with (on_cores(entry_cores), ServedApart(log, embedder_cores, entry_cores, **env).wait() if plan.apart
              else Server(log.with_suffix(".log"), root=root, **env).wait() as srv):
            if plan.apart:  # the cores each service's processes are allowed, as read from them
                served |= {f"{role}_cores": sorted(set().union(*(p.cpu_affinity() for p in procs)))
                           for role, procs in srv.processes().items() if role != "supervisor"}
            for _ in range(plan.rounds):
                rates = bare_rates(bare, cores, 1 if plan.quick else plan.bare_seconds)
                lat = latency(srv, bare, photos, ctype, 2 if plan.quick else 6, 5 if plan.quick else 20)
                sat = saturation(srv, photos, ctype, seconds, levels)
                best = {name: max(r.values()) for name, r in rates.items()}
                per_round.append({**lat, **sat, "bare_images_per_s": rates,
                                  "served_over_bare": {name: round(sat["best_rps"] / b, 3) for name, b in best.items()}})
                print(json.dumps(per_round[-1]), flush=True)
    finally:
        bare.close()
    median = lambda key, name=None: statistics.median(  # noqa: E731
        r[key][name] if name else r[key] for r in per_round)
    names = list(per_round[0]["served_over_bare"])
    row = {"code": label, "device": bare.info["device"], "half": bare.info["half"], "layout": served,
           "clients": list(levels), "rounds": per_round,
           "http_over_bare": round(median("http_over_bare"), 2), "http_p50_ms": round(median("http_p50_ms"), 1),
           "bare_forward_p50_ms": round(median("bare_forward_p50_ms"), 1), "best_rps": round(median("best_rps"), 1),
           "bare_spaced_p50_ms": round(median("bare_spaced_p50_ms"), 1),
           "http_over_bare_spaced": round(median("http_over_bare_spaced"), 2),
           "bare_best_images_per_s": {n: round(statistics.median(max(r["bare_images_per_s"][n].values())
                                                                 for r in per_round), 1) for n in names},
           "served_over_bare": {n: round(median("served_over_bare", n), 3) for n in names}}
    print(json.dumps({k: v for k, v in row.items() if k != "rounds"}), flush=True)
    return row


def serving_layout(settings) -> dict:
    """How this checkout serves on this machine: processes, the embedder's device and batch limit."""
    gpu = pick_device(settings.device).type == "cuda"
    return {"entry_workers": settings.search_workers, "embedder_workers": worker_count(settings.embedder_workers, gpu),
            "embed_max_batch": settings.embed_batch_limit(gpu), "device": settings.device,
            "entry_threads": settings.entry_thread_count(available_cores())}


def demo_index(prefix: str, quick: bool, backbone: str = "", weights: str = "default") -> tuple[Path, Path, str]:
    """A temporary BentoML home and stage records holding the demo catalogue's index (a tiny one when quick;
    the default embedder unless `backbone`, '' for none, and `weights` name another): (the temporary folder,
    the demo photos' folder, the index tag)."""
    from index_builder.build import build
    from index_builder.demo import make_demo_catalogue
    from model_store import stages

    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    os.environ.update(BENTOML_HOME=str(tmp / "home"), IMAGESEARCH_STAGES_DIR=str(tmp / "stages"))
    stages.get_settings.cache_clear()
    catalogue = make_demo_catalogue(tmp / "demo", items_per_family=2 if quick else 6)
    tag = build(catalogue, backbone=backbone or ("efficientnet-lite0" if quick else None),
                weights=weights, image_size=64 if quick else None, progress=False).tag
    return tmp, tmp / "demo" / "photos", tag


def phone_photos(folder: Path, n: int = 24) -> list[bytes]:
    """Demo drawings as 1600x1200 JPEGs with sensor-like noise: a phone photo sent as is."""
    from PIL import Image

    from bench.decode import jpeg

    return [jpeg(Image.open(path).convert("RGB"), (1600, 1200), 90, seed=i, noise=6)
            for i, path in enumerate(sorted(folder.glob("*.png"))[:n])]


def uploads(kind: str, folder: Path, tag: str, quick: bool) -> tuple[list[bytes], str]:
    """The photos a run posts, and their content type."""
    if kind == "demo":
        return [p.read_bytes() for p in sorted(folder.glob("*.png"))], "image/png"
    photos = phone_photos(folder, 4 if quick else 24)
    if kind == "page":
        from model_store.index_artifact import IndexManifest
        from model_store.preprocess import as_page_sends, upload_px
        from model_store.registry import get_model

        manifest = IndexManifest.read(Path(get_model(tag).path))
        photos = [as_page_sends(p, upload_px(manifest.embedder_config.preprocess)) for p in photos]
    return photos, "image/jpeg"


@app.command()
def main(before: Annotated[str, typer.Option(help="git ref, or the folder of an older checkout, to compare with "
                                                  "('' for none)")] = BEFORE,
         upload_kind: Annotated[str, typer.Option("--upload", help="demo (160 px PNG), phone (1600x1200 JPEG) "
                                                                      "or page (phone, as the page sends it)")] = "demo",
         layout: Annotated[list[str], typer.Option(help="ENTRYxEMBEDDER processes: a row of this checkout each "
                                                        "(default: the settings' own)")] = [],  # noqa: B006
         clients: Annotated[list[int], typer.Option(help="closed loops' client counts")] = [4, 8, 16],  # noqa: B006
         seconds: Annotated[float, typer.Option(help="seconds per closed loop")] = 15,
         bare_seconds: Annotated[float, typer.Option(help="seconds per bare rate (layout and batch)")] = 6,
         rounds: Annotated[int, typer.Option(help="alternating bare/served rounds per row")] = 2,
         backbone: Annotated[str, typer.Option(help="the index's backbone ('' for the default embedder's)")] = "",
         weights: Annotated[str, typer.Option(help="its weights, as the builder's --weights takes them")] = "default",
         apart: Annotated[bool, typer.Option(help="each service a server of its own on cores of its own (the "
                                                  "Embedder on the first half), with deploy/k8s.yaml's containers' "
                                                  "args, as both manifests deploy them")] = False,
         quick: Annotated[bool, typer.Option(help="tiny run, no docs")] = False,
         out: Annotated[Path, typer.Option(help="where the JSON goes (written after each row)")] = DOCS / "overhead.json"
         ) -> None:
    from model_store.settings import get_settings

    if upload_kind not in ("demo", "phone", "page"):  # before the minute the demo index takes
        raise typer.BadParameter(f"--upload {upload_kind!r}: use demo, phone or page")
    layouts_env = [parse_layout(text) for text in layout] or [{}]
    if apart and before:
        raise typer.BadParameter("--apart serves this checkout only: add --before ''")
    cores = split_cores() if apart else None
    tmp, folder, tag = demo_index("bench-overhead-", quick, backbone, weights)
    photos, ctype = uploads(upload_kind, folder, tag, quick)
    plan = Plan(photos, ctype, 1 if quick else rounds, quick, tuple(clients), seconds, bare_seconds, cores)
    result = {"machine": machine(), "photos": len(photos), "upload": upload_kind, "rows": [], "backbone": backbone,
              "weights": weights,
              "layout": serving_layout(get_settings()), "command": command_line("bench.overhead")}
    if before:
        older = Path(before) if Path(before).is_dir() else checkout(before, tmp / "before")
        result["rows"].append(measure(older, f"before ({before})", tag, tmp, plan, {}))
        if older == tmp / "before":
            remove_checkout(older)
        save(result, out, quick)
    for env in layouts_env:
        label = layout_label(env) + (f", apart: the Embedder on {cores_label(cores[0])}, the entry and the load on "
                                     f"{cores_label(cores[1])}" if cores else "")
        result["rows"].append(measure(ROOT, label, tag, tmp, plan, env))
        save(result, out, quick)


def save(result: dict, out: Path, quick: bool) -> None:
    if not quick:
        out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    app()
