"""The embedded ``memory://`` store: thread-safe, TTL-aware, bounded with LRU eviction.

Use it for a single process (the default ``make serve``).  Do not use it when
several processes or hosts must share state: each process gets its own copy.
``memory://?max_entries=10000`` sets the bound.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Iterator

from .base import Store, StoreError

_monotonic = time.monotonic


def _check_value(value: bytes) -> None:
    if not isinstance(value, bytes | bytearray):
        raise TypeError("store values are bytes; encode JSON in the layer")


class MemoryStore(Store):
    """An in-process store.  ``MemoryStore(max_entries=10_000)``."""

    def __init__(self, max_entries: int = 10_000, url: str = "memory://") -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.max_entries = max_entries
        self.url = url
        # key -> (value, expires_at or None); order is recency of use.
        self._data: OrderedDict[str, tuple[bytes | int, float | None]] = OrderedDict()
        self._lock = threading.Lock()

    def _live(self, key: str, now: float) -> tuple[bytes | int, float | None] | None:
        item = self._data.get(key)
        if item is None:
            return None
        if item[1] is not None and item[1] <= now:
            del self._data[key]
            return None
        self._data.move_to_end(key)
        return item

    def _put(self, key: str, value: bytes | int, expires: float | None) -> None:
        self._data[key] = (value, expires)
        self._data.move_to_end(key)
        while len(self._data) > self.max_entries:
            self._data.popitem(last=False)

    @staticmethod
    def _deadline(ttl: float | None, now: float) -> float | None:
        return None if ttl is None else now + ttl

    def get(self, key: str) -> bytes | None:
        with self._lock:
            item = self._live(key, _monotonic())
        if item is None:
            return None
        value = item[0]
        return str(value).encode() if isinstance(value, int) else value

    def getex(self, key: str, ttl: float) -> bytes | None:
        now = _monotonic()
        with self._lock:
            item = self._live(key, now)
            if item is None:
                return None
            self._data[key] = (item[0], now + ttl)
        value = item[0]
        return str(value).encode() if isinstance(value, int) else value

    def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        _check_value(value)
        now = _monotonic()
        with self._lock:
            self._put(key, bytes(value), self._deadline(ttl, now))

    def add(self, key: str, value: bytes, ttl: float | None = None) -> bool:
        _check_value(value)
        now = _monotonic()
        with self._lock:
            if self._live(key, now) is not None:
                return False
            self._put(key, bytes(value), self._deadline(ttl, now))
            return True

    def delete(self, key: str) -> bool:
        now = _monotonic()
        with self._lock:
            existed = self._live(key, now) is not None
            self._data.pop(key, None)
            return existed

    def incr(self, key: str, ttl: float | None = None, amount: int = 1) -> int:
        now = _monotonic()
        with self._lock:
            item = self._live(key, now)
            if item is None:
                value, expires = amount, self._deadline(ttl, now)
            else:
                try:
                    value = int(item[0]) + amount
                except ValueError:
                    raise StoreError(f"value at {key!r} is not an integer") from None
                expires = item[1]
            self._put(key, value, expires)
            return value

    def expire(self, key: str, ttl: float) -> bool:
        now = _monotonic()
        with self._lock:
            item = self._live(key, now)
            if item is None:
                return False
            self._data[key] = (item[0], now + ttl)
            return True

    def scan(self, prefix: str) -> Iterator[str]:
        now = _monotonic()
        with self._lock:
            keys = [k for k, (_, exp) in self._data.items() if k.startswith(prefix) and (exp is None or exp > now)]
        yield from keys

    def ping(self) -> bool:
        return True

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return f"MemoryStore(max_entries={self.max_entries})"
