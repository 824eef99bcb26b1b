"""How the embedder's worker processes on one CPU box share its cores.

A worker that is the only one busy runs its batch on every core (one photo answers fastest that way);
workers busy at the same time take one share each, so two single-threaded passes run side by side
instead of one two-threaded pass (no thread waiting at a barrier for a core another process holds).
Measured on a 2-core VM (docs/PERFORMANCE.md, `bench.overhead`): one process with 2 threads embeds ~50
photos/s at its best batch size, two single-threaded processes ~62; one photo alone takes ~26 ms on 2
threads and ~48 ms on 1.

Cores are never given out twice. A pass holds one lock per torch thread it runs, byte-range locks on a
shared file, one byte per core, which the kernel drops when the process holding them dies. A worker that
finds every core taken waits (flagged as waiting) until a pass ends; a pass takes only its share of the
free cores while other workers are busy, waiting, or ran a pass within the last RECENT_S. Until 2026-12-03
a worker chose its threads from busy flags alone, so a pass that started alone on both cores kept them
when the other worker started beside it on one: 3 threads on 2 cores, and the default network's 2-thread
pass took 158 ms instead of 48 (66 on one thread; `python -m bench.oversubscribe`, docs/oversubscribe.json).
That was behind embed calls of 300-450 ms at 4 clients, and the 2 s searches of the promote/rollback test.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import struct
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import psutil


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, which container limits usually set)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# Sharing needs Linux's open-file-description locks; elsewhere a CPU gets one worker on every core.
SHARING = hasattr(fcntl, "F_OFD_SETLK")


def worker_count(setting: int, on_gpu: bool) -> int:
    """Embedder worker processes: the setting, else one on a GPU and one per core (at most 4) on a CPU."""
    if setting:
        return setting
    return 1 if on_gpu or not SHARING else min(available_cores(), MAX_AUTO_WORKERS)


def share_of_worker(workers: int, worker_index: int | None, on_gpu: bool, fixed_threads: int) -> CoreShare | None:
    """The cores embedder worker `worker_index` (1, 2, ... under `bentoml serve`; None when called directly) of
    `workers` shares with the others; None where it does not share: on a GPU, alone, or where
    IMAGESEARCH_TORCH_THREADS fixes the threads (`fixed_threads`)."""
    if on_gpu or workers == 1 or worker_index is None or fixed_threads or not SHARING:
        return None
    return CoreShare(workers, worker_index - 1)


def busy_threads(workers: int) -> int:
    """torch threads of a worker's pass while every one of `workers` is busy."""
    return max(1, available_cores() // workers)


# libgomp (torch's OpenMP on Linux) lets an idle team thread spin 300,000 times before it sleeps. Workers that
# share cores then spin on a core the other worker needs while its pass runs: at 16 clients, with the default
# 35-36 searches/s, p99 1.0-1.6 s and embed calls past their deadline; with 10,000, 39-40 searches/s and p99
# 0.65-0.72 s, a lone search as fast (39-40 ms p50). Measured alternating, docs/PERFORMANCE.md. A
# GOMP_SPINCOUNT set where the service starts wins.
SPIN_COUNT = {"name": "GOMP_SPINCOUNT", "value": "10000"}
MAX_AUTO_WORKERS = 4  # each worker holds a copy of the network and torch (~0.9 GB resident on the CPU build)


# A worker waits at most this long for a core (or longer, `max_wait_s`, for a network whose pass takes longer);
# then it runs on one thread anyway, so that a pass held up elsewhere can never stall it (the default
# network's embed deadline is 1.2 s; its pass of 4 photos on one core ~0.17 s here).
MAX_WAIT_S = 0.5
POLL_S = 0.0005
# A worker whose last pass ended this recently still counts as busy: under load it is only between two
# batches (answering one, taking the next), and a pass that took every core then would make it wait. Tried
# 0.05 and 0.5 s (bench.ab_serving, 2026-12-03): with 0.05, 20-30% fewer searches/s at 4 clients than the
# busy flags before; with 0.5, lone searches as fast and p99 at 4 clients lower (docs/PERFORMANCE.md).
RECENT_S = 0.5
IDLE, WAITING, BUSY = 0, 1, 2
FOLDER = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())  # memory, where there is one
FILE_PREFIX = "imagesearch-embedder-cores-"  # then the process id of the server's supervisor


class CoreShare:
    """Cores shared by `workers` worker processes; `busy()` holds cores for one pass and sets torch's threads."""

    def __init__(self, workers: int, index: int, cores: int | None = None, key: str | None = None):
        if not 0 <= index < workers:
            raise ValueError(f"worker index {index} is outside 0..{workers - 1}")
        self.workers, self.index, self.cores = workers, index, cores or available_cores()
        self.max_wait_s = MAX_WAIT_S
        remove_stale_files(FOLDER)
        self.path = FOLDER / f"{FILE_PREFIX}{key or os.getppid()}"
        # bytes 0..cores-1: one lock each (never written); per worker a state byte (locked while the worker
        # lives) and, 8 bytes each, when its last pass ended
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        size = self.cores + 9 * workers
        if os.fstat(self._fd).st_size < size:
            os.ftruncate(self._fd, size)
        self._shared = mmap.mmap(self._fd, size)
        if not _lock(self._fd, self._state_byte(index), fcntl.F_WRLCK):  # held for this worker's life
            raise RuntimeError(f"{self.path}: embedder worker {index} is already running")
        self._set(IDLE, ended=0.0)  # a worker restarted after a crash clears what it may have left

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)  # drops any lock still held

    def _state_byte(self, worker: int) -> int:
        return self.cores + worker

    def _ended_at(self, worker: int) -> int:
        return self.cores + self.workers + 8 * worker

    def _set(self, state: int, ended: float | None = None) -> None:
        self._shared[self._state_byte(self.index)] = state
        if ended is not None:
            struct.pack_into("d", self._shared, self._ended_at(self.index), ended)

    def _others(self) -> Iterator[tuple[int, float]]:
        """(state, when its last pass ended) of each other running worker: each holds a lock on its state
        byte while it lives, so a dead worker's stale state is skipped."""
        for w in range(self.workers):
            if w != self.index and not _lock(self._fd, self._state_byte(w), fcntl.F_WRLCK, test=True):
                yield self._shared[self._state_byte(w)], struct.unpack_from("d", self._shared, self._ended_at(w))[0]

    def others(self, state: int) -> int:
        """Other running workers in `state` (IDLE, WAITING, BUSY)."""
        return sum(st == state for st, _ in self._others())

    def others_active(self) -> int:
        """Other running workers busy, waiting for a core, or between two passes."""
        now = time.monotonic()
        return sum(st != IDLE or now - ended < RECENT_S for st, ended in self._others())

    def held_elsewhere(self) -> int:
        """Cores that other passes hold now."""
        return sum(not _lock(self._fd, core, fcntl.F_WRLCK, test=True) for core in range(self.cores))

    @contextmanager
    def busy(self) -> Iterator[int]:
        """Hold cores for one pass; yields the torch threads it should use (one per core held), already set."""
        import torch

        held = self._grab() or self._wait_for_a_core()
        self._set(BUSY)
        share = max(1, len(held) // (1 + self.others_active()))
        for core in held[share:]:
            _lock(self._fd, core, fcntl.F_UNLCK)
        held = held[:share]
        if torch.get_num_threads() != share:
            torch.set_num_threads(share)
        try:
            yield share
        finally:
            for core in held:
                _lock(self._fd, core, fcntl.F_UNLCK)
            self._set(IDLE, ended=time.monotonic())

    def _wait_for_a_core(self) -> list[int]:
        self._set(WAITING)
        deadline = time.monotonic() + self.max_wait_s
        while time.monotonic() < deadline:
            time.sleep(POLL_S)
            if held := self._grab():
                return held
        return []  # held up elsewhere: run on one thread without a lock

    def _grab(self) -> list[int]:
        """Lock every free core; their numbers."""
        return [core for core in range(self.cores) if _lock(self._fd, core, fcntl.F_WRLCK)]


def remove_stale_files(folder: Path) -> None:
    """The files of servers whose supervisor is gone (they are named after its process id): a few bytes
    each, but one per server start, and /dev/shm is memory."""
    for path in folder.glob(f"{FILE_PREFIX}*"):
        pid = path.name.removeprefix(FILE_PREFIX)
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            path.unlink(missing_ok=True)


def _lock(fd: int, byte: int, kind: int, test: bool = False) -> bool:
    """Lock (F_WRLCK) or unlock (F_UNLCK) one byte without waiting; False when another holder has it (with
    `test`, only say whether the lock could be taken). Linux's open-file-description locks: two CoreShares
    conflict even in one process, and the kernel drops a lock when its holder dies."""
    flock = struct.pack("hhqqi4x", kind, os.SEEK_SET, byte, 1, 0)
    try:
        got = fcntl.fcntl(fd, fcntl.F_OFD_GETLK if test else fcntl.F_OFD_SETLK, flock)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return not test or struct.unpack("hhqqi4x", got)[0] == fcntl.F_UNLCK
