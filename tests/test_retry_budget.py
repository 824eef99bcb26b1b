"""The retry budget of embed calls (query/retry_budget.py)."""

from query.retry_budget import RetryBudget


def test_a_lone_failure_is_retried_at_once():
    budget = RetryBudget(0.1)
    assert budget.take()


def test_retries_add_at_most_the_share_once_the_reserve_is_spent():
    budget = RetryBudget(0.1, reserve=10)
    retried = 0
    for _ in range(1000):  # every call late: an overloaded embedder
        budget.sent()
        retried += budget.take()
    assert 100 <= retried <= 110  # the reserve of 10, then one retry per 10 calls


def test_the_reserve_refills_with_calls_but_never_beyond_it():
    budget = RetryBudget(0.5, reserve=2)
    assert budget.take() and budget.take() and not budget.take()
    for _ in range(100):
        budget.sent()
    assert budget.take() and budget.take() and not budget.take()


def test_share_zero_means_no_retry_after_the_reserve():
    budget = RetryBudget(0.0, reserve=1)
    assert budget.take()
    budget.sent()
    assert not budget.take()
