"""Headless Locust runs with an SLO verdict: python -m loadtests.run --host URL [--mix api|page|all] [--step] ...

Writes Locust's CSV and HTML reports under --out, prints p50/p95/p99 and failures, overall and for each kind
of request, and exits 1 when any kind's p95 exceeds the SLO or any request failed. --step raises the user
count until the SLO breaks and reports the highest count (and its throughput) that held it. --mix picks the
users: api (Buyer, Seller: /search and /estimate as API clients call them), page (PageVisitor: what the search
page requests for a person), or all three.
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

import httpx
import typer
from pydantic import BaseModel

from loadtests.photos import photo_paths

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
app = typer.Typer(add_completion=False, help=__doc__, rich_markup_mode=None)


class Mix(str, Enum):
    api = "api"
    page = "page"
    all = "all"


USERS = {Mix.api: ["Buyer", "Seller"], Mix.page: ["PageVisitor"], Mix.all: ["Buyer", "Seller", "PageVisitor"]}


class Stats(BaseModel):
    name: str  # the kind of request (Locust's name for it), or "all"
    requests: int
    failures: int
    rps: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float

    @classmethod
    def of(cls, row: dict[str, str]) -> "Stats":
        num = lambda key: float(row[key]) if row[key] not in ("", "N/A") else 0.0  # noqa: E731
        return cls(name="all" if row["Name"] == "Aggregated" else f"{row['Type']} {row['Name']}",
                   requests=int(num("Request Count")), failures=int(num("Failure Count")),
                   rps=round(num("Requests/s"), 2), p50_ms=num("50%"), p95_ms=num("95%"), p99_ms=num("99%"),
                   max_ms=num("Max Response Time"))


class RunResult(Stats):
    users: int
    mix: Mix = Mix.api
    report: str
    kinds: list[Stats] = []  # each kind of request on its own
    errors: list[str] = []  # exceptions raised in the users' own code (not failed requests): the test is broken

    def holds(self, slo_ms: float) -> bool:
        """No failure, no error, and every kind of request (a search as much as a thumbnail) within the SLO at p95."""
        return (self.failures == 0 and not self.errors and self.requests > 0
                and all(k.p95_ms <= slo_ms for k in self.kinds or [self]))


def run_locust(host: str, users: int, spawn_rate: float, run_time: str, out: Path, photos: Path | None,
               extra_env: dict[str, str] | None = None, mix: Mix = Mix.api) -> RunResult:
    """One headless Locust run; its stats come from the CSV Locust writes."""
    out.mkdir(parents=True, exist_ok=True)
    prefix = out / f"users{users}"
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", host,
           "-u", str(users), "-r", str(spawn_rate), "-t", run_time, "--csv", str(prefix),
           "--html", f"{prefix}.html", "--only-summary", "--stop-timeout", "10", *USERS[mix]]
    env = {**os.environ, **(extra_env or {})}
    if photos:
        env["LOADTEST_PHOTOS"] = str(photos)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    stats = prefix.with_name(prefix.name + "_stats.csv")
    if not stats.exists():
        raise SystemExit(f"locust wrote no stats (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    with open(stats) as f:
        rows = [Stats.of(row) for row in csv.DictReader(f)]
    total = next(r for r in rows if r.name == "all")
    errors = prefix.with_name(prefix.name + "_exceptions.csv")
    with open(errors) if errors.exists() else open(os.devnull) as f:
        raised = [f"{e['Count']}x {e['Message']}" for e in csv.DictReader(f)]
    return RunResult(**total.model_dump(), users=users, mix=mix, report=f"{prefix}.html",
                     kinds=[r for r in rows if r.name != "all"], errors=raised)


def check_target(host: str, photos: Path | None) -> None:
    """Exit 2, saying why, before a run that cannot mean anything: no photos to send, or no service ready at
    HOST (against a dead port Locust reported 1 request, failed, at 196 requests/s)."""
    try:
        photo_paths(photos)  # the Locust process reads them
    except ValueError as exc:
        _refuse(str(exc))
    if urlsplit(host).scheme not in ("http", "https"):
        _refuse(f"--host {host} is not an http(s) URL: write it as http://{host.split('://')[-1]}")
    try:
        ready = httpx.get(f"{host.rstrip('/')}/readyz", timeout=10)
    except httpx.HTTPError as exc:
        _refuse(f"cannot reach {host} ({type(exc).__name__}): start the service (bash quickstart.sh) or pass --host")
    if ready.status_code != 200:
        _refuse(f"{host} is not ready ({ready.status_code} from /readyz): {ready.text[:300]}")


def _refuse(message: str) -> None:
    print(f"loadtests.run: {message}", file=sys.stderr)
    raise typer.Exit(2)


def _line(r: RunResult) -> str:
    def stats(s: Stats) -> str:
        return (f"requests={s.requests:<6} failures={s.failures:<4} rps={s.rps:<7} p50={s.p50_ms:.0f}ms "
                f"p95={s.p95_ms:.0f}ms p99={s.p99_ms:.0f}ms max={s.max_ms:.0f}ms")
    kinds = "".join(f"\n    {k.name:<32} {stats(k)}" for k in r.kinds)
    errors = "".join(f"\n    ERROR in the load test's own code: {e}" for e in r.errors)
    return f"users={r.users:<4} {stats(r)}{kinds}{errors}"


def _timespan(value: str) -> str:
    """A duration as Locust's -t reads it (locust.util.timespan's grammar; importing it would import locust, which
    monkey-patches this process for gevent); anything else failed inside Locust, after the service check."""
    if not re.fullmatch(r"\d+|(\d+h)?(\d+m)?(\d+s)?", value) or not re.search(r"[1-9]", value):
        raise typer.BadParameter(f"{value!r}: write a duration over zero, as 60s, 5m or 1h30m")
    return value


@app.command()
def main(
    host: Annotated[str, typer.Option(help="service URL")] = "http://127.0.0.1:3000",
    users: Annotated[int, typer.Option(min=1, help="concurrent users (first count with --step)")] = 10,
    spawn_rate: Annotated[float, typer.Option(min=0.1, help="users started per second")] = 5,
    run_time: Annotated[str, typer.Option(callback=_timespan, help="Locust duration per run, e.g. 60s, 5m, 1h30m")] = "60s",
    slo_ms: Annotated[float, typer.Option(min=1, help="p95 latency objective in ms")] = 1000,
    photos: Annotated[Path | None, typer.Option(help="folder of photos [default: $LOADTEST_PHOTOS or demo/photos]")] = None,
    out: Annotated[Path, typer.Option(help="where CSV/HTML reports go")] = Path("loadtests/out"),
    step: Annotated[bool, typer.Option(help="raise users until the SLO breaks")] = False,
    step_factor: Annotated[float, typer.Option(min=1, help="users multiply by this each step")] = 1.5,
    max_users: Annotated[int, typer.Option(min=1, help="stop stepping here")] = 400,
    mix: Annotated[Mix, typer.Option(help="api: Buyer and Seller (/search, /estimate); page: PageVisitor (what the "
                                          "search page requests); all: the three by weight")] = Mix.api,
) -> None:
    """Run Locust headless against HOST and judge the result against the SLO."""
    check_target(host, photos)
    if not step:
        r = run_locust(host, users, spawn_rate, run_time, out, photos, mix=mix)
        print(_line(r))
        ok = r.holds(slo_ms)
        print(f"{'PASS' if ok else 'FAIL'}: p95 {r.p95_ms:.0f} ms vs SLO {slo_ms:.0f} ms, {r.failures} failed; "
              f"report {r.report}")
        (out / "summary.json").write_text(json.dumps({"slo_ms": slo_ms, "run": r.model_dump()}, indent=2))
        raise typer.Exit(0 if ok else 1)
    held, runs, n = None, [], users
    while n <= max_users:
        r = run_locust(host, n, max(spawn_rate, n / 5), run_time, out, photos, mix=mix)
        runs.append(r)
        print(_line(r), "held" if r.holds(slo_ms) else "BROKE", flush=True)
        if not r.holds(slo_ms):
            break
        held, n = r, max(n + 1, int(n * step_factor))
    (out / "step.json").write_text(json.dumps({"slo_ms": slo_ms, "runs": [x.model_dump() for x in runs]}, indent=2))
    if held is None:
        print(f"FAIL: even {users} users broke the SLO of {slo_ms:.0f} ms")
        raise typer.Exit(1)
    print(f"highest user count holding p95 <= {slo_ms:.0f} ms with no failure: {held.users} users, "
          f"{held.rps} requests/s (p95 {held.p95_ms:.0f} ms)")


if __name__ == "__main__":
    app()
