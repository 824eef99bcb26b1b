"""The entry's calls to the Embedder service, and what their failures tell the client.

Each call has a deadline, one embed deadline for each batch its photos fill; a call that stalls or drops is
sent once more (embedding is idempotent; BentoML issue 4971 drops or stalls a reused connection) while the
retry budget allows, then the client gets a 503 that says so. The photos an entry has at the embedder are
bounded (query/photo_budget.py), and a request whose photos would wait past its timeout gets a 429 before
they are decoded. Both limits follow the pass the embedder measured and reports in `describe`
(query/embed_pace.py); every answer and failure goes to the embedder's health, which /livez reads.
"""

from __future__ import annotations

import asyncio
import logging
import math
from http import HTTPStatus
from typing import Awaitable, Callable, TypeVar

import aiohttp
import numpy as np
from bentoml.exceptions import BentoMLException

from query.embed_pace import MARGIN, EmbedPace, RecentPaces
from query.embedder_health import EmbedderHealth
from query.errors import ApiError
from query.photo_budget import PhotoBudget
from query.retry_budget import RetryBudget

log = logging.getLogger("bentoml.imagesearch")
T = TypeVar("T")


class EmbedderCalls:
    """Calls to `proxy` (the entry's `bentoml.depends(Embedder)`), which batches up to `max_batch` photos a
    pass. `pace_of` turns what the embedder measured (its describe's "pace", {} for nothing) into limits.
    Used from one event loop."""

    def __init__(self, proxy, pace_of: Callable[[dict], EmbedPace], *, max_batch: int, retry_share: float,
                 lost_s: float, request_timeout_s: float, paces: RecentPaces | None = None) -> None:
        self.proxy, self.pace_of, self.max_batch = proxy, pace_of, max_batch
        self.request_timeout_s = request_timeout_s
        self.tag: str | None = None  # of the embedder the embedder service runs, once it answered
        self.paces = paces or RecentPaces()  # the passes the embedder's workers reported lately
        self.pace = pace_of({})
        self.photos = PhotoBudget(self.pace.photos_in_flight)
        self.retries = RetryBudget(retry_share)
        self.health = EmbedderHealth(proxy, lost_s)

    async def ask_tag(self, retry: bool = True) -> str | None:
        """The tag of the embedder the embedder service runs, asked now (and kept in `tag`), and the pass it
        measured."""
        described = await self.call(self.proxy.to_async.describe, retry=retry)
        if described.get("tag") != self.tag:
            self.paces.forget()
        self.tag = described.get("tag")
        self._learn_pace(described.get("pace") or {})
        return self.tag

    async def known_tag(self) -> str | None:
        """The tag of the embedder the embedder service runs, asked until it answers once."""
        return self.tag if self.tag is not None else await self.ask_tag()

    def _learn_pace(self, measured: dict) -> None:
        """Size the embed deadline and the photos in flight from the slowest pass that a worker of this
        embedder reported lately (query/embed_pace.py, RecentPaces)."""
        self.paces.hear(measured)
        pace = self.pace_of(self.paces.slowest())
        if pace != self.pace:
            log.info("embed limits: %s", pace.why)
            self.pace = pace
            self.photos.resize(pace.photos_in_flight)

    async def embed(self, batch: np.ndarray) -> np.ndarray:
        """The embedder's descriptors of `batch`, once its photos fit among those in flight."""
        self.refuse_what_would_time_out(len(batch))  # at once in line: no other call between this and the hold
        async with self.photos.hold(len(batch)):
            return await self.call(lambda: self.proxy.to_async.embed(batch), len(batch))

    def refuse_what_would_time_out(self, photos: int) -> None:
        """429 at once, with the seconds to wait, for photos the embedder would hardly reach before the request's
        timeout stops it with a 503: those whose wait, from the measured pass (query/embed_pace.py) and MARGIN
        times, is past that timeout. Only /search_batch calls stacked up get there (the default network on
        2 cores: over 300 photos queued ahead)."""
        ahead = self.photos.ahead()
        wait_s = self.pace.wait_s(ahead + photos)
        if wait_s is None or MARGIN * wait_s <= self.request_timeout_s:
            return
        retry = math.ceil(wait_s - self.request_timeout_s / MARGIN)  # when the queue ahead is short enough
        raise ApiError(f"the service is at capacity: {ahead} photos are queued ahead of this request's {photos}, "
                       f"about {wait_s:.0f} s of work, too close to the {self.request_timeout_s:g} s a request "
                       f"may take: retry in {retry} s", HTTPStatus.TOO_MANY_REQUESTS, headers={"Retry-After": str(retry)})

    async def call(self, call: Callable[[], Awaitable[T]], photos: int = 1, retry: bool = True) -> T:
        """One call to the embedder service, with a deadline (one embed deadline for each embedder batch the
        photos fill), sent once more on a stall or a drop while the retry budget allows. retry=False: one try,
        nothing logged."""
        failure: Exception | None = None
        deadline_s = self.pace.deadline_s * -(-photos // self.max_batch)
        self.retries.sent()
        for attempt in (1, 2):
            try:
                answer = await asyncio.wait_for(call(), deadline_s)
                self.health.answered()
                return answer
            except (asyncio.TimeoutError, aiohttp.ClientConnectionError, RuntimeError) as exc:
                # RuntimeError: "Session is closed", when BentoML closes its client at shutdown
                failure = exc
                if not retry:
                    break
                if attempt == 1 and self.retries.take():
                    log.warning("embedder call 1 failed (%s): sending it again", type(exc).__name__)
                    continue
                log.warning("embedder call %d failed (%s)%s", attempt, type(exc).__name__,
                            ": retry budget spent" if attempt == 1 else "")
                break
            except BentoMLException as exc:
                self.health.answered()  # with an error
                if exc.error_code == HTTPStatus.UNAUTHORIZED:
                    raise ApiError("the embedder service refused the call: give both services the same "
                                   "IMAGESEARCH_EMBEDDER_TOKEN", HTTPStatus.SERVICE_UNAVAILABLE) from None
                if exc.error_code in (HTTPStatus.TOO_MANY_REQUESTS, HTTPStatus.SERVICE_UNAVAILABLE):
                    raise ApiError("the embedder is at capacity: retry in a second",
                                   HTTPStatus.TOO_MANY_REQUESTS) from None
                raise
        reason = "did not answer in time" if isinstance(failure, asyncio.TimeoutError) else "is unreachable"
        self.health.lost()
        raise ApiError(f"the embedder service {reason} (restarting?): retry in a few seconds",
                       HTTPStatus.SERVICE_UNAVAILABLE)
