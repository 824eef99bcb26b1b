"""Closed loops of searches driven by wrk: `concurrency` connections posting photos back to back.

The benchmarks' server, embedder and load generator share this machine's cores, so whatever CPU the load
generator takes is taken from the server. httpx's async client took 1.5-4 ms of CPU per search here (the
search itself ~40); wrk, written in C, takes ~0.15 (docs/PERFORMANCE.md, section 6). A load balancer, not
the server's cores, carries that work in production. Debian: `apt-get install wrk`.
"""

from __future__ import annotations

import re
import resource
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

BOUNDARY = "imagesearch-bench-boundary"
LUA = """
local bodies = {{}}
for i = 0, {last} do
  local f = assert(io.open("{folder}/" .. i .. ".bin", "rb"))
  bodies[#bodies + 1] = f:read("*all")
  f:close()
end
wrk.method = "POST"
wrk.headers["Content-Type"] = "multipart/form-data; boundary={boundary}"
local n = 0
request = function()
  n = n + 1
  return wrk.format(nil, "/search", nil, bodies[n % #bodies + 1])
end
"""


def search_body(photo: bytes, ctype: str, k: int = 10) -> bytes:
    """A /search request's multipart body: the photo in `image`, and `k`."""
    head = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"k\"\r\n\r\n{k}\r\n--{BOUNDARY}\r\n"
            f"Content-Disposition: form-data; name=\"image\"; filename=\"photo\"\r\nContent-Type: {ctype}\r\n\r\n")
    return head.encode() + photo + f"\r\n--{BOUNDARY}--\r\n".encode()


def ms(text: str) -> float:
    """wrk's duration ("512.30us", "41.2ms", "1.02s", "2.00m") in milliseconds."""
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()
    return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit]


def parse(out: str) -> dict:
    """Requests, failures (non-2xx answers and socket errors) and latency percentiles from wrk --latency."""
    sent = int(re.search(r"(\d+) requests in", out).group(1))
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    failed = (int(non_2xx.group(1)) if non_2xx else 0) + (sum(map(int, errors.groups())) if errors else 0)
    pct = dict(re.findall(r"^\s+(50|99)%\s+(\S+)\s*$", out, re.M))  # "1.20s " has a space after it
    return {"answered": sent - (int(non_2xx.group(1)) if non_2xx else 0), "failed": failed,
            "p50_ms": round(ms(pct["50"]), 1) if "50" in pct else 0.0,
            "p99_ms": round(ms(pct["99"]), 1) if "99" in pct else 0.0}


def closed_loop(url: str, photos: list[bytes], concurrency: int, seconds: float, ctype: str = "image/png") -> dict:
    """Searches per second, failures, p50 and p99 of `concurrency` clients posting `photos` in turn for `seconds`
    (whole seconds, at least 1), and the CPU seconds wrk itself took."""
    wrk = shutil.which("wrk")
    if wrk is None:
        raise RuntimeError("the benchmarks' closed loops need wrk (apt-get install wrk): a load generator in C, so "
                           "that the load's own CPU is not taken from the server on shared cores")
    with tempfile.TemporaryDirectory(prefix="bench-wrk-") as folder:
        for i, photo in enumerate(photos):
            Path(folder, f"{i}.bin").write_bytes(search_body(photo, ctype))
        script = Path(folder, "post.lua")
        script.write_text(LUA.format(last=len(photos) - 1, folder=folder, boundary=BOUNDARY))
        start, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
        run = subprocess.run([wrk, "-t1", f"-c{concurrency}", f"-d{max(1, round(seconds))}s", "--timeout", "30s",
                              "--latency", "-s", str(script), url], capture_output=True, text=True)
        elapsed, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
    if run.returncode != 0 or "requests in" not in run.stdout:
        raise RuntimeError(f"wrk failed ({run.returncode}): {run.stderr.strip() or run.stdout.strip()}")
    r = parse(run.stdout)
    return {"concurrency": concurrency, **r, "rps": round(r["answered"] / elapsed, 1),
            # the children reaped meanwhile: only wrk
            "load_generator_cpu_s": after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime}
