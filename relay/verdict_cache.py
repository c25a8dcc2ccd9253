"""Each distinct text moderated once per model and policy: a verdict cache and the single
flight that makes concurrent requests for one new text cost one model call."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import secrets
import threading
import time
from collections.abc import Callable
from typing import Protocol, cast

import redis

from relay.memo import Memo
from relay.moderation import (
    POLICY_VERSION,
    Moderator,
    Verdict,
    admitted,
    cache_key,
    unavailable,
)
from relay.ratelimit import reaching_storage


class VerdictCache(Protocol):
    """Where verdicts are remembered by cache_key(), and who is computing one."""

    def get(self, key: str) -> Verdict | None:
        """The verdict stored under KEY, if any."""
        ...

    def remembered(self, key: str) -> Verdict | None:
        """The verdict under KEY if this process holds it already (no shared store asked)."""
        ...

    def put(self, key: str, verdict: Verdict, *, releasing: str | None = None) -> None:
        """Remember a verdict under KEY; with ``releasing``, give that holder's claim up in
        the same write."""
        ...

    def claim(self, key: str, holder: str, seconds: float) -> Verdict | bool:
        """The verdict stored under KEY by now, if any (nothing is claimed then); else take
        the right to compute it for ``seconds``: False while another process holds it."""
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

    def remembered(self, key: str) -> Verdict | None:
        """All of it is this process's memory."""
        return self._items.get(key)

    def put(self, key: str, verdict: Verdict, *, releasing: str | None = None) -> None:
        """Remember a verdict, evicting the least recently used beyond max_entries (there
        is no claim to give up)."""
        self._items.put(key, verdict, keep_first=True)

    def claim(self, key: str, holder: str, seconds: float) -> Verdict | bool:
        """One process: the in-process single flight is all there is to it."""
        return self._items.get(key) or True

    def release(self, key: str, holder: str) -> None:
        """Nothing to give up."""

    def __len__(self) -> int:
        return len(self._items)


#: A stored verdict if there is one; else the claim taken (new, ours already, or run out): 1.
_CLAIM = """
local verdict = redis.call('GET', KEYS[1])
if verdict then return verdict end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
if redis.call('GET', KEYS[2]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
  return 1
end
return 0
"""
#: The verdict stored unless one was first (1 if this one), and the holder's claim given up.
_PUT = """
local stored = redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2])
if ARGV[3] ~= '' and redis.call('GET', KEYS[2]) == ARGV[3] then redis.call('DEL', KEYS[2]) end
if stored then return 1 end
return 0
"""
#: The claim given up, if still the holder's.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RedisVerdictCache:
    """Verdicts, and the claims to compute them, in the Redis that every process shares (the
    rate limits' storage): fleet-wide like the database's, with no database write per new
    text. A verdict is kept VERDICT_SECONDS (a text seen again after that is moderated
    again); a claim runs out on its own if its holder dies. Each process keeps the verdicts
    it has read or stored in memory too. Redis unreachable: StorageUnavailable (503)."""

    VERDICT_SECONDS = 7 * 24 * 3600

    def __init__(self, client: redis.Redis, max_in_memory: int = 10_000) -> None:
        self._redis = client
        self._memory: Memo[str, Verdict] = Memo(max_in_memory)
        self._claim = client.register_script(_CLAIM)
        self._put = client.register_script(_PUT)
        self._release = client.register_script(_RELEASE)

    def get(self, key: str) -> Verdict | None:
        """The verdict stored under KEY, if any."""
        known = self.remembered(key)
        if known is not None:
            return known
        with reaching_storage():
            stored = self._redis.get(_verdict_key(key))
        return None if stored is None else self._remember(key, cast(bytes | str, stored))

    def remembered(self, key: str) -> Verdict | None:
        """A verdict this process has read or stored already."""
        return self._memory.get(key)

    def put(self, key: str, verdict: Verdict, *, releasing: str | None = None) -> None:
        """Remember a verdict (unless another was stored first: that one stays); with
        ``releasing``, that holder's claim is given up in the same script."""
        keys = [_verdict_key(key), _claim_key(key)]
        stored_json = json.dumps(verdict.to_dict())
        args: list[str | int] = [stored_json, self.VERDICT_SECONDS, releasing or ""]
        with reaching_storage():
            stored = self._put(keys=keys, args=args)
        if stored == 1:
            self._memory.put(key, verdict)

    def claim(self, key: str, holder: str, seconds: float) -> Verdict | bool:
        """The stored verdict, or the fleet-wide right to moderate KEY for ``seconds``."""
        keys = [_verdict_key(key), _claim_key(key)]
        with reaching_storage():
            answer = self._claim(keys=keys, args=[holder, max(1, round(seconds * 1000))])
        if isinstance(answer, bytes | str):  # str: a client made with decode_responses
            return self._remember(key, answer)
        return bool(answer == 1)

    def release(self, key: str, holder: str) -> None:
        """Give the right to moderate KEY up (if still ``holder``'s)."""
        with reaching_storage():
            self._release(keys=[_claim_key(key)], args=[holder])

    def _remember(self, key: str, stored: bytes | str) -> Verdict:
        return self._memory.put(key, Verdict.from_dict(json.loads(stored)))


def _verdict_key(key: str) -> str:
    # One hash tag for a text's verdict and claim: a cluster keeps both on one node.
    return "relay:verdict:{" + _digest(key) + "}"


def _claim_key(key: str) -> str:
    return "relay:verdict-claim:{" + _digest(key) + "}"


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:48]


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
    (in the shared database or Redis) lets one compute while the others poll for its
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

    def moderate(self, text: str, admit: Callable[[], None] = admitted) -> Verdict:
        """The cached verdict (marked cached, tokens kept) or a fresh one, then remembered;
        ``admit`` runs before anything but this process's memory is used."""
        key = cache_key(text, self._model, self._policy_version)
        hit = self._cache.remembered(key)
        if hit is None:
            admit()  # before the shared store is asked, or anyone waited for
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
        while True:
            claimed = self._cache.claim(key, self._holder, self._wait_seconds)
            if isinstance(claimed, Verdict):  # finished before our claim, or while we waited
                return dataclasses.replace(claimed, cached=False)
            if claimed:
                break
            if time.monotonic() > deadline:
                raise unavailable("another worker is still moderating this text")
            time.sleep(self._poll_seconds)
        released = False
        try:
            verdict = self._inner.moderate(text)
            stored = dataclasses.replace(verdict, cached=False)
            self._cache.put(key, stored, releasing=self._holder)
            released = True
            return verdict
        finally:
            if not released:
                self._cache.release(key, self._holder)
