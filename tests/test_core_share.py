"""Embedder workers sharing a CPU's cores: a lone busy worker takes them all, busy workers one share each."""

from __future__ import annotations

import uuid

import pytest
import torch

from model_store.core_share import MAX_AUTO_WORKERS, CoreShare, available_cores, worker_count


@pytest.fixture
def pair():
    key = uuid.uuid4().hex
    a, b = CoreShare(2, 0, cores=2, key=key), CoreShare(2, 1, cores=2, key=key)
    threads = torch.get_num_threads()
    yield a, b
    torch.set_num_threads(threads)
    a.path.unlink(missing_ok=True)


def test_a_lone_worker_uses_every_core_and_two_busy_workers_one_each(pair):
    a, b = pair
    with a.busy() as alone:
        assert alone == 2 and torch.get_num_threads() == 2
        assert a.busy_workers() == b.busy_workers() == 1
        with b.busy() as together:  # b starts while a is still busy
            assert together == 1 and torch.get_num_threads() == 1
            assert a.busy_workers() == 2
    assert a.busy_workers() == 0
    with b.busy() as again:
        assert again == 2


def test_a_worker_restarted_after_a_crash_clears_its_flag(pair):
    a, b = pair
    batch = a.busy()
    batch.__enter__()  # killed in the middle of a batch: its flag stays set
    assert b.busy_workers() == 1
    CoreShare(2, 0, cores=2, key=a.path.name.rsplit("-", 1)[1])  # the same worker, started again
    assert b.busy_workers() == 0


def test_an_index_outside_the_workers_is_refused():
    with pytest.raises(ValueError, match="outside 0..1"):
        CoreShare(2, 2, key=uuid.uuid4().hex)


def test_worker_count_setting_wins_else_one_per_gpu_or_one_per_core():
    assert worker_count(3, on_gpu=True) == 3
    assert worker_count(0, on_gpu=True) == 1
    assert worker_count(0, on_gpu=False) == min(available_cores(), MAX_AUTO_WORKERS)
