"""Keep the memory a forward pass frees for the next one, instead of handing it back to the kernel.

On a CPU every pass allocates its activations afresh and frees them at the end. glibc's malloc gives large
freed blocks back to the kernel: a block above its mmap threshold is a mapping of its own and is unmapped
when freed, and free memory at the top of a heap beyond its trim threshold is released. The next pass then
faults the same pages back in, and the kernel zeroes each one: measured on this project's default network,
one thread, ~3,000 page faults per pass of one photo and ~13,500 per batch of 4, 29-35% of the pass's time
(docs/PERFORMANCE.md, "Memory the network frees"). With a fixed mmap threshold at glibc's largest (32 MiB)
and a trim threshold far above what a pass holds, freed activations stay in the process and are reused:
few page faults once each batch size has run a few times (Embedder.warm_up runs each before a service
is ready).

Only on the main thread's arena. The service runs torch on a thread of its own (service.py), and glibc gives
a thread an arena of its own, made of heaps of at most 64 MiB, each deleted once all of it is free whatever
the trim threshold: with the thresholds alone a served worker still took 1,400-3,600 page faults per search at
16 clients; on a thread's own arena glibc's default faulted 1.5 times a pass in one script and 4,153 in
another (bench/freed_memory.py's), and the thresholds alone 2,374 in the first. So the embedder service
starts its workers with ONE_ARENA in their environment (every thread then allocates from the main heap, which
only the trim threshold shrinks: 4-32 faults per search), and elsewhere keep_freed_memory applies only when
called on the main thread, where the builder and the benchmarks run the network. glibc reads the arena limit
when the first thread's arena is made, so it must be set where the process starts.

The process keeps its peak memory instead of shrinking after each pass; activations above 32 MiB (a large
network at a large batch) are still mapped and unmapped each time.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
MMAP_THRESHOLD = 32 << 20  # glibc's largest on 64-bit (HEAP_MAX_SIZE / 2); a fixed value stops its adjusting
TRIM_THRESHOLD = 512 << 20
ONE_ARENA = {"name": "MALLOC_ARENA_MAX", "value": "1"}  # in the environment a process starts with


def keep_freed_memory() -> bool:
    """Set this process's malloc to keep freed blocks (glibc only) where the calling thread allocates from the
    main arena; whether it was set."""
    if threading.current_thread() is not threading.main_thread() and os.environ.get(ONE_ARENA["name"]) != "1":
        log.info("malloc: freed memory goes back to the system as before (a thread's own arena; see %s)", __name__)
        return False
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)  # absent outside glibc (musl, macOS)
    if mallopt is None:
        log.info("malloc: no mallopt here; freed memory goes back to the system as before")
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def give_back_freed_memory() -> bool:
    """Hand the free pages of every malloc arena back to the kernel (glibc's malloc_trim), for a process that has
    just freed far more than it goes on holding, such as the entry after a flood of large uploads (glibc keeps
    what it freed otherwise: query/guard.py, BodyBytes); False where there is no glibc to ask."""
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)  # absent outside glibc
    if trim is None:
        return False
    trim(0)
    return True
