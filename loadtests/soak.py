"""Open-loop soak test: python -m loadtests.soak --host URL --minutes N --rate R [--photos DIR] [--out FILE]

Starts requests at a fixed arrival rate R per second for N minutes, whether or not the server keeps up
(an open loop: a slow server gets a queue, not a gentler client), 5 in 6 POST /search (k=10) and
1 in 6 POST /estimate, each with a photo from --photos. Requests in flight are capped (--max-in-flight,
default 4 x rate); one that cannot start is an error. Latency runs from each request's scheduled start,
so a late client never hides a slow server; percentiles are over successful requests.

Prints one line per window (--window-s) and a summary, writes everything as JSON to --out, and watches
the server's memory: the RSS summed over the `bentoml serve` process tree (--pid, or the process tree
listening on the host's port), at start, once per window, and at the end. Exit 1 when any request failed
or RSS grew more than --max-rss-growth percent (or could not be measured), else 0; 2 for bad arguments.
Only loopback hosts (127.0.0.0/8, localhost, [::1]) are accepted.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import json
import math
import random
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

import httpx
import psutil
import typer
from pydantic import BaseModel

from loadtests.photos import load_photos

LOOPBACK_V4 = ipaddress.ip_network("127.0.0.0/8")
ERROR_SAMPLES = 5
MiB = 2**20
app = typer.Typer(add_completion=False, help=__doc__, rich_markup_mode=None)


# ---- results -------------------------------------------------------------------------------------------

class Latency(BaseModel):
    p50_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    max_ms: float | None = None


class ProcRss(BaseModel):
    pid: int
    name: str
    rss_bytes: int


class RssSample(BaseModel):
    t_s: float
    total_bytes: int
    processes: list[ProcRss]


class Window(BaseModel):
    index: int
    start_s: float
    end_s: float
    requests: int
    ok: int
    errors: int
    rps: float
    latency: Latency
    rss_bytes: int | None


class ErrorSample(BaseModel):
    t_s: float
    endpoint: str
    kind: str
    detail: str


class EndpointStats(BaseModel):
    requests: int
    errors: int
    latency: Latency


class Memory(BaseModel):
    root_pid: int | None
    found_by: str
    before_warmup: RssSample | None = None
    start: RssSample | None = None
    end: RssSample | None = None
    growth_pct: float | None = None
    samples: list[RssSample] = []


class Report(BaseModel):
    host: str
    rate: float
    minutes: float
    warmup_s: float
    window_s: float
    timeout_s: float
    max_in_flight: int
    started_at: str
    duration_s: float
    requests: int
    ok: int
    errors: dict[str, int]
    error_samples: list[ErrorSample]
    warmup: dict[str, int]
    rps: float
    latency: Latency
    by_endpoint: dict[str, EndpointStats]
    client_lag_max_ms: float
    windows: list[Window]
    memory: Memory
    max_rss_growth_pct: float
    passed: bool
    verdict: str


@dataclass
class Outcome:
    """One request: when it was due and finished (seconds from the measured start), and how it went."""

    endpoint: str
    due_s: float
    end_s: float
    error: str | None = None
    detail: str = ""

    @property
    def latency_ms(self) -> float:
        return (self.end_s - self.due_s) * 1000


# ---- arguments -----------------------------------------------------------------------------------------

def loopback_port(host: str) -> int:
    """The port of an http(s) URL on a loopback address; ValueError for anything else."""
    parts = urlsplit(host)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{host!r} is not an http(s) URL")
    name = parts.hostname
    if name != "localhost":
        try:
            ip = ipaddress.ip_address(name)
        except ValueError:
            ip = None
        if ip is None or not (ip in LOOPBACK_V4 if ip.version == 4 else ip == ipaddress.ip_address("::1")):
            raise ValueError(f"refusing --host {host}: only loopback targets (127.0.0.0/8, localhost, [::1]) "
                             "are allowed here")
    return parts.port or (443 if parts.scheme == "https" else 80)


# ---- server memory -------------------------------------------------------------------------------------

def _listens_on(proc: psutil.Process, port: int) -> bool:
    """Whether the process holds a listening TCP socket on the port."""
    try:
        return any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port
                   for c in proc.net_connections("tcp"))
    except (psutil.Error, OSError):
        return False


def _listener_pids(port: int) -> set[int]:
    """Pids of local processes listening on the port (one per socket from the system table, else a scan)."""
    try:
        pids = {c.pid for c in psutil.net_connections("tcp")
                if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid}
    except (psutil.Error, OSError):
        pids = set()
    return pids or {p.pid for p in psutil.process_iter() if _listens_on(p, port)}


def _climb(proc: psutil.Process, port: int) -> psutil.Process:
    """The topmost ancestor that still listens on the port (the `bentoml serve` parent holds its workers' socket)."""
    while (parent := proc.parent()) is not None and _listens_on(parent, port):
        proc = parent
    return proc


def find_server(port: int, pid: int | None) -> tuple[psutil.Process | None, str]:
    """The root of the server's process tree, and how it was found."""
    if pid is not None:
        return psutil.Process(pid), f"--pid {pid}"
    roots = set()
    for p in _listener_pids(port):
        try:
            roots.add(_climb(psutil.Process(p), port).pid)
        except psutil.Error:
            pass
    if not roots:
        return None, f"no local process found listening on port {port}"
    root = min(roots)
    return psutil.Process(root), f"listening on port {port}"


def sample_rss(root: psutil.Process | None, t_s: float) -> RssSample | None:
    """RSS of the root and all its descendants now (processes that vanish meanwhile are skipped)."""
    if root is None:
        return None
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        procs = []
    rows = []
    for p in procs:
        try:
            rows.append(ProcRss(pid=p.pid, name=p.name(), rss_bytes=p.memory_info().rss))
        except psutil.Error:
            pass
    return RssSample(t_s=round(t_s, 3), total_bytes=sum(r.rss_bytes for r in rows), processes=rows)


def growth_pct(start: RssSample | None, end: RssSample | None) -> float | None:
    """Percent growth of the summed RSS, None when either end is missing or empty."""
    if not start or not end or not start.total_bytes or not end.total_bytes:
        return None
    return round(100 * (end.total_bytes - start.total_bytes) / start.total_bytes, 2)


# ---- statistics ----------------------------------------------------------------------------------------

def percentile(sorted_ms: list[float], q: float) -> float | None:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_ms:
        return None
    return round(sorted_ms[min(len(sorted_ms) - 1, max(0, math.ceil(q / 100 * len(sorted_ms)) - 1))], 1)


def latency(outcomes: list[Outcome]) -> Latency:
    """p50/p95/p99/max of the successful outcomes."""
    ms = sorted(o.latency_ms for o in outcomes if o.error is None)
    return Latency(p50_ms=percentile(ms, 50), p95_ms=percentile(ms, 95), p99_ms=percentile(ms, 99),
                   max_ms=percentile(ms, 100))


def by_endpoint(outcomes: list[Outcome]) -> dict[str, EndpointStats]:
    """Requests, errors and latency per endpoint."""
    names = sorted({o.endpoint for o in outcomes})
    return {n: EndpointStats(requests=len(sel := [o for o in outcomes if o.endpoint == n]),
                             errors=sum(o.error is not None for o in sel), latency=latency(sel)) for n in names}


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f}"


def _mib(x: int | None) -> str:
    return "-" if not x else f"{x / MiB:.1f}"


HEADER = (f"{'win':>4} {'t_end_s':>8} {'reqs':>6} {'ok':>6} {'err':>5} {'rps':>7} {'p50_ms':>7} {'p95_ms':>7} "
          f"{'p99_ms':>7} {'max_ms':>7} {'rss_MiB':>9}")


def window_line(w: Window) -> str:
    """One row of the per-window table."""
    lt = w.latency
    return (f"{w.index:>4} {w.end_s:>8.1f} {w.requests:>6} {w.ok:>6} {w.errors:>5} {w.rps:>7.2f} {_ms(lt.p50_ms):>7} "
            f"{_ms(lt.p95_ms):>7} {_ms(lt.p99_ms):>7} {_ms(lt.max_ms):>7} {_mib(w.rss_bytes):>9}")


# ---- load ----------------------------------------------------------------------------------------------

@dataclass
class Config:
    host: str
    rate: float
    duration_s: float
    warmup_s: float
    window_s: float
    timeout_s: float
    max_in_flight: int
    seed: int = 0


@dataclass
class Soak:
    """One open-loop run: a sender on a fixed schedule, a window closer, and the outcomes they collect."""

    cfg: Config
    photos: list[tuple[str, bytes]]
    root: psutil.Process | None
    t0: float = 0.0  # loop time of the measured start (after the warm-up)
    pending: list[Outcome] = field(default_factory=list)  # finished since the last window closed
    outcomes: list[Outcome] = field(default_factory=list)
    warm: list[Outcome] = field(default_factory=list)
    inflight: set[asyncio.Task] = field(default_factory=set)
    windows: list[Window] = field(default_factory=list)
    samples: list[RssSample] = field(default_factory=list)
    lag_s: float = 0.0

    def __post_init__(self) -> None:
        self.rng = random.Random(self.cfg.seed)

    def now(self) -> float:
        return asyncio.get_running_loop().time() - self.t0

    def record(self, o: Outcome) -> None:
        """File an outcome: warm-up requests (due before the measured start) are kept apart."""
        (self.warm if o.due_s < 0 else self.pending).append(o)

    async def request(self, client: httpx.AsyncClient, endpoint: str, photo: tuple[str, bytes],
                      due_s: float) -> Outcome:
        """One POST, judged: 200 with a JSON answer naming what was served, else an error kind."""
        name, data = photo
        form = {"k": "10"} if endpoint == "/search" else {}
        error, detail = None, ""
        try:
            async with asyncio.timeout(self.cfg.timeout_s):
                r = await client.post(endpoint, files={"image": (name, data, "application/octet-stream")}, data=form)
            if r.status_code != 200:
                error, detail = f"HTTP {r.status_code}", r.text[:300]
            elif not _names_served(r):
                error, detail = "bad answer", r.text[:300]
        except Exception as exc:  # noqa: BLE001 - every failure is a counted error kind
            error, detail = type(exc).__name__, (str(exc) or repr(exc))[:300]
        return Outcome(endpoint, due_s, self.now(), error, detail)

    def start(self, client: httpx.AsyncClient, i: int, due_s: float) -> None:
        """Start request i now (5 in 6 /search, 1 in 6 /estimate), or count an error at the in-flight cap."""
        endpoint = "/estimate" if i % 6 == 5 else "/search"
        photo = self.photos[self.rng.randrange(len(self.photos))]
        if len(self.inflight) >= self.cfg.max_in_flight:
            self.record(Outcome(endpoint, due_s, due_s, "not started",
                                f"{self.cfg.max_in_flight} requests already in flight"))
            return
        task = asyncio.create_task(self.request(client, endpoint, photo, due_s))
        self.inflight.add(task)
        task.add_done_callback(self.finished)

    def finished(self, task: asyncio.Task) -> None:
        """Done-callback of a request task."""
        self.inflight.discard(task)
        self.record(task.result())

    async def send(self, client: httpx.AsyncClient) -> None:
        """Start requests at the fixed rate for warm-up plus duration, never waiting for answers."""
        n = math.floor((self.cfg.warmup_s + self.cfg.duration_s) * self.cfg.rate + 1e-9)
        for i in range(n):
            due_s = i / self.cfg.rate - self.cfg.warmup_s
            if (delay := due_s - self.now()) > 0:
                await asyncio.sleep(delay)
            self.lag_s = max(self.lag_s, self.now() - due_s)
            self.start(client, i, due_s)

    async def sample(self) -> RssSample | None:
        """An RSS sample of the server tree, taken off the event loop; kept for the curve."""
        s = await asyncio.to_thread(sample_rss, self.root, self.now())
        if s is not None:
            self.samples.append(s)
        return s

    async def close_window(self, start_s: float) -> None:
        """Turn the outcomes finished since the last window into a Window, sample RSS, print its line."""
        end_s, done, self.pending = self.now(), self.pending, []
        self.outcomes += done
        rss = await self.sample()
        ok, rps = sum(o.error is None for o in done), len(done) / max(end_s - start_s, 1e-9)
        w = Window(index=len(self.windows) + 1, start_s=round(start_s, 3), end_s=round(end_s, 3),
                   requests=len(done), ok=ok, errors=len(done) - ok, rps=round(rps, 2),
                   latency=latency(done), rss_bytes=rss.total_bytes if rss else None)
        self.windows.append(w)
        print(window_line(w), flush=True)

    async def sleep_until(self, t_s: float) -> None:
        await asyncio.sleep(max(0.0, t_s - self.now()))

    async def run(self) -> tuple[RssSample | None, RssSample | None, RssSample | None]:
        """The whole run; returns RSS before the warm-up, at the measured start and at the end."""
        before = await asyncio.to_thread(sample_rss, self.root, -self.cfg.warmup_s)
        self.samples += [before] if before else []
        limits = httpx.Limits(max_connections=self.cfg.max_in_flight, max_keepalive_connections=self.cfg.max_in_flight)
        async with httpx.AsyncClient(base_url=self.cfg.host, timeout=None, limits=limits, trust_env=False) as client:
            self.t0 = asyncio.get_running_loop().time() + self.cfg.warmup_s
            sender = asyncio.create_task(self.send(client))
            start = before
            if self.cfg.warmup_s > 0:
                await self.sleep_until(0.0)
                start = await self.sample()
            print(HEADER, flush=True)
            k = 1
            while k * self.cfg.window_s < self.cfg.duration_s - 1e-9:
                await self.sleep_until(k * self.cfg.window_s)
                await self.close_window((k - 1) * self.cfg.window_s)
                k += 1
            await sender
            while self.inflight:  # each request ends by its own timeout
                await asyncio.wait(set(self.inflight))
            await self.sleep_until(self.cfg.duration_s)
            await self.close_window((k - 1) * self.cfg.window_s)
        return before, start, self.samples[-1] if self.samples and self.root else None


def _names_served(r: httpx.Response) -> bool:
    """Whether a 200 carries the service's JSON answer (which always names the served index)."""
    try:
        return "served" in r.json()
    except ValueError:
        return False


# ---- report --------------------------------------------------------------------------------------------

def judge(errors: int, memory: Memory, max_growth: float) -> tuple[bool, str]:
    """Pass or fail, and the one-line reason."""
    problems = []
    if errors:
        problems.append(f"{errors} request(s) failed")
    if memory.growth_pct is None:
        problems.append(f"server memory not measured ({memory.found_by}; pass --pid)"
                        if memory.root_pid is None else "server processes gone by the end")
    elif memory.growth_pct > max_growth:
        problems.append(f"RSS grew {memory.growth_pct:+.1f}% > {max_growth:g}%")
    if problems:
        return False, "FAIL: " + "; ".join(problems)
    return True, f"PASS: no failed request, RSS {memory.growth_pct:+.1f}% (limit {max_growth:g}%)"


def build_report(soak: Soak, rss: tuple, memory: Memory, started_at: str, minutes: float, max_growth: float) -> Report:
    """Everything the run measured, judged."""
    cfg, outs = soak.cfg, soak.outcomes
    before, start, end = rss
    memory.before_warmup, memory.start, memory.end = before, start, end
    memory.growth_pct, memory.samples = growth_pct(start, end), soak.samples
    kinds = Counter(o.error for o in outs if o.error)
    warm_errors = sum(o.error is not None for o in soak.warm)
    duration = soak.windows[-1].end_s if soak.windows else 0.0
    passed, verdict = judge(sum(kinds.values()) + warm_errors, memory, max_growth)
    return Report(
        host=cfg.host, rate=cfg.rate, minutes=minutes, warmup_s=cfg.warmup_s, window_s=cfg.window_s,
        timeout_s=cfg.timeout_s, max_in_flight=cfg.max_in_flight, started_at=started_at, duration_s=duration,
        requests=len(outs), ok=len(outs) - sum(kinds.values()), errors=dict(kinds.most_common()),
        error_samples=[ErrorSample(t_s=round(o.end_s, 3), endpoint=o.endpoint, kind=o.error, detail=o.detail)
                       for o in [*soak.warm, *outs] if o.error][:ERROR_SAMPLES],
        warmup={"requests": len(soak.warm), "errors": warm_errors}, rps=round(len(outs) / max(duration, 1e-9), 2),
        latency=latency(outs), by_endpoint=by_endpoint(outs), client_lag_max_ms=round(soak.lag_s * 1000, 1),
        windows=soak.windows, memory=memory, max_rss_growth_pct=max_growth, passed=passed, verdict=verdict)


def print_summary(r: Report) -> None:
    """The summary after the table, ending with the one-line verdict."""
    lt = r.latency
    print(f"overall: {r.requests} requests, {r.requests - r.ok} errors, {r.rps} req/s; p50 {_ms(lt.p50_ms)} ms, "
          f"p95 {_ms(lt.p95_ms)} ms, p99 {_ms(lt.p99_ms)} ms, max {_ms(lt.max_ms)} ms; "
          f"client lag max {r.client_lag_max_ms:.0f} ms")
    for name, e in r.by_endpoint.items():
        print(f"  {name:<10} {e.requests} requests, {e.errors} errors, p95 {_ms(e.latency.p95_ms)} ms")
    if r.warmup["requests"]:
        print(f"warm-up ({r.warmup_s:g} s, not in the stats): {r.warmup['requests']} requests, "
              f"{r.warmup['errors']} errors")
    if r.errors:
        print("errors: " + ", ".join(f"{k}: {n}" for k, n in r.errors.items()))
    for s in r.error_samples:
        print(f"  t={s.t_s:.1f}s {s.endpoint} {s.kind}: {s.detail[:160]!r}")
    m = r.memory
    if m.start and m.end:
        print(f"server RSS ({len(m.end.processes)} processes under pid {m.root_pid}, {m.found_by}): "
              f"{_mib(m.start.total_bytes)} MiB -> {_mib(m.end.total_bytes)} MiB "
              f"({'-' if m.growth_pct is None else f'{m.growth_pct:+.2f}%'})")
    else:
        print(f"server RSS: not measured ({m.found_by})")
    print(r.verdict, flush=True)


def _refuse(message: str) -> None:
    print(f"soak: {message}", file=sys.stderr)
    raise typer.Exit(2)


@app.command()
def main(
    host: Annotated[str, typer.Option(help="service URL, loopback only")] = "http://127.0.0.1:3000",
    minutes: Annotated[float, typer.Option(min=0.001, help="measured duration, fractions allowed (0.2 = 12 s)")] = 10,
    rate: Annotated[float, typer.Option(min=0.001, help="requests started per second, whatever the server does")] = 5,
    photos: Annotated[Path | None, typer.Option(help="folder of photos [default: $LOADTEST_PHOTOS or demo/photos]")] = None,
    out: Annotated[Path, typer.Option(help="JSON report")] = Path("loadtests/out/soak.json"),
    window_s: Annotated[float, typer.Option(min=0.1, help="seconds per table row and RSS sample")] = 60,
    pid: Annotated[int | None, typer.Option(help="pid of `bentoml serve` [default: whoever listens on the port]")] = None,
    timeout_s: Annotated[float, typer.Option(min=0.001, help="client timeout per request, whole request")] = 30,
    max_in_flight: Annotated[int, typer.Option(min=0, help="cap on requests in flight [0: 4 x rate]")] = 0,
    max_rss_growth: Annotated[float, typer.Option(help="fail above this RSS growth in percent")] = 5.0,
    warmup_s: Annotated[float, typer.Option(min=0, help="seconds of load before the measured start (not counted)")] = 0,
    seed: Annotated[int, typer.Option(help="photo choice")] = 0,
) -> None:
    """Soak HOST at a fixed arrival rate and judge failures and the server's memory growth."""
    try:
        port = loopback_port(host)
        images = load_photos(photos)
        root, found_by = find_server(port, pid)
    except ValueError as exc:
        _refuse(str(exc))
    except psutil.Error as exc:
        _refuse(f"--pid {pid}: {exc}")
    duration = minutes * 60
    if math.floor((warmup_s + duration) * rate + 1e-9) < 1:
        _refuse(f"{minutes} min at {rate}/s sends no request")
    cap = max_in_flight or max(4, math.ceil(4 * rate))
    cfg = Config(host.rstrip("/"), rate, duration, warmup_s, window_s, timeout_s, cap, seed)
    print(f"soak {cfg.host}: {rate:g} req/s for {duration:g} s (+{warmup_s:g} s warm-up), window {window_s:g} s, "
          f"timeout {timeout_s:g} s, at most {cap} in flight; {len(images)} photos; server: "
          f"{f'pid {root.pid} ({found_by})' if root else found_by}", flush=True)
    started_at = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    soak = Soak(cfg, images, root)
    rss = asyncio.run(soak.run())
    memory = Memory(root_pid=root.pid if root else None, found_by=found_by)
    report = build_report(soak, rss, memory, started_at, minutes, max_rss_growth)
    print_summary(report)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report.model_dump(), indent=2))
    print(f"report: {out}")
    raise typer.Exit(0 if report.passed else 1)


if __name__ == "__main__":
    app()
