"""'Authorization: Bearer <token>', checked one way by the entry's /reload and the Embedder's guard."""

from __future__ import annotations

import hmac


def carries(header: bytes, token: str) -> bool:
    """Whether an Authorization header's value is 'Bearer <token>': the scheme in any case (RFC 7235) and
    required, the token compared in constant time and as bytes (compare_digest refuses a str with non-ASCII
    characters, which a client can send). Never true for an empty token."""
    scheme, _, given = header.strip().partition(b" ")
    return bool(token) and scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), token.encode())
