"""How long one embed call may take, and how many photos an entry keeps at the embedder, from the pass the
embedder measured.

Fixed limits fitted only the network they were tuned on: 1.2 s a call and 32 photos in flight suit the
default network on a CPU (a batch of 4 in ~0.17 s on one core). In front of VGG16, the original design's
network (the same batch in ~1.3 s), 32 photos in flight are ~5 s of queue: at 8 clients 98 of 122 searches
passed the deadline, were sent again and answered 503, while the embedder did the work for nothing, and at
16 clients 266 of 269 failed (docs/PERFORMANCE.md, section 6). The embedder times a full batch on the share
of the cores a busy worker gets and says so in `describe`; both services size their limits from it here.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

# The deadline over the slowest wait expected: a pass varies by ~25% between runs on a shared machine, and
# the load may run beside it.
MARGIN = 1.5
# Rounds of batches kept at the embedder: with two, a batch is queued at each worker when its pass ends, so
# no worker idles while the entry sends the next.
MIN_ROUNDS = 2
# How long an entry process counts a worker's report after it last heard it. Each readiness probe (every 5 s
# in deploy/k8s.yaml) reaches one entry process and, through it, one embedder worker: in 30 minutes an entry
# of 4 processes hears ~90 probes in each, and misses a given one of 8 embedder workers with a chance of
# (7/8)^90, 6 in a million. A worker not heard from for that long is gone (redeployed on other hardware,
# restarted); an embedder redeployed on faster hardware gets its own limits within the half hour.
FORGET_S = 1800.0


@dataclass(frozen=True)
class EmbedPace:
    deadline_s: float  # of one embed call of up to a batch of photos
    photos_in_flight: int  # per entry process
    why: str  # for the log: what was measured and what follows from it
    photos_per_s: float | None = None  # the embedder's rate with every worker busy; None: not measured

    def wait_s(self, photos: int) -> float | None:
        """Seconds the embedder takes to work through `photos` (None when it measured nothing)."""
        return photos / self.photos_per_s if self.photos_per_s else None


def embed_pace(batch_s: float | None, max_batch: int, workers: int, entries: int, deadline_s: float,
               max_photos: int) -> EmbedPace:
    """Limits for an embedder of `workers` processes that runs a batch of `max_batch` photos in `batch_s`
    seconds when all are busy, fed by `entries` entry processes, from the settings' `deadline_s` and
    `max_photos` (per entry). With R rounds of batches in flight (R x workers x max_batch photos), a photo
    admitted last waits at most R passes and its own: (R + 1) x batch_s. The most rounds the settings allow
    whose wait, times MARGIN, fits the deadline are kept, but never fewer than MIN_ROUNDS; where even those do
    not fit, the deadline grows to them. An embedder that measured nothing (batch_s None) gets the settings."""
    if not batch_s or batch_s <= 0:
        return EmbedPace(deadline_s, max_photos, "the embedder measured no pass: the settings' limits")
    per_round = workers * max_batch
    most = max(1, max_photos * entries // per_round)
    fit = math.floor(deadline_s / (MARGIN * batch_s)) - 1
    rounds = min(most, max(MIN_ROUNDS, fit))
    photos = max_photos if rounds == most else max(max_batch, rounds * per_round // entries)
    deadline = max(deadline_s, round(MARGIN * (rounds + 1) * batch_s, 2))
    why = (f"a batch of {max_batch} takes {batch_s:.2f} s on each of {workers} embedder worker(s): "
           f"{photos} photos in flight per entry process, embed deadline {deadline:.2f} s")
    return EmbedPace(deadline, photos, why, per_round / batch_s)


class RecentPaces:
    """The passes the embedder's workers reported (describe's "pace"), each kept FORGET_S after it was last
    heard; `slowest` sizes the entry's limits. Each worker times its own pass and a probe reaches one of them,
    so the slowest is kept while any slow worker is alive, and the limits tighten no longer once the slow
    workers are gone: an embedder redeployed on faster hardware under the same tag gets its own limits."""

    def __init__(self, forget_s: float = FORGET_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.forget_s, self.clock = forget_s, clock
        self.heard: dict[str, tuple[float, dict]] = {}  # worker -> (when last heard, its report)

    def hear(self, measured: dict) -> None:
        """A worker's report ({}: it measured nothing, and is not counted). A worker is named by its "worker";
        a report without one (an older embedder) stands for itself."""
        if not measured.get("batch_s"):
            return
        now = self.clock()
        self.heard[measured.get("worker") or repr(sorted(measured.items()))] = (now, measured)
        self.heard = {worker: (at, m) for worker, (at, m) in self.heard.items() if now - at <= self.forget_s}

    def slowest(self) -> dict:
        """The slowest report heard lately ({} for none)."""
        return max((m for _, m in self.heard.values()), key=lambda m: m["batch_s"], default={})

    def forget(self) -> None:
        self.heard.clear()
