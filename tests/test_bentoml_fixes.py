"""query/bentoml_fixes.py against BentoML's own batching dispatcher, run in process."""

from __future__ import annotations

import asyncio
import inspect
import json
import subprocess
import sys
import time

import aiohttp
import bentoml
import bentoml._internal.utils.circus as bentoml_circus
import bentoml.serving
import numpy as np
import pytest
from aiohttp import web
from bentoml._internal.marshal.dispatcher import CorkDispatcher
from bentoml._internal.server.http import traffic
from starlette.responses import JSONResponse

from conftest import ROOT, asgi_call, run_env
from query.bentoml_fixes import (batching_backstop_at_least, media_types_worked_out_once, never_hold_batches_back,
                                 own_answers_in_one_shape, reuse_newest_first, start_dead_workers_again)

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
def pristine_dispatcher(monkeypatch):
    """BentoML's dispatcher as shipped, restored after the test whatever the test patched."""
    monkeypatch.setattr(CorkDispatcher, "controller", CorkDispatcher.controller)
    monkeypatch.setattr(CorkDispatcher, "_holds_nothing_back", False, raising=False)
    monkeypatch.setattr(CorkDispatcher, "backstop_floor_s", 0.0, raising=False)


def test_as_shipped_a_burst_teaches_the_dispatcher_to_hold_lone_calls_back(pristine_dispatcher):
    wait, lone, _ = burst_then_lone_call()
    assert wait > 2 * PASS_S  # the time the burst spent queued, taken for time worth waiting
    assert lone > 3 * PASS_S  # so the next lone call waits for company (measured: ~160 ms)


def test_after_the_fix_a_lone_call_leaves_at_once_and_bursts_still_batch(pristine_dispatcher):
    never_hold_batches_back()
    never_hold_batches_back()  # a second call changes nothing
    _, lone, sizes = burst_then_lone_call()
    assert lone < 3 * PASS_S  # measured: one pass, 20 ms
    assert max(sizes) == 4  # calls that queue behind a running batch still form full batches


FIRST_CALLS = 12
LONG_PASS_S = 0.1


def a_new_workers_first_calls(burst: int = 0) -> tuple[list[float], list[int], int]:
    """A new dispatcher like the embedder's: `burst` calls at once (if any), then FIRST_CALLS calls one at a
    time. Returns each lone call's seconds in the queue before its batch started, the batch sizes, and how
    many calls got no answer (BentoML cancels a call its cost model expects to wait too long)."""
    waits: list[float] = []
    sizes: list[int] = []
    starts: list[float] = []

    async def run() -> int:
        async def embed(batch):
            starts.append(time.perf_counter())
            sizes.append(len(batch))
            await asyncio.sleep(LONG_PASS_S)
            return batch

        dispatcher = CorkDispatcher(3000, 4, fallback=lambda: None, get_batch_size=lambda x: 1)
        call = dispatcher(embed)
        answers = list(await asyncio.gather(*(call(i) for i in range(burst))))
        for i in range(FIRST_CALLS):
            sent = time.perf_counter()
            answers.append(await call(i))
            waits.append(starts[-1] - sent)
        dispatcher.shutdown()
        return answers.count(None)

    unanswered = asyncio.run(run())
    return waits, sizes, unanswered


def test_as_shipped_a_new_worker_holds_lone_calls_back_while_it_trains(pristine_dispatcher):
    waits, _, _ = a_new_workers_first_calls()
    assert max(waits) > LONG_PASS_S  # calls 10 and 11 wait for company that does not come (measured: 0.15-0.2 s)


def test_after_the_fix_a_new_worker_sends_every_lone_call_at_once(pristine_dispatcher):
    never_hold_batches_back()
    waits, sizes, _ = a_new_workers_first_calls()
    assert max(waits) < LONG_PASS_S / 2  # measured: well under 1 ms
    assert sizes == [1] * FIRST_CALLS


def test_after_the_fix_a_burst_at_start_batches_and_drops_nothing(pristine_dispatcher):
    never_hold_batches_back()
    _, sizes, unanswered = a_new_workers_first_calls(burst=40)
    assert unanswered == 0
    assert max(sizes) == 4 and sum(sizes) == 40 + FIRST_CALLS


POLL_S = 0.5  # the dispatcher's poll interval in these tests (BentoML's: 1 ms), so a poll is easy to see


def gaps_between_batches(rounds: int = 3, max_latency_ms: int = 3000) -> tuple[list[float], list]:
    """Each round, one call's batch is held running while two more calls queue behind it, then ends. Returns
    the seconds from each held batch's end to the next batch's start, and every call's answer (None: refused)."""
    gaps: list[float] = []

    async def run() -> list:
        starts: list[float] = []
        held = asyncio.Event()

        async def embed(batch):
            starts.append(time.perf_counter())
            if batch[0] == "held":
                await held.wait()
                held.clear()
            return batch

        dispatcher = CorkDispatcher(max_latency_ms, 4, fallback=lambda: None, get_batch_size=lambda x: 1)
        dispatcher.TICKET_INTERVAL = POLL_S
        call = dispatcher(embed)
        answers = []
        for _ in range(rounds):
            first = asyncio.ensure_future(call("held"))
            await asyncio.sleep(0.05)  # its batch is running
            queued = [asyncio.ensure_future(call("queued")) for _ in range(2)]
            await asyncio.sleep(0.15)  # the queued calls wait behind it
            ended = time.perf_counter()
            held.set()
            answers += await asyncio.gather(first, *queued)
            gaps.append(starts[-1] - ended)
        dispatcher.shutdown()
        return answers

    answers = asyncio.run(run())
    return gaps, answers


def test_as_shipped_the_next_batch_waits_for_the_dispatchers_poll(pristine_dispatcher):
    gaps, _ = gaps_between_batches()
    assert max(gaps) > POLL_S / 4  # it finds the worker free at its next poll (BentoML's: every ms)


def test_after_the_fix_the_next_batch_leaves_when_the_running_one_ends(pristine_dispatcher):
    never_hold_batches_back()
    gaps, answers = gaps_between_batches()
    assert max(gaps) < POLL_S / 10  # measured: well under a millisecond
    assert answers == ["held", "queued", "queued"] * 3  # the two queued calls left together, none refused


def test_after_the_fix_calls_queued_past_max_latency_are_still_refused(pristine_dispatcher):
    never_hold_batches_back()
    _, answers = gaps_between_batches(rounds=1, max_latency_ms=100)  # queued 150 ms: past 100
    assert answers == ["held", None, "queued"]  # the oldest refused (BentoML answers 503), the newest sent


def test_a_slower_network_raises_the_backstop_to_its_embed_deadline(pristine_dispatcher):
    """max_latency_ms is fixed where the service is defined; an embedder whose measured pass asks for a longer
    embed deadline raises the backstop with it, so calls the entry still waits for are not refused."""
    never_hold_batches_back()
    batching_backstop_at_least(1.0)
    _, answers = gaps_between_batches(rounds=1, max_latency_ms=100)  # queued 150 ms: under 1 s
    assert answers == ["held", "queued", "queued"]


def connections_used_one_at_a_time(newest_first: bool) -> list[int]:
    """A real aiohttp server on 127.0.0.1 and a client as BentoML makes it: 4 calls at once open 4
    connections, then 12 calls one at a time. Returns the client port that carried each lone call."""

    async def run() -> list[int]:
        async def handler(request: web.Request) -> web.Response:
            await asyncio.sleep(0.02 if request.query.get("slow") else 0)
            return web.Response(text=str(request.transport.get_extra_info("peername")[1]))

        app = web.Application()
        app.router.add_get("/", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        connector = aiohttp.TCPConnector(keepalive_timeout=5)
        if newest_first:
            reuse_newest_first(connector)
        try:
            async with aiohttp.ClientSession(connector=connector) as session:
                async def get(path: str) -> int:
                    async with session.get(f"http://127.0.0.1:{port}{path}") as r:
                        return int(await r.text())

                assert len(set(await asyncio.gather(*(get("/?slow=1") for _ in range(4))))) == 4
                return [await get("/") for _ in range(12)]
        finally:
            await runner.cleanup()

    return asyncio.run(run())


def test_as_shipped_calls_one_at_a_time_cycle_through_every_idle_connection():
    assert len(set(connections_used_one_at_a_time(newest_first=False))) == 4


def test_after_the_fix_calls_one_at_a_time_keep_to_one_connection():
    assert len(set(connections_used_one_at_a_time(newest_first=True))) == 1


def array_service():
    """A BentoML service whose API answers an array, as the embedder's does; a new class each call."""

    @bentoml.service
    class Arrays:
        @bentoml.api
        def double(self, batch: np.ndarray) -> np.ndarray:
            return batch * 2

    return Arrays


def schemas_built_for(spec, responses: int) -> tuple[int, list[str]]:
    """How many JSON schemas BentoML builds to answer `responses` responses' media types, and the types."""
    built = []
    schema = spec.model_json_schema

    def counted(*args, **kwargs):
        built.append(1)
        return schema(*args, **kwargs)

    spec.model_json_schema = counted
    try:
        types = [spec.mime_type() for _ in range(responses)]
    finally:
        spec.model_json_schema = schema
    return len(built), types


def test_as_shipped_each_array_response_builds_a_json_schema():
    spec = array_service().apis["double"].output_spec
    built, types = schemas_built_for(spec, 5)
    assert built == 5 and set(types) == {"application/json"}


def test_after_the_fix_the_media_type_is_worked_out_once():
    service = array_service()
    media_types_worked_out_once(service)
    built, types = schemas_built_for(service.apis["double"].output_spec, 5)
    assert built == 0 and set(types) == {"application/json"}  # the same answer, no schema built


@pytest.fixture
def workers_as_shipped_in_a_container(monkeypatch):
    """BentoML's watchers and arbiter as shipped (restored after the test), inside a container as its image says."""
    for module, name in ((bentoml.serving, "create_watcher"), (bentoml_circus, "create_standalone_arbiter")):
        monkeypatch.setattr(module, name, inspect.unwrap(getattr(module, name)))
    monkeypatch.setenv("BENTOML_CONTAINERIZED", "true")


def a_watcher_respawns() -> bool:
    """Whether circus would start a dead worker of a service watcher again, as `bentoml serve` builds it."""
    return bentoml.serving.create_watcher(name="service_X", args=["-c", "pass"], use_sockets=False).respawn


def seconds_between_checks() -> float:
    """How often the arbiter `bentoml serve` builds looks for dead workers."""
    return bentoml_circus.create_standalone_arbiter([]).check_delay


def test_as_shipped_a_dead_worker_stays_dead_in_a_container(workers_as_shipped_in_a_container):
    assert not a_watcher_respawns()
    assert seconds_between_checks() == 10


def test_after_the_fix_a_dead_worker_is_started_again_within_a_check(workers_as_shipped_in_a_container):
    start_dead_workers_again(0.5)
    start_dead_workers_again(0.5)  # twice: still one wrapper
    assert a_watcher_respawns()
    assert seconds_between_checks() == 0.5
    assert inspect.unwrap(bentoml.serving.create_watcher) is bentoml.serving.create_watcher.__wrapped__


@pytest.fixture
def traffic_as_shipped(monkeypatch):
    """BentoML's traffic module with its own JSONResponse (the service's import replaces it), restored after."""
    monkeypatch.setattr(traffic, "JSONResponse", JSONResponse)


def backstop_answer() -> tuple[int, dict, dict]:
    """A request whose app never answers, through BentoML's real TimeoutMiddleware set to 0.1 s."""
    async def never(scope, receive, send):
        await asyncio.sleep(3600)

    scope = {"type": "http", "method": "POST", "path": "/search", "headers": [], "query_string": b""}
    status, headers, body = asyncio.run(asgi_call(traffic.TimeoutMiddleware(never, timeout=0.1), scope))
    return status, headers, json.loads(body)


def test_as_shipped_the_backstop_answers_in_a_shape_of_its_own(traffic_as_shipped):
    status, headers, body = backstop_answer()
    assert status == 504 and set(body) == {"error"} and b"x-content-type-options" not in headers, (headers, body)


def test_after_the_fix_the_backstop_answers_in_the_one_shape_and_says_nosniff(traffic_as_shipped):
    own_answers_in_one_shape()
    status, headers, body = backstop_answer()
    assert status == 504 and body == {"error": "Not able to process the request in 0.1 seconds: retry", "field": None}
    assert headers[b"x-content-type-options"] == b"nosniff", headers


def test_the_service_makes_bentomls_own_answers_in_the_one_shape():
    """The fix holds where it counts: in every process that imports the service (each worker does)."""
    code = "import service; from bentoml._internal.server.http import traffic; print(traffic.JSONResponse.__name__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=run_env(), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.split()[-1] == "in_one_shape", out.stderr[-2000:]
