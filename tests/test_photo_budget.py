"""Photos in flight to the embedder (query/photo_budget.py): never over the limit, first come first served,
and a cancelled call neither keeps nor loses its photos."""

import asyncio

from query.photo_budget import PhotoBudget


async def _call(budget: PhotoBudget, photos: int, log: list, held: list, hold_s: float = 0.01) -> None:
    async with budget.hold(photos):
        held.append(budget.limit - budget.free)
        log.append(photos)
        await asyncio.sleep(hold_s)


def test_never_more_photos_than_the_limit_and_first_come_first_served():
    async def run() -> tuple[list, list]:
        budget, log, held = PhotoBudget(32), [], []
        calls = [asyncio.create_task(_call(budget, n, log, held)) for n in (16, 16, 16, 1, 1, 16, 1)]
        for task in calls:
            await asyncio.sleep(0)  # each call arrives after the one before
        await asyncio.gather(*calls)
        return log, held, budget.free

    log, held, free = asyncio.run(run())
    assert max(held) <= 32 and free == 32
    assert log == [16, 16, 16, 1, 1, 16, 1]  # the lone photos do not overtake the batch ahead of them


def test_a_call_for_more_than_the_limit_holds_all_of_it_alone():
    async def run() -> tuple[list, list]:
        budget, log, held = PhotoBudget(4), [], []
        await asyncio.gather(_call(budget, 2, log, held), _call(budget, 16, log, held), _call(budget, 2, log, held))
        return held, budget.free

    held, free = asyncio.run(run())
    assert held == [2, 4, 2] and free == 4


def test_a_call_cancelled_while_it_waits_lets_the_next_in():
    """3 of 4 photos held; a call for 4 waits, a call for 1 waits behind it. When the first is cancelled
    (its client went away, say) the call for 1 fits and goes at once, not when the 3 are given back."""
    async def run() -> tuple[list, bool, int]:
        budget, log, held = PhotoBudget(4), [], []
        first = asyncio.create_task(_call(budget, 3, log, held, hold_s=1.0))
        await asyncio.sleep(0)
        waiting_big = asyncio.create_task(_call(budget, 4, log, held))
        await asyncio.sleep(0)
        small = asyncio.create_task(_call(budget, 1, log, held))
        await asyncio.sleep(0.05)
        waiting_big.cancel()
        await asyncio.wait_for(small, 0.5)
        first_still_holds = not first.done()
        await first
        return log, first_still_holds, budget.free

    log, first_still_holds, free = asyncio.run(run())
    assert log == [3, 1] and first_still_holds and free == 4


def test_a_call_cancelled_as_its_turn_comes_gives_its_photos_back():
    async def run() -> int:
        budget = PhotoBudget(2)
        async with budget.hold(2):
            waiter = asyncio.create_task(_call(budget, 2, [], []))
            await asyncio.sleep(0)
        waiter.cancel()  # granted on release, cancelled before it ran
        await asyncio.gather(waiter, return_exceptions=True)
        return budget.free

    assert asyncio.run(run()) == 2


def test_a_smaller_limit_holds_new_calls_back_until_the_photos_held_are_given_back():
    """The entry shrinks the budget once it learns how slow the embedder is: photos already held stay held,
    calls waiting are granted under the new limit, and every photo comes back."""
    async def run() -> tuple[list, list, int, int]:
        budget, log, held = PhotoBudget(8), [], []
        first = asyncio.create_task(_call(budget, 6, log, held, hold_s=0.1))
        await asyncio.sleep(0)
        budget.resize(4)  # 6 held under a limit of 4 now: none free
        waiting = [asyncio.create_task(_call(budget, n, log, held)) for n in (8, 1)]
        await asyncio.sleep(0.05)
        nothing_yet = list(log)
        await asyncio.gather(first, *waiting)
        return nothing_yet, held, budget.free, budget.limit

    nothing_yet, held, free, limit = asyncio.run(run())
    assert nothing_yet == [6]  # the call for 8 (4 now) and the one behind it wait for the 6
    assert held == [6, 4, 1] and free == limit == 4


def test_a_larger_limit_lets_waiting_calls_in_at_once():
    async def run() -> tuple[list, int]:
        budget, log, held = PhotoBudget(2), [], []
        first = asyncio.create_task(_call(budget, 2, log, held, hold_s=1.0))
        await asyncio.sleep(0)
        second = asyncio.create_task(_call(budget, 2, log, held))
        await asyncio.sleep(0.02)
        budget.resize(4)
        await asyncio.wait_for(second, 0.5)  # not after the first's second
        first.cancel()
        await asyncio.gather(first, return_exceptions=True)
        return log, budget.free

    log, free = asyncio.run(run())
    assert log == [2, 2] and free == 4


def test_photos_ahead_are_those_held_and_those_waiting():
    async def run() -> tuple[int, int, int]:
        budget = PhotoBudget(16)
        first = asyncio.create_task(_call(budget, 12, [], [], hold_s=0.2))
        await asyncio.sleep(0)
        waiting = [asyncio.create_task(_call(budget, n, [], [])) for n in (8, 40)]  # 40 counts as the limit
        await asyncio.sleep(0.01)
        both = budget.ahead()
        waiting[1].cancel()
        await asyncio.sleep(0)
        one = budget.ahead()
        await asyncio.gather(first, *waiting, return_exceptions=True)
        return both, one, budget.ahead()

    assert asyncio.run(run()) == (12 + 8 + 16, 12 + 8, 0)
