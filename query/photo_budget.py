"""Photos an entry process has at the embedder at once.

The guard bounds requests in flight, but a /search_batch request carries up to 16 photos: 8 clients sending
batches put ~128 photos in the embedder's queue, each embed call then waited past its deadline, and 108 of
111 requests answered 503 while the embedder did the work for nothing (docs/PERFORMANCE.md, section 6). Each
call now waits, first come first served, until its photos fit in the budget; its deadline starts once they do.
"""

from __future__ import annotations

import asyncio
from collections import deque
from contextlib import asynccontextmanager, suppress
from typing import AsyncIterator


class PhotoBudget:
    """At most `limit` photos held at once; a call for more than `limit` holds all of them, alone. The limit
    may change (resize) while calls hold and wait: each call gives back what it was granted."""

    def __init__(self, limit: int) -> None:
        self.limit = self.free = limit
        self.waiting: deque[tuple[int, asyncio.Future]] = deque()

    @asynccontextmanager
    async def hold(self, photos: int) -> AsyncIterator[None]:
        n = min(photos, self.limit)
        if self.waiting or self.free < n:
            turn = asyncio.get_running_loop().create_future()
            self.waiting.append((photos, turn))
            try:
                n = await turn  # the photos granted, under the limit of when its turn came
            except asyncio.CancelledError:
                if turn.done() and not turn.cancelled():  # granted as it was cancelled: give the photos back
                    self._give_back(turn.result())
                else:
                    with suppress(ValueError):
                        self.waiting.remove((photos, turn))
                    self._wake()  # the calls behind it may fit now
                raise
        else:
            self.free -= n
        try:
            yield
        finally:
            self._give_back(n)

    def ahead(self) -> int:
        """Photos held and waiting: those a call made now would have ahead of it."""
        return self.limit - self.free + sum(min(photos, self.limit) for photos, turn in self.waiting if not turn.done())

    def resize(self, limit: int) -> None:
        """At most `limit` photos from now on; calls already holding more finish as they are."""
        self.free += limit - self.limit
        self.limit = limit
        self._wake()

    def _give_back(self, n: int) -> None:
        self.free += n
        self._wake()

    def _wake(self) -> None:
        while self.waiting:
            photos, turn = self.waiting[0]
            n = min(photos, self.limit)
            if not turn.done() and n > self.free:
                return
            self.waiting.popleft()
            if turn.done():  # cancelled while it waited
                continue
            self.free -= n
            turn.set_result(n)
