"""Per-client rate limits and pay-password lock-outs on a shared `limits` storage."""

from __future__ import annotations

import functools
import ipaddress
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any, cast

import redis
from limits import RateLimitItem, parse, parse_many
from limits.errors import StorageError
from limits.storage import RedisStorage, Storage, storage_from_string
from limits.strategies import MovingWindowRateLimiter
from redis.exceptions import RedisClusterException

from relay.errors import StorageUnavailable

#: Storages with moving windows (memory is one process only: development).
STORAGE_SCHEMES = ("memory", "redis", "rediss", "redis+unix", "redis+sentinel", "redis+cluster")
#: A storage that does not answer within this is down: fail fast with a 503.
STORAGE_TIMEOUT_SECONDS = 2.0
STORAGE_RETRY_AFTER_SECONDS = 5


def open_storage(url: str) -> Storage:
    """The limits storage at URL; its errors surface as limits' StorageError."""
    options: dict[str, float | str | bool] = {"wrap_exceptions": True}
    if url.startswith("redis"):
        options["socket_connect_timeout"] = STORAGE_TIMEOUT_SECONDS
        options["socket_timeout"] = STORAGE_TIMEOUT_SECONDS
    storage = storage_from_string(url, **options)
    assert isinstance(storage, Storage)
    return storage


class Limiter:
    """Counts events per key against one or more limits ("30/minute;500/hour")."""

    def __init__(self, storage_url: str, rules: str) -> None:
        self._storage = open_storage(storage_url)
        self._limiter = MovingWindowRateLimiter(self._storage)
        self._items: list[RateLimitItem] = parse_many(rules)
        shared = self.redis()
        # A plain client's pool takes early hits; a cluster's is counted the usual way.
        self._early = None
        if isinstance(shared, redis.Redis) and isinstance(self._storage, RedisStorage):
            self._early = _EarlyHits(shared, self._storage)

    def hit(self, namespace: str, key: str) -> int | None:
        """Count one event; None when allowed, else the seconds to wait."""
        return self._rest(0, namespace, key)

    @contextmanager
    def counting(self, namespace: str, key: str) -> Iterator[Callable[[], int | None]]:
        """Count one event as the block starts; the function given to the block answers
        as hit() does (read once, when first called, or when the block ends), so that a
        shared storage's round trip overlaps the block's own work."""
        sent = None if self._early is None else self._early.send(self._items[0], namespace, key)
        answers: list[int | None] = []
        failures: list[BaseException] = []

        def answer() -> int | None:
            if not answers and not failures:
                try:
                    answers.append(self._answer(sent, namespace, key))
                except BaseException as exc:
                    failures.append(exc)
            if failures:
                raise failures[0]
            return answers[0]

        try:
            yield answer
        finally:
            if sent is not None:
                sent.drop()

    def _answer(self, sent: _Sent | None, namespace: str, key: str) -> int | None:
        """The first limit's answer as sent early, then the others'. A reply that did not
        come (a connection dropped, a script Redis lost on a restart) is counted again the
        storage's own way: at worst one event twice, never one uncounted."""
        if sent is None:
            return self.hit(namespace, key)
        try:
            allowed = sent.read()
        except redis.RedisError:
            return self.hit(namespace, key)
        if not allowed:
            with reaching_storage():
                return self._wait(self._items[0], namespace, key)
        return self._rest(1, namespace, key)

    def _rest(self, first: int, namespace: str, key: str) -> int | None:
        """Count against the limits from ``first`` on, stopping at the first that refuses."""
        with reaching_storage():
            for item in self._items[first:]:
                if not self._limiter.hit(item, namespace, key):
                    return self._wait(item, namespace, key)
        return None

    def blocked(self, namespace: str, key: str) -> int | None:
        """Without counting: None when another event would be allowed, else the seconds to wait."""
        with reaching_storage():
            for item in self._items:
                if not self._limiter.test(item, namespace, key):
                    return self._wait(item, namespace, key)
        return None

    def redis(self) -> redis.Redis | None:
        """The Redis client of the limits' storage, when it is Redis (shared by every
        process); None for the in-memory storage."""
        if isinstance(self._storage, RedisStorage):
            # A cluster's or a sentinel's client answers the same commands.
            return cast(redis.Redis, self._storage.get_connection())
        return None

    def ping(self) -> None:
        """Raise StorageUnavailable unless the storage answers."""
        if not self._storage.check():
            raise StorageUnavailable(retry_after=STORAGE_RETRY_AFTER_SECONDS)

    def _wait(self, item: RateLimitItem, namespace: str, key: str) -> int:
        reset = self._limiter.get_window_stats(item, namespace, key).reset_time
        return max(1, math.ceil(reset - time.time()))


class _Sent:
    """A moving-window hit sent on a pooled connection, its reply read once."""

    def __init__(self, pool: redis.ConnectionPool, connection: Any) -> None:
        self._pool = pool
        self._connection: Any = connection

    def read(self) -> bool:
        """Whether the hit was within the limit. The connection goes back to the pool, once
        (closed first if the reply did not come, or was not the script's 1 or false:
        nothing stale is left on it); it is never read again from here."""
        connection, self._connection = self._connection, None
        if connection is None:
            raise redis.ConnectionError("the reply was read already")
        try:
            reply = connection.read_response()
            if reply not in (1, None, False):  # Lua's false is nil in RESP2, False in RESP3
                raise redis.ResponseError(f"unexpected reply to the window's script: {reply!r}")
            return bool(reply == 1)
        except BaseException:
            connection.disconnect()
            raise
        finally:
            self._pool.release(connection)

    def drop(self) -> None:
        """Done with it: a reply nobody asked for is read all the same, so that the count
        stands and nothing is left for the connection's next user."""
        if self._connection is not None:
            with suppress(redis.RedisError):
                self.read()


class _EarlyHits:
    """Moving-window hits sent to Redis ahead of their reply: limits' own script and key,
    on a connection of the storage's client's pool."""

    def __init__(self, client: redis.Redis, storage: RedisStorage) -> None:
        self._pool = client.connection_pool
        self._storage = storage
        self._sha = storage.lua_acquire_moving_window.sha

    def send(self, item: RateLimitItem, namespace: str, key: str) -> _Sent | None:
        """The hit sent (what limits' MovingWindowRateLimiter.hit would send); None if it
        could not be, to be counted the usual way."""
        window = self._storage.prefixed_key(item.key_for(namespace, key))
        arguments = (time.time(), item.amount, item.get_expiry(), 1)
        try:
            connection: Any = self._pool.get_connection()
        except redis.RedisError:
            return None
        try:
            connection.send_command("EVALSHA", self._sha, 1, window, *arguments)
        except BaseException as exc:
            connection.disconnect()
            self._pool.release(connection)
            if isinstance(exc, redis.RedisError):
                return None
            raise
        return _Sent(self._pool, connection)


@contextmanager
def reaching_storage() -> Iterator[None]:
    """A storage that cannot be reached (limits' wrapped errors, or Redis's own for what
    else is kept there) is a 503 with Retry-After, never a 500."""
    try:
        yield
    except (StorageError, redis.RedisError, RedisClusterException) as exc:
        raise StorageUnavailable(retry_after=STORAGE_RETRY_AFTER_SECONDS) from exc


def lockout_rule(max_failures: int, lockout_seconds: int) -> str:
    """The limits notation for N failures per lock-out window."""
    parse(f"{max_failures}/{lockout_seconds} seconds")
    return f"{max_failures}/{lockout_seconds} seconds"


@functools.lru_cache(maxsize=4096)
def rate_key(address: str) -> str:
    """The key a client's limits count under: an IPv4 address as it is, an IPv6 address
    as its /64 network (anything else, e.g. "unknown", as it is)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network(f"{ip}/64", strict=False))
    return str(ip)
