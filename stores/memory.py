"""The embedded ``memory://`` store: thread-safe, TTL-aware and bounded.

Use it for a single process (the default ``make serve``).  Do not use it when
several processes or hosts must share state: each process gets its own copy.
``memory://?max_entries=10000`` sets the bound on entries, and
``max_cache_bytes`` (64 MiB) the bound on the bytes the disposable entries hold
(a cache of large answers must not grow the process by gigabytes first).

Only the keys of layers that declare them disposable (through
:meth:`MemoryStore.allow_eviction`) are evicted, least recently used first, to
make room: the response cache's entries first, for any new key; then keys
declared ``lowest=False`` (the core's per-account counts of wrong passwords),
for a cache entry only while they hold more than half the store (so made-up
names cannot leave the cache no room), else for kept keys and each other.
Everything else (sessions, revoked and
used tokens) is state whose loss changes what a request may do: a client that
can add cache entries at will must not be able to push a token revocation, or
a count of password guesses, out.  When the bound is reached and nothing may
be evicted for it, writing a new key fails with :class:`StoreError` (the
layer's ``on_store_error`` applies) rather than forgetting something.
"""

from __future__ import annotations

import heapq
import os
import re
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Iterator, Sequence

from .base import Store, StoreError, new_mark, optional_ttl, ttl_seconds

_monotonic = time.monotonic
Entry = tuple[bytes | int, float | None]  # (value, expires_at or None)


def _check_value(value: bytes) -> None:
    if not isinstance(value, bytes | bytearray):
        raise TypeError("store values are bytes; encode JSON in the layer")


#: What Redis reads as an integer (``string2ll``): decimal digits, no sign but "-", no spaces, no leading zeros.
_INTEGER = re.compile(rb"0|-?[1-9][0-9]{0,18}")
_INT64 = range(-2**63, 2**63)


#: The default bound on the bytes (keys and values) the disposable entries hold.
MAX_CACHE_BYTES = 64 * 1024 * 1024


def _size(key: str, value: bytes | int) -> int:
    return len(key) + (len(value) if isinstance(value, bytes) else 8)


#: Every memory store of this process, for :func:`_after_fork`.
_STORES: weakref.WeakSet[MemoryStore] = weakref.WeakSet()


def _after_fork() -> None:
    """In a forked child: a new lock for each memory store.

    A thread of the parent inside a store step when another thread forked (a host or an app
    forking from a threaded process; serve's supervisor waits for its reload thread first) is
    not in the child: the lock it held is copied held, nobody gives it back, and every request
    of the child would wait on the store for ever.
    """
    for store in _STORES:
        store._lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork)


class MemoryStore(Store):
    """An in-process store.  ``MemoryStore(max_entries=10_000, max_cache_bytes=64 MiB)``."""

    def __init__(self, max_entries: int = 10_000, url: str = "memory://",
                 max_cache_bytes: int = MAX_CACHE_BYTES) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        if max_cache_bytes < 1:
            raise ValueError("max_cache_bytes must be at least 1")
        self.max_entries = max_entries
        self.max_cache_bytes = max_cache_bytes
        self._cache_bytes = 0  # what the disposable entries hold now
        self.url = url
        # Three tables, each ordered by recency of use: keys that must be kept, and keys under a
        # prefix given to allow_eviction(), which make room for new keys: the lowest first.
        self._data: OrderedDict[str, Entry] = OrderedDict()
        self._disposable: OrderedDict[str, Entry] = OrderedDict()  # lowest: the cache's entries
        self._spare: OrderedDict[str, Entry] = OrderedDict()  # evicted when no lowest is left (see _make_room)
        self._evictable: tuple[str, ...] = ()
        self._spared: tuple[str, ...] = ()
        # Keys kept apart (keep_apart()): in a table of their own, bounded on its own, outside max_entries.
        self._apart: OrderedDict[str, Entry] = OrderedDict()
        self._apart_prefixes: tuple[str, ...] = ()
        self.max_apart = max(1, max_entries)
        # (deadline, key) for every deadline a key was given, soonest first (a heap): a full table drops
        # its expired keys by popping them, without reading the others.  A pair whose key no longer holds
        # that deadline (rewritten, refreshed, deleted, evicted) is skipped when it comes up.
        self._deadlines: list[tuple[float, str]] = []
        self._deadlines_bound = 1024  # its length past which _track counts the keys (to rebuild it)
        self._lock = threading.Lock()  # (a new one in a forked child: _after_fork)
        _STORES.add(self)

    def keep_apart(self, prefix: str) -> None:
        """Keep the keys starting with ``prefix`` in a table of their own, of at most ``max_apart``
        (as many as ``max_entries``), the expired, then the least recently used going first to make room.

        For small keys that may be lost at any time but must not take room from the others: the
        cache's write marks (one per URI looked up lately), which, counted with the entries,
        would halve how many answers fit (and a working set of more than half the store would
        get no hits at all).  As many as the entries: an entry whose mark was lost is stale.
        """
        with self._lock:
            if prefix in self._apart_prefixes:
                return
            self._apart_prefixes = (*self._apart_prefixes, prefix)
            for table in (self._data, self._spare, self._disposable):
                for key in [k for k in table if k.startswith(prefix)]:
                    entry = table[key]
                    self._drop(table, key)
                    self._put(key, entry[0], entry[1])

    def allow_eviction(self, prefix: str, *, lowest: bool = True) -> None:
        """Let keys starting with ``prefix`` be evicted (least recently used first) to make room.

        ``lowest`` (a cache): they go first, for any new key, and their bytes are bounded by
        ``max_cache_bytes``.  Otherwise they go only when no lowest key is left, and make room
        for a lowest one only while they hold more than half of ``max_entries``.  Keys already
        written under ``prefix`` move to its tier, whichever they were in.
        """
        with self._lock:
            if prefix in self._evictable or prefix in self._spared:
                return
            if lowest:
                self._evictable = (*self._evictable, prefix)
            else:
                self._spared = (*self._spared, prefix)
            # Every key the store now looks for in another table, from whichever it is in (a count under a
            # cache's wider prefix too): left where it was, it would read as missing and still take room.
            for table in (self._data, self._spare, self._disposable):
                for key in [k for k in table if k.startswith(prefix) and self._table(k) is not table]:
                    entry = table.get(key)
                    if entry is not None:  # (else evicted meanwhile, making room for one moved before it)
                        self._drop(table, key)
                        self._put(key, entry[0], entry[1])
            self._shrink()

    def _table(self, key: str) -> OrderedDict[str, Entry]:
        if self._apart_prefixes and key.startswith(self._apart_prefixes):
            return self._apart
        if key.startswith(self._evictable):
            return self._disposable
        return self._spare if self._spared and key.startswith(self._spared) else self._data

    def _live(self, key: str, now: float) -> Entry | None:
        table = self._table(key)
        item = table.get(key)
        if item is None:
            return None
        if item[1] is not None and item[1] <= now:
            self._drop(table, key)
            return None
        table.move_to_end(key)
        return item

    def _put(self, key: str, value: bytes | int, expires: float | None) -> None:
        table = self._table(key)
        if table is self._apart:
            if key not in table and len(table) >= self.max_apart:
                self._drop_expired()
                if len(table) >= self.max_apart:
                    table.popitem(last=False)
            table[key] = (value, expires)
            table.move_to_end(key)
            self._track(key, expires)
            return
        if table is self._disposable and _size(key, value) > self.max_cache_bytes:
            self._drop(table, key)  # larger than the bound on its own: not kept, and nothing evicted for it
            return
        if key not in table and len(self) >= self.max_entries:
            self._make_room(table)
        if table is self._disposable:
            self._drop(table, key)
            self._cache_bytes += _size(key, value)
        table[key] = (value, expires)
        table.move_to_end(key)
        self._track(key, expires)
        if self._cache_bytes > self.max_cache_bytes:
            self._shrink()

    def _drop(self, table: OrderedDict[str, Entry], key: str) -> None:
        """Remove ``key`` from ``table`` (if there), keeping the count of the disposable bytes."""
        entry = table.pop(key, None)
        if entry is not None and table is self._disposable:
            self._cache_bytes -= _size(key, entry[0])

    def _shrink(self) -> None:
        """Evict disposable entries, the expired first, then the least recently used, until they hold at most
        max_cache_bytes."""
        if self._cache_bytes > self.max_cache_bytes:
            self._drop_expired()  # (one pop per deadline passed: a live answer is not pushed out for them)
        while self._cache_bytes > self.max_cache_bytes and self._disposable:
            key, entry = self._disposable.popitem(last=False)
            self._cache_bytes -= _size(key, entry[0])

    def _track(self, key: str, expires: float | None) -> None:
        """Note ``expires``, the deadline ``key`` now holds, in the heap :meth:`_drop_expired` pops (the caller
        holds the lock).  The heap is rebuilt from the tables when stale pairs (keys rewritten again and
        again) make it longer than twice the keys (as last counted) and 1024: once per n + 1024 pushes.
        """
        if expires is None:
            return
        heapq.heappush(self._deadlines, (expires, key))
        if len(self._deadlines) > self._deadlines_bound:
            tables = (self._data, self._spare, self._disposable, self._apart)
            self._deadlines_bound = 2 * sum(map(len, tables)) + 1024
            if len(self._deadlines) > self._deadlines_bound:
                self._deadlines = [(entry[1], k) for table in tables
                                   for k, entry in table.items() if entry[1] is not None]
                heapq.heapify(self._deadlines)

    def _drop_expired(self) -> None:
        """Drop every key whose deadline has passed, from whichever table holds it: one pop per deadline
        passed, and no other key read."""
        now = _monotonic()
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now:
            expires, key = heapq.heappop(deadlines)
            table = self._table(key)
            entry = table.get(key)
            if entry is not None and entry[1] == expires:  # (else a stale pair: the key has another deadline)
                self._drop(table, key)

    def _make_room(self, table: OrderedDict[str, Entry]) -> None:
        """Evict one key for a new key of ``table``, or raise StoreError when none may go.

        Expired keys go first, from every table: they hold no state, and a live count of wrong
        passwords (or a cache entry) pushed out while they took the room would be lost for nothing.
        """
        self._drop_expired()
        if len(self) < self.max_entries:
            return
        # Counts go for a cache entry while they hold more than half the store (wrong passwords for
        # made-up names cannot fill it and leave the cache no room), else for kept keys and each other.
        if table is self._disposable and 2 * len(self._spare) > self.max_entries:
            self._spare.popitem(last=False)
            return
        if self._disposable:
            old, entry = self._disposable.popitem(last=False)
            self._cache_bytes -= _size(old, entry[0])
            return
        if self._spare and table is not self._disposable:
            self._spare.popitem(last=False)
            return
        raise StoreError(
            f"the memory store is full: its {len(self)} entries (sessions, token records) may not "
            "be evicted for this key, so it was not written; raise max_entries in its URL "
            "(memory://?max_entries=N) or use Redis")

    @staticmethod
    def _deadline(life: float | None, now: float) -> float | None:
        """When a key given ``life`` (a TTL :func:`~stores.base.ttl_seconds` checked) now expires."""
        return None if life is None else now + life

    def _refresh(self, key: str, value: bytes | int, expires: float) -> None:
        """Give ``key`` (live) the deadline ``expires`` (the caller holds the lock)."""
        self._table(key)[key] = (value, expires)
        self._track(key, expires)

    def get(self, key: str) -> bytes | None:
        with self._lock:
            return self._value(key, _monotonic())

    def getex(self, key: str, ttl: float) -> bytes | None:
        life = ttl_seconds(ttl)
        now = _monotonic()
        with self._lock:
            item = self._live(key, now)
            if item is None:
                return None
            self._refresh(key, item[0], now + life)
        value = item[0]
        return str(value).encode() if isinstance(value, int) else value

    def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        _check_value(value)
        life = optional_ttl(ttl)
        now = _monotonic()
        with self._lock:
            self._put(key, bytes(value), self._deadline(life, now))

    def replace(self, key: str, value: bytes, ttl: float | None = None) -> bool:
        _check_value(value)
        life = optional_ttl(ttl)
        now = _monotonic()
        with self._lock:
            if self._live(key, now) is None:
                return False
            self._put(key, bytes(value), self._deadline(life, now))
            return True

    def _value(self, key: str, now: float) -> bytes | None:
        """The value at ``key`` as :meth:`get` returns it (the caller holds the lock)."""
        item = self._live(key, now)
        if item is None:
            return None
        value = item[0]
        return str(value).encode() if isinstance(value, int) else value

    def get_or_lock(self, key: str, lock_key: str, ttl: float, mark: str | None = None,
                    mark_ttl: float | None = None) -> tuple[bytes | None, bytes | None, bytes | None]:
        """Read ``key`` (and ``mark``, set when missing), or take ``lock_key`` (with a new token) when it is
        missing, in one step (as Redis's script does).

        Two calls would let a reader miss, the leader store the entry and drop its lock, and the
        reader take the lock and call the app a second time.
        """
        lock_life = ttl_seconds(ttl)
        mark_life = lock_life if mark_ttl is None else ttl_seconds(mark_ttl)
        now = _monotonic()
        with self._lock:
            seen = None
            if mark is not None:
                seen = self._value(mark, now)
                if seen is None:
                    seen = new_mark()
                    try:
                        self._put(mark, seen, now + mark_life)
                    except StoreError:  # full of keys that may not go: no mark, so the reader stores nothing
                        seen = None
            value = self._value(key, now)
            if value is not None:
                return value, None, seen
            if self._live(lock_key, now) is not None:
                return None, None, seen
            token = new_mark()
            self._put(lock_key, token, now + lock_life)
            return None, token, seen

    def unlock(self, lock_key: str, token: bytes, leave: tuple[bytes, float] | None = None) -> bool:
        _check_value(token)  # (text would equal the same bytes in a Lua script, and never in memory://)
        if leave is not None:
            _check_value(leave[0])
            leave = (leave[0], ttl_seconds(leave[1]))
        now = _monotonic()
        with self._lock:
            return self._unlock(lock_key, token, leave, now)

    def _unlock(self, lock_key: str, token: bytes, leave: tuple[bytes, float] | None, now: float) -> bool:
        """:meth:`unlock`, the caller holding the lock."""
        item = self._live(lock_key, now)
        if item is None or item[0] != token:
            return False
        if leave is None:
            self._drop(self._table(lock_key), lock_key)
        else:
            self._put(lock_key, bytes(leave[0]), now + leave[1])
        return True

    def write(self, sets: Sequence[tuple[str, bytes, float | None]] = (), deletes: Sequence[str] = ()) -> None:
        for _, value, _ in sets:
            _check_value(value)
        sets = [(key, value, optional_ttl(ttl)) for key, value, ttl in sets]
        now = _monotonic()
        with self._lock:  # one step: a reader sees all of it or none of it (the cache's marks and deletes)
            self._write(sets, deletes, now)

    def _write(self, sets: Sequence[tuple[str, bytes, float | None]], deletes: Sequence[str], now: float) -> None:
        """Apply ``sets`` (their TTLs checked), then ``deletes`` (the caller holds the lock); all or nothing, see
        :meth:`_put_all`."""
        self._put_all([(key, bytes(value), self._deadline(ttl, now)) for key, value, ttl in sets])
        for key in deletes:
            self._drop(self._table(key), key)

    def _put_all(self, entries: Sequence[tuple[str, bytes, float | None]]) -> None:
        """Put every entry, or none: when one finds the store full, those put before it get back what they
        held (as Redis refuses a whole transaction it has no memory for), and the StoreError goes on.

        Entries evicted to make room stay evicted: they were disposable (the cache) or spare (counts).
        """
        before: list[tuple[OrderedDict[str, Entry], str, Entry | None]] = []
        try:
            for key, value, expires in entries:
                table = self._table(key)
                before.append((table, key, table.get(key)))
                self._put(key, value, expires)
        except StoreError:
            for table, key, entry in reversed(before):
                self._drop(table, key)
                if entry is not None:
                    table[key] = entry
                    self._track(key, entry[1])
                    if table is self._disposable:
                        self._cache_bytes += _size(key, entry[0])
            raise

    def write_unless_marked(self, mark: str, seen: bytes | None, sets: Sequence[tuple[str, bytes, float]],
                            deletes: Sequence[str] = (), unlock: tuple[str, bytes] | None = None) -> bool:
        for _, value, _ in sets:
            _check_value(value)
        for given in (seen, unlock and unlock[1]):
            if given is not None:
                _check_value(given)
        sets = [(key, value, ttl_seconds(ttl)) for key, value, ttl in sets]
        now = _monotonic()
        with self._lock:
            if seen is None or self._value(mark, now) != seen:
                sets = ()
            self._write(sets, deletes, now)
            item = self._live(mark, now) if sets else None
            longest = self._deadline(max(ttl for _, _, ttl in sets), now) if sets else None
            if item is not None and item[1] is not None and longest is not None and item[1] < longest:
                self._put(mark, item[0], longest)  # the mark outlives what is stored under it
            if unlock is not None:
                self._unlock(*unlock, None, now)
        return bool(sets)

    def add(self, key: str, value: bytes, ttl: float | None = None) -> bool:
        return self.add_then_write(key, value, ttl, ())

    def add_then_write(self, key: str, value: bytes, ttl: float | None,
                       sets: Sequence[tuple[str, bytes, float | None]]) -> bool:
        _check_value(value)
        for _, other, _ in sets:
            _check_value(other)
        life = optional_ttl(ttl)
        sets = [(k, v, optional_ttl(t)) for k, v, t in sets]
        now = _monotonic()
        with self._lock:
            if self._live(key, now) is not None:
                return False
            self._put_all([(key, bytes(value), self._deadline(life, now)),
                           *((k, bytes(v), self._deadline(t, now)) for k, v, t in sets)])
            return True

    def delete(self, key: str) -> bool:
        now = _monotonic()
        with self._lock:
            existed = self._live(key, now) is not None
            self._drop(self._table(key), key)
            return existed

    def incr(self, key: str, ttl: float | None = None, amount: int = 1) -> int:
        life = optional_ttl(ttl)
        now = _monotonic()
        with self._lock:
            item = self._live(key, now)
            if item is None:
                value, expires = amount, self._deadline(life, now)
            else:
                current = item[0]
                if not isinstance(current, int):  # bytes someone set: read as Redis reads them
                    if _INTEGER.fullmatch(current) is None or int(current) not in _INT64:
                        raise StoreError(f"value at {key!r} is not an integer or out of range")
                    current = int(current)
                value = current + amount
                if value not in _INT64:
                    raise StoreError(f"incrementing the value at {key!r} would overflow")
                expires = item[1]
            self._put(key, value, expires)
            return value

    def expire(self, key: str, ttl: float) -> bool:
        life = ttl_seconds(ttl)
        now = _monotonic()
        with self._lock:
            item = self._live(key, now)
            if item is None:
                return False
            self._refresh(key, item[0], now + life)
            return True

    def ttl(self, key: str) -> float | None:
        now = _monotonic()
        with self._lock:
            table = self._table(key)
            item = table.get(key)  # (not _live: reading the TTL is no use, and leaves the key's recency alone)
            if item is None or item[1] is None:
                return None
            if item[1] <= now:
                self._drop(table, key)
                return None
            return item[1] - now

    def scan(self, prefix: str) -> Iterator[str]:
        now = _monotonic()
        with self._lock:
            keys = [k for table in (self._data, self._spare, self._disposable, self._apart)
                    for k, (_, exp) in table.items() if k.startswith(prefix) and (exp is None or exp > now)]
        yield from keys

    def ping(self) -> bool:
        return True

    def __len__(self) -> int:
        """The keys counted against ``max_entries`` (the ones kept apart have their own bound)."""
        return len(self._data) + len(self._spare) + len(self._disposable)

    def __repr__(self) -> str:
        return f"MemoryStore(max_entries={self.max_entries}, max_cache_bytes={self.max_cache_bytes})"
