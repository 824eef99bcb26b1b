"""Limits on a request's URL and headers, and the one error shape for requests the HTTP server cannot parse.

uvicorn, with httptools, reads a request's line and headers before any ASGI middleware sees the request, with
neither a size limit nor a deadline: a 20 MB header was held whole and answered 200, a connection that sent
nothing or half a request line was held for as long as the client liked (every one an open file, so a client
opening thousands could lock others out), and a URL over 64 KB, a Content-Length that is not a number or a
request line that is not HTTP got uvicorn's plain-text 400 "Invalid HTTP request received." (measured
2026-12-04). Here the entry's uvicorn protocol counts the bytes of the head it is reading and refuses one over
the limit as soon as that many have arrived (414 for the URL, 431 for the headers), answers 408 to a head not
complete within the deadline (from the connection's start, or from the first byte of a later request on it)
and closes a connection that sends nothing in that time, and every answer it gives on its own is in the shape
of query.errors.ErrorBody. Reaches into uvicorn's HttpToolsProtocol: uvicorn is pinned in requirements.txt,
and tests/test_guard.py runs this on a real server.
"""

from __future__ import annotations

from http import HTTPStatus

from query.errors import ApiError, ErrorBody
from query.guard import NOSNIFF


def _head_size(protocol: object) -> int:
    """Bytes of the URL and headers read so far, as sent less the request line's method and version."""
    return len(protocol.url) + sum(len(name) + len(value) + 4 for name, value in protocol.headers)


def _too_large(protocol: object, max_bytes: int) -> ApiError:
    if len(protocol.url) > max_bytes:
        return ApiError(f"the URL is over {max_bytes:,} bytes, the limit for a request's URL and headers: "
                        "shorten it (a photo or long text belongs in a POST form)", HTTPStatus.REQUEST_URI_TOO_LONG)
    return ApiError(f"the request's URL and headers are over {max_bytes:,} bytes, the limit: send fewer or "
                    "shorter headers (cookies count too)", HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE)


def _raw_answer(protocol: object, error: ApiError) -> bytes:
    body = ErrorBody(error=error.message).model_dump_json().encode()
    lines = [f"HTTP/1.1 {error.status.value} {error.status.phrase}".encode()]
    lines += [name + b": " + value for name, value in protocol.server_state.default_headers]
    lines += [b"content-type: application/json", b"content-length: " + str(len(body)).encode(), b"connection: close",
              b": ".join(NOSNIFF)]  # as the guard says on every answer it sends
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def limit_request_heads(max_bytes: int, timeout_s: float) -> None:
    """In this process, uvicorn's httptools protocol refuses a request whose URL and headers come to more than
    `max_bytes` or take longer than `timeout_s` to arrive, and answers what it cannot parse in the API's error
    shape. Idempotent."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as Protocol

    if getattr(Protocol, "max_head_bytes", None) is None:
        _patch(Protocol)
    Protocol.max_head_bytes, Protocol.head_timeout_s = max_bytes, timeout_s


def _refuse(protocol: object, error: ApiError) -> None:
    protocol.refusal = error
    protocol.send_400_response("")


def _start_head_clock(protocol: object) -> None:
    if protocol.head_clock is None:
        protocol.head_clock = protocol.loop.call_later(protocol.head_timeout_s, _head_late, protocol)


def _stop_head_clock(protocol: object) -> None:
    if protocol.head_clock is not None:
        protocol.head_clock.cancel()
        protocol.head_clock = None


def _head_late(protocol: object) -> None:
    protocol.head_clock = None
    if protocol.transport.is_closing():
        return
    if protocol.head_open:
        _refuse(protocol, ApiError(f"the request's URL and headers did not arrive within {protocol.head_timeout_s:g} "
                                   "s: send the request again, all of its head at once", HTTPStatus.REQUEST_TIMEOUT))
    else:  # a connection that has sent nothing
        protocol.transport.close()


def _patch(protocol_class: type) -> None:
    made, lost = protocol_class.connection_made, protocol_class.connection_lost
    begin, complete = protocol_class.on_message_begin, protocol_class.on_headers_complete
    received = protocol_class.data_received
    protocol_class.head_open, protocol_class.head_bytes, protocol_class.refusal = False, 0, None
    protocol_class.head_clock = None

    def connection_made(self, transport: object) -> None:
        made(self, transport)
        _start_head_clock(self)

    def connection_lost(self, exc: Exception | None) -> None:
        _stop_head_clock(self)
        lost(self, exc)

    def on_message_begin(self) -> None:
        begin(self)
        self.head_open, self.head_bytes = True, 0
        _start_head_clock(self)  # a later request on a kept-alive connection: its own deadline

    def on_headers_complete(self) -> None:
        self.head_open = False
        _stop_head_clock(self)
        if _head_size(self) > self.max_head_bytes:
            self.refusal = _too_large(self, self.max_head_bytes)
            raise self.refusal  # httptools raises HttpParserCallbackError; uvicorn then calls send_400_response
        complete(self)

    def data_received(self, data: bytes) -> None:
        received(self, data)
        if self.head_open and not self.transport.is_closing():
            # httptools holds a header until its end arrives: count what came while the head was open (the
            # chunk it began in whole, an upper bound) and refuse before holding much more than the limit.
            self.head_bytes += len(data)
            if self.head_bytes > self.max_head_bytes:
                _refuse(self, _too_large(self, self.max_head_bytes))

    def send_400_response(self, msg: str) -> None:
        error = self.refusal or ApiError("the request is not valid HTTP/1.1: check its request line, its headers and "
                                         "its Content-Length")
        self.transport.write(_raw_answer(self, error))
        self.transport.close()

    protocol_class.connection_made, protocol_class.connection_lost = connection_made, connection_lost
    protocol_class.on_message_begin, protocol_class.on_headers_complete = on_message_begin, on_headers_complete
    protocol_class.data_received, protocol_class.send_400_response = data_received, send_400_response
