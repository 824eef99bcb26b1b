"""Embedder workers sharing a CPU's cores: a lone busy worker takes them all, busy workers one share each,
and no core is ever given to two passes at once."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid

import pytest
import torch

from model_store import core_share
from model_store.core_share import MAX_AUTO_WORKERS, RECENT_S, WAITING, CoreShare, available_cores, worker_count


@pytest.fixture
def key():
    key = uuid.uuid4().hex
    threads = torch.get_num_threads()
    yield key
    torch.set_num_threads(threads)
    (core_share.FOLDER / f"{core_share.FILE_PREFIX}{key}").unlink(missing_ok=True)


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
        until(lambda: a.others(WAITING) == 1)
        time.sleep(0.05)
        assert got == [], "b started a pass on cores a holds: 3 threads on 2 cores"
    t.join(5)
    assert got == [1]  # a has just finished a pass: under load it takes the next one at once, on the other core
    assert a.held_elsewhere() == b.held_elsewhere() == 0 and a.others(WAITING) == 0
    time.sleep(RECENT_S)
    with a.busy() as idle_since:  # b has been idle a while: a takes both again
        assert idle_since == 2


def test_a_pass_that_starts_while_another_worker_waits_takes_its_share(key, monkeypatch):
    monkeypatch.setattr(core_share, "POLL_S", 0.05)  # the waiting worker polls slowly: a starts again first
    a, b = CoreShare(2, 0, cores=2, key=key), CoreShare(2, 1, cores=2, key=key)
    release_b = threading.Event()
    with a.busy():
        t, got = pass_in_thread(b, hold=release_b)
        until(lambda: a.others(WAITING) == 1)
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
    assert b.others(WAITING) == 0


def test_a_slower_network_waits_longer_for_a_core(key, monkeypatch):
    """The embedder sets max_wait_s from its measured pass: a pass longer than MAX_WAIT_S is waited for,
    not run beside on a core it holds."""
    monkeypatch.setattr(core_share, "MAX_WAIT_S", 0.1)
    a, b = CoreShare(2, 0, cores=2, key=key), CoreShare(2, 1, cores=2, key=key)
    b.max_wait_s = 5.0
    with a.busy():
        t, got = pass_in_thread(b)
        time.sleep(0.3)  # past MAX_WAIT_S: b still waits
        assert got == [] and a.others(WAITING) == 1
    t.join(5)
    assert got and a.held_elsewhere() == 0


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


def test_a_dead_worker_counts_as_idle_and_its_index_can_start_again(key):
    a, b = CoreShare(2, 0, cores=2, key=key), CoreShare(2, 1, cores=2, key=key)
    b._set(WAITING)  # killed while it waited for a core
    assert a.others(WAITING) == 1 and a.others_active() == 1
    with pytest.raises(RuntimeError, match="worker 1 is already running"):
        CoreShare(2, 1, cores=2, key=key)
    del b  # its process ends: the kernel drops its locks
    assert a.others(WAITING) == 0 and a.others_active() == 0
    with a.busy() as threads:
        assert threads == 2
    restarted = CoreShare(2, 1, cores=2, key=key)  # the same worker, started again: its stale state is gone
    time.sleep(RECENT_S)
    assert a.others_active() == 0 and restarted.others_active() == 0


def test_an_index_outside_the_workers_is_refused():
    with pytest.raises(ValueError, match="outside 0..1"):
        CoreShare(2, 2, key=uuid.uuid4().hex)


def test_worker_count_setting_wins_else_one_per_gpu_or_one_per_core():
    assert worker_count(3, on_gpu=True) == 3
    assert worker_count(0, on_gpu=True) == 1
    assert worker_count(0, on_gpu=False) == min(available_cores(), MAX_AUTO_WORKERS)


def test_a_new_worker_removes_the_files_of_servers_that_are_gone(key):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    CoreShare(2, 0, cores=2, key=key)
    stale = core_share.FOLDER / f"{core_share.FILE_PREFIX}{gone.stdout.strip()}"
    live = core_share.FOLDER / f"{core_share.FILE_PREFIX}{os.getpid()}"  # a server still running: this process
    stale.write_bytes(b"\0" * 8)
    live_existed = live.exists()
    live.write_bytes(b"\0" * 8)
    try:
        CoreShare(2, 1, cores=2, key=key)
        assert not stale.exists()
        assert live.exists()
        assert (core_share.FOLDER / f"{core_share.FILE_PREFIX}{key}").exists()  # not named after a process: kept
    finally:
        stale.unlink(missing_ok=True)
        if not live_existed:
            live.unlink(missing_ok=True)
