"""Faults of BentoML 1.4.39 behind slow or failed searches, fixed where they start (docs/PERFORMANCE.md, section 6).

All reach into BentoML's internals, so both are pinned to the version in requirements.txt and covered by
tests (tests/test_bentoml_fixes.py, and the service tests under load).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time

import aiohttp

log = logging.getLogger("bentoml.imagesearch")

IDLE_CONNECTION_S = 1.0


def tune_client(proxy: object) -> None:
    """Two faults of BentoML's client between services, behind the dropped and stalled embed calls (BentoML
    issue 4971): it replaces its aiohttp session every 100 calls and closes the old one while calls are still
    in flight on it (they fail with "Server disconnected"); and aiohttp keeps an idle connection for 15 s where
    the embedder's server (uvicorn) closes it after 5 s, so a call can be sent on a connection being closed.
    Here the session is kept, and idle connections are dropped after 1 s."""
    manager = getattr(getattr(proxy, "to_async", None), "_session_manager", None)
    if manager is None or not hasattr(manager, "_make_client"):  # in-process use has no HTTP hop
        return
    manager.max_requests = manager.max_age = math.inf
    make = manager._make_client

    def make_with_short_keepalive() -> aiohttp.ClientSession:
        session = make()
        if session.connector is not None:
            session.connector._keepalive_timeout = IDLE_CONNECTION_S
        return session

    manager._make_client = make_with_short_keepalive


def batch_as_soon_as_free() -> None:
    """Two faults of BentoML's adaptive batching loop (CorkDispatcher.controller), fixed by running it without
    them (the rest is BentoML's: its first calls train its cost model, and calls that waited past
    max_latency are cancelled):
    - it holds a lone request back while n x (its age + the per-photo cost) stays under the average wait of
      the last 50 batches, hoping for company. That average counts the time requests spent queued behind a
      running batch, so after a burst of load a lone search waits for company that does not come: measured
      38 ms p50 one at a time before a 15 s burst, 128 ms after it, still 110 ms 20 s later. A worker runs
      one batch at a time, so photos that arrive during a pass form the next batch anyway: here a batch
      leaves as soon as the worker is free, with whatever has queued (up to max_batch_size);
    - while a batch runs and calls wait, it wakes every 1 ms to look again: ~1,000 timer wake-ups a second
      in each busy embedder worker, on the core its torch thread computes on (on this VM, where every timer
      costs a trip to the hypervisor, the embedder spent ~20% more CPU per search). Here it sleeps until the
      running batch ends; calls past max_latency are then cancelled when a batch ends, not every millisecond."""
    from bentoml._internal.marshal.dispatcher import CorkDispatcher

    if getattr(CorkDispatcher, "_waits_for_batches", False):
        return
    outbound = CorkDispatcher.outbound_call

    async def outbound_call(self: CorkDispatcher, inputs_info: tuple, training: bool = False) -> None:
        """BentoML's, then wakes the loop: the batch has ended."""
        try:
            await outbound(self, inputs_info, training)
        finally:
            _batch_done(self).set()

    CorkDispatcher.controller = _controller
    CorkDispatcher.outbound_call = outbound_call
    CorkDispatcher._waits_for_batches = True


def _batch_done(dispatcher: object) -> asyncio.Event:
    event = getattr(dispatcher, "_batch_done", None)
    if event is None:
        event = dispatcher._batch_done = asyncio.Event()
    return event


async def _controller(self) -> None:  # noqa: ANN001 -- a CorkDispatcher
    """CorkDispatcher.controller of BentoML 1.4.39 without holding calls back and without polling."""
    try:
        skipped = self.optimizer.N_SKIPPED_SAMPLE
        await self.train_optimizer(skipped, skipped + 6, 1)
        for required, size in ((6, 1), (5, 2), (3, 3)):
            await self.train_optimizer(required, 1, size)
            self.optimizer.trigger_refresh()
    except Exception:  # noqa: BLE001
        log.exception("Error training optimizer")
    while True:
        try:
            async with self._wake_event:  # until a call is queued
                await self._wake_event.wait_for(self._queue.__len__)
            n, waited = len(self._queue), time.time() - self._queue[0].enqueue_time
            if n > 1 and waited + self.optimizer.o_a * n + self.optimizer.o_b >= self.max_latency:
                self._queue.popleft().future.cancel()
                continue
            if self._sema.is_locked():
                if n == 1 and waited >= self.max_latency:
                    self._queue.popleft().future.cancel()
                    continue
                done = _batch_done(self)
                done.clear()
                await done.wait()
                continue
            self._sema.acquire()
            self._loop.create_task(self.outbound_call(tuple(self._get_inputs())))
        except Exception:  # noqa: BLE001 -- as BentoML's loop: log and keep dispatching
            log.exception("Error processing batch requests")
