"""Each client its share of photos: the bucket's arithmetic, who the client is, and a real `bentoml serve`
that refuses the client past its share with 429 while serving the others."""

from __future__ import annotations

import time

import pytest

from bench.server import deployed_serve_args
from conftest import Server
from query.client_limit import ClientLimit
from query.errors import ApiError
from test_guard import GOOD, PHOTO


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def refusal(limit: ClientLimit, client: str) -> ApiError:
    with pytest.raises(ApiError) as exc:
        limit.admit(client)
    return exc.value


def test_a_client_has_its_burst_then_its_rate_and_others_are_not_touched():
    clock = Clock()
    limit = ClientLimit(rate=2, burst=3, clock=clock)
    for _ in range(3):
        limit.admit("a")
    refused = refusal(limit, "a")
    assert refused.status == 429 and refused.headers == {"Retry-After": "1"}
    assert "2 photos a second with bursts of 3: retry in 1 s" in refused.message
    limit.admit("b")  # another client still has its whole burst
    clock.now += 0.5  # one photo's worth comes back
    limit.admit("a")
    refusal(limit, "a")
    clock.now += 60  # never more than the burst
    for _ in range(3):
        limit.admit("a")
    refusal(limit, "a")


def test_a_batch_takes_its_photos_and_its_debt_is_waited_out():
    clock = Clock()
    limit = ClientLimit(rate=1, burst=4, clock=clock)
    limit.admit("a")
    limit.charge("a", 16)  # a /search_batch of 16: 12 photos of debt
    assert refusal(limit, "a").headers == {"Retry-After": "13"}
    clock.now += 12.5
    assert refusal(limit, "a").headers == {"Retry-After": "1"}
    clock.now += 0.5
    limit.admit("a")
    limit.charge("a", 1)  # a request with one photo took it on admission
    refusal(limit, "a")


def scope(peer: str | None, *forwarded: str) -> dict:
    return {"client": (peer, 5000) if peer else None,
            "headers": [(b"x-forwarded-for", value.encode()) for value in forwarded]}


def test_the_client_is_the_peer_or_the_address_the_trusted_proxies_saw():
    direct, behind_one, behind_two = (ClientLimit(1, 1, hops) for hops in (0, 1, 2))
    # without trusted proxies the header is anyone's to write, so it is ignored
    assert direct.client(scope("203.0.113.7", "10.9.9.9")) == "203.0.113.7"
    assert direct.client(scope(None)) == "unknown"
    # an ingress appends the address it saw; what the client wrote stays on the left, untrusted
    assert behind_one.client(scope("10.0.0.2", "1.1.1.1, 198.51.100.4")) == "198.51.100.4"
    assert behind_one.client(scope("10.0.0.2", "1.1.1.1", "198.51.100.4")) == "198.51.100.4"
    assert behind_two.client(scope("10.0.0.3", "1.1.1.1, 198.51.100.4, 10.0.0.2")) == "198.51.100.4"
    assert behind_two.client(scope("10.0.0.3", "198.51.100.4")) == "198.51.100.4"  # fewer hops than said
    assert behind_one.client(scope("10.0.0.2")) == "10.0.0.2"  # no header: the peer
    # an IPv6 host has a /64 to pick its addresses from: they are one client
    assert direct.client(scope("2001:db8:1:2:aaaa::1")) == direct.client(scope("2001:db8:1:2:bbbb::9")) \
        == "2001:db8:1:2::/64" != direct.client(scope("2001:db8:1:3::1"))
    assert behind_one.client(scope("10.0.0.2", "2001:db8:1:2::5")) == "2001:db8:1:2::/64"


def test_buckets_are_bounded_and_the_least_recently_seen_goes_first():
    limit = ClientLimit(rate=1, burst=1, max_clients=2, clock=Clock())
    for client in ("a", "b", "c"):
        limit.admit(client)
    limit.admit("a")  # a's empty bucket was dropped for c's: a starts afresh
    refusal(limit, "c")


@pytest.fixture(scope="module")
def limited(served_stages, tmp_path_factory):
    """A real server behind one (pretend) proxy, each client held to 0.25 photos a second in bursts of 3."""
    srv = Server(served_stages, tmp_path_factory.mktemp("limited") / "serve.log", serve_args=deployed_serve_args(),
                 IMAGESEARCH_CLIENT_PHOTOS_PER_S="0.25", IMAGESEARCH_CLIENT_BURST_PHOTOS="3",
                 IMAGESEARCH_FORWARDED_HOPS="1")
    try:
        srv.wait()
        yield srv
    finally:
        srv.stop()


@pytest.mark.slow
def test_a_client_past_its_share_gets_429_while_others_are_served(limited):
    def search(client: str, **kw):
        return limited.http.post("/search", files={"image": PHOTO}, headers={"X-Forwarded-For": client}, **kw)

    assert search("10.0.0.9").status_code == 200  # warm up, as another client
    assert [search("10.0.0.1").status_code for _ in range(3)] == [200, 200, 200]
    refused = search("10.0.0.1")
    assert refused.status_code == 429 and refused.json()["field"] is None, refused.text
    assert "more than its share, 0.25 photos a second with bursts of 3" in refused.json()["error"]
    wait = int(refused.headers["retry-after"])
    assert 1 <= wait <= 4
    assert search("10.0.0.2").status_code == 200  # another client is served meanwhile
    assert search("6.6.6.6, 10.0.0.1").status_code == 429  # what the client wrote itself does not count
    assert limited.http.get("/index").status_code == 200  # requests without photos are not counted
    # a batch of three photos takes the whole burst; refused requests cost one photo each
    r = limited.http.post("/search_batch", files=[("images", PHOTO)] * 3, headers={"X-Forwarded-For": "10.0.0.3"})
    assert r.status_code == 200 and search("10.0.0.3").status_code == 429
    bad = [search("10.0.0.4", data={"k": "0"}).status_code for _ in range(3)]
    assert bad == [400, 400, 400] and search("10.0.0.4").status_code == 429
    time.sleep(wait)
    assert search("10.0.0.1").status_code == 200


@pytest.mark.slow
def test_the_page_says_how_long_to_wait(limited, browser):
    """The page's own searches (no proxy header: the client is the peer) past the share of 3."""
    from test_ui import choose, open_search_page

    page = browser.new_page(base_url=limited.url)
    open_search_page(page)
    for i in range(4):
        with page.expect_response(lambda r: r.url.endswith("/assist")) as answer:
            choose(page, data=GOOD, name=f"photo-{i}.png")
        assert answer.value.status == (200 if i < 3 else 429), (i, answer.value.status)
    alert = page.locator("#error")
    alert.wait_for(state="visible", timeout=30_000)
    wait = int(answer.value.headers["retry-after"])
    when = f"in {wait} seconds" if wait > 1 else "in a moment"
    assert alert.inner_text() == f"Too many searches at once. Please try again {when}.", alert.inner_text()
    page.close()
