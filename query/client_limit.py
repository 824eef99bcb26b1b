"""A fair share for each client: a token bucket of photos per client address.

`max_concurrency` protects the service, not its other users: one client that sends as fast as it can fills
every place and everyone else gets 429. With a per-client rate, that client gets 429 once it has used its
burst, and the others are served. A bucket holds up to `burst` photos and refills at `rate` photos a second.
A request takes one photo's worth before its body is read (so a flood of requests that are refused later, or
carry no photo, is paid for too) and the rest once its photos are counted; a /search_batch of 16 may take
the bucket below zero, and the client's next requests wait until the debt is repaid.

The client is the connection's peer, or, behind `forwarded_hops` proxies that each append the address they
saw to X-Forwarded-For (an ingress: 1), the address that many entries from its right end: the entries to
the left of it are whatever the client sent, and cannot be trusted. An IPv6 client is its /64 network: one
host is given a whole /64 and may pick a new address in it for every request. Buckets live in each entry
process: with N processes or replicas a client that spreads its requests over them gets up to N times the
rate. Working out the client and its bucket costs 3 us a request, 22 us for an IPv6 address (timeit).
"""

from __future__ import annotations

import ipaddress
import math
import time
from collections import OrderedDict
from http import HTTPStatus
from typing import Any, Callable

from query.errors import ApiError

MAX_CLIENTS = 100_000  # buckets kept, least recently seen dropped first (~10 MB); a dropped bucket was full or near


class ClientLimit:
    def __init__(self, rate: float, burst: int, forwarded_hops: int = 0, max_clients: int = MAX_CLIENTS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst, self.forwarded_hops = rate, burst, forwarded_hops
        self.max_clients, self.clock = max_clients, clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # client -> (photos left, when)

    def client(self, scope: dict[str, Any]) -> str:
        """Who sent the request: the peer's address, or the one the outermost trusted proxy saw."""
        if self.forwarded_hops:
            forwarded = [a.strip() for name, value in scope["headers"] if name.lower() == b"x-forwarded-for"
                         for a in value.decode("latin-1").split(",") if a.strip()]
            if forwarded:
                return _network(forwarded[-min(self.forwarded_hops, len(forwarded))])
        peer = scope.get("client")
        return _network(peer[0]) if peer else "unknown"

    def admit(self, client: str) -> None:
        """Take one photo's worth for a request about to be read; 429 with Retry-After when none is left."""
        left = self._left(client)
        if left < 1:
            wait = math.ceil((1 - left) / self.rate)
            raise ApiError(f"this client has sent more than its share, {self.rate:g} photos a second with bursts "
                           f"of {self.burst}: retry in {wait} s", HTTPStatus.TOO_MANY_REQUESTS,
                           headers={"Retry-After": str(wait)})
        self._set(client, left - 1)

    def charge(self, client: str, photos: int) -> None:
        """Take the request's other photos once they are counted (admit took the first); may go below zero."""
        if photos > 1:
            self._set(client, self._left(client) - (photos - 1))

    def _left(self, client: str) -> float:
        now = self.clock()
        left, since = self._buckets.get(client, (self.burst, now))
        return min(self.burst, left + (now - since) * self.rate)

    def _set(self, client: str, left: float) -> None:
        self._buckets[client] = (left, self.clock())
        self._buckets.move_to_end(client)
        if len(self._buckets) > self.max_clients:
            self._buckets.popitem(last=False)


def _network(address: str) -> str:
    """An IPv6 address's /64 (a single host's share of addresses); anything else as it is."""
    if ":" not in address:
        return address
    try:
        return str(ipaddress.IPv6Network((address.strip("[]"), 64), strict=False))
    except ValueError:
        return address
