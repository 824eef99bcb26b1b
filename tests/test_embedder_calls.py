"""The entry's calls to the embedder: deadlines, the one retry, what failures answer, limits from its pace.

The embedder here is a stand-in with BentoML's client's surface (`to_async.describe`, `to_async.embed`) whose
calls stall, drop or refuse on cue; a real `bentoml serve` drives the same paths in test_faults.py and
test_slow_network.py, in seconds instead of milliseconds.
"""

from __future__ import annotations

import asyncio
from http import HTTPStatus
from types import SimpleNamespace

import aiohttp
import numpy as np
import pytest
from bentoml.exceptions import BentoMLException

from query.embed_pace import RecentPaces, embed_pace
from query.embedder_calls import EmbedderCalls
from query.errors import ApiError

DEADLINE_S = 0.05


class StandIn:
    """Answers describe with `described[i]` on its i-th call and embed with one vector a photo; each call first
    does what `faults` holds next: "stall" (past any deadline), "drop" (a lost connection) or an HTTP status
    that BentoML's client raises."""

    def __init__(self, faults=(), described=({"tag": "net:1"},)):
        self.faults, self.described, self.calls = list(faults), list(described), 0
        self.to_async = SimpleNamespace(describe=self.describe, embed=self.embed)

    async def _fault(self) -> None:
        self.calls += 1
        fault = self.faults.pop(0) if self.faults else None
        if fault == "stall":
            await asyncio.sleep(60)
        if fault == "drop":
            raise aiohttp.ServerDisconnectedError()
        if isinstance(fault, HTTPStatus):
            raise BentoMLException(f"Error making request: {fault.value}", error_code=fault)

    async def describe(self) -> dict:
        await self._fault()
        return self.described[min(self.calls, len(self.described)) - 1]

    async def embed(self, batch: np.ndarray) -> np.ndarray:
        await self._fault()
        return np.ones((len(batch), 4), np.float32)


def pace_of(measured: dict):
    return embed_pace(measured.get("batch_s"), 4, 1, 1, DEADLINE_S, 32)


def calls_to(embedder: StandIn, retry_share: float = 0.1) -> EmbedderCalls:
    return EmbedderCalls(embedder, pace_of, max_batch=4, retry_share=retry_share, lost_s=30, request_timeout_s=5)


@pytest.mark.parametrize("fault", ["stall", "drop"])
def test_a_stalled_or_dropped_call_is_sent_once_more(fault):
    embedder = StandIn([fault])
    calls = calls_to(embedder)
    assert asyncio.run(calls.ask_tag()) == "net:1"
    assert embedder.calls == 2 and calls.health.lost_at is None


@pytest.mark.parametrize("fault, reason", [("stall", "did not answer in time"), ("drop", "is unreachable")])
def test_a_call_that_fails_twice_answers_503_saying_why_and_counts_as_lost(fault, reason):
    embedder = StandIn([fault, fault])
    calls = calls_to(embedder)
    with pytest.raises(ApiError, match=f"the embedder service {reason}") as raised:
        asyncio.run(calls.embed(np.zeros((1, 3, 8, 8), np.uint8)))
    assert raised.value.status == HTTPStatus.SERVICE_UNAVAILABLE
    assert embedder.calls == 2 and calls.health.lost_at is not None


def test_a_probe_tries_once_and_a_spent_budget_retries_nothing():
    embedder = StandIn(["stall"])
    with pytest.raises(ApiError):
        asyncio.run(calls_to(embedder).ask_tag(retry=False))
    assert embedder.calls == 1
    embedder = StandIn(["drop"] * 40)
    calls = calls_to(embedder, retry_share=0)
    for _ in range(20):  # the reserve of 10 retries, then none
        with pytest.raises(ApiError):
            asyncio.run(calls.ask_tag())
    assert embedder.calls == 20 + 10


@pytest.mark.parametrize("status, answer, message", [
    (HTTPStatus.UNAUTHORIZED, HTTPStatus.SERVICE_UNAVAILABLE, "give both services the same IMAGESEARCH_EMBEDDER_TOKEN"),
    (HTTPStatus.TOO_MANY_REQUESTS, HTTPStatus.TOO_MANY_REQUESTS, "the embedder is at capacity"),
    (HTTPStatus.SERVICE_UNAVAILABLE, HTTPStatus.TOO_MANY_REQUESTS, "the embedder is at capacity"),
])
def test_what_the_embedder_refuses_is_answered_at_once_and_it_counts_as_answering(status, answer, message):
    embedder = StandIn(["drop", "drop", status])
    calls = calls_to(embedder)
    with pytest.raises(ApiError, match="is unreachable"):
        asyncio.run(calls.ask_tag())
    assert calls.health.lost_at is not None
    with pytest.raises(ApiError, match=message) as raised:
        asyncio.run(calls.ask_tag())  # not sent again: it answered
    assert raised.value.status == answer and embedder.calls == 3 and calls.health.lost_at is None


def test_the_limits_follow_the_slowest_pass_of_the_embedder_served():
    embedder = StandIn(described=[{"tag": "net:1", "pace": {"batch_s": 0.2, "worker": "a"}},
                                  {"tag": "net:1", "pace": {"batch_s": 0.1, "worker": "b"}},
                                  {"tag": "net:1", "pace": {}},
                                  {"tag": "net:2", "pace": {"batch_s": 0.05, "worker": "c"}}])
    calls = calls_to(embedder)
    assert calls.pace == pace_of({}) and calls.photos.limit == 32  # nothing measured yet: the settings
    asyncio.run(calls.ask_tag())
    slowest = pace_of({"batch_s": 0.2})
    assert calls.pace == slowest and calls.photos.limit == slowest.photos_in_flight == 8
    asyncio.run(calls.ask_tag())  # another worker of the same embedder, faster: the slowest is kept
    assert calls.pace == slowest
    asyncio.run(calls.ask_tag())  # a worker that measured nothing changes nothing
    assert calls.pace == slowest
    asyncio.run(calls.ask_tag())  # a new embedder: its own pace
    assert calls.tag == "net:2" and calls.pace == pace_of({"batch_s": 0.05})


def test_a_slow_worker_not_heard_from_for_a_while_no_longer_holds_the_limits_back():
    """An embedder redeployed on faster hardware under the same tag: the old workers' pace is forgotten."""
    now = [0.0]
    reports = [{"batch_s": 0.4, "worker": "old-1"}, {"batch_s": 0.1, "worker": "new-1"},
               {"batch_s": 0.1, "worker": "new-2"}, {"batch_s": 0.1, "worker": "new-1"}]
    calls = EmbedderCalls(StandIn(described=[{"tag": "net:1", "pace": r} for r in reports]), pace_of,
                          max_batch=4, retry_share=0.1, lost_s=30, request_timeout_s=5,
                          paces=RecentPaces(forget_s=60, clock=lambda: now[0]))
    for at in (0, 30, 60):  # old-1 was heard 60 s ago: still counted
        now[0] = at
        asyncio.run(calls.ask_tag())
        assert calls.pace == pace_of({"batch_s": 0.4})
    now[0] = 61
    asyncio.run(calls.ask_tag())
    assert calls.pace == pace_of({"batch_s": 0.1}) and calls.photos.limit == pace_of({"batch_s": 0.1}).photos_in_flight


def test_the_last_report_counts_however_old():
    """A server that nobody probes hears the embedder once: its pace holds until another report comes."""
    now = [0.0]
    paces = RecentPaces(forget_s=60, clock=lambda: now[0])
    paces.hear({"batch_s": 0.4, "worker": "a"})
    now[0] = 3600
    assert paces.slowest() == {"batch_s": 0.4, "worker": "a"}
    paces.hear({"batch_s": 0.1})  # an embedder that names no worker: the report stands for itself
    assert paces.slowest() == {"batch_s": 0.1}


def test_photos_that_would_wait_past_the_request_timeout_get_429_with_when_to_retry():
    calls = calls_to(StandIn(described=[{"tag": "net:1", "pace": {"batch_s": 1.0}}]))
    asyncio.run(calls.ask_tag())  # 4 photos a second
    calls.refuse_what_would_time_out(8)  # 2 s of work, 3 s with the margin: within the 5 s
    with pytest.raises(ApiError, match=r"0 photos are queued ahead of this request's 16, about 4 s of work, too "
                                       r"close to the 5 s a request may take: retry in 1 s") as raised:
        calls.refuse_what_would_time_out(16)
    assert raised.value.status == HTTPStatus.TOO_MANY_REQUESTS and raised.value.headers == {"Retry-After": "1"}
