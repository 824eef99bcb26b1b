"""How long the service takes from `bentoml serve` to /readyz 200: this checkout against another commit.

    python -m bench.startup --before 4f3e2ae      # 5 rounds on the demo index; docs/startup.json
    python -m bench.startup --quick               # one start of this checkout, a tiny index (the tests')

A replica an autoscaler adds serves nothing until it is ready. Each round starts one version's server, waits
for readiness (polled every 50 ms), stops it, then does the same with the other version; which goes first
swaps each round, so the VM's drift hits both.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Annotated

import typer

from bench.ann_scale import machine
from bench.overhead import DOCS, checkout, demo_index, hide_newer_packages, remove_checkout
from bench.server import ROOT, Server


def seconds_to_ready(root: Path, env: dict[str, str], log: Path) -> float:
    start = time.perf_counter()
    with Server(log, root=root, **env) as srv:
        srv.wait(every=0.05)
        return round(time.perf_counter() - start, 2)


def main(before: Annotated[str, typer.Option(help="git ref to compare with ('' for this checkout only)")] = "",
         rounds: Annotated[int, typer.Option(min=1)] = 5,
         quick: Annotated[bool, typer.Option(help="one start of this checkout, a tiny index, no docs")] = False,
         out: Annotated[Path, typer.Option(help="where the JSON goes")] = DOCS / "startup.json") -> None:
    from model_store import stages

    tmp, _, tag = demo_index("bench-startup-", quick)
    stages.promote(tag, "production", force=True)
    versions: dict[str, tuple[Path, dict[str, str]]] = {"this checkout": (ROOT, {})}
    old = checkout(before, tmp / "before") if before and not quick else None
    if old:
        versions[f"before ({before})"] = (old, hide_newer_packages(old, tmp / "hidden"))
    seconds: dict[str, list[float]] = {label: [] for label in versions}
    try:
        for i in range(1 if quick else rounds):
            for label, (root, env) in list(versions.items())[::-1 if i % 2 else 1]:
                seconds[label].append(seconds_to_ready(root, env, tmp / f"serve-{i}-{root.name}.log"))
                print(json.dumps({"round": i, label: seconds[label][-1]}), flush=True)
    finally:
        if old:
            remove_checkout(old)
    command = " ".join(["python -m bench.startup", *([f"--before {before}"] if old else []), f"--rounds {rounds}"])
    result = {"machine": machine(), "command": command,
              "index": tag, "seconds_to_ready": seconds,
              "median_s": {label: statistics.median(s) for label, s in seconds.items()}}
    print(json.dumps(result, indent=2))
    if not quick:
        out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    typer.run(main)
