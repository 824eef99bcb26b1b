"""The service's pages, the search page (/ui/) and the API's (/), kept to this server.

Every script, style, photo and call they load is the server's own, and the browser is told so: a
Content-Security-Policy that also keeps them out of other sites' frames. BentoML's own API page, which / used
to be, loads Google Tag Manager, telling Google of every visit; / is now a copy of it without (api_page/), the
same Swagger UI from BentoML's static files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Awaitable, Callable

from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.staticfiles import StaticFiles

SEARCH_PAGE = Path(__file__).resolve().parent / "static"  # served at /ui/
API_PAGE = Path(__file__).resolve().parent / "api_page"  # served at /


def page_headers(style_src: str) -> dict[str, str]:
    """A page's headers: it loads only what this server serves (and photos the visitor picks, as blob: URLs),
    sends no address to other sites and is framed by none (the guard adds `nosniff`, as to every answer)."""
    return {"Content-Security-Policy": f"default-src 'self'; img-src 'self' data: blob:; style-src {style_src}; "
                                       "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
            "Referrer-Policy": "same-origin"}


SEARCH_PAGE_HEADERS = page_headers("'self'")
API_PAGE_HEADERS = page_headers("'self' 'unsafe-inline'")  # Swagger UI sets inline styles; scripts stay 'self'


class SearchPageFiles(StaticFiles):
    """StaticFiles whose every answer carries SEARCH_PAGE_HEADERS."""

    def file_response(self, *args: Any, **kwargs: Any) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers.update(SEARCH_PAGE_HEADERS)
        return response


def api_page_file(name: str) -> Callable[[Request], Awaitable[Response]]:
    """A route's endpoint that answers the API page's file `name`."""
    async def endpoint(request: Request) -> Response:
        return FileResponse(API_PAGE / name, headers=API_PAGE_HEADERS)
    return endpoint
