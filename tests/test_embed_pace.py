"""The embed deadline and the photos in flight, sized from the pass the embedder measured (query/embed_pace.py)."""

import math

import pytest

from query.embed_pace import MARGIN, MIN_ROUNDS, embed_pace

DEADLINE, PHOTOS = 1.2, 32  # the settings' defaults


def test_an_embedder_that_measured_nothing_gets_the_settings():
    pace = embed_pace(None, 4, 2, 1, DEADLINE, PHOTOS)
    assert (pace.deadline_s, pace.photos_in_flight) == (DEADLINE, PHOTOS)


def test_a_fast_network_keeps_the_settings():
    """A GPU pass, or the default network on both cores: the settings' queue fits the deadline."""
    for batch_s, max_batch, workers in ((0.005, 8, 1), (0.07, 4, 2)):
        pace = embed_pace(batch_s, max_batch, workers, 1, DEADLINE, PHOTOS)
        assert (pace.deadline_s, pace.photos_in_flight) == (DEADLINE, PHOTOS)


def test_the_original_design_network_gets_a_deadline_for_its_pass_and_a_short_queue():
    """VGG16 on one core a worker: a batch of 4 in ~1.3 s. Fixed limits (1.2 s, 32 photos) timed out calls
    that were only queued; now two rounds of batches are in flight and the deadline covers them."""
    pace = embed_pace(1.3, 4, 2, 1, DEADLINE, PHOTOS)
    assert pace.photos_in_flight == MIN_ROUNDS * 2 * 4
    assert pace.deadline_s == pytest.approx(MARGIN * (MIN_ROUNDS + 1) * 1.3)
    assert "1.30 s" in pace.why and "16 photos" in pace.why


@pytest.mark.parametrize("workers,max_batch,entries", [(1, 4, 1), (2, 4, 1), (4, 4, 1), (2, 4, 3), (1, 8, 1)])
def test_the_photos_in_flight_always_fit_the_deadline_with_a_margin(workers, max_batch, entries):
    """For passes from 1 ms to 5 s: a photo admitted last, behind every other photo the entry processes
    keep in flight, is answered within the deadline with MARGIN to spare; and the queue never drops below two
    rounds of batches (which would leave workers idle between rounds) unless the settings ask for less."""
    per_round = workers * max_batch
    for batch_s in (0.001 * 1.25 ** i for i in range(38)):
        pace = embed_pace(batch_s, max_batch, workers, entries, DEADLINE, PHOTOS)
        rounds = math.ceil(pace.photos_in_flight * entries / per_round)
        assert MARGIN * (rounds + 1) * batch_s <= pace.deadline_s + 0.01, (batch_s, pace)
        assert pace.deadline_s >= DEADLINE and max_batch <= pace.photos_in_flight <= PHOTOS
        assert rounds >= min(MIN_ROUNDS, PHOTOS * entries // per_round), (batch_s, pace)


def test_the_deadline_grows_with_the_pass_and_the_queue_shrinks():
    paces = [embed_pace(b, 4, 2, 1, DEADLINE, PHOTOS) for b in (0.05, 0.17, 0.3, 0.9, 1.4)]
    assert [p.deadline_s for p in paces] == sorted(p.deadline_s for p in paces)
    assert [p.photos_in_flight for p in paces] == sorted((p.photos_in_flight for p in paces), reverse=True)


def test_entry_processes_share_the_queue():
    one, four = (embed_pace(1.3, 4, 2, n, DEADLINE, PHOTOS) for n in (1, 4))
    assert four.photos_in_flight == one.photos_in_flight // 4 and four.deadline_s == one.deadline_s


def test_the_wait_for_photos_queued_comes_from_the_measured_rate():
    assert embed_pace(None, 4, 2, 1, DEADLINE, PHOTOS).wait_s(100) is None  # not measured: no estimate
    pace = embed_pace(0.5, 4, 2, 1, DEADLINE, PHOTOS)  # 8 photos a round of 0.5 s: 16 a second
    assert pace.photos_per_s == 16 and pace.wait_s(48) == 3
