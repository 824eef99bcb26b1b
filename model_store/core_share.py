"""How the embedder's worker processes on one CPU box share its cores.

A worker that is the only one busy runs its batch on every core (one photo answers fastest that way);
workers busy at the same time take one share each, so two single-threaded passes run side by side
instead of one two-threaded pass (no thread waiting at a barrier for a core another process holds).
Measured on a 2-core VM (docs/PERFORMANCE.md, `bench.overhead`): one process with 2 threads embeds ~50
photos/s at its best batch size, two single-threaded processes ~62; one photo alone takes ~26 ms on 2
threads and ~48 ms on 1. Busy flags live in a few shared bytes, one per worker, named after the parent process
(the `bentoml serve` that started the workers), so they need no server of their own.
"""

from __future__ import annotations

import mmap
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, which container limits usually set)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def worker_count(setting: int, on_gpu: bool) -> int:
    """Embedder worker processes: the setting, else one on a GPU and one per core (at most 4) on a CPU."""
    if setting:
        return setting
    return 1 if on_gpu else min(available_cores(), MAX_AUTO_WORKERS)


# libgomp (torch's OpenMP on Linux) lets an idle team thread spin 300,000 times before it sleeps. Workers that
# share cores then spin on a core the other worker needs while its pass runs: at 16 clients, with the default
# 35-36 searches/s, p99 1.0-1.6 s and embed calls past their deadline; with 10,000, 39-40 searches/s and p99
# 0.65-0.72 s, a lone search as fast (39-40 ms p50). Measured alternating, docs/PERFORMANCE.md. A
# GOMP_SPINCOUNT set where the service starts wins.
SPIN_COUNT = {"name": "GOMP_SPINCOUNT", "value": "10000"}
MAX_AUTO_WORKERS = 4  # each worker holds a copy of the network and torch (~0.9 GB resident on the CPU build)


class CoreShare:
    """Busy flags of `workers` worker processes; `threads_for_batch()` sets torch's threads for the next pass."""

    def __init__(self, workers: int, index: int, cores: int | None = None, key: str | None = None):
        if not 0 <= index < workers:
            raise ValueError(f"worker index {index} is outside 0..{workers - 1}")
        self.workers, self.index, self.cores = workers, index, cores or available_cores()
        folder = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
        self.path = folder / f"imagesearch-embedder-cores-{key or os.getppid()}"
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size < workers:
                os.ftruncate(fd, workers)
            self._flags = mmap.mmap(fd, workers)
        finally:
            os.close(fd)
        self._flags[index] = 0  # a worker restarted after a crash clears the flag it may have left set

    def busy_workers(self) -> int:
        return sum(self._flags[:self.workers])

    @contextmanager
    def busy(self) -> Iterator[int]:
        """Mark this worker busy for one pass; yields the torch threads it should use, already set."""
        import torch

        self._flags[self.index] = 1
        threads = max(1, self.cores // max(1, self.busy_workers()))
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        try:
            yield threads
        finally:
            self._flags[self.index] = 0
