"""Whether the embedder answers the entry, and whether restarting the server could bring it back: /livez."""

from __future__ import annotations

import time


class EmbedderHealth:
    """Told of every call to the embedder (`answered`, `lost`); `restart_needed` once it has answered nothing
    for `lost_s` (0: never) and the embedder runs in this same `bentoml serve`, where a restart starts it
    again. The embedder of another deployment (BentoCloud runs the services apart) is not revived by
    restarting this one: readiness says it is gone, liveness stays."""

    def __init__(self, proxy: object, lost_s: float) -> None:
        self.lost_s = lost_s
        self.lost_at: float | None = None  # monotonic time of the first failed call since one answered
        self.alongside = served_alongside(proxy)

    def answered(self) -> None:
        self.lost_at = None

    def lost(self) -> None:
        self.lost_at = self.lost_at or time.monotonic()

    def lost_for_s(self) -> float:
        return time.monotonic() - self.lost_at if self.lost_at is not None else 0.0

    def restart_needed(self) -> bool:
        return bool(self.lost_s) and self.alongside and self.lost_for_s() > self.lost_s


def served_alongside(proxy: object) -> bool:
    """Whether BentoML's client reaches the embedder on a socket of this same `bentoml serve` (a Unix socket,
    or TCP where there are none), not at another deployment's URL (`--depends Embedder=https://...`)."""
    sessions = getattr(getattr(proxy, "to_async", None), "_session_manager", None)  # BentoML 1.4's client
    url = getattr(sessions, "_parsed_url", None)
    return url is not None and url.scheme in ("file", "tcp")
