"""A bounded, thread-safe map of answers that never change (or may be a few seconds old):
what a hot path would otherwise compute or read again on every request."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Memo(Generic[K, V]):
    """Least recently used entries, at most ``max_entries`` of them; with ``max_age`` (seconds)
    an entry older than that is gone. Never a source of truth: only what the caller may
    compute again, or what may be that old."""

    def __init__(
        self,
        max_entries: int = 1024,
        max_age: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._max_entries = max_entries
        self._max_age = max_age
        self._clock = clock
        self._items: OrderedDict[K, tuple[float, V]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        """The value under KEY, if any and not too old (and mark it recently used)."""
        with self._lock:
            found = self._items.get(key)
            if found is None:
                return None
            stored_at, value = found
            if self._max_age is not None and self._clock() - stored_at > self._max_age:
                del self._items[key]
                return None
            self._items.move_to_end(key)
            return value

    def put(self, key: K, value: V, *, keep_first: bool = False) -> V:
        """Remember VALUE under KEY (with ``keep_first``, unless one is there already);
        the value now stored is returned. The least recently used beyond the bound go."""
        with self._lock:
            found = self._items.get(key) if keep_first else None
            if found is not None:
                self._items.move_to_end(key)
                return found[1]
            self._items[key] = (self._clock(), value)
            self._items.move_to_end(key)
            while len(self._items) > self._max_entries:
                self._items.popitem(last=False)
            return value

    def get_or_make(self, key: K, make: Callable[[], V]) -> V:
        """The value under KEY, made (outside the lock) and remembered when missing."""
        found = self.get(key)
        if found is not None:
            return found
        return self.put(key, make())

    def forget(self, key: K) -> None:
        """Drop KEY's entry, if any."""
        with self._lock:
            self._items.pop(key, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)
