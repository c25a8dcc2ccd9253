"""Per-client rate limits and pay-password lock-outs on a shared `limits` storage."""

from __future__ import annotations

import ipaddress
import math
import time

from limits import RateLimitItem, parse, parse_many
from limits.storage import storage_from_string
from limits.strategies import MovingWindowRateLimiter


class Limiter:
    """Counts events per key against one or more limits ("30/minute;500/hour")."""

    def __init__(self, storage_url: str, rules: str) -> None:
        self._limiter = MovingWindowRateLimiter(storage_from_string(storage_url))
        self._items: list[RateLimitItem] = parse_many(rules)

    def hit(self, namespace: str, key: str) -> int | None:
        """Count one event; None when allowed, else the seconds to wait."""
        for item in self._items:
            if not self._limiter.hit(item, namespace, key):
                return self._wait(item, namespace, key)
        return None

    def blocked(self, namespace: str, key: str) -> int | None:
        """Without counting: None when another event would be allowed, else the seconds to wait."""
        for item in self._items:
            if not self._limiter.test(item, namespace, key):
                return self._wait(item, namespace, key)
        return None

    def _wait(self, item: RateLimitItem, namespace: str, key: str) -> int:
        reset = self._limiter.get_window_stats(item, namespace, key).reset_time
        return max(1, math.ceil(reset - time.time()))


def lockout_rule(max_failures: int, lockout_seconds: int) -> str:
    """The limits notation for N failures per lock-out window."""
    parse(f"{max_failures}/{lockout_seconds} seconds")
    return f"{max_failures}/{lockout_seconds} seconds"


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
