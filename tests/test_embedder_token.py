"""The Embedder's token guard, in process (tests/test_bento.py and tests/test_faults.py run it in real servers)."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest

from conftest import asgi_call
from query.embedder_token import EmbedderTokenGuard, log

TCP, UNIX = ("10.0.0.7", 3000), ("/tmp/bentoml-uds-x/1.sock", None)


def answer(guard: EmbedderTokenGuard, server: tuple, method: str = "POST", path: str = "/embed",
           headers: tuple = ()) -> tuple[int, dict, bytes]:
    """The guard's answer (200 where it lets the call through to the Embedder): (status, headers, body)."""
    scope = {"type": "http", "method": method, "path": path, "server": server, "headers": list(headers)}
    return asyncio.run(asgi_call(guard, scope))


def call(guard: EmbedderTokenGuard, server: tuple, **request) -> int:
    return answer(guard, server, **request)[0]


@pytest.fixture
def warnings_logged():
    """The messages the guard logs at WARNING or above, read on its own logger: once BentoML has set up its
    logging in this process (other tests import service.py), "bentoml" loggers no longer reach pytest's caplog."""
    messages: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: messages.append(record.getMessage())
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.WARNING)
    try:
        yield messages
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


async def embedder(scope, receive, send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"[]"})


def test_with_a_token_only_calls_that_carry_it_pass_and_the_probes_stay_open(warnings_logged):
    guard = EmbedderTokenGuard(embedder, token="s3cret")
    assert call(guard, TCP) == 401
    assert call(guard, TCP, headers=((b"authorization", b"Bearer wrong"),)) == 401
    assert call(guard, TCP, headers=((b"authorization", b"Bearer s3cret"),)) == 200
    assert call(guard, TCP, headers=((b"authorization", b"bearer  s3cret "),)) == 200  # RFC 7235: any case
    assert call(guard, TCP, headers=((b"authorization", b"s3cret"),)) == 401  # the scheme is required
    assert call(guard, TCP, headers=((b"authorization", b"Basic s3cret"),)) == 401
    assert call(guard, TCP, method="GET", path="/readyz") == 200
    assert call(guard, TCP, method="POST", path="/readyz") == 401
    assert not warnings_logged


def test_without_a_token_every_call_passes_and_one_over_tcp_warns_once(warnings_logged):
    guard = EmbedderTokenGuard(embedder, token="")
    assert [call(guard, UNIX), call(guard, UNIX, method="GET", path="/readyz")] == [200, 200]
    assert not warnings_logged  # one `bentoml serve`: a Unix socket only its user can open
    assert [call(guard, TCP, method="GET", path="/readyz"), call(guard, TCP)] == [200, 200]
    warned = warnings_logged
    assert len(warned) == 1 and "on 10.0.0.7:3000 without IMAGESEARCH_EMBEDDER_TOKEN" in warned[0], warned
    assert "anyone who reaches this port can run code here" in warned[0]


def test_the_refusal_is_in_the_one_error_shape():
    status, _, raw = answer(EmbedderTokenGuard(embedder, token="s3cret"), TCP)
    body = json.loads(raw)
    assert status == 401
    assert set(body) == {"error", "field"} and "IMAGESEARCH_EMBEDDER_TOKEN" in body["error"], body
