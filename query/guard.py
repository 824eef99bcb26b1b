"""One guard in front of every endpoint: limits, field checks, a deadline and one error shape.

An ASGI middleware that runs before BentoML's request parser. For the API endpoints it refuses load
beyond `max_concurrency` (429), a client past its share of photos (429, query.client_limit), bodies over the
byte limit (413) before reading them, more than `max_uploads` bodies arriving at once or more than
`max_body_bytes` of bodies held at once (429), one slower than `upload_timeout_s` (408), any query
parameter (a POST reads its fields from the body: 400 saying so), and any form field that is unknown,
missing, of the wrong kind or value (4xx naming the field); what passes is handed on re-encoded, so
BentoML's parser only ever sees values it reads back exactly. Every answer of 400 or more, whoever
produced it, leaves in the shape of query.errors.ErrorBody, and every answer says `nosniff`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import uuid
from collections import Counter
from http import HTTPStatus
from typing import Any, Awaitable, Callable
from urllib.parse import parse_qsl, unquote_to_bytes, urlsplit

from python_multipart.multipart import DEFAULT_MAX_HEADER_COUNT, DEFAULT_MAX_HEADER_SIZE
from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser, parse_options_header

from model_store.malloc import give_back_freed_memory
from model_store.preprocess import SEND_AN_UPLOAD
from query.client_limit import ClientLimit
from query.errors import ApiError, ErrorBody, collect_errors, error_response
from query.fields import EndpointFields, refuse_query_params
from query.openapi import serve_amended

log = logging.getLogger("bentoml.imagesearch")
# The multipart parser logs a WARNING for each body it cannot read: the client's mistake, which its 400 names
# and the access log shows, is not the operator's
logging.getLogger("python_multipart").setLevel(logging.ERROR)
Scope, Message = dict[str, Any], dict[str, Any]
Receive, Send = Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]
TEXT_PART_BYTES = 64 * 1024
FLOOD_BYTES = 128 * 2**20  # bodies held at once past which their memory is handed back once they are gone
TRIM_AFTER_S = 0.2
NOSNIFF = (b"x-content-type-options", b"nosniff")  # on every answer (_not_sniffed; the answers made before it)
# Headers of refusals that say when or how to come back: a 408 closes its connection (RFC 9110: the rest of
# the body may still be on its way).
_HEADERS = {HTTPStatus.TOO_MANY_REQUESTS: {"Retry-After": "1"}, HTTPStatus.REQUEST_TIMEOUT: {"Connection": "close"}}


class RequestGuard:
    """ASGI middleware; `service` is the BentoML service whose API endpoints it guards."""

    def __init__(self, app: Any, *, service: Any, max_concurrency: int, max_request_bytes: int,
                 max_file_bytes: int, max_files: int, timeout_s: float, max_uploads: int = 64,
                 upload_timeout_s: float = 30.0, max_body_bytes: int = 512 * 2**20,
                 client_limit: ClientLimit | None = None,
                 health_problem: Callable[[], str | None] = lambda: None) -> None:  # why /readyz or /livez fails
        self.app = app
        self.endpoints = {"/" + m.route.strip("/"): EndpointFields.of(m.input_spec) for m in service.apis.values()}
        self.slots = asyncio.Semaphore(max_concurrency)
        self.uploads, self.max_uploads, self.upload_timeout_s = asyncio.Semaphore(max_uploads), max_uploads, upload_timeout_s
        self.max_concurrency, self.max_request_bytes = max_concurrency, max_request_bytes
        self.max_file_bytes, self.max_files, self.timeout_s = max_file_bytes, max_files, timeout_s
        self.client_limit, self.health_problem = client_limit, health_problem
        self.bodies = BodyBytes(max_body_bytes, max_request_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            return await _refuse_websocket(scope, _not_sniffed(send))
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        slot = Slot(self.slots)
        raised = collect_errors()
        send = _not_sniffed(send)
        if scope["path"].endswith("/") and scope["path"] != "/":  # what Starlette redirects, to the route without it
            send = _redirect_as_a_path(scope, send)
        shaper = ErrorShaper(scope, slot.freed_by_last_byte(send), raised, self.health_problem)
        try:
            await self._serve(scope, receive, shaper, slot)
        except Exception:  # noqa: BLE001
            # Answer now: BentoML's TimeoutMiddleware would otherwise hold the client for its whole timeout
            # (Settings.entry_backstop_s, then a 504 outside this guard) when the app raises before sending anything.
            log.exception("%s %s failed", scope["method"], scope["path"])
            if not shaper.started:
                await _answer(scope, shaper.send, ApiError("internal error: the server log has the details; retry",
                                                           HTTPStatus.INTERNAL_SERVER_ERROR))
        finally:
            slot.free()
            # The errors' tracebacks hold this request's frames, and with them its body, in a cycle through this
            # list: freed at once here, not whenever the cyclic collector next runs (seldom: it counts objects,
            # and a request allocates few; a flood of refused 48 MB uploads kept ~1 GB per 20 of them).
            raised.clear()

    async def _serve(self, scope: Scope, receive: Receive, shaper: ErrorShaper, slot: Slot) -> None:
        if scope["path"] == "/docs.json" and scope["method"] == "GET":
            return await serve_amended(self.app, scope, receive, shaper.send)
        fields = self.endpoints.get(scope["path"]) if scope["method"] == "POST" else None
        if fields is None:
            return await self.app(_without_foreign_range(scope), receive, shaper.send)
        try:
            held = self.bodies.hold(scope)  # before the body is read
        except ApiError as exc:
            return await _answer(scope, shaper.send, exc, _HEADERS.get(exc.status))
        try:
            await self._serve_api(scope, receive, shaper, slot, fields)
        finally:
            self.bodies.free(held)

    async def _serve_api(self, scope: Scope, receive: Receive, shaper: ErrorShaper, slot: Slot,
                         fields: EndpointFields) -> None:
        try:
            refuse_query_params(parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True),
                                fields, scope["path"])
            self._refuse_when_full()  # at once, before the client sends its photos for nothing
            client = self._admit(scope, fields)
            body = await self.receive_body(scope, receive)
            self._refuse_when_full()
            await slot.take()
            if fields.names:
                scope, body, photos = await self.checked(scope, body, fields)
                if client is not None:
                    self.client_limit.charge(client, photos)
            else:  # an endpoint without inputs ignores any body, rather than let BentoML's parser choke on it
                scope, body = _with_body(scope, b"", None), b""
        except ApiError as exc:
            return await _answer(scope, shaper.send, exc, exc.headers or _HEADERS.get(exc.status))
        try:
            await asyncio.wait_for(self.app(scope, _replay(body), shaper.send), self.timeout_s)
        except asyncio.TimeoutError:
            log.error("%s took over %.0f s and was stopped", scope["path"], self.timeout_s)
            if not shaper.started:
                await _answer(scope, shaper.send, ApiError(
                    f"the request took longer than {self.timeout_s:g} s and was stopped: retry",
                    HTTPStatus.SERVICE_UNAVAILABLE))

    def _admit(self, scope: Scope, fields: EndpointFields) -> str | None:
        """The client of a request that carries photos, admitted under its share (None: no per-client limit)."""
        if self.client_limit is None or not fields.files:
            return None
        client = self.client_limit.client(scope)
        self.client_limit.admit(client)
        return client

    def _refuse_when_full(self) -> None:
        if self.slots.locked():
            raise ApiError(f"the service has {self.max_concurrency} requests in flight, its limit: retry in a second",
                           HTTPStatus.TOO_MANY_REQUESTS)

    async def receive_body(self, scope: Scope, receive: Receive) -> bytes:
        """The request's body, under limits of its own: at most `max_uploads` arriving at once, each within
        `upload_timeout_s`. Until its body has arrived a request holds no place among `max_concurrency`, so
        phones on slow uplinks, or clients that stall, do not turn others away while the service idles (32
        stalled uploads did, with 429 to every search, for as long as they stayed connected)."""
        if self.uploads.locked():
            raise ApiError(f"the service is receiving {self.max_uploads} uploads, its limit: retry in a second",
                           HTTPStatus.TOO_MANY_REQUESTS)
        async with self.uploads:
            try:
                return await asyncio.wait_for(read_body(scope, receive, self.max_request_bytes), self.upload_timeout_s)
            except asyncio.TimeoutError:
                raise ApiError(f"the request's body did not arrive within {self.upload_timeout_s:g} s: send it again "
                               "(smaller photos arrive sooner)", HTTPStatus.REQUEST_TIMEOUT) from None

    async def checked(self, scope: Scope, body: bytes, fields: EndpointFields) -> tuple[Scope, bytes, int]:
        """Every field present, known, of its kind and valid; returns the request re-encoded and its photos."""
        headers = Headers(scope=scope)
        coding = headers.get("content-encoding", "").strip().lower()
        if coding not in ("", "identity"):  # RFC 9110: a coding the server does not apply is refused with 415
            raise ApiError(f"Content-Encoding {coding[:40]} is not accepted: send the body uncompressed (photos are "
                           "compressed already)", HTTPStatus.UNSUPPORTED_MEDIA_TYPE)
        ctype = headers.get("content-type", "")
        media_type = ctype.split(";")[0].strip().lower()  # RFC 9110: a media type is case-insensitive
        first_file = next(iter(fields.files), None)
        if media_type != "multipart/form-data":
            example = f" (curl -F {first_file}=@photo.jpg)" if first_file else ""
            if first_file and (not body or media_type == "application/x-www-form-urlencoded"):
                raise ApiError(f"{first_file} is missing: send the photo as a file in a multipart/form-data "
                               f"request{example}", field=first_file)  # a form without its file
            raise ApiError(f"send the request as multipart/form-data{example}; got Content-Type "
                           f"{ctype or 'none'}", HTTPStatus.UNSUPPORTED_MEDIA_TYPE)
        form = await _parse(headers, body, fields, self.max_files, scope["path"])
        try:
            _refuse_unknown(form, fields, scope["path"])
            more = next((f.name for f in fields.files.values() if f.many and not f.required), None)
            files = [part for f in fields.files.values() for part in await self._files(form, f, more)]
            texts = [(t.name, t.encode(t.check(v))) for t in fields.texts.values()
                     if (v := _text(form, t)) is not None]
        finally:
            await form.close()
        body, boundary = encode_multipart(texts, files)
        return _with_body(scope, body, f"multipart/form-data; boundary={boundary}"), body, len(files)

    async def _files(self, form: Any, f: Any, more: str | None) -> list[tuple[str, str, str, bytes]]:
        """The parts of file field `f`; `more`: the endpoint's field for more photos of the same item, if any."""
        values = form.getlist(f.name)
        how = _send_file(f.name)
        if not values and f.required:
            raise ApiError(f"{f.name} is missing: {how}", field=f.name)
        if any(not isinstance(v, UploadFile) for v in values):
            raise _text_for_a_photo(f.name)
        if not f.many and len(values) > 1:
            others = f" (more photos of the same item go in {more})" if more else ""
            raise ApiError(f"{f.name} was sent {len(values)} times: send one photo{others}", field=f.name)
        if f.many and len(values) > self.max_files:
            count = f"1 to {self.max_files}" if f.required else f"at most {self.max_files}"
            raise ApiError(f"send {count} photos in {f.name}; got {len(values)}", field=f.name)
        parts = []
        for i, v in enumerate(values):
            name = f"{f.name}[{i}]" if f.many else f.name
            if v.size == 0:
                raise ApiError(f"{name} is empty (0 bytes): {SEND_AN_UPLOAD}",
                               HTTPStatus.UNSUPPORTED_MEDIA_TYPE, f.name)
            if v.size > self.max_file_bytes:
                raise ApiError(f"{name} is {v.size:,} bytes; the limit is {self.max_file_bytes:,}: send a smaller "
                               "photo", HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f.name)
            parts.append((f.name, _safe_filename(v.filename), v.content_type or "application/octet-stream",
                          await v.read()))
        return parts


class BodyBytes:
    """The bytes of request bodies an entry process holds at once. A body is kept until its answer leaves, and
    copied on the way (parsed and re-encoded here, parsed again by BentoML): 32 requests of 48 MB in flight
    took the entry to 7.6 GiB (docs/PERFORMANCE.md). A request holds its Content-Length (without one, the
    largest a body may be) from before its body is read; one of the largest size always fits."""

    def __init__(self, limit: int, largest: int):
        self.limit, self.largest, self.held, self.peak = max(limit, largest), largest, 0, 0

    def hold(self, scope: Scope) -> int:
        declared = Headers(scope=scope).get("content-length", "")
        size = min(int(declared), self.largest) if declared.isdigit() else self.largest
        if self.held + size > self.limit:
            raise ApiError(f"the service is holding {self.held / 2**20:.0f} MiB of uploads and this request's "
                           f"{size / 2**20:.1f} MiB would pass its limit of {self.limit / 2**20:.0f} MiB: retry in a "
                           "second", HTTPStatus.TOO_MANY_REQUESTS)
        self.held += size
        self.peak = max(self.peak, self.held)
        return size

    def free(self, size: int) -> None:
        """Once nothing is held after a flood (FLOOD_BYTES held at once), glibc is asked to hand what the bodies
        took back to the kernel; it keeps it otherwise (~1 GB after floods of 48 MB uploads, docs/PERFORMANCE.md).
        Ordinary uploads never hold that much, so a search never waits for it."""
        self.held -= size
        if self.held == 0 and self.peak >= FLOOD_BYTES:
            self.peak = 0
            loop = asyncio.get_running_loop()  # a little later: the request's last references go as it ends
            loop.call_later(TRIM_AFTER_S, loop.run_in_executor, None, give_back_freed_memory)


class Slot:
    """One request's place among `max_concurrency`. It is freed as the answer's last byte leaves, not when the
    request's code returns: a client that sends its next request as soon as it has an answer can be quicker
    than the middlewares and logging after that byte, and at exactly the limit it was refused with 429 (on the
    lent H200, one answer in ~1,100 from 32 clients was not a 200; wrk did not say which status)."""

    def __init__(self, slots: asyncio.Semaphore):
        self.slots, self.held = slots, False

    async def take(self) -> None:
        await self.slots.acquire()
        self.held = True

    def free(self) -> None:
        if self.held:
            self.held = False
            self.slots.release()

    def freed_by_last_byte(self, send: Send) -> Send:
        async def sending(message: Message) -> None:
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                self.free()
            await send(message)
        return sending


def _not_sniffed(send: Send) -> Send:
    """`send` with `X-Content-Type-Options: nosniff` on the answer: a browser takes a thumbnail, a JSON answer or
    an error for what its Content-Type says, never for HTML or script that its bytes might look like."""
    async def sending(message: Message) -> None:
        if message["type"] in ("http.response.start", "websocket.http.response.start"):
            message = {**message, "headers": [*message.get("headers", ()), NOSNIFF]}
        await send(message)
    return sending


def _redirect_as_a_path(scope: Scope, send: Send) -> Send:
    """`send` with a redirect to this server's own URL named by its path: Starlette answers `POST /search/` with
    307 to `http://HOST/search`, the scheme as the server saw it, which behind a proxy that ends TLS is http://,
    so a client would follow it in the clear. A path keeps the scheme and host the client used (RFC 9110,
    10.2.2)."""
    own = Headers(scope=scope).get("host", "")

    async def sending(message: Message) -> None:
        if message["type"] == "http.response.start" and 300 <= message["status"] < 400:
            message = {**message, "headers": [(k, _own_path(v, own) if k.lower() == b"location" else v)
                                              for k, v in message.get("headers", ())]}
        await send(message)
    return sending


def _own_path(location: bytes, own_host: str) -> bytes:
    """An absolute URL on `own_host` -> its path and query; any other Location as it is (and one whose path
    begins `//`, which as a Location alone would name another host)."""
    url = urlsplit(location.decode("latin-1"))
    if url.scheme not in ("http", "https") or not own_host or url.netloc != own_host or url.path.startswith("//"):
        return location
    return (url.path or "/").encode("latin-1") + (b"?" + url.query.encode("latin-1") if url.query else b"")


class ErrorShaper:
    """Wraps `send`: an answer of 400 or more is held back and re-sent as ErrorBody JSON."""

    def __init__(self, scope: Scope, send: Send, raised: list[ApiError], health_problem: Callable[[], str | None]):
        self.scope, self._send, self.raised, self.health_problem = scope, send, raised, health_problem
        self.started = False
        self._held: Message | None = None
        self._chunks: list[bytes] = []

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.started = True
            if message["status"] < 400:
                return await self._send(message)
            self._held = message
            return
        if message["type"] != "http.response.body" or self._held is None:
            return await self._send(message)
        self._chunks.append(message.get("body", b""))
        if message.get("more_body"):
            return
        status = self._held["status"]
        try:
            shaped = self.reshape(status, b"".join(self._chunks))
        except Exception:  # noqa: BLE001 -- an answer must leave whatever went wrong here
            log.exception("could not reshape a %s answer", status)
            shaped = ErrorBody(error=f"{HTTPStatus(status).phrase}")
        body = json.dumps(shaped.model_dump()).encode()
        extra = {k.lower().encode(): v.encode() for k, v in self._headers_for(status).items()}
        replaced = (b"content-type", b"content-length", *extra)
        headers = [(k, v) for k, v in self._held["headers"] if k.lower() not in replaced]
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        headers += list(extra.items())
        await self._send({"type": "http.response.start", "status": status, "headers": headers})
        await self._send({"type": "http.response.body", "body": body})

    def _mine(self, status: int) -> ApiError | None:
        """The ApiError our code raised for this answer, if any."""
        return next((e for e in reversed(self.raised) if e.status == status), None)

    def _headers_for(self, status: int) -> dict[str, str]:
        """The headers of our ApiError (a 429's own Retry-After); a 429 without one says 1 s, as the guard's do."""
        mine = self._mine(status)
        return {**(_HEADERS[HTTPStatus.TOO_MANY_REQUESTS] if status == 429 else {}), **((mine and mine.headers) or {})}

    def reshape(self, status: int, body: bytes) -> ErrorBody:
        method, path = self.scope["method"], self.scope["path"]
        if status == 503 and path == "/readyz":
            return ErrorBody(error=f"not ready: {self.health_problem() or 'starting up'}")
        if status == 503 and path == "/livez":
            return ErrorBody(error=f"not alive: {self.health_problem()}")
        mine = self._mine(status)
        if mine is not None:
            return ErrorBody(error=mine.message, field=mine.field)
        if status == 404:
            return ErrorBody(error=f"there is no {method} {path}: the API is listed at /")
        if status == 405:
            return ErrorBody(error=f"{path} does not take {method}: the API at / lists the methods")
        if (wanted := _range_refused(status, self.scope, self._held["headers"])) is not None:
            return ErrorBody(error=wanted)
        found = _message_in(body)
        if found is not None and status < 500:
            return found
        if status == 504:
            return ErrorBody(error="the request took too long and was stopped: retry")
        if status >= 500:
            return ErrorBody(error=f"internal error ({status}): the server log has the details; retry later")
        return ErrorBody(error=f"{HTTPStatus(status).phrase}")


def _without_foreign_range(scope: Scope) -> Scope:
    """`scope` less a Range header of a unit other than bytes (`items=0-5`), which RFC 9110 (section 14.2) has
    a server ignore, answering the whole file; Starlette's file answers refuse it with a 400."""
    headers = scope["headers"]
    units = [v.split(b"=")[0].strip().lower() for k, v in headers if k.lower() == b"range" and b"=" in v]
    if all(unit == b"bytes" for unit in units):  # a Range without "=" is malformed, not foreign: its 400 says so
        return scope
    return {**scope, "headers": [(k, v) for k, v in headers if k.lower() != b"range"]}


def _range_refused(status: int, scope: Scope, answer_headers: list[tuple[bytes, bytes]]) -> str | None:
    """What to send instead of a Range header a file answer refused (Starlette's own text names the status or its
    parser's step: "Range header: range must be requested"); None for another answer."""
    if status not in (400, 416) or (sent := Headers(scope=scope).get("range")) is None:
        return None
    answer = Headers(raw=answer_headers)
    if answer.get("content-type", "").startswith("application/json"):
        return None
    if status == 400:
        return (f"the Range header {sent[:80]!r} is not one this server reads: send bytes=START-END (START at most "
                "END, as bytes=0-1023), or no Range")
    size = answer.get("content-range", "").rpartition("/")[2]
    has = f"bytes 0-{int(size) - 1}" if size.isdigit() and int(size) > 0 else "none"
    return f"the Range header {sent[:80]!r} asks for bytes past the end of the file, which has {has}: ask within them"


def _message_in(body: bytes) -> ErrorBody | None:
    """The message of BentoML's own error bodies: {"error": ...}, [{"error": ...}], or pydantic's detail."""
    try:
        data = json.loads(body)
    except ValueError:
        text = body.decode("utf-8", "replace").strip()
        return ErrorBody(error=text) if text else None
    if isinstance(data, list) and data and isinstance(data[0], dict):
        data = data[0]
    if not isinstance(data, dict):
        return None
    detail = data.get("detail")
    if isinstance(detail, list) and detail and isinstance(detail[0], dict):
        loc = detail[0].get("loc") or []
        field = str(loc[-1]) if loc else None
        message = detail[0].get("msg", "invalid value")
        return ErrorBody(error=f"{field}: {message}" if field else f"the request body is not valid: {message}",
                         field=field)
    return ErrorBody(error=str(data["error"])) if "error" in data else None


async def read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    """The whole request body; 413 as soon as it passes `limit` bytes (at once when Content-Length says so)."""
    declared = Headers(scope=scope).get("content-length")
    if declared is not None and not declared.isdigit():
        raise ApiError(f"Content-Length {declared!r} is not a number of bytes")
    if declared is not None and int(declared) > limit:
        raise ApiError(f"the request is {int(declared):,} bytes; the limit is {limit:,}: send fewer or smaller "
                       "photos", HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ApiError("the client went away before the request was complete")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise ApiError(f"the request is over {limit:,} bytes, the limit: send fewer or smaller photos",
                           HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)


class _ClosedMultiPart(MultiPartParser):
    """Starlette's parser, which also tells whether the body reached its closing boundary: without it the
    last part is dropped without a word, so a trailing max_price or the photo itself would go missing."""

    closed = False
    file_fields: frozenset[str] = frozenset()  # the endpoint's photo fields

    def on_end(self) -> None:
        self.closed = True

    def on_headers_finished(self) -> None:
        """A part of a photo field is a file even without `filename=`: named only in RFC 2231's `filename*=`
        (which RFC 7578 forbids, yet older clients send for a name outside ASCII), or with none but a Content-Type
        other than text. The parser read such a part's bytes as text (a 400 saying "not text")."""
        part = self._current_part
        _, options = parse_options_header(part.content_disposition)
        if b"filename" not in options and options.get(b"name", b"").decode("latin-1") in self.file_fields:
            extended = _EXTENDED_FILENAME.search(part.content_disposition)
            ctype = dict(part.item_headers).get(b"content-type", b"text/plain").strip().lower()
            if extended or not ctype.startswith(b"text/"):
                name = _safe_filename(_rfc2231_value(extended.group(1)) if extended else "")
                part.content_disposition += f'; filename="{name}"'.encode()
        super().on_headers_finished()

    def current_part(self) -> str | None:
        """The name of the part the parser is in (that the body ended in, or it stopped at), once its headers
        arrived."""
        part = getattr(self, "_current_part", None)
        return getattr(part, "field_name", "") or None

    def text_parts(self) -> list[str]:
        """The names of the text parts read so far, the one it is in included."""
        return [name for name, value in self.items if isinstance(value, str)] + [self.current_part() or ""]


async def _parse(headers: Headers, body: bytes, fields: EndpointFields, max_files: int, path: str) -> Any:
    async def stream():
        yield body

    accepted = sum(max_files if f.many else 1 for f in fields.files.values())
    # Room beyond what is accepted, so that the checks after parsing name the field at fault ("sent 2 times",
    # "send 1 to 16 photos", "unknown field") instead of the parser refusing the whole body.
    room = max_files + 1
    parser = _ClosedMultiPart(headers, stream(), max_files=accepted + room, max_fields=len(fields.texts) + 16,
                              max_part_size=TEXT_PART_BYTES)
    parser.file_fields = frozenset(fields.files)
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        if exc.message.startswith("Too many files"):
            raise _too_many_files(fields, max_files) from None
        if exc.message.startswith("Part exceeded"):
            raise _text_too_long(parser.current_part(), fields, path) from None
        if exc.message.startswith("Too many fields"):
            raise _too_many_texts(parser.text_parts(), fields, path) from None
        raise ApiError(f"the multipart body cannot be read ({_why_unreadable(exc)}): send a well-formed "
                       f"multipart/form-data request with fields {', '.join(fields.names)}") from None
    if body and not parser.closed:  # an empty body is a form without its fields: they are named as missing
        await form.close()
        raise _cut_short(headers, parser.current_part(), fields)
    return form


_EXTENDED_FILENAME = re.compile(rb";\s*filename\*\s*=\s*([^;]*)", re.IGNORECASE)


def _rfc2231_value(raw: bytes) -> str:
    """`UTF-8''caf%C3%A9.jpg` -> `café.jpg` (an unknown charset or a broken escape gives what it can)."""
    charset, _, rest = raw.strip().strip(b'"').partition(b"'")
    encoded = rest.partition(b"'")[2] if rest else charset
    try:
        return unquote_to_bytes(encoded).decode(charset.decode("latin-1") if rest else "utf-8", "replace")
    except (LookupError, ValueError):  # an unknown charset, or a name no codec has (a NUL in it)
        return unquote_to_bytes(encoded).decode("utf-8", "replace")


def _why_unreadable(exc: MultiPartException) -> str:
    """What the multipart parser stopped at: Starlette says "Invalid multipart data." for every fault the
    parser underneath finds, and keeps that parser's reason as the cause."""
    cause = str(exc.__cause__ or "")
    if cause.startswith("Maximum header size"):  # python-multipart's limits on each part's headers
        return f"a part has a header line over {DEFAULT_MAX_HEADER_SIZE:,} bytes: send shorter file names"
    if cause.startswith("Maximum header count"):
        return f"a part has more than {DEFAULT_MAX_HEADER_COUNT} headers: send Content-Disposition and Content-Type"
    return f"{exc.message[:-1]}: {cause[:100]}" if cause else exc.message


def _cut_short(headers: Headers, part: str | None, fields: EndpointFields) -> ApiError:
    """The body ended before its closing boundary, in part `part` if its headers arrived."""
    boundary = parse_options_header(headers["content-type"])[1][b"boundary"].decode("latin-1")[:70]
    where = f", inside part {part[:40]!r}, which was cut off" if part else ""
    first_file = next(iter(fields.files), None)
    example = f" (curl -F {first_file}=@photo.jpg builds it)" if first_file else ""
    return ApiError(f"the multipart body ends before its closing boundary --{boundary}--{where}: send the whole "
                    f"body{example}", field=part if part in fields.names else None)


def _too_many_files(fields: EndpointFields, max_files: int) -> ApiError:
    """The parser stopped at more file parts than the endpoint's fields take, with room: say what they take."""
    takes = [(f.name, max_files if f.many else 1) for f in fields.files.values()]
    if not takes:
        return ApiError(f"too many files: send none; the fields are {', '.join(fields.names)}")
    first = f"{takes[0][1]} photo{'s' if takes[0][1] > 1 else ''} in {takes[0][0]}"
    most = " and ".join([first, *(f"{n} in {name}" for name, n in takes[1:])])
    return ApiError(f"too many files: send at most {most}", field=takes[0][0] if len(takes) == 1 else None)


def _text_too_long(part: str | None, fields: EndpointFields, path: str) -> ApiError:
    """The parser stopped at a text part over TEXT_PART_BYTES: say which field, as the checks after parsing
    would. A photo sent as text (`curl -F image=<photo.jpg`, where `@` sends a file) is the usual one."""
    if part in fields.files:
        return _text_for_a_photo(part)
    if part in fields.texts:
        return ApiError(f"{part} is over {TEXT_PART_BYTES // 1024} KB: send {fields.texts[part].expected}",
                        field=part)
    return _unknown(part or "", False, fields, path)


def _too_many_texts(names: list[str], fields: EndpointFields, path: str) -> ApiError:
    """The parser stopped at more text parts than it reads (each field once, and room): name one at fault."""
    unknown = next((n for n in names if n not in fields.names), None)  # "" too: a part named ""
    if unknown is not None:
        return _unknown(unknown, False, fields, path)
    photo = next((n for n in names if n in fields.files), None)
    if photo is not None:
        return _text_for_a_photo(photo)
    name, times = Counter(names).most_common(1)[0]
    return ApiError(f"{name} was sent {times} times or more: send it once", field=name)


def _refuse_unknown(form: Any, fields: EndpointFields, path: str) -> None:
    for name, value in form.multi_items():
        if name not in fields.names:
            raise _unknown(name, isinstance(value, UploadFile), fields, path)


def _unknown(name: str, is_file: bool, fields: EndpointFields, path: str) -> ApiError:
    hint = ""
    required = [f.name for f in fields.files.values() if f.required]
    if is_file and len(required) == 1:
        hint = f" (send the photo as {required[0]!r})"
    return ApiError(f"unknown field {name!r}{hint}: {path} takes {', '.join(fields.names)}", field=name)


def _send_file(name: str) -> str:
    return f"send the photo as a file part named {name!r} (curl -F {name}=@photo.jpg)"


def _text_for_a_photo(name: str) -> ApiError:
    return ApiError(f"{name} must be a file upload, not text: {_send_file(name)}", field=name)


def _text(form: Any, t: Any) -> str | None:
    values = form.getlist(t.name)
    if not values:
        if t.required:
            raise ApiError(f"{t.name} is missing: send {t.expected}", field=t.name)
        return None
    if len(values) > 1:
        raise ApiError(f"{t.name} was sent {len(values)} times: send it once", field=t.name)
    if isinstance(values[0], UploadFile):
        raise ApiError(f"{t.name} must be a plain form value, not a file: send {t.expected}", field=t.name)
    return values[0]


def _safe_filename(name: str | None) -> str:
    """A file name BentoML can store (it fails on '/', BentoML issue 5532); the suffix is kept."""
    base = re.sub(r"[^A-Za-z0-9._-]", "_", (name or "").replace("\\", "/").rsplit("/", 1)[-1])[-100:]
    return base.lstrip(".") or "upload"


def encode_multipart(texts: list[tuple[str, str]], files: list[tuple[str, str, str, bytes]]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    out = []
    for name, value in texts:
        out.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for name, filename, ctype, data in files:
        out.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                   f'Content-Type: {ctype}\r\n\r\n'.encode() + data + b"\r\n")
    out.append(f"--{boundary}--\r\n".encode())
    return b"".join(out), boundary


def _with_body(scope: Scope, body: bytes, content_type: str | None) -> Scope:
    """The scope with headers that describe `body` (no Content-Type when None)."""
    raw = [(k, v) for k, v in scope["headers"] if k.lower() not in (b"content-type", b"content-length")]
    raw.append((b"content-length", str(len(body)).encode()))
    if content_type:
        raw.append((b"content-type", content_type.encode()))
    return {**scope, "headers": raw}


def _replay(body: bytes) -> Receive:
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if sent:
            await asyncio.Event().wait()  # like a client that keeps the connection open
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


async def _refuse_websocket(scope: Scope, send: Send) -> None:
    """No endpoint speaks WebSocket. Its handshake was refused with uvicorn's bare 403; where the server can
    answer a handshake with a response (uvicorn can: ASGI's websocket.http.response), it is a 400 in the one
    shape, and otherwise closed."""
    if "websocket.http.response" not in scope.get("extensions", {}):
        return await send({"type": "websocket.close", "code": 1008})
    await _answer(scope, send, ApiError(f"{scope['path']} does not take WebSocket connections: send HTTP requests "
                                        "(the API at / lists them)", HTTPStatus.BAD_REQUEST))


async def _answer(scope: Scope, send: Send, exc: ApiError, headers: dict | None = None) -> None:
    await error_response(exc.message, exc.status, exc.field, headers)(scope, _replay(b""), send)
