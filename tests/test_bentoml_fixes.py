"""query/bentoml_fixes.py against BentoML's own batching dispatcher, run in process."""

from __future__ import annotations

import asyncio
import time

import bentoml._internal.marshal.dispatcher as dispatcher_module
import pytest
from bentoml._internal.marshal.dispatcher import CorkDispatcher, Optimizer

from query.bentoml_fixes import batch_as_soon_as_free

PASS_S = 0.02  # one batch's pass, whatever its size, like a network on a busy CPU


def burst_then_lone_call() -> tuple[float, float, list[int]]:
    """A dispatcher like BentoML's embedder endpoint: 80 calls at once, then one call alone. Returns the wait
    it learned from the burst, the lone call's seconds, and the batch sizes."""
    sizes: list[int] = []

    async def run() -> tuple[float, float]:
        async def embed(batch):
            sizes.append(len(batch))
            await asyncio.sleep(PASS_S)
            return batch

        dispatcher = CorkDispatcher(1000, 4, fallback=lambda: None, get_batch_size=lambda x: 1)
        call = dispatcher(embed)
        for _ in range(3):  # the dispatcher trains its cost model on its first calls
            await asyncio.gather(*(call(i) for i in range(4)))
        await asyncio.gather(*(call(i) for i in range(80)))  # queued behind each other: long waits
        dispatcher.optimizer.trigger_refresh()
        start = time.perf_counter()
        await call(0)
        lone = time.perf_counter() - start
        dispatcher.shutdown()
        return dispatcher.optimizer.wait, lone

    wait, lone = asyncio.run(run())
    return wait, lone, sizes


@pytest.fixture
def pristine_optimizer(monkeypatch):
    """BentoML's dispatcher as shipped, restored after the test whatever the test patched."""
    monkeypatch.setattr(Optimizer, "trigger_refresh", Optimizer.trigger_refresh)
    for name in ("controller", "outbound_call"):
        monkeypatch.setattr(CorkDispatcher, name, getattr(CorkDispatcher, name))
    monkeypatch.setattr(CorkDispatcher, "_waits_for_batches", False, raising=False)


def test_as_shipped_a_burst_teaches_the_dispatcher_to_hold_lone_calls_back(pristine_optimizer):
    wait, lone, _ = burst_then_lone_call()
    assert wait > 2 * PASS_S  # the time the burst spent queued, taken for time worth waiting
    assert lone > 3 * PASS_S  # so the next lone call waits for company (measured: ~160 ms)


def test_after_the_fix_a_lone_call_leaves_at_once_and_bursts_still_batch(pristine_optimizer):
    batch_as_soon_as_free()
    batch_as_soon_as_free()  # a second call changes nothing
    wait, lone, sizes = burst_then_lone_call()
    assert wait > 2 * PASS_S  # BentoML still learns the same wait, but it no longer holds anyone back
    assert lone < 3 * PASS_S  # measured: one pass, 20 ms
    assert max(sizes) == 4  # calls that queue behind a running batch still form full batches


def polls_during_one_long_pass(monkeypatch, max_latency_ms: int = 10_000) -> tuple[int, list]:
    """Two calls queued behind a 0.3 s pass: how often the dispatcher's loop slept to look again meanwhile,
    and what the queued calls got."""
    sleeps = []

    class CountingAsyncio:  # the dispatcher module's `asyncio`, counting its sleeps
        def __getattr__(self, name):
            return getattr(asyncio, name)

        @staticmethod
        async def sleep(seconds):
            sleeps.append(seconds)
            await asyncio.sleep(seconds)

    async def run() -> list:
        async def embed(batch):
            await asyncio.sleep(0.3 if len(batch) == 1 and batch[0] == "slow" else 0.001)
            return batch

        dispatcher = CorkDispatcher(max_latency_ms, 4, fallback=lambda: "cancelled", get_batch_size=lambda x: 1)
        call = dispatcher(embed)
        for _ in range(20):  # past the training calls
            await asyncio.gather(*(call(i) for i in range(3)))
        monkeypatch.setattr(dispatcher_module, "asyncio", CountingAsyncio())
        slow = asyncio.ensure_future(call("slow"))
        await asyncio.sleep(0.01)
        answers = await asyncio.gather(slow, call("a"), call("b"))
        dispatcher.shutdown()
        return answers

    answers = asyncio.run(run())
    return len(sleeps), answers


def test_as_shipped_the_loop_polls_every_millisecond_while_a_batch_runs(pristine_optimizer, monkeypatch):
    polls, answers = polls_during_one_long_pass(monkeypatch)
    assert polls > 50  # measured: ~300 in a 0.3 s pass
    assert answers == ["slow", "a", "b"]


def test_after_the_fix_the_loop_waits_for_the_batch_to_end(pristine_optimizer, monkeypatch):
    batch_as_soon_as_free()
    polls, answers = polls_during_one_long_pass(monkeypatch)
    assert polls == 0
    assert answers == ["slow", "a", "b"]  # and the two that queued leave together right after


def test_after_the_fix_calls_that_waited_past_max_latency_are_still_cancelled(pristine_optimizer, monkeypatch):
    batch_as_soon_as_free()
    _, answers = polls_during_one_long_pass(monkeypatch, max_latency_ms=100)
    assert answers[0] == "slow" and "cancelled" in answers[1:]
