"""Saturation throughput of this checkout against another commit, servers alternating round by round.

    python -m bench.ab_serving --before HEAD~1             # 4 rounds, 8 and 16 clients; docs/ab_serving.json
    python -m bench.ab_serving --before HEAD~1 --rounds 2 --out /tmp/ab.json
    python -m bench.ab_serving --env IMAGESEARCH_TORCH_THREADS=1   # this checkout with a setting, against without
    python -m bench.ab_serving --clients 2 --clients 4 --clients 16  # other client levels (p50, p99 at each)
    python -m bench.ab_serving --quick                     # seconds-long smoke run against HEAD (the tests')
    python -m bench.ab_serving --before 9f3dfa5 --backbone vgg16 --weights random --rounds 2 \
        --clients 4 --clients 8 --clients 16 --out docs/ab_slow_network.json
                                                           # in front of the original design's network (speed only)

bench.overhead measures each version's ratios to its own bare network, one version after the other; this
one answers "is the change faster?" on a machine whose speed drifts (this VM: 10-35% between runs, and
CPU time taken by the hypervisor varies from 0 to 20%): each round serves the demo index with one version,
then the other, so drift hits both, and the version that goes first swaps each round; every closed loop
records the searches/s, failures, CPU per search of each server role and the share of CPU the hypervisor
stole meanwhile (/proc/stat).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Annotated

import typer

from bench.ann_scale import machine
from bench.overhead import (DOCS, checkout, cpu_ms_per_request, cpu_seconds, demo_index, hide_newer_packages,
                            remove_checkout)
from bench.server import ROOT, Server
from bench.wrk import closed_loop

LEVELS = (8, 16)


def steal_ticks() -> tuple[int, int]:
    """(all CPU ticks, ticks stolen by the hypervisor) so far, from /proc/stat (zeros where it is absent)."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except OSError:
        return 0, 0
    return sum(fields), fields[7] if len(fields) > 7 else 0


def loads(srv: Server, photos: list[bytes], seconds: float, levels: tuple[int, ...]) -> list[dict]:
    closed_loop(srv.url, photos, 16, min(seconds, 5))  # warm up
    out = []
    for clients in levels:
        cpu0, (all0, stolen0) = cpu_seconds(srv), steal_ticks()
        r = closed_loop(srv.url, photos, clients, seconds)
        cpu1, (all1, stolen1) = cpu_seconds(srv), steal_ticks()
        r["cpu_ms_per_request"] = cpu_ms_per_request(cpu0, cpu1, r)
        r["stolen"] = round((stolen1 - stolen0) / max(all1 - all0, 1), 3)
        out.append(r)
    return out


def summary(rounds: list[dict], label: str, levels: tuple[int, ...]) -> dict:
    by_level = {}
    for clients in levels:
        runs = [r for rnd in rounds for r in rnd[label] if r["concurrency"] == clients]
        by_level[clients] = {"median_rps": round(statistics.median(r["rps"] for r in runs), 1),
                             "median_p50_ms": round(statistics.median(r["p50_ms"] for r in runs), 1),
                             "median_p99_ms": round(statistics.median(r["p99_ms"] for r in runs), 1),
                             "median_embedder_cpu_ms": round(statistics.median(
                                 r["cpu_ms_per_request"]["embedder"] for r in runs), 1),
                             "failed": sum(r["failed"] for r in runs)}
    return by_level


def setting(pair: str) -> tuple[str, str]:
    name, sep, value = pair.partition("=")
    if not sep or not name:
        raise typer.BadParameter(f"--env {pair!r}: write NAME=VALUE, e.g. IMAGESEARCH_TORCH_THREADS=1")
    return name, value


def main(before: Annotated[str, typer.Option(help="git ref to compare this checkout with")] = "HEAD",
         env: Annotated[list[str], typer.Option(help="NAME=VALUE for this checkout's server only (repeatable)")] = [],
         rounds: Annotated[int, typer.Option(help="rounds, each serving both versions in turn")] = 4,
         seconds: Annotated[float, typer.Option(help="length of each closed loop")] = 20,
         clients: Annotated[list[int], typer.Option(help="closed-loop clients, each level in turn (repeatable)")] = [],
         backbone: Annotated[str, typer.Option(help="the index's backbone ('' for the default embedder's)")] = "",
         weights: Annotated[str, typer.Option(help="its weights, as the builder's --weights takes them")] = "default",
         quick: Annotated[bool, typer.Option(help="one short round, a tiny index, no docs")] = False,
         out: Annotated[Path, typer.Option(help="where the JSON goes")] = DOCS / "ab_serving.json") -> None:
    from model_store import stages

    tmp, folder, tag = demo_index("bench-ab-", quick, backbone, weights)
    photos = [p.read_bytes() for p in sorted(folder.glob("*.png"))]
    stages.promote(tag, "production", force=True)
    rounds, seconds = (1, 2) if quick else (rounds, seconds)
    levels = tuple(clients) or LEVELS
    old = checkout(before, tmp / "before")
    settings = dict(setting(pair) for pair in env)
    versions = {f"before ({before})": (old, hide_newer_packages(old, tmp / "hidden")),
                " ".join(["this checkout", *env]): (ROOT, settings)}
    results = []
    try:
        for i in range(rounds):
            results.append({})
            # which version goes first swaps each round: on this VM the second server of a round ran ~5% slower
            # at 4 clients whichever it was (docs/ab_entry_threads.json against docs/ab_entry_threads_6.json)
            for label, (root, server_env) in list(versions.items())[::-1 if i % 2 else 1]:
                with Server(tmp / f"serve-{i}-{root.name}.log", root=root, **server_env).wait() as srv:
                    results[-1][label] = loads(srv, photos, seconds, levels)
                print(json.dumps({"round": i, label: results[-1][label]}), flush=True)
    finally:
        remove_checkout(old)
    command = " ".join(["python -m bench.ab_serving", f"--before {before}", f"--rounds {rounds}", f"--seconds {seconds:g}",
                        *(f"--env {pair}" for pair in env), *(f"--clients {n}" for n in clients),
                        *([f"--backbone {backbone} --weights {weights}"] if backbone else [])])
    result = {"machine": machine(), "command": command, "backbone": backbone or "default", "weights": weights,
              "summary": {label: summary(results, label, levels) for label in versions}, "rounds": results}
    print(json.dumps(result["summary"], indent=2))
    if not quick:
        out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    typer.run(main)
