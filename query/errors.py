"""One error shape for every 4xx and 5xx the API gives: {"error": "what is wrong and what to send", "field": ...}."""

from __future__ import annotations

import contextvars
from http import HTTPStatus
from typing import Awaitable, Callable

from bentoml.exceptions import BentoMLException
from pydantic import BaseModel, Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response


class ErrorBody(BaseModel):
    """The body of every error answer."""

    error: str = Field(description="what is wrong and what to send instead")
    field: str | None = Field(None, description="the request field at fault, when one is")


# The ApiError raised while serving this request: BentoML turns 5xx messages into a generic text and 4xx
# ones into a list, so the guard reads the original from here when it reshapes the answer.
_raised: contextvars.ContextVar[list["ApiError"] | None] = contextvars.ContextVar("imagesearch_error", default=None)


class ApiError(BentoMLException):
    """A request that cannot be served as sent; the status and message say why and what to change."""

    def __init__(self, message: str, status: HTTPStatus = HTTPStatus.BAD_REQUEST, field: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message, error_code=status)
        self.message, self.status, self.field, self.headers = message, HTTPStatus(status), field, headers
        holder = _raised.get()
        if holder is not None:
            holder.append(self)


def error_response(message: str, status: int, field: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(ErrorBody(error=message, field=field).model_dump(), status_code=int(status), headers=headers)


def answers_errors(route: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    """A Starlette route whose ApiErrors are answered in the one shape."""
    async def answer(request: Request) -> Response:
        try:
            return await route(request)
        except ApiError as exc:
            return error_response(exc.message, exc.status, exc.field)
    return answer


def collect_errors() -> list[ApiError]:
    """Start collecting the ApiErrors of the current request (call once per request, in its context)."""
    holder: list[ApiError] = []
    _raised.set(holder)
    return holder
