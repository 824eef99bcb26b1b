"""GET /photos/{name}: a thumbnail of a photo of the served index, from the thumbnail store only."""

from __future__ import annotations

from http import HTTPStatus

from starlette.datastructures import Headers
from starlette.responses import FileResponse, Response
from starlette.staticfiles import NotModifiedResponse, StaticFiles

from model_store import thumbnails
from query.active import Active
from query.errors import ApiError

IMMUTABLE = {"Cache-Control": "public, max-age=31536000, immutable"}  # a thumbnail's name is its photo's hash
_REVALIDATION = StaticFiles(directory=".", check_dir=False)  # Starlette's If-None-Match check, as the page gets it


def thumbnail_response(active: Active, name: str, request_headers: Headers) -> Response:
    """The thumbnail `name` (its key and suffix), 304 for a cache that holds it already; 404 naming it when the
    served index has no such photo or its thumbnail is missing from the store."""
    key = name.removesuffix(thumbnails.SUFFIX)
    if not thumbnails.KEY.match(key) or name == key or not active.index.has_thumbnail(key):
        raise ApiError(f"no photo {name[:80]!r} in index {active.served.index}", HTTPStatus.NOT_FOUND, "name")
    path = thumbnails.thumbnail_path(key)
    if not path.is_file():
        raise ApiError(f"the thumbnail of {name} is missing from the store: rebuild the index",
                       HTTPStatus.NOT_FOUND, "name")
    photo = FileResponse(path, media_type=thumbnails.MEDIA_TYPE, headers={**IMMUTABLE, "ETag": f'"{key}"'})
    if _REVALIDATION.is_not_modified(photo.headers, request_headers):  # a cache revalidating: no body to resend
        return NotModifiedResponse(photo.headers)
    return photo
