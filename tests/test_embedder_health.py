"""query/embedder_health.py: when /livez asks for a restart, against BentoML's own client."""

from __future__ import annotations

import time

import pytest
from _bentoml_impl.client import RemoteProxy

from query.embedder_health import EmbedderHealth, served_alongside


@pytest.mark.parametrize("url, alongside", [
    ("file:///tmp/bentoml-uds-x/1.sock", True),  # `bentoml serve` runs the embedder: a Unix socket
    ("tcp://127.0.0.1:3001", True),  # the same where there are no Unix sockets (BENTOML_NO_UDS, Windows)
    ("http://127.0.0.1:3001", False),  # --depends Embedder=URL: another server's embedder
    ("https://embedder.example", False),
])
def test_only_an_embedder_of_this_server_counts_as_alongside(url, alongside):
    assert served_alongside(RemoteProxy(url)) is alongside


def test_an_embedder_in_process_is_not_alongside():
    assert not served_alongside(object())


def test_a_restart_is_needed_only_after_lost_s_without_an_answer():
    health = EmbedderHealth(RemoteProxy("file:///tmp/x.sock"), lost_s=0.05)
    health.lost()
    assert not health.restart_needed()
    time.sleep(0.06)
    health.lost()  # a later failure keeps the first one's time
    assert health.restart_needed() and health.lost_for_s() > 0.05
    health.answered()
    assert not health.restart_needed() and health.lost_for_s() == 0


@pytest.mark.parametrize("url, lost_s", [("https://embedder.example", 0.01), ("file:///tmp/x.sock", 0)])
def test_no_restart_for_an_embedder_apart_or_with_the_limit_off(url, lost_s):
    health = EmbedderHealth(RemoteProxy(url), lost_s=lost_s)
    health.lost()
    time.sleep(0.02)
    assert not health.restart_needed()
