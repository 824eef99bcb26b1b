"""Schemathesis checks of this API (loaded by tests/test_fuzz.py through SCHEMATHESIS_HOOKS)."""

import schemathesis


@schemathesis.check
def one_error_shape(ctx, response, case):
    """Every 4xx and 5xx answers {"error": str, "field": str or null}; nothing a client sends gets a 5xx."""
    if response.status_code < 400:
        return None
    body = response.json()
    if not (isinstance(body, dict) and set(body) == {"error", "field"} and isinstance(body["error"], str)
            and (body["field"] is None or isinstance(body["field"], str))):
        raise AssertionError(f"error body not in the one shape: {response.text[:300]}")
    if response.status_code >= 500 and response.status_code != 503:
        raise AssertionError(f"{response.status_code} for a client's request: {body['error']}")
    return None
