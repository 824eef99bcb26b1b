"""CORS, closed unless IMAGESEARCH_CORS_ORIGINS lists origins: Starlette's middleware, whose answers to a
preflight are made before the guard sees the request. Those come in the one error shape and say nosniff too."""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response

from query.errors import error_response
from query.guard import NOSNIFF

NOT_SENT_AGAIN = ("content-length", "content-type")  # of Starlette's plain-text answer, not of the JSON one


class OneShapeCORS(CORSMiddleware):
    def preflight_response(self, request_headers: Headers) -> Response:
        answer = super().preflight_response(request_headers)
        answer.raw_headers.append(NOSNIFF)
        if answer.status_code < 400:
            return answer
        refused = answer.body.decode().removeprefix("Disallowed CORS ")  # Starlette's "origin, method", ...
        return error_response(
            f"a browser on {request_headers['origin']} may not call this API ({refused} not allowed): the "
            f"server's IMAGESEARCH_CORS_ORIGINS lists the origins that may, with {' or '.join(self.allow_methods)}",
            answer.status_code, headers={k: v for k, v in answer.headers.items() if k not in NOT_SENT_AGAIN})
