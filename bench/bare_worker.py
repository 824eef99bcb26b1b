"""One bare embedder in its own process, driven by bench.overhead over stdin and stdout (a JSON object a line).

    PYTHONPATH=<code to measure> python bench/bare_worker.py <embedder tag>

It imports the embedder from whatever code PYTHONPATH names (this checkout or an older one), so each row of
the overhead benchmark is compared with its own network. Jobs:
    {"threads": 0 or n, "batch": b, "seconds": s, "start_at": unix time}  -> {"images_per_s": ...}
    {"threads": 0 or n, "batch": b, "calls": n, "gap_ms": g}              -> {"ms": [per call]}
threads 0 is torch's default (one per core). A job waits for start_at, so that several workers start together.
gap_ms (default 0): idle time before each call, as a server's network idles between lone searches.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import torch

from model_store.embedder import load_embedder
from model_store.settings import get_settings


def main() -> None:
    settings = get_settings()
    embedder = load_embedder(sys.argv[1], settings.device, settings.half_precision)
    crop = embedder.config.preprocess.crop
    pixels = np.random.default_rng(0).integers(0, 256, (64, 3, crop, crop), dtype=np.uint8)
    default_threads = torch.get_num_threads()
    print(json.dumps({"threads": default_threads, "device": str(embedder.device), "half": embedder.half}), flush=True)
    for line in sys.stdin:
        job = json.loads(line)
        torch.set_num_threads(job["threads"] or default_threads)
        x = pixels[:job["batch"]]
        embedder.warm_up((len(x),))  # warm at this batch size and thread count (a CUDA graph where the server has one)
        while time.time() < job.get("start_at", 0):
            time.sleep(0.002)
        ms, start = [], time.perf_counter()
        while len(ms) < job.get("calls", 1 << 30) and time.perf_counter() - start < job.get("seconds", 1e9):
            if job.get("gap_ms"):
                time.sleep(job["gap_ms"] / 1000)
            t = time.perf_counter()
            embedder.embed(x)
            ms.append((time.perf_counter() - t) * 1000)
        elapsed = time.perf_counter() - start
        print(json.dumps({"images_per_s": len(ms) * len(x) / elapsed, "ms": ms}), flush=True)


if __name__ == "__main__":
    main()
