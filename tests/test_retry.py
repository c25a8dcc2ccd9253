"""relay.retry: the bound, the jitter, the cap and the last error."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from relay.retry import Backoff, retry


class Flaky(Exception):
    """A failure worth another attempt."""


class Broken(Exception):
    """A failure that no attempt will fix."""


def failing(times: int, then: str = "done") -> tuple[list[int], Callable[[int], str]]:
    """A call that fails ``times`` times (each with its own error), then returns ``then``."""
    seen: list[int] = []

    def call(attempt: int) -> str:
        seen.append(attempt)
        if len(seen) <= times:
            raise Flaky(f"failure {attempt}")
        return then

    return seen, call


def is_flaky(error: Exception) -> bool:
    return isinstance(error, Flaky)


def test_retries_until_the_call_returns_and_numbers_the_attempts() -> None:
    seen, call = failing(2)
    sleeps: list[float] = []

    assert retry(call, Backoff(5, 0.5, 10.0), retryable=is_flaky, sleep=sleeps.append) == "done"

    assert seen == [1, 2, 3]
    assert len(sleeps) == 2


@pytest.mark.parametrize("attempts", [1, 2, 4])
def test_gives_up_after_exactly_the_attempts_with_the_last_error(attempts: int) -> None:
    seen, call = failing(10)
    sleeps: list[float] = []

    with pytest.raises(Flaky, match=f"failure {attempts}$"):
        retry(call, Backoff(attempts, 0.1, 1.0), retryable=is_flaky, sleep=sleeps.append)

    assert seen == list(range(1, attempts + 1))
    assert len(sleeps) == attempts - 1


def test_an_error_not_worth_retrying_is_raised_at_once() -> None:
    sleeps: list[float] = []

    def call(_attempt: int) -> str:
        raise Broken("no")

    with pytest.raises(Broken):
        retry(call, Backoff(5, 0.1, 1.0), retryable=is_flaky, sleep=sleeps.append)
    assert sleeps == []


@pytest.mark.parametrize(
    ("attempt", "first", "cap", "ceiling"),
    [(1, 0.5, 10.0, 0.5), (2, 0.5, 10.0, 1.0), (3, 0.5, 10.0, 2.0), (6, 0.5, 10.0, 10.0)],
)
def test_the_wait_is_full_jitter_under_the_capped_exponential(
    attempt: int, first: float, cap: float, ceiling: float
) -> None:
    backoff = Backoff(10, first, cap)

    assert backoff.longest(attempt) == ceiling
    assert backoff.wait(attempt, rand=lambda: 0.0) == 0.0
    assert backoff.wait(attempt, rand=lambda: 1.0) == ceiling
    waits = [backoff.wait(attempt) for _ in range(200)]
    assert all(0.0 <= wait <= ceiling for wait in waits)
    assert len(set(waits)) > 100  # random, not one fixed wait


@pytest.mark.parametrize(("asked", "wait"), [(2.0, 2.0), (0.0, 0.0), (3600.0, 7.0), (-1.0, 0.0)])
def test_a_wait_the_other_side_asked_for_is_kept_within_the_cap(asked: float, wait: float) -> None:
    assert Backoff(3, 0.5, 7.0).wait(1, asked) == wait
    assert Backoff(3, 0.5, 7.0).longest(1, asked) == wait


def test_retry_waits_what_was_asked() -> None:
    _, call = failing(2)
    sleeps: list[float] = []

    retry(call, Backoff(3, 0.5, 10.0), retryable=is_flaky, asked=lambda _: 4.0, sleep=sleeps.append)

    assert sleeps == [4.0, 4.0]


def test_no_wait_may_end_past_the_budget() -> None:
    now = [0.0]
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        now[0] += seconds

    seen, call = failing(100)
    with pytest.raises(Flaky):
        retry(
            call,
            Backoff(100, 1.0, 1.0, budget=3.5),
            retryable=is_flaky,
            asked=lambda _: 1.0,
            sleep=sleep,
            clock=lambda: now[0],
        )

    assert sleeps == [1.0, 1.0, 1.0]  # a fourth would end at 4.0 > 3.5
    assert seen == [1, 2, 3, 4]
