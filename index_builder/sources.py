"""Where catalogue photos come from: a local file, or a URL (https://, s3://, gs://) read through fsspec.

Remote reads have a timeout and are retried with backoff; a photo that cannot be read raises PhotoError with
the reason, which the build reports like an unreadable file. Cheap keys (local: size and mtime; remote:
ETag, else size and Last-Modified, from one metadata request) let the embedding cache recognise an
unchanged photo without reading it.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from typing import Any

REMOTE_SCHEMES = ("http://", "https://", "s3://", "gs://")
TIMEOUT_S = 30.0
RETRIES = 2
CONCURRENCY = 16  # remote reads in flight per decoding worker


class PhotoError(OSError):
    """A photo that could not be read; the message says why."""


def is_remote(source: str) -> bool:
    return source.startswith(REMOTE_SCHEMES)


@lru_cache(maxsize=8)
def _filesystem(protocol: str, pid: int) -> Any:
    """One filesystem per protocol and process (a forked decoding worker makes its own)."""
    import fsspec

    if protocol in ("http", "https"):
        import aiohttp

        return fsspec.filesystem("https", client_kwargs={"timeout": aiohttp.ClientTimeout(total=TIMEOUT_S)})
    if protocol == "s3":  # credentials and endpoint from the usual AWS_* variables (AWS_ENDPOINT_URL too)
        return fsspec.filesystem("s3", config_kwargs={"connect_timeout": TIMEOUT_S, "read_timeout": TIMEOUT_S,
                                                      "retries": {"max_attempts": 1}})
    if protocol in ("gs", "gcs"):  # credentials: Google's default ones; STORAGE_EMULATOR_HOST for an emulator
        return fsspec.filesystem("gs", requests_timeout=TIMEOUT_S)
    return fsspec.filesystem(protocol)


def _fs(source: str) -> Any:
    return _filesystem(source.split("://", 1)[0], os.getpid())


def _retrying(what: str, source: str, call):
    for attempt in range(RETRIES + 1):
        try:
            return call()
        except FileNotFoundError:
            raise PhotoError(f"{what} {source}: not found") from None
        except PermissionError as exc:
            raise PhotoError(f"{what} {source}: access denied ({exc})") from None
        except Exception as exc:  # noqa: BLE001 -- every backend has its own errors; retried, then reported
            if attempt == RETRIES:
                raise PhotoError(f"{what} {source}: {type(exc).__name__}: {exc} "
                                 f"(tried {RETRIES + 1} times)") from None
            time.sleep(0.2 * 2 ** attempt)


def read_bytes(source: str) -> bytes:
    """The photo's bytes; PhotoError with the reason when it cannot be read."""
    if not is_remote(source):
        try:
            with open(source, "rb") as f:
                return f.read()
        except OSError as exc:
            raise PhotoError(f"cannot read {source}: {exc.strerror or exc}") from None
    return _retrying("cannot fetch", source, lambda: _fs(source).cat_file(source))


def read_many(sources: list[str]) -> list[bytes | PhotoError]:
    """Bytes or the error of each source; remote ones fetched CONCURRENCY at a time."""
    def one(source: str) -> bytes | PhotoError:
        try:
            return read_bytes(source)
        except PhotoError as exc:
            return exc

    if not any(is_remote(s) for s in sources):
        return [one(s) for s in sources]
    with ThreadPoolExecutor(min(CONCURRENCY, len(sources))) as pool:
        return list(pool.map(one, sources))


def cheap_key(source: str) -> str | None:
    """Changes when the photo does; None when it cannot be had (the photo is then read and hashed)."""
    if not is_remote(source):
        try:
            st = os.stat(source)
        except OSError:
            return None
        return f"{source}|{st.st_size}|{st.st_mtime_ns}"
    try:
        info = _retrying("cannot stat", source, lambda: _fs(source).info(source))
    except PhotoError:
        return None
    tag = info.get("ETag") or info.get("etag")
    if tag:
        return f"{source}|etag={tag}"
    modified = info.get("LastModified") or info.get("Last-Modified") or info.get("last_modified")
    return f"{source}|{info.get('size')}|{modified}" if modified else None


def cheap_keys(sources: list[str]) -> list[str | None]:
    if not any(is_remote(s) for s in sources):
        return [cheap_key(s) for s in sources]
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        return list(pool.map(cheap_key, sources))
