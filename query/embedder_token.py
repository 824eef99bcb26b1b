"""A shared secret between the entry and the Embedder.

Deployed apart (deploy/k8s.yaml, BentoCloud), the Embedder listens on a TCP port, and BentoML's server unpickles
the body of every call to it: it refuses `application/vnd.bentoml+pickle` only in the entry service, and the
Embedder's `embed` takes the pickled arrays the entry sends. Whoever reaches that port can run code in the
Embedder. With `IMAGESEARCH_EMBEDDER_TOKEN` set on both services, the Embedder answers calls only when they carry
the token, before anything reads their body, and the entry sends it with each call. (In one `bentoml serve` the
Embedder listens on a Unix socket in a folder only its user can open.) An Embedder without the token that gets a
call over TCP says in its log, once, that anyone who reaches its port can run code in it.
"""

from __future__ import annotations

import logging
from http import HTTPStatus

from starlette.types import ASGIApp, Receive, Scope, Send

from query.bearer import carries
from query.errors import error_response

# What needs no token: the probes and Prometheus' scrapes (deploy/k8s.yaml) read nothing from a body
OPEN = frozenset({"/readyz", "/livez", "/healthz", "/metrics"})
REFUSED = ("only the entry service calls the Embedder: send 'Authorization: Bearer <IMAGESEARCH_EMBEDDER_TOKEN>', "
           "the token both services are given")
OPEN_PORT = ("the Embedder answers calls on {host}:{port} without IMAGESEARCH_EMBEDDER_TOKEN, and BentoML unpickles "
             "what they send: anyone who reaches this port can run code here. Give both services the same token "
             "(README, Deploy)")
log = logging.getLogger("bentoml.imagesearch")


class EmbedderTokenGuard:
    """ASGI middleware of the Embedder: 401 for a call without the token, before its body is read. With no
    token (""), every call passes, and the first that comes over TCP logs the warning."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app, self.token = app, token
        self.warned = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not self.token:
            self._warn_once(scope)
        elif scope["type"] == "http" and not self._open(scope) and not self._carries_token(scope):
            await error_response(REFUSED, HTTPStatus.UNAUTHORIZED)(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _warn_once(self, scope: Scope) -> None:
        host, port = scope.get("server") or (None, None)  # uvicorn: (path, None) on a Unix socket
        if port is not None and not self.warned:
            self.warned = True
            log.warning(OPEN_PORT.format(host=host, port=port))

    @staticmethod
    def _open(scope: Scope) -> bool:
        return scope["method"] in ("GET", "HEAD") and scope["path"] in OPEN

    def _carries_token(self, scope: Scope) -> bool:
        given = [value for name, value in scope["headers"] if name.lower() == b"authorization"]
        return len(given) == 1 and carries(given[0], self.token)


def send_token(proxy: object, token: str) -> None:
    """Make BentoML's client to the Embedder (`bentoml.depends(Embedder)`) send the token with every call. Its
    HTTP sessions are made from these headers, so this is done before the first call."""
    client = getattr(proxy, "to_async", None)  # to_sync calls through it
    manager = getattr(client, "_session_manager", None)
    for headers in (getattr(client, "default_headers", None), getattr(manager, "_headers", None)):
        if headers is not None:  # none: the Embedder runs in this process, with no HTTP hop
            headers["Authorization"] = f"Bearer {token}"
