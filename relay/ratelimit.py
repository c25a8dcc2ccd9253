"""Per-client rate limits and pay-password lock-outs on a shared `limits` storage."""

from __future__ import annotations

import functools
import ipaddress
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import cast

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

    def hit(self, namespace: str, key: str) -> int | None:
        """Count one event; None when allowed, else the seconds to wait."""
        with reaching_storage():
            for item in self._items:
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
