"""BentoML's OpenAPI document (/docs.json, shown at /), amended to say what this API really answers:
the one error shape for every 4xx and 5xx, the statuses each endpoint can give, the forms as the guard reads
them, and the GET routes (/index, /similar, /photos)."""

from __future__ import annotations

import json
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from pydantic import BaseModel

from query.errors import ErrorBody
from query.models import IndexInfo, SimilarQuery, SimilarResponse

DESCRIPTION = """Reverse image search over sold estate-sale items: upload a photo, get the most similar sold items
and an expected price. The search page for people is at [/ui](/ui/); match photos are at each match's `photo_url`.

**Errors.** Every 4xx and 5xx answer has one shape, `{"error": "what is wrong and what to send", "field":
"the request field at fault, or null"}`: 400 a field is missing, unknown or invalid; 401 no admin token; 403
reload is off (the server has no admin token); 404 no
such endpoint; 405 wrong method; 409 a reload that cannot be done; 413 a photo or request over the limits; 414
or 431 a URL, or URL and headers, over the limit; 415 not a photo (or not multipart/form-data); 408 the request's
body took too long to arrive; 429 over capacity, or this client past its share of photos: retry after the
seconds in `Retry-After`; 503 not ready or the embedder is restarting,
retry in a few seconds."""

STATUSES = {"400": "A field is missing, unknown or invalid", "408": "The request's body took too long to arrive",
            "413": "A photo or the request is over the limits",
            "415": "Not a photo the service can read, or not multipart/form-data",
            "429": "Over capacity, or this client past its share of photos: retry after Retry-After seconds",
            "503": "Not ready, or the embedder is restarting"}
RELOAD_STATUSES = {"401": "No admin token, or not this server's", "403": "Reload is off: this server has no admin token",
                   "409": "Nothing can be switched to: nothing promoted, another embedder, or a broken artifact"}


def amend(doc: dict[str, Any]) -> dict[str, Any]:
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    error = ErrorBody.model_json_schema()
    for name in ("InvalidArgument", "NotFound", "InternalServerError"):  # BentoML's own, whose shape we replaced
        schemas[name] = {**error, "title": name}
    schemas["ErrorBody"] = error
    ref = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
    for path, ops in doc.get("paths", {}).items():
        for method, op in ops.items():
            if method == "post":  # every API endpoint
                statuses = {**STATUSES, **(RELOAD_STATUSES if path == "/reload" else {})}
                for status, text in statuses.items():
                    op.setdefault("responses", {})[status] = {"description": text, "content": ref}
                _describe_form(op)
    for probe in ("/readyz", "/livez"):  # BentoML's, answered in the one shape when they fail (query.guard)
        doc["paths"].get(probe, {}).get("get", {}).setdefault("responses", {})["503"] = {
            "description": "Not ready (or not alive): `error` says why", "content": ref}
    paths = doc.setdefault("paths", {})
    paths["/index"] = {"get": {
        "summary": "The served index: version, stage, counts, embedder, categories and build metadata",
        "responses": {"200": _json(_schema(schemas, IndexInfo)), "503": {"description": "Not ready", "content": ref}}}}
    paths["/similar/{item_id}"] = {"get": {
        "summary": "More like this: the k items most similar to a catalogue item, from its stored photos",
        "parameters": [{"name": "item_id", "in": "path", "required": True, "schema": {"type": "string"}},
                       *_query_parameters(SimilarQuery)],
        "responses": {"200": _json(_schema(schemas, SimilarResponse)),
                      "400": {"description": STATUSES["400"], "content": ref},
                      "404": {"description": "No such item in the served index", "content": ref},
                      "503": {"description": "Not ready", "content": ref}}}}
    paths["/photos/{name}"] = {"get": {
        "summary": "A thumbnail of a photo of the served index (a match's photo_url); cached for good",
        "parameters": [{"name": "name", "in": "path", "required": True,
                        "schema": {"type": "string", "pattern": "^[0-9a-f]{64}\\.webp$"}}],
        "responses": {"200": {"description": "WebP image; its ETag is its name", "content": {"image/webp": {}}},
                      "206": {"description": "The part of it a Range header asked for", "content": {"image/webp": {}}},
                      "304": {"description": "Not modified: If-None-Match named its ETag (no body)"},
                      "400": {"description": "A bytes Range not of the form bytes=START-END (another unit is ignored)",
                              "content": ref},
                      "404": {"description": "No such photo in the served index", "content": ref},
                      "416": {"description": "A Range past its end: Content-Range gives its size", "content": ref}}}}
    info = doc.setdefault("info", {})
    info.update(title="Estate image search API", description=DESCRIPTION, version=_api_version())  # it was "None"
    info.pop("contact", None)  # BentoML's own team, who do not answer for this API
    _mark_nullable(doc)
    return doc


def _describe_form(op: dict[str, Any]) -> None:
    """Say of an endpoint's form what the guard enforces, where BentoML's document says otherwise: an endpoint
    without inputs takes no body (BentoML declares an empty JSON object); the body is required where a field
    is (a photo); text fields are plain text (BentoML declares them JSON, and a client that followed it would
    send `"Art"`, quotes and all); a field the form does not name is refused."""
    body = op.get("requestBody", {})
    if not any(media.get("schema", {}).get("properties") for media in body.get("content", {}).values()):
        op.pop("requestBody", None)  # no inputs (POST /reload): the guard ignores any body
        return
    form = body.get("content", {}).get("multipart/form-data")
    if form is None:
        return
    form.pop("encoding", None)
    schema = form.setdefault("schema", {})
    schema["additionalProperties"] = False
    for prop in schema.get("properties", {}).values():
        # A form has no null: the API page pre-filled "null" (no category's name); an optional field is left out
        if "default" in prop and prop["default"] in (None, []):
            del prop["default"]
    if schema.get("required"):
        body["required"] = True


def _api_version() -> str:
    try:
        return version("estate-image-search")
    except PackageNotFoundError:  # run from a checkout that was not installed
        return "unknown"


def _schema(schemas: dict[str, Any], model: type[BaseModel]) -> dict[str, Any]:
    """Put `model`'s schema (and those it uses) among the components; returns a reference to it."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas.update(schema.pop("$defs", {}))
    schemas[model.__name__] = schema
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _json(schema_ref: dict[str, Any]) -> dict[str, Any]:
    return {"description": "Successful Response", "content": {"application/json": {"schema": schema_ref}}}


def _query_parameters(model: type[BaseModel]) -> list[dict[str, Any]]:
    """OpenAPI query parameters from a pydantic model of them."""
    schema = model.model_json_schema()
    return [{"name": name, "in": "query", "required": name in schema.get("required", []), "schema": prop}
            for name, prop in schema["properties"].items()]


def _mark_nullable(node: Any) -> None:
    """BentoML drops the null of optional answer fields (`float | None = None` becomes "type": "number"):
    put it back as OpenAPI 3.0's nullable, so the document matches the answers (forms have no null defaults
    left by then: _describe_form)."""
    if isinstance(node, dict):
        if "default" in node and node["default"] is None and "type" in node:
            node["nullable"] = True
        for value in node.values():
            _mark_nullable(value)
    elif isinstance(node, list):
        for value in node:
            _mark_nullable(value)


async def serve_amended(app: Any, scope: dict, receive: Any, send: Any) -> None:
    """Run `app` for GET /docs.json and send its document amended."""
    held: dict = {}
    chunks: list[bytes] = []

    async def capture(message: dict) -> None:
        if message["type"] == "http.response.start":
            held.update(message)
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await app(scope, receive, capture)
    body = b"".join(chunks)
    if held.get("status") == 200:
        body = json.dumps(amend(json.loads(body))).encode()
    headers = [(k, v) for k, v in held.get("headers", []) if k.lower() != b"content-length"]
    await send({"type": "http.response.start", "status": held.get("status", 500),
                "headers": [*headers, (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
