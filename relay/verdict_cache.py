"""Each distinct text moderated once per model and policy: a verdict cache and the single
flight that makes concurrent requests for one new text cost one model call."""

from __future__ import annotations

import dataclasses
import os
import secrets
import threading
import time
from typing import Protocol

from relay.memo import Memo
from relay.moderation import POLICY_VERSION, Moderator, Verdict, cache_key, unavailable


class VerdictCache(Protocol):
    """Where verdicts are remembered by cache_key(), and who is computing one."""

    def get(self, key: str) -> Verdict | None:
        """The verdict stored under KEY, if any."""
        ...

    def put(self, key: str, verdict: Verdict, *, releasing: str | None = None) -> None:
        """Remember a verdict under KEY; with ``releasing``, give that holder's claim up in
        the same write."""
        ...

    def claim(self, key: str, holder: str, seconds: float) -> bool:
        """Take the right to compute KEY's verdict for ``seconds``; False while another
        process holds it."""
        ...

    def release(self, key: str, holder: str) -> None:
        """Give that right up."""
        ...


class MemoryVerdictCache:
    """A thread-safe, bounded LRU cache for one process; the first verdict for a key wins."""

    def __init__(self, max_entries: int = 10_000) -> None:
        self._items: Memo[str, Verdict] = Memo(max_entries)

    def get(self, key: str) -> Verdict | None:
        """The verdict stored under KEY, if any (and mark it recently used)."""
        return self._items.get(key)

    def put(self, key: str, verdict: Verdict, *, releasing: str | None = None) -> None:
        """Remember a verdict, evicting the least recently used beyond max_entries (there
        is no claim to give up)."""
        self._items.put(key, verdict, keep_first=True)

    def claim(self, key: str, holder: str, seconds: float) -> bool:
        """One process: the in-process single flight is all there is to it."""
        return True

    def release(self, key: str, holder: str) -> None:
        """Nothing to give up."""

    def __len__(self) -> int:
        return len(self._items)


class _Flight:
    """One computation that concurrent callers wait for."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.verdict: Verdict | None = None
        self.error: BaseException | None = None


class CachingModerator:
    """Moderates each distinct text once per model and policy; errors are never cached.

    Concurrent requests for the same new text cost one model call: one thread per process
    computes while the others wait (single flight), and across processes the cache's claim
    (a lease in the shared database) lets one compute while the others poll for its
    verdict. Everyone who waited gets that verdict as fresh (``cached`` False), so all the
    concurrent first quotes are priced alike.
    """

    def __init__(
        self,
        inner: Moderator,
        cache: VerdictCache,
        model: str,
        policy_version: str = POLICY_VERSION,
        *,
        wait_seconds: float = 60.0,
        poll_seconds: float = 0.05,
    ) -> None:
        self._inner = inner
        self._cache = cache
        self._model = model
        self._policy_version = policy_version
        self._wait_seconds = wait_seconds
        self._poll_seconds = poll_seconds
        self._holder = f"{os.getpid()}:{secrets.token_hex(6)}"
        self._flights: dict[str, _Flight] = {}
        self._lock = threading.Lock()

    def moderate(self, text: str) -> Verdict:
        """The cached verdict (marked cached, tokens kept) or a fresh one, then remembered."""
        key = cache_key(text, self._model, self._policy_version)
        hit = self._cache.get(key)
        if hit is not None:
            return dataclasses.replace(hit, cached=True)
        with self._lock:
            flight = self._flights.get(key)
            leader = flight is None
            if flight is None:
                flight = self._flights[key] = _Flight()
        if not leader:
            flight.done.wait()
            if flight.error is not None:
                raise flight.error
            assert flight.verdict is not None
            return flight.verdict
        try:
            flight.verdict = self._across_processes(key, text)
            return flight.verdict
        except BaseException as exc:
            flight.error = exc
            raise
        finally:
            with self._lock:
                del self._flights[key]
            flight.done.set()

    def _across_processes(self, key: str, text: str) -> Verdict:
        """Compute under the cache's claim, or wait for the process that holds it."""
        deadline = time.monotonic() + 2 * self._wait_seconds  # the holder's lease, and more
        while not self._cache.claim(key, self._holder, self._wait_seconds):
            found = self._cache.get(key)
            if found is not None:
                return dataclasses.replace(found, cached=False)
            if time.monotonic() > deadline:
                raise unavailable("another worker is still moderating this text")
            time.sleep(self._poll_seconds)
        released = False
        try:
            found = self._cache.get(key)  # finished just before we claimed
            if found is not None:
                return dataclasses.replace(found, cached=False)
            verdict = self._inner.moderate(text)
            stored = dataclasses.replace(verdict, cached=False)
            self._cache.put(key, stored, releasing=self._holder)
            released = True
            return verdict
        finally:
            if not released:
                self._cache.release(key, self._holder)
