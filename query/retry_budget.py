"""A retry budget for calls to the embedder: retries may add only a fixed share to the calls sent.

A call past its deadline is sent once more (embedding is idempotent), which cures a call lost on a dropped
or stalled connection (BentoML issue 4971). But a call is also late when the embedder is merely behind, and
then the first copy is still queued there and will be computed anyway: sending every late call again
doubles the load at the moment the embedder can least take it. Measured in a 10-minute soak at 27
searches/s on 2 cores (docs/PERFORMANCE.md, section 6): a few seconds of slowdown made ~30 calls late, each
was sent twice, and the last 100 s of the run failed 146 requests with 503s and 429s. With a budget, a lone
lost call is still retried, and an overloaded embedder gets at most `share` more calls than it was sent
(the answer is a 503 at the first deadline instead), the usual cure for retry storms (Google SRE book,
"Handling Overload").
"""

from __future__ import annotations


class RetryBudget:
    """Tokens for retries: each first attempt earns `share` of one, up to `reserve`; a retry spends one.

    Used from one event loop, so it needs no lock."""

    def __init__(self, share: float, reserve: float = 10.0):
        self.share, self.reserve, self.tokens = share, reserve, reserve

    def sent(self) -> None:
        """A first attempt went out."""
        self.tokens = min(self.reserve, self.tokens + self.share)

    def take(self) -> bool:
        """May a failed call be sent again? Spends a token when it may."""
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True
