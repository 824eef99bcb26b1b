"""Embedder workers sharing a CPU's cores: a lone busy worker takes them all, busy workers one share each,
and no core is ever given to two passes at once."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import uuid

import pytest
import torch

from model_store import core_share
from model_store.core_share import MAX_AUTO_WORKERS, CoreShare, available_cores, worker_count


@pytest.fixture
def key():
    key = uuid.uuid4().hex
    threads = torch.get_num_threads()
    yield key
    torch.set_num_threads(threads)
    (CoreShare(2, 0, cores=2, key=key).path).unlink(missing_ok=True)


def pass_in_thread(share: CoreShare, hold: threading.Event | None = None) -> tuple[threading.Thread, list]:
    """share.busy() on another thread; the list gets its threads once the pass starts."""
    got: list = []

    def run():
        with share.busy() as threads:
            got.append(threads)
            if hold:
                hold.wait(10)

    t = threading.Thread(target=run)
    t.start()
    return t, got


def until(condition, timeout: float = 5) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.005)


def test_a_lone_worker_uses_every_core_and_a_second_waits_for_one(key):
    a, b = CoreShare(2, 0, cores=2, key=key), CoreShare(2, 1, cores=2, key=key)
    with a.busy() as alone:
        assert alone == 2 and torch.get_num_threads() == 2
        assert b.held_elsewhere() == 2 and a.held_elsewhere() == 0
        t, got = pass_in_thread(b)
        until(lambda: a.waiting_workers() == 1)
        time.sleep(0.05)
        assert got == [], "b started a pass on cores a holds: 3 threads on 2 cores"
    t.join(5)
    assert got == [2]  # a is done and nobody waits: b takes both
    assert a.held_elsewhere() == b.held_elsewhere() == 0 and a.waiting_workers() == 0


def test_a_pass_that_starts_while_another_worker_waits_takes_its_share(key, monkeypatch):
    monkeypatch.setattr(core_share, "POLL_S", 0.05)  # the waiting worker polls slowly: a starts again first
    a, b = CoreShare(2, 0, cores=2, key=key), CoreShare(2, 1, cores=2, key=key)
    release_b = threading.Event()
    with a.busy():
        t, got = pass_in_thread(b, hold=release_b)
        until(lambda: a.waiting_workers() == 1)
    with a.busy() as again:  # b still waits: a leaves it a core
        assert again == 1
        until(lambda: got == [1])
        assert a.held_elsewhere() == 1 and b.held_elsewhere() == 1
    release_b.set()
    t.join(5)


def test_a_wait_is_bounded(key, monkeypatch):
    monkeypatch.setattr(core_share, "MAX_WAIT_S", 0.1)
    a, b = CoreShare(2, 0, cores=2, key=key), CoreShare(2, 1, cores=2, key=key)
    with a.busy():
        start = time.monotonic()
        with b.busy() as threads:  # a never finishes: b runs on one thread after the wait
            assert threads == 1 and 0.1 <= time.monotonic() - start < 1
    assert b.waiting_workers() == 0


def test_cores_held_by_a_killed_worker_are_free_again(key):
    code = (f"from model_store.core_share import CoreShare; import sys, time\n"
            f"with CoreShare(2, 1, cores=2, key={key!r}).busy() as n:\n"
            f"    print(n, flush=True); time.sleep(60)")
    worker = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert worker.stdout.readline().strip() == "2"
        a = CoreShare(2, 0, cores=2, key=key)
        assert a.held_elsewhere() == 2
    finally:
        worker.kill()
        worker.wait()
    assert a.held_elsewhere() == 0  # the kernel dropped the dead worker's locks
    with a.busy() as threads:
        assert threads == 2


def test_a_worker_restarted_after_a_crash_clears_its_waiting_flag(key):
    a, b = CoreShare(2, 0, cores=2, key=key), CoreShare(2, 1, cores=2, key=key)
    b._flags[b._waiting] = 1  # killed while it waited for a core
    assert a.waiting_workers() == 1
    CoreShare(2, 1, cores=2, key=key)  # the same worker, started again
    assert a.waiting_workers() == 0


def test_an_index_outside_the_workers_is_refused():
    with pytest.raises(ValueError, match="outside 0..1"):
        CoreShare(2, 2, key=uuid.uuid4().hex)


def test_worker_count_setting_wins_else_one_per_gpu_or_one_per_core():
    assert worker_count(3, on_gpu=True) == 3
    assert worker_count(0, on_gpu=True) == 1
    assert worker_count(0, on_gpu=False) == min(available_cores(), MAX_AUTO_WORKERS)
