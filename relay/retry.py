"""The one retry loop: exponential backoff with full jitter, each wait capped, the whole bounded.

Every outbound call that is worth repeating goes through ``retry``: Gemini, Sinch, the payer
client's paid request, nonce reservations and waiting for a development chain. Random waits
keep many clients that failed together from coming back together; a wait the other side asked
for (Retry-After) is honoured as it is, within the same cap.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Backoff:
    """At most ``attempts`` attempts within ``budget`` seconds; the wait after attempt n is
    uniform in [0, min(cap, first * 2**(n-1))], or what the other side asked for, up to cap."""

    attempts: int
    first: float
    cap: float
    budget: float = math.inf

    def longest(self, attempt: int, asked: float | None = None) -> float:
        """The longest wait after failed attempt number ``attempt`` (counted from 1): what
        the other side asked for, or the capped exponential."""
        if asked is not None:
            return min(max(asked, 0.0), self.cap)
        return min(self.cap, self.first * 2.0 ** (attempt - 1))

    def wait(
        self, attempt: int, asked: float | None = None, rand: Callable[[], float] = random.random
    ) -> float:
        """Seconds to wait after failed attempt number ``attempt``: what was asked for, else a
        random part of the longest wait (full jitter)."""
        longest = self.longest(attempt, asked)
        return longest if asked is not None else rand() * longest


def _nothing_asked(_error: Exception) -> float | None:
    return None


def retry(
    call: Callable[[int], T],
    backoff: Backoff,
    *,
    retryable: Callable[[Exception], bool],
    asked: Callable[[Exception], float | None] = _nothing_asked,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> T:
    """``call(attempt)`` until it returns. Its last error is raised as it is when the error is
    not ``retryable``, the attempts are spent, or the next wait would end past the budget."""
    started = clock()
    attempt = 1
    while True:
        try:
            return call(attempt)
        except Exception as error:
            delay = backoff.wait(attempt, asked(error))
            spent = attempt >= backoff.attempts or clock() - started + delay > backoff.budget
            if spent or not retryable(error):
                raise
        sleep(delay)
        attempt += 1
