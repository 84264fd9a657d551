"""The store contract, run against every backend, plus the facts of each backend.

The contract tests take the ``store`` fixture, built from ``store_url`` (``memory://``
and a real redis-server), so a behaviour holds for both or the suite says which
one broke it.  TTLs are short (0.1-0.4 s) with margins of at least 0.1 s.
"""

from __future__ import annotations

import datetime
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import redis_command

from middleware.base import mask_url_passwords
from stores import MemoryStore, Store, StoreError, store_from_url
from stores.breaker import CircuitBreaker
from stores.redis import RedisStore, mask_url

HEALTH_KEYS = {"ok", "backend", "url", "breaker", "latency_ms"}


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    """A fresh, empty store of each backend, closed afterwards."""
    made = store_from_url(store_url)
    yield made
    made.close()


def run_threads(count: int, target: Callable[[], object]) -> list[object]:
    """Start ``count`` threads together on ``target``; return what each returned."""
    barrier = threading.Barrier(count)
    results: list[object] = []
    lock = threading.Lock()

    def work() -> None:
        barrier.wait()
        value = target()
        with lock:
            results.append(value)

    threads = [threading.Thread(target=work) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(results) == count, "a worker thread failed"
    return results


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- the contract ----------------------------------------------------------------------


def test_missing_key_reads_as_none(store: Store) -> None:
    assert store.get("nope") is None
    assert store.getex("nope", 1) is None
    assert store.delete("nope") is False
    assert store.expire("nope", 1) is False


@pytest.mark.parametrize("ttl", [float("inf"), 1e17, 2.0**31 + 1])
def test_a_ttl_beyond_the_longest_is_the_longest(store: Store, ttl: float) -> None:
    """A layer's timeout of .inf (or years in ms past Redis's 2^63) keeps the value on both backends alike."""
    store.set("set", b"1", ttl=ttl)
    assert store.replace("set", b"1", ttl=ttl) is True
    assert store.add("add", b"1", ttl=ttl) is True
    assert store.getex("set", ttl) == b"1"
    assert store.expire("add", ttl) is True
    assert store.incr("counter", ttl=ttl) == 1
    _, token, _ = store.get_or_lock("missing", "lock", ttl)
    assert token is not None
    store.write(sets=[("written", b"1", ttl)])
    assert [store.get(k) for k in ("set", "add", "counter", "lock", "written")] == [b"1", b"1", b"1", token, b"1"]


def _taken(store: Store) -> bytes:
    """Take the lock ``lock`` (with a mark): its token."""
    token = store.get_or_lock("entry", "lock", 60, "mark", 60)[1]
    assert token is not None
    return token


#: Every method that takes a TTL, called with ``ttl`` where it goes (the others valid), after ``_taken``; and the
#: key that gets that TTL.
TTL_CALLS: list[Any] = [
    pytest.param(lambda s, t, ttl: s.set("k", b"new", ttl), "k", id="set"),
    pytest.param(lambda s, t, ttl: s.replace("k", b"new", ttl), "k", id="replace"),
    pytest.param(lambda s, t, ttl: s.add("new", b"new", ttl), "new", id="add"),
    pytest.param(lambda s, t, ttl: s.getex("k", ttl), "k", id="getex"),
    pytest.param(lambda s, t, ttl: s.expire("k", ttl), "k", id="expire"),
    pytest.param(lambda s, t, ttl: s.incr("counter", ttl), "counter", id="incr"),
    pytest.param(lambda s, t, ttl: s.write([("new", b"new", 5), ("k", b"new", ttl)], ["old"]), "k", id="write"),
    pytest.param(lambda s, t, ttl: s.add_then_write("new", b"new", ttl, []), "new", id="add_then_write"),
    pytest.param(lambda s, t, ttl: s.add_then_write("new", b"new", 5, [("k", b"new", ttl)]), "k",
                 id="add_then_write's sets"),
    pytest.param(lambda s, t, ttl: s.get_or_lock("missing", "new", ttl), "new", id="get_or_lock"),
    pytest.param(lambda s, t, ttl: s.get_or_lock("missing", "new", 5, "new mark", ttl), "new mark",
                 id="get_or_lock's mark_ttl"),
    pytest.param(lambda s, t, ttl: s.unlock("lock", t, leave=(b"new", ttl)), "lock", id="unlock's leave"),
    pytest.param(lambda s, t, ttl: s.write_unless_marked("mark", s.get("mark"),
                                                         [("new", b"new", 5), ("k", b"new", ttl)], ["old"],
                                                         unlock=("lock", t)),
                 "k", id="write_unless_marked"),
]
#: TTLs no method takes: none above 0 (Redis refuses a PX of 0 or less), or not a number.
BAD_TTLS = [0, 0.0, -0.0, -1, -1e-9, -1e305, -1e306, -float("inf"), float("nan"), "5", True, b"5"]


@pytest.mark.parametrize("ttl", BAD_TTLS, ids=repr)
@pytest.mark.parametrize(("call", "key"), TTL_CALLS)
def test_a_ttl_not_above_zero_is_refused_and_nothing_is_written(store: Store, call: Any, key: str, ttl: object) -> None:
    """The same ValueError on both backends, before anything is written (memory:// kept such a key expired
    at once or not at all, Redis kept it for 1 ms, or raised OverflowError past -1e305)."""
    store.set("k", b"old", 60)
    store.set("old", b"old")
    token = _taken(store)
    before = {name: store.get(name) for name in ("k", "old", "new", "counter", "lock", "mark", "new mark")}
    with pytest.raises(ValueError, match=r"^a store TTL is a number of seconds above 0, got "):
        call(store, token, ttl)
    assert {name: store.get(name) for name in before} == before
    assert 59 < (store.ttl("k") or 0) <= 60  # its expiry left alone too


@pytest.mark.parametrize(("call", "key"), [p for p in TTL_CALLS if p.id not in (
    "set", "replace", "add", "incr", "write", "add_then_write", "add_then_write's sets", "get_or_lock's mark_ttl")])
def test_a_ttl_is_needed_where_a_key_cannot_live_forever(store: Store, call: Any, key: str) -> None:
    """None (no expiry) where the method takes none: refused on both (Redis raised a TypeError, memory:// kept
    a lock or a cache entry forever, or refreshed nothing).  (``get_or_lock``'s ``mark_ttl=None`` is its ``ttl``.)"""
    store.set("k", b"old", 60)
    token = _taken(store)
    with pytest.raises(ValueError, match=r"^a store TTL is a number of seconds above 0, got None$"):
        call(store, token, None)
    assert (store.get("k"), store.get("lock"), store.get("new")) == (b"old", token, None)


class _OwnStore(Store):
    """A store of your own: the abstract methods and ``ttl`` (over a memory store), so every combined method
    (``get_or_lock``, ``unlock``, ``write``, ``write_unless_marked``…) is Store's default."""

    def __init__(self) -> None:
        self.inner = MemoryStore()

    def get(self, key: str) -> bytes | None:
        return self.inner.get(key)

    def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        self.inner.set(key, value, ttl)

    def delete(self, key: str) -> bool:
        return self.inner.delete(key)

    def incr(self, key: str, ttl: float | None = None, amount: int = 1) -> int:
        return self.inner.incr(key, ttl, amount)

    def expire(self, key: str, ttl: float) -> bool:
        return self.inner.expire(key, ttl)

    def ttl(self, key: str) -> float | None:
        return self.inner.ttl(key)

    def add(self, key: str, value: bytes, ttl: float | None = None) -> bool:
        return self.inner.add(key, value, ttl)

    def scan(self, prefix: str) -> Iterator[str]:
        return self.inner.scan(prefix)

    def ping(self) -> bool:
        return True


@pytest.mark.parametrize("ttl", BAD_TTLS, ids=repr)
@pytest.mark.parametrize(("call", "key"), TTL_CALLS)
def test_store_s_defaults_refuse_a_ttl_not_above_zero_before_writing(call: Any, key: str, ttl: object) -> None:
    """As the built-in stores: the default write and write_unless_marked wrote the sets before a bad one,
    and get_or_lock took a mark_ttl of 0 for its ttl."""
    test_a_ttl_not_above_zero_is_refused_and_nothing_is_written(_OwnStore(), call, key, ttl)


@pytest.mark.parametrize(("call", "key"), [p for p in TTL_CALLS if p.id not in (
    "set", "replace", "add", "incr", "write", "add_then_write", "add_then_write's sets", "get_or_lock's mark_ttl")])
def test_store_s_defaults_need_a_ttl_where_a_key_cannot_live_forever(call: Any, key: str) -> None:
    """As the built-in stores: the defaults took a lock, or left one, with no expiry (it never went)."""
    test_a_ttl_is_needed_where_a_key_cannot_live_forever(_OwnStore(), call, key)


@pytest.mark.parametrize(("call", "key"), TTL_CALLS)
def test_a_ttl_below_a_millisecond_is_a_millisecond(store: Store, call: Any, key: str) -> None:
    """Redis keeps expiries in whole milliseconds: a shorter TTL above 0 is taken, and counts as 1 ms on both."""
    store.set("k", b"old", 60)
    store.set("old", b"old")
    token = _taken(store)
    call(store, token, 1e-9)
    time.sleep(0.05)
    assert store.get(key) is None  # gone again


def test_a_ttl_below_a_millisecond_lives_a_millisecond_in_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """As on Redis (``PX 1``): not expired at once, which a clock that has not moved shows."""
    import stores.memory

    now = 1000.0
    monkeypatch.setattr(stores.memory, "_monotonic", lambda: now)
    store = MemoryStore()
    store.set("k", b"v", 1e-9)
    assert store.add("lock", b"t", 1e-6) is True
    assert (store.get("k"), store.get("lock")) == (b"v", b"t")
    assert store.ttl("k") == pytest.approx(0.001)
    now += 0.001
    assert (store.get("k"), store.get("lock")) == (None, None)


@pytest.mark.parametrize("ttl", [1e308, 10**400, float("inf")], ids=["1e308", "10**400", "inf"])
def test_a_ttl_too_long_for_a_float_is_the_longest(store: Store, ttl: float) -> None:
    store.set("k", b"v", ttl)
    assert store.add_then_write("a", b"v", ttl, [("b", b"v", ttl)]) is True
    assert all(2.0**31 - 5 < (store.ttl(key) or 0) <= 2.0**31 for key in ("k", "a", "b"))


def test_add_then_write_without_a_ttl_keeps_the_keys(store: Store) -> None:
    """``ttl=None``, for the key and for each set, is no expiry on both backends (Redis raised a TypeError)."""
    store.set("head", b"old", 60)
    assert store.add_then_write("used", b"1", None, [("head", b"new", None), ("other", b"o", 5)]) is True
    assert [store.get(key) for key in ("used", "head", "other")] == [b"1", b"new", b"o"]
    assert (store.ttl("used"), store.ttl("head")) == (None, None)  # an earlier TTL cleared, as set() does
    assert 4 < (store.ttl("other") or 0) <= 5
    assert store.add_then_write("used", b"2", None, [("head", b"newer", None)]) is False
    assert (store.get("used"), store.get("head")) == (b"1", b"new")


def test_values_round_trip_as_bytes(store: Store) -> None:
    store.set("k", b"\x00\xffjson")
    store.set("ba", bytearray(b"abc"))  # type: ignore[arg-type]  # taken too, as redis-py takes it
    assert store.get("k") == b"\x00\xffjson"
    assert store.get("ba") == b"abc"
    assert type(store.get("ba")) is bytes


@pytest.mark.parametrize("value", ["text", 42, {"a": 1}], ids=["str", "int", "dict"])
@pytest.mark.parametrize("method", ["set", "add", "replace"])
def test_values_must_be_bytes(store: Store, method: str, value: object) -> None:
    with pytest.raises(TypeError, match=r"^store values are bytes; encode JSON in the layer$"):
        getattr(store, method)("k", value)
    assert store.get("k") is None


def test_set_expires_after_ttl(store: Store) -> None:
    store.set("k", b"v", ttl=0.1)
    assert store.get("k") == b"v"
    time.sleep(0.2)
    assert store.get("k") is None
    assert store.delete("k") is False
    assert list(store.scan("k")) == []


def test_set_without_ttl_replaces_an_earlier_ttl(store: Store) -> None:
    store.set("k", b"old", ttl=0.1)
    store.set("k", b"new")
    time.sleep(0.2)
    assert store.get("k") == b"new"


def test_getex_refreshes_the_ttl(store: Store) -> None:
    store.set("k", b"v", ttl=0.3)
    time.sleep(0.15)
    assert store.getex("k", 0.4) == b"v"  # now expires at ~0.55 s instead of 0.3 s
    time.sleep(0.25)
    assert store.get("k") == b"v"
    time.sleep(0.3)
    assert store.get("k") is None


def test_add_is_a_lock(store: Store) -> None:
    assert store.add("lock", b"a", ttl=0.15) is True
    assert store.add("lock", b"b", ttl=0.15) is False
    assert store.get("lock") == b"a"
    time.sleep(0.25)
    assert store.add("lock", b"c") is True
    assert store.get("lock") == b"c"
    assert store.delete("lock") is True
    assert store.add("lock", b"d") is True


def test_replace_writes_only_what_exists(store: Store) -> None:
    assert store.replace("k", b"new", ttl=5) is False
    assert store.get("k") is None  # a deleted key stays deleted
    store.set("k", b"old", ttl=0.15)
    assert store.replace("k", b"new", ttl=0.6) is True
    assert store.get("k") == b"new"
    time.sleep(0.3)
    assert store.get("k") == b"new"  # the new ttl replaced the old one
    assert store.delete("k") is True
    assert store.replace("k", b"again") is False
    assert store.get("k") is None
    store.set("short", b"v", ttl=0.1)
    time.sleep(0.2)
    assert store.replace("short", b"w") is False  # an expired key is no key


def test_add_lets_exactly_one_thread_win(store: Store) -> None:
    results = run_threads(16, lambda: store.add("lock", b"x", ttl=5))
    assert sorted(results, key=bool) == [False] * 15 + [True]


def test_add_then_write_writes_the_sets_only_with_the_key(store: Store) -> None:
    assert store.add_then_write("mark", b"1", 5, [("head", b"a", 5), ("other", b"o", 0.15)]) is True
    assert (store.get("mark"), store.get("head"), store.get("other")) == (b"1", b"a", b"o")
    assert store.add_then_write("mark", b"2", 5, [("head", b"b", 5)]) is False
    assert (store.get("mark"), store.get("head")) == (b"1", b"a")  # the loser wrote nothing
    time.sleep(0.2)
    assert store.get("other") is None  # each set with its own TTL


def test_add_then_write_lets_exactly_one_thread_write(store: Store) -> None:
    def one(n: int) -> bool:
        return store.add_then_write("mark", b"x", 5, [("head", str(n).encode(), 5)])

    counter = iter(range(16))
    results = run_threads(16, lambda: one(next(counter)))
    assert sorted(results, key=bool) == [False] * 15 + [True]
    assert store.get("head") is not None


def test_add_then_write_leaves_neither_when_the_memory_store_is_full() -> None:
    full = MemoryStore(max_entries=2)
    full.set("a", b"1")
    with pytest.raises(StoreError):
        full.add_then_write("mark", b"1", 5, [("head", b"h", 5)])
    assert (full.get("mark"), full.get("head")) == (None, None)


@pytest.mark.parametrize("write", [
    pytest.param(lambda s: s.write([("a", b"new", 5), ("b", b"2", 5), ("c", b"3", 5)], ["kept"]), id="write"),
    pytest.param(lambda s: s.add_then_write("mark", b"1", 5, [("a", b"new", 5), ("b", b"2", 5), ("c", b"3", 5)]),
                 id="add_then_write"),
])
def test_a_write_the_full_memory_store_cannot_take_leaves_it_as_it_was(write: Any) -> None:
    """All or nothing, as Redis refuses a transaction it has no memory for: a key written before
    the one that found no room keeps its old value, and no delete of the write happens."""
    full = MemoryStore(max_entries=3)
    full.set("a", b"old")
    full.set("kept", b"k")
    with pytest.raises(StoreError, match="the memory store is full"):
        write(full)
    assert [full.get(key) for key in ("a", "b", "c", "kept", "mark")] == [b"old", None, None, b"k", None]
    assert full.ttl("a") is None  # its expiry is as it was too


def test_incr_creates_the_counter_with_its_ttl_and_never_resets_it(store: Store) -> None:
    assert store.incr("n", ttl=0.4) == 1
    time.sleep(0.2)
    assert store.incr("n", ttl=0.4) == 2  # must not push the expiry to 0.6 s
    time.sleep(0.3)
    assert store.get("n") is None
    assert store.incr("n", ttl=0.4) == 1  # a new window starts from scratch


def test_incr_amounts_and_counters_written_as_bytes(store: Store) -> None:
    store.set("n", b"5")
    assert store.incr("n") == 6
    assert store.incr("n", amount=10) == 16
    assert store.incr("n", amount=-20) == -4
    assert store.get("n") == b"-4"
    assert store.incr("fresh", amount=3) == 3


@pytest.mark.parametrize("value", [b"abc", b" 12", b"12 ", b"1_000", b"+5", b"-0", b"007", b"1e3", b"\xd9\xa1",
                                   b"9223372036854775808", b""])
def test_incr_refuses_a_value_that_is_not_an_integer(store: Store, value: bytes) -> None:
    """What Redis takes for an integer, on both backends: plain decimal digits in 64 bits."""
    store.set("n", value)
    with pytest.raises(StoreError, match="not an integer"):
        store.incr("n", ttl=5)
    assert store.get("n") == value
    assert store.ping() is True  # a bad value is not an outage


@pytest.mark.parametrize(("value", "amount"), [(b"9223372036854775807", 1), (b"-9223372036854775808", -1)])
def test_incr_past_64_bits_is_refused(store: Store, value: bytes, amount: int) -> None:
    store.set("n", value)
    with pytest.raises(StoreError, match="overflow"):
        store.incr("n", amount=amount)
    assert store.get("n") == value


def test_incr_is_exact_under_many_threads(store: Store) -> None:
    def work() -> int:
        for _ in range(50):
            store.incr("hits", ttl=30)
        return 0

    run_threads(16, work)
    assert store.get("hits") == b"800"


def test_expire_sets_a_ttl_on_an_existing_key(store: Store) -> None:
    store.set("k", b"v")
    assert store.expire("k", 0.1) is True
    assert store.get("k") == b"v"
    time.sleep(0.2)
    assert store.get("k") is None
    assert store.expire("k", 1) is False


@pytest.mark.parametrize("write", ["set", "incr"])
def test_ttl_is_the_time_a_key_has_left(store: Store, write: str) -> None:
    """Seconds left before the key expires; ``None`` for a missing key, an expired one and one without expiry."""
    assert store.ttl("k") is None
    if write == "set":
        store.set("k", b"v")
    else:
        store.incr("k")
    assert store.ttl("k") is None  # no expiry
    store.delete("k")
    if write == "set":
        store.set("k", b"v", ttl=0.4)
    else:
        assert store.incr("k", ttl=0.4) == 1
    left = store.ttl("k")
    assert left is not None and 0.3 < left <= 0.4
    time.sleep(0.2)
    if write == "incr":
        assert store.incr("k", ttl=0.4) == 2  # a count leaves its window alone
    left = store.ttl("k")
    assert left is not None and 0.05 < left <= 0.21
    assert store.get("k") is not None  # reading the TTL leaves the key as it was
    time.sleep(0.3)
    assert store.ttl("k") is None
    assert store.get("k") is None


def test_the_time_a_key_has_left_is_a_ttl_the_store_takes(store: Store) -> None:
    """What ``ttl`` tells of a key that is there is above 0, so it may be passed on (the auth
    layer's revocation sweep gives each blocklist entry what its record has left): Redis's ``PTTL`` says 0 for a
    key with less than a millisecond left, a TTL every method refuses."""
    for _ in range(300):  # (PTTL says 0 in a few of them: those whose millisecond ran out between the calls)
        store.set("k", b"v", 0.001)
        left = store.ttl("k")
        assert left is None or left > 0
        if left is not None:
            store.set("copy", b"v", left)


def test_ttl_of_a_store_that_cannot_tell_is_a_store_error() -> None:
    """The default, for a store of your own without ``ttl``: a StoreError, which its callers handle already."""
    with pytest.raises(StoreError, match=r"^MemoryStore cannot tell how long a key has left$"):
        Store.ttl(MemoryStore(), "k")


def test_delete_says_whether_the_key_existed(store: Store) -> None:
    store.set("k", b"v")
    assert store.delete("k") is True
    assert store.delete("k") is False
    assert store.get("k") is None


def test_delete_of_a_key_whose_ttl_ran_out_says_it_did_not_exist(store: Store) -> None:
    """Redis answers 0; the memory store, which purges lazily, must not count the expired entry as there."""
    store.set("k", b"v", ttl=0.1)
    time.sleep(0.2)
    assert store.delete("k") is False  # the first thing to touch the key since it expired
    assert store.get("k") is None


GLOB_KEYS = ["a*b:1", "a*b:2", "axb:1", "a?b:1", "a[b]:1", "ab:1", "a\\b:1", "other"]


@pytest.mark.parametrize(
    ("prefix", "expected"),
    [
        pytest.param("a*b", {"a*b:1", "a*b:2"}, id="star is literal"),
        pytest.param("a?b", {"a?b:1"}, id="question mark is literal"),
        pytest.param("a[b]", {"a[b]:1"}, id="brackets are literal"),
        pytest.param("a\\b", {"a\\b:1"}, id="backslash is literal"),
        pytest.param("axb:", {"axb:1"}, id="plain prefix"),
        pytest.param("a", set(GLOB_KEYS) - {"other"}, id="short prefix"),
        pytest.param("", set(GLOB_KEYS), id="empty prefix is everything"),
        pytest.param("zzz", set(), id="no match"),
    ],
)
def test_scan_and_delete_prefix_treat_the_prefix_literally(
    store: Store, prefix: str, expected: set[str]
) -> None:
    for key in GLOB_KEYS:
        store.set(key, b"v")
    assert set(store.scan(prefix)) == expected
    assert store.delete_prefix(prefix) == len(expected)
    assert set(store.scan("")) == set(GLOB_KEYS) - expected


def test_scan_skips_expired_keys(store: Store) -> None:
    store.set("p:short", b"v", ttl=0.1)
    store.set("p:long", b"v", ttl=30)
    time.sleep(0.2)
    assert list(store.scan("p:")) == ["p:long"]


def test_delete_prefix_handles_more_keys_than_one_batch(store: Store) -> None:
    for i in range(1200):
        store.set(f"cache:{i}", b"v", ttl=30)
    store.set("cachex", b"keep")
    assert store.delete_prefix("cache:") == 1200
    assert list(store.scan("cache")) == ["cachex"]


def test_ping_and_health(store: Store) -> None:
    assert store.ping() is True
    health = store.health()
    assert set(health) == HEALTH_KEYS
    assert health["ok"] is True
    assert health["backend"] == type(store).__name__
    assert isinstance(health["latency_ms"], float)
    assert health["breaker"] == (None if isinstance(store, MemoryStore) else "closed")


# -- memory:// -------------------------------------------------------------------------


def test_memory_store_evicts_disposable_keys_least_recently_used_first() -> None:
    store = MemoryStore(max_entries=4)
    store.allow_eviction("c:")
    store.set("session:1", b"s")
    for key in ("c:a", "c:b", "c:c"):
        store.set(key, b"v")
    assert store.get("c:a") == b"v"  # "c:b" is now the least recently used
    store.set("c:d", b"v")
    assert len(store) == 4
    assert store.get("c:b") is None
    assert [store.get(k) for k in ("c:a", "c:c", "c:d")] == [b"v", b"v", b"v"]
    store.incr("hits")  # a kept key makes room by evicting a disposable one
    assert store.get("c:a") is None
    assert len(store) == 4
    assert store.get("session:1") == b"s"


def test_wrong_password_counts_never_make_room_for_a_cache_entry_while_they_hold_half_or_less() -> None:
    """A client who can add cache entries cannot wipe a name's brute-force count."""
    store = MemoryStore(max_entries=4)
    store.allow_eviction("cache:")
    store.allow_eviction("login-failures:", lowest=False)
    for i in range(3):
        store.set(f"session:{i}", b"x")
    store.incr("login-failures:alice", 900)
    with pytest.raises(StoreError, match="the memory store is full"):
        store.set("cache:e:/page", b"body", 60)
    assert store.get("login-failures:alice") == b"1"


def test_memory_store_never_evicts_other_keys() -> None:
    """A client who can add cache entries at will cannot push a revocation out."""
    store = MemoryStore(max_entries=3)
    store.allow_eviction("c:")
    store.set("revoked:jti", b"1", ttl=60)
    for i in range(100):
        store.set(f"c:{i}", b"v")
    assert store.get("revoked:jti") == b"1"
    assert len(store) == 3
    store.set("session:a", b"s")
    store.set("session:b", b"s")
    assert store.get("revoked:jti") == b"1"
    assert sorted(store.scan("")) == ["revoked:jti", "session:a", "session:b"]
    with pytest.raises(StoreError, match=r"the memory store is full: its 3 entries .* raise max_entries"):
        store.set("session:c", b"s")
    assert store.get("session:c") is None
    store.set("session:a", b"again")  # rewriting a key needs no room
    assert store.get("session:a") == b"again"


def test_memory_store_spares_keys_evictable_only_for_others_from_the_cache() -> None:
    """Counts of password guesses may go for sessions or for each other, and for cache entries only
    while they hold more than half the store."""
    store = MemoryStore(max_entries=4)
    store.allow_eviction("c:")
    store.allow_eviction("fail:", lowest=False)
    store.set("c:0", b"v")
    store.incr("fail:ann", ttl=60)  # pushes nothing out: there is room
    store.incr("fail:bob", ttl=60)
    for i in range(1, 100):  # a flood of cache entries takes room from the cache only
        store.set(f"c:{i}", b"v")
    assert sorted(store.scan("")) == ["c:98", "c:99", "fail:ann", "fail:bob"]
    store.incr("fail:cid", ttl=60)  # a new count takes room from the cache first
    store.incr("fail:dan", ttl=60)
    assert sorted(store.scan("")) == ["fail:ann", "fail:bob", "fail:cid", "fail:dan"]
    store.get("fail:ann")  # used: bob's count is now the least recently used
    store.set("c:new", b"v")  # counts fill the store: the least recently used goes for the cache,
    store.set("c:newer", b"v")  # down to half the store
    assert sorted(store.scan("")) == ["c:new", "c:newer", "fail:ann", "fail:dan"]
    store.set("c:newest", b"v")  # from then on cache entries make room for each other
    assert sorted(store.scan("")) == ["c:newer", "c:newest", "fail:ann", "fail:dan"]
    store.incr("fail:eve", ttl=60)  # a count takes room from the cache first
    store.incr("fail:fay", ttl=60)
    store.incr("fail:gus", ttl=60)  # then from the other counts
    assert sorted(store.scan("")) == ["fail:ann", "fail:eve", "fail:fay", "fail:gus"]
    store.set("session:1", b"s")  # counts make room for kept keys
    assert sorted(store.scan("")) == ["fail:eve", "fail:fay", "fail:gus", "session:1"]
    assert store.get("fail:gus") == b"1"


def test_allow_eviction_of_kept_keys_moves_them_to_their_tier() -> None:
    store = MemoryStore(max_entries=3)
    store.set("fail:ann", b"1")
    store.set("kept", b"v")
    store.allow_eviction("fail:", lowest=False)
    store.allow_eviction("c:")
    store.set("c:1", b"v")
    store.set("new", b"v")  # the cache's entry goes first
    assert sorted(store.scan("")) == ["fail:ann", "kept", "new"]
    store.set("newer", b"v")  # then the count written before it could be evicted
    assert sorted(store.scan("")) == ["kept", "new", "newer"]


def test_memory_store_full_of_kept_keys_drops_the_expired_first(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr("stores.memory._monotonic", lambda: now[0])
    store = MemoryStore(max_entries=2)
    store.set("a", b"1", ttl=5)
    store.set("b", b"1")
    now[0] += 6
    store.set("c", b"1")
    assert sorted(store.scan("")) == ["b", "c"]


@pytest.mark.parametrize(("live", "expired", "new"), [
    pytest.param("fail:ann", "session:old", "session:new", id="a count of wrong passwords, for a session"),
    pytest.param("c:page", "session:old", "session:new", id="a cache entry, for a session"),
    pytest.param("c:page", "c:old", "c:new", id="a cache entry, for another"),
    pytest.param("fail:ann", "fail:old", "fail:bob", id="a count, for another count"),
    pytest.param("fail:ann", "session:old", "c:new", id="a count, for a cache entry"),
])
def test_a_full_memory_store_drops_expired_keys_before_any_live_one(monkeypatch: pytest.MonkeyPatch, live: str,
                                                                     expired: str, new: str) -> None:
    """Expired keys hold no state: their room goes first, whatever tier they are in. A live count of wrong
    passwords pushed out while expired sessions took the room would reset that account's lockout."""
    now = [1000.0]
    monkeypatch.setattr("stores.memory._monotonic", lambda: now[0])
    store = MemoryStore(max_entries=2)
    store.allow_eviction("c:")
    store.allow_eviction("fail:", lowest=False)
    store.set(live, b"1", ttl=600)  # the least recently used
    store.set(expired, b"1", ttl=5)
    now[0] += 6
    store.set(new, b"1", ttl=600)
    assert sorted(store.scan("")) == sorted([live, new])


def test_a_full_memory_store_drops_expired_keys_however_soon_after_the_last(monkeypatch: pytest.MonkeyPatch) -> None:
    """The room of a key that expired a moment after others were dropped goes before a live count."""
    now, tick = [1000.0], [0.0]

    def clock() -> float:
        now[0] += tick[0]
        return now[0]

    monkeypatch.setattr("stores.memory._monotonic", clock)
    store = MemoryStore(max_entries=3)
    store.allow_eviction("fail:", lowest=False)
    store.incr("fail:ann", 600)
    store.set("session:old", b"s", 2.02)
    store.set("session:x", b"s", 1)
    now[0], tick[0] = 1002.0, 0.0005  # the clock moves while the full store drops session:x
    store.set("session:y", b"s", 600)
    now[0], tick[0] = 1002.03, 0.0
    store.set("session:z", b"s", 600)
    assert sorted(store.scan("")) == ["fail:ann", "session:y", "session:z"]
    assert "session:old" not in store._data  # the expired key went, not the live count
    assert store.get("fail:ann") == b"1"


@pytest.mark.parametrize(("refresh", "ttl"), [
    pytest.param(lambda store: store.getex("session:a", 60), 60, id="getex"),
    pytest.param(lambda store: store.expire("session:a", 60), 60, id="expire"),
    pytest.param(lambda store: store.set("session:a", b"s", 60), 60, id="set with a longer TTL"),
    pytest.param(lambda store: store.set("session:a", b"s"), None, id="set without a TTL"),
])
def test_a_full_memory_store_keeps_a_key_past_a_deadline_it_no_longer_has(
        monkeypatch: pytest.MonkeyPatch, refresh: Callable[[MemoryStore], object], ttl: float | None) -> None:
    now = [1000.0]
    monkeypatch.setattr("stores.memory._monotonic", lambda: now[0])
    store = MemoryStore(max_entries=2)
    store.set("session:a", b"s", 5)
    store.set("session:b", b"s", 5)
    refresh(store)
    now[0] += 6
    store.set("session:c", b"s")  # session:b's room: it expired
    assert sorted(store.scan("")) == ["session:a", "session:c"]
    now[0] += 1000
    if ttl is None:  # never expires, and is never dropped for room
        with pytest.raises(StoreError, match="the memory store is full"):
            store.set("session:d", b"s")
        assert sorted(store.scan("")) == ["session:a", "session:c"]
    else:  # expired at its new deadline: its room goes
        store.set("session:d", b"s")
        assert sorted(store.scan("")) == ["session:c", "session:d"]


def test_a_memory_store_of_keys_rewritten_again_and_again_keeps_few_deadlines() -> None:
    store = MemoryStore(max_entries=100)
    for i in range(10_000):
        store.set(f"session:{i % 10}", str(i).encode(), 60)
    assert len(store._deadlines) <= 2 * 10 + 1024
    assert [store.get(f"session:{i}") for i in range(10)] == [str(9990 + i).encode() for i in range(10)]

def test_allow_eviction_moves_keys_already_written() -> None:
    store = MemoryStore(max_entries=2)
    store.set("c:old", b"v")
    store.set("kept", b"v")
    store.allow_eviction("c:")
    store.set("new", b"v")
    assert sorted(store.scan("")) == ["kept", "new"]


@pytest.mark.parametrize(("first", "then"), [
    pytest.param(("login:", False), ("log", True), id="a count now under a cache's wider prefix"),
    pytest.param((None, False), ("log", True), id="a kept key now under a cache's prefix"),
    pytest.param((None, False), ("log", False), id="a kept key now under a count's prefix"),
])
def test_allow_eviction_moves_keys_of_every_tier(first: tuple[str | None, bool], then: tuple[str, bool]) -> None:
    """A key under the new prefix is found, and evicted, where the store now looks for it, whatever tier it was
    in: it read as missing (and was never written over) while it still took room in its old tier."""
    store = MemoryStore(max_entries=3)
    if first[0] is not None:
        store.allow_eviction(first[0], lowest=first[1])
    store.set("login:x", b"v")
    store.allow_eviction(then[0], lowest=then[1])
    assert store.get("login:x") == b"v"
    store.set("login:x", b"w")
    assert (store.get("login:x"), len(store)) == (b"w", 1)
    assert list(store.scan("")) == ["login:x"]


def test_memory_store_bounds_the_bytes_of_disposable_keys() -> None:
    """A cache of large answers may not grow the process without bound; kept keys are never evicted for it."""
    store = MemoryStore(max_cache_bytes=1000)
    store.allow_eviction("c:")
    store.set("session:big", b"s" * 5000)  # kept keys do not count and are never evicted
    for i in range(4):
        store.set(f"c:{i}", b"v" * 300)  # 303 bytes each, keys included: the fourth pushes c:0 out
    assert [store.get(f"c:{i}") is not None for i in range(4)] == [False, True, True, True]
    assert store.get("c:1") is not None  # c:1 used: c:2 is now the least recently used
    store.set("c:2", b"v" * 10)  # rewriting counts the new size, not both
    store.set("c:4", b"v" * 300)
    assert sorted(store.scan("c:")) == ["c:1", "c:2", "c:3", "c:4"]
    store.delete("c:1")
    store.set("c:5", b"v" * 300)
    assert sorted(store.scan("c:")) == ["c:2", "c:3", "c:4", "c:5"]
    store.set("c:huge", b"v" * 2000)  # larger than the bound on its own: the cache does without it,
    assert store.get("c:huge") is None
    assert sorted(store.scan("c:")) == ["c:2", "c:3", "c:4", "c:5"]  # and keeps every other entry
    store.set("c:2", b"v" * 2000)  # a rewrite too large to keep: the old value goes (it is outdated)
    assert sorted(store.scan("c:")) == ["c:3", "c:4", "c:5"]
    assert store.get("session:big") == b"s" * 5000


def test_memory_store_counts_expired_disposable_keys_out(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr("stores.memory._monotonic", lambda: now[0])
    store = MemoryStore(max_cache_bytes=700)
    store.allow_eviction("c:")
    store.set("c:a", b"v" * 300, ttl=5)
    store.set("c:b", b"v" * 300)
    now[0] += 6
    assert store.get("c:a") is None  # expired: its bytes are free again
    store.set("c:c", b"v" * 300)
    assert sorted(store.scan("c:")) == ["c:b", "c:c"]


def test_the_bytes_of_expired_disposable_keys_go_before_a_live_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past max_cache_bytes the expired entries are dropped first, as they are for max_entries: a live answer,
    even the least recently used, is not pushed out while expired ones hold the room."""
    now = [1000.0]
    monkeypatch.setattr("stores.memory._monotonic", lambda: now[0])
    store = MemoryStore(max_cache_bytes=700)
    store.allow_eviction("c:")
    store.set("c:live", b"v" * 300)
    store.set("c:short", b"v" * 300, ttl=5)
    now[0] += 6
    store.set("c:new", b"v" * 300)
    assert sorted(store.scan("c:")) == ["c:live", "c:new"]
    assert store.get("c:live") == b"v" * 300


def test_memory_url_sets_the_bound() -> None:
    store = store_from_url("memory://?max_entries=2")
    assert isinstance(store, MemoryStore)
    assert store.max_entries == 2
    assert store_from_url("memory://?max_cache_bytes=4096").max_cache_bytes == 4096  # type: ignore[attr-defined]
    assert store.url == "memory://?max_entries=2"
    store.allow_eviction("")
    for key in "abc":
        store.set(key, b"v")
    assert sorted(store.scan("")) == ["b", "c"]


@pytest.mark.parametrize(
    ("url", "error"),
    [
        pytest.param(
            "memory://?size=3", "unknown memory:// option(s): size (known: max_entries, max_cache_bytes)",
            id="unknown option"
        ),
        pytest.param(
            "memory://?max_entries=1&ttl=2&a=1",
            "unknown memory:// option(s): a, ttl (known: max_entries, max_cache_bytes)",
            id="several unknown options",
        ),
        pytest.param("memory://?max_entries=0", "max_entries must be at least 1", id="zero bound"),
        pytest.param("memory://?max_entries=lots", "memory:// max_entries must be a whole number, got 'lots'",
                     id="not a number"),
        pytest.param("memory://?max_cache_bytes=0", "max_cache_bytes must be at least 1", id="zero bytes"),
        pytest.param("memory://?max_cache_bytes=1e6", "memory:// max_cache_bytes must be a whole number, got '1e6'",
                     id="bytes not a whole number"),
    ],
)
def test_memory_url_errors(url: str, error: str) -> None:
    with pytest.raises(ValueError) as info:
        store_from_url(url)
    assert str(info.value) == error


@pytest.mark.parametrize(
    ("options", "error"),
    [
        pytest.param({"max_entriez": 5}, "unknown memory:// option(s): max_entriez (known: max_entries, "
                     "max_cache_bytes; a Redis store's options are ignored on memory://)", id="a misspelt option"),
        pytest.param({"max_entries": True}, "memory:// max_entries must be a whole number, got True",
                     id="YAML's yes: a boolean, not a bound of 1"),
        pytest.param({"max_cache_bytes": 1.5}, "memory:// max_cache_bytes must be a whole number, got 1.5",
                     id="a fraction"),
    ],
)
def test_memory_store_options_errors(options: dict[str, Any], error: str) -> None:
    with pytest.raises(ValueError) as info:
        store_from_url("memory://", **options)
    assert str(info.value) == error


def test_a_redis_stores_options_are_let_be_on_memory() -> None:
    """``url: ${REDIS_URL:-memory://}`` with Redis options: the fallback to memory:// takes them as they are."""
    store = store_from_url("memory://", socket_timeout=0.5, max_connections=50, key_prefix="shop:",
                           ssl_cert_reqs="required", max_entries=5.0)
    assert isinstance(store, MemoryStore) and store.max_entries == 5


@pytest.mark.parametrize(
    ("url", "error"),
    [
        pytest.param(
            "mongodb://db:27017",
            "unknown store scheme 'mongodb://' (known: memory://, redis://, rediss://, unix://, "
            "redis+sentinel://)",
            id="unknown scheme",
        ),
        pytest.param(
            "localhost:6379",
            "store URL 'localhost:6379' has no scheme (known: memory://, redis://, rediss://, unix://, "
            "redis+sentinel://)",
            id="no scheme",
        ),
    ],
)
def test_unknown_scheme_error_text(url: str, error: str) -> None:
    with pytest.raises(ValueError) as info:
        store_from_url(url)
    assert str(info.value) == error


# -- URLs and their masking (no server needed) ---------------------------------------------


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        pytest.param("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0", id="no password"),
        pytest.param("redis://:s3cret@host:6379/0", "redis://:***@host:6379/0", id="password only"),
        pytest.param("rediss://app:s3cret@host/1", "rediss://app:***@host/1", id="user and password"),
        pytest.param("redis://s3cret@host/1", "redis://***@host/1",
                     id="user only: a token as often as a name, a password with its colon forgotten"),
        pytest.param("https://h.example/u?mail=a@b.example", "https://h.example/u?mail=a@b.example",
                     id="an @ after the host is no user"),
        pytest.param("https://blob.example/c?sv=2024&sig=s3cret&se=1", "https://blob.example/c?sv=2024&sig=***&se=1",
                     id="a signature in the query, by the names the operator page masks"),
        pytest.param("https://h.example/?auth=s3cret&author=me", "https://h.example/?auth=***&author=me",
                     id="auth= in the query, not author="),
        pytest.param("redis://:p%40ss@host/0", "redis://:***@host/0", id="quoted password"),
        pytest.param("unix://:s3cret@/run/redis.sock?db=2", "unix://:***@/run/redis.sock?db=2", id="unix"),
        pytest.param(
            "unix:///run/redis.sock?db=2&password=s3cret", "unix:///run/redis.sock?db=2&password=***",
            id="password in the query",
        ),
        pytest.param(
            "redis+sentinel://:s3cret@h1:26379,h2:26380/mymaster/0",
            "redis+sentinel://:***@h1:26379,h2:26380/mymaster/0",
            id="sentinel",
        ),
        # Unencoded, as `openssl rand -base64` makes them: urlsplit would end the host part early.
        pytest.param("redis://:Xy7/Q+9z=@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0", id="a / in it"),
        pytest.param("redis://:Xy7#Q9z@h:1/0", "redis://:***@h:1/0", id="a # in it"),
        pytest.param("redis://u:p?x@h/0", "redis://u:***@h/0", id="a ? in it"),
        pytest.param('redis://u:pa"ss@h/0', "redis://u:***@h/0", id="a quote in it"),
        pytest.param("redis://127.0.0.1:6379/0?password=hunter2@Tail99", "redis://127.0.0.1:6379/0?password=***",
                     id="an @ in a query password"),
        pytest.param("redis://:my secret@h/0", "redis://:***@h/0", id="a space in it"),
        pytest.param("redis://h/0?password=ab#cd@ef", "redis://h/0?password=***", id="a # and an @ in a query one"),
        pytest.param("redis://h/0?password=ab&cdsecret&db=1", "redis://h/0?password=***&db=1",
                     id="an & in a query one"),
    ],
)
def test_mask_url(url: str, masked: str) -> None:
    assert mask_url(url) == masked
    for secret in ("s3cret", "Xy7", "hunter2", "Tail99", 'pa"ss', "secret", "cd@ef"):
        assert secret not in mask_url_passwords(f"see '{url}' here") and secret not in mask_url_passwords(url)


@pytest.mark.parametrize(("message", "shown"), [
    pytest.param("store 'shared' (redis://127.0.0.1:6379/3?password=***): authentication failed",
                 "store 'shared' (redis://127.0.0.1:6379/3?password=***): authentication failed",
                 id="a masked query password, then the text"),
    pytest.param("redis+sentinel:// URLs take no query options (redis+sentinel://:***@h:26379/svc?x=1); pass "
                 "socket options as store options instead",
                 "redis+sentinel:// URLs take no query options (redis+sentinel://:***@h:26379/svc?x=1); pass "
                 "socket options as store options instead", id="a masked URL in a message that starts with a scheme"),
    pytest.param("store 'shared' (redis://app:***@h:6379/0): no database of that number on the server",
                 "store 'shared' (redis://app:***@h:6379/0): no database of that number on the server",
                 id="a masked user's password"),
    pytest.param("bad: host=db password=*** port=5432", "bad: host=db password=*** port=5432",
                 id="a masked connection string password"),
    pytest.param("store 'a' (redis://:s3cret@h/0): x", "store 'a' (redis://:***@h/0): x", id="a password"),
    pytest.param("store 'a' (redis://h/0?password=s3cret): x", "store 'a' (redis://h/0?password=*** x",
                 id="a query password: up to the next space"),
    pytest.param("(redis://:***@h/0) and (redis://:s3cret@g/0): x", "(redis://:***@h/0) and (redis://:***@g/0): x",
                 id="a password after a masked one"),
    pytest.param("(redis://h/0?password=***&token=s3cret) x", "(redis://h/0?password=***&token=*** x",
                 id="a query password after a masked one"),
    pytest.param("host=db password=*** token=s3cret", "host=db password=*** token=***",
                 id="a connection string's secret after a masked one"),
    pytest.param("(redis://:***s3cret@h/0): x", "(redis://:***@h/0): x", id="a password that starts with ***"),
    pytest.param("(redis://:s3***cret@h/0): x", "(redis://:***@h/0): x", id="a password with *** in it"),
    pytest.param("password=s3cret*** x", "password=*** x", id="a password that ends with ***"),
])
def test_a_problem_masks_passwords_but_not_a_mask(message: str, shown: str) -> None:
    """A message quoting a store's masked URL keeps its words: a value that is ``***`` is not masked again."""
    from config.errors import Problem

    assert Problem(message).message == shown
    assert "s3cret" not in Problem(message).message and "cret" not in Problem(message).message


@pytest.mark.parametrize(("url", "secret"), [
    ("redis://:my secret@h/0", "my secret"),
    ("redis://h/0?password=ab#cdef", "cdef"),
    ("redis://u:pq?xy@h/0", "pq?xy"),
    ("unix://:hunter/2secret@/tmp/r.sock?db=0", "2secret"),
    ("redis+sentinel://:hunter/2secret@127.0.0.1:26379/mymaster", "2secret"),
])
def test_a_password_that_needed_percent_encoding_is_refused(url: str, secret: str) -> None:
    """The store would connect elsewhere (a unix socket under another path) or fail misleadingly."""
    with pytest.raises(ValueError, match="percent-encode the characters") as info:
        RedisStore(url)
    assert secret not in str(info.value)


def test_an_unencoded_slash_in_the_password_is_named_and_masked() -> None:
    with pytest.raises(ValueError) as info:
        RedisStore("redis://:Xy7/Q+9z=@127.0.0.1:6379/0")
    assert str(info.value) == ("bad Redis store URL: percent-encode the characters / ? # @ % & and spaces in its "
                               "user name and password (/ as %2F, ? as %3F, # as %23, @ as %40, % as %25, & as %26, "
                               "a space as %20): redis://:***@127.0.0.1:6379/0")


@pytest.mark.parametrize(
    ("url", "error"),
    [
        pytest.param(
            "redis+sentinel://127.0.0.1:26379",
            "a sentinel URL names its sentinels and the service: "
            "redis+sentinel://host:26379[,host2:26379]/service_name[/db], got redis+sentinel://127.0.0.1:26379",
            id="sentinel without service",
        ),
        pytest.param(
            "redis+sentinel://:pw@h:port/m",
            "bad sentinel address 'h:port' in redis+sentinel://:***@h:port/m; write host:port",
            id="sentinel bad port",
        ),
        pytest.param(
            "redis+sentinel://h/m/x",
            "the database in redis+sentinel://h/m/x must be a number, got 'x'",
            id="sentinel bad db",
        ),
        pytest.param(
            "redis+sentinel://h/m?socket_timeout=1",
            "redis+sentinel:// URLs take no query options (redis+sentinel://h/m?socket_timeout=1); "
            "pass socket and sentinel options as store options instead",
            id="sentinel query",
        ),
        pytest.param(
            "redis://:pw@h:abc/0",
            "bad Redis store URL redis://:***@h:abc/0: Port could not be cast to integer value as 'abc'",
            id="bad port",
        ),
        pytest.param(
            "redis://h/0?db=x",
            "bad Redis store URL redis://h/0?db=x: Invalid value for 'db' in connection URL.",
            id="bad db",
        ),
        pytest.param("redis://h/x", "bad Redis store URL redis://h/x: the path names the database, a number such "
                     "as /0, got '/x'", id="db not a number (redis-py would use 0)"),
        pytest.param("redis://h/1/5", "bad Redis store URL redis://h/1/5: the path names the database, a number "
                     "such as /0, got '/1/5'", id="two path segments (redis-py would use 15)"),
        # Digits that are not ASCII: str.isdigit() takes them, int() refuses '²' and reads '٣' as 3.
        pytest.param("redis://h/\u00b2", "bad Redis store URL redis://h/\u00b2: the path names the database, a "
                     "number such as /0, got '/\u00b2'", id="a superscript two as the database"),
        pytest.param("redis://h/\u0663", "bad Redis store URL redis://h/\u0663: the path names the database, a "
                     "number such as /0, got '/\u0663'", id="an Arabic-Indic three as the database"),
        pytest.param("redis+sentinel://h:\u00b2/m", "bad sentinel address 'h:\u00b2' in redis+sentinel://h:\u00b2/m; "
                     "write host:port", id="sentinel port of a superscript digit"),
        pytest.param("redis+sentinel://h/m/\u00b2", "the database in redis+sentinel://h/m/\u00b2 must be a number, "
                     "got '\u00b2'", id="sentinel db of a superscript digit"),
    ],
)
def test_bad_redis_urls_are_refused_at_construction(url: str, error: str) -> None:
    with pytest.raises(ValueError) as info:
        RedisStore(url)
    assert str(info.value) == error


@pytest.mark.parametrize(("query", "meant"), [
    ("retry_on_timeout=yes", True), ("retry_on_timeout=No", False), ("retry_on_timeout=1", True),
    ("retry_on_timeout=FALSE", False), ("retry_on_timeout=t", True), ("retry_on_timeout=n", False),
])
def test_boolean_words_redis_py_reads_are_taken(query: str, meant: bool) -> None:
    store = store_from_url(f"redis://127.0.0.1:1/0?{query}")
    try:
        assert isinstance(store, RedisStore) and store.pool.connection_kwargs["retry_on_timeout"] is meant
    finally:
        store.close()


def test_numeric_options_given_as_text_are_parsed() -> None:
    """``socket_timeout: ${REDIS_SOCKET_TIMEOUT:-0.5}`` interpolates to the string "0.5"."""
    store = store_from_url("redis://127.0.0.1:1/3", socket_timeout="0.5", max_connections="4",
                           failure_threshold="2", retry_on_timeout="true")
    try:
        assert isinstance(store, RedisStore)
        kwargs = store.pool.connection_kwargs
        assert (kwargs["socket_timeout"], kwargs["retry_on_timeout"]) == (0.5, True)
        assert store.pool.max_connections == 4
        assert store.breaker.failure_threshold == 2
    finally:
        store.close()


@pytest.mark.parametrize(("option", "value", "error"), [
    pytest.param("socket_timeout", "soon", "store option socket_timeout must be a number of seconds above 0, "
                 "got 'soon'", id="timeout"),
    pytest.param("socket_timeout", [1], "store option socket_timeout must be a number of seconds above 0, got [1]",
                 id="a list for a timeout"),
    pytest.param("socket_connect_timeout", 0, "store option socket_connect_timeout must be a number of seconds "
                 "above 0, got 0", id="no time to connect"),
    pytest.param("reset_timeout", float("inf"), "store option reset_timeout must be a number of seconds above 0, "
                 "got inf", id="a breaker that never closes"),
    pytest.param("failure_threshold", "2.5", "store option failure_threshold must be a whole number above 0, "
                 "got '2.5'", id="a threshold that is not whole"),
    pytest.param("failure_threshold", True, "store option failure_threshold must be a whole number above 0, "
                 "got True", id="a yes for a threshold"),
    pytest.param("failure_threshold", 2.9, "store option failure_threshold must be a whole number above 0, "
                 "got 2.9", id="a threshold written as a fraction"),
    pytest.param("failure_threshold", 0.5, "store option failure_threshold must be a whole number above 0, "
                 "got 0.5", id="a fraction that would round to 0"),
    pytest.param("max_connections", "many", "store option max_connections cannot be 'many'", id="pool size"),
])
def test_options_that_are_not_numbers_are_refused_at_construction(option: str, value: Any, error: str) -> None:
    with pytest.raises(ValueError) as info:
        store_from_url("redis://127.0.0.1:1/0", **{option: value})
    assert str(info.value) == error


@pytest.mark.parametrize(("option", "value", "error"), [
    pytest.param("key_prefix", 12, "store option key_prefix must be text, got a number (quote it in stack.yaml)",
                 id="a number (every command raised TypeError)"),
    pytest.param("key_prefix", None, "store option key_prefix must be text, got no value (YAML reads an empty value "
                 "as null: write '' for no prefix)", id="an empty value"),
    pytest.param("key_prefix", True, "store option key_prefix must be text, got a boolean (quote it in stack.yaml)",
                 id="a word YAML reads as a boolean"),
    pytest.param("password", datetime.date(2024, 1, 1), "store option password must be text, got a date (quote it "
                 "in stack.yaml)", id="a date for a password (redis-py refused it on connecting)"),
    pytest.param("username", False, "store option username must be text, got a boolean (quote it in stack.yaml)",
                 id="a boolean for a user name"),
    pytest.param("client_name", [1], "store option client_name must be text, got a list (quote it in stack.yaml)",
                 id="a list for a client name"),
])
def test_options_that_are_not_text_are_refused_at_construction(option: str, value: Any, error: str) -> None:
    """Built without connecting, such a store passed check and failed on the first command (key_prefix 12 + key)
    or the first connection (redis-py sends only text and numbers)."""
    with pytest.raises(ValueError) as info:
        store_from_url("redis://127.0.0.1:1/0", **{option: value})
    assert str(info.value) == error


def test_a_whole_number_for_a_password_is_its_digits() -> None:
    store = store_from_url("redis://127.0.0.1:1/0", password=12345, key_prefix="")
    try:
        assert isinstance(store, RedisStore) and store.pool.connection_kwargs["password"] == 12345
    finally:
        store.close()


def test_a_whole_number_of_any_size_is_a_threshold() -> None:
    store = store_from_url("redis://127.0.0.1:1/0", failure_threshold=10**400, socket_timeout="0.5")
    try:
        assert isinstance(store, RedisStore) and store.breaker.failure_threshold == 10**400
    finally:
        store.close()


@pytest.mark.parametrize(("url", "error"), [
    pytest.param("unix://", "bad Redis store URL unix://: a unix:// URL names the socket's path, e.g. "
                 "unix:///run/redis/redis.sock?db=0", id="a unix socket without a path"),
    pytest.param("unix://run/redis/redis.sock", "bad Redis store URL unix://run/redis/redis.sock: a unix:// URL has "
                 "no host; the socket's path follows three slashes (unix:///run/redis/redis.sock)",
                 id="two slashes: the first folder read as a host"),
    pytest.param("unix://Run/redis.sock", "bad Redis store URL unix://Run/redis.sock: a unix:// URL has "
                 "no host; the socket's path follows three slashes (unix:///Run/redis.sock)",
                 id="the folder's case kept in the advice"),
    pytest.param("redis://127.0.0.1:1/0?socket_timeout=0",
                 "bad Redis store URL redis://127.0.0.1:1/0?socket_timeout=0: socket_timeout must be a number of "
                 "seconds above 0, got 0.0", id="a timeout of 0 in the URL"),
    pytest.param("redis://127.0.0.1:1/0?socket_connect_timeout=-1", "bad Redis store URL "
                 "redis://127.0.0.1:1/0?socket_connect_timeout=-1: socket_connect_timeout must be a number of "
                 "seconds above 0, got -1.0", id="a negative connect timeout in the URL"),
    pytest.param("rediss://127.0.0.1:1/0?ssl_ca_certs=/nonexistent/ca.pem", "Redis store "
                 "rediss://127.0.0.1:1/0?ssl_ca_certs=/nonexistent/ca.pem: ssl_ca_certs '/nonexistent/ca.pem' does "
                 "not exist", id="a CA file that is not there"),
    pytest.param("redis://:pw@127.0.0.1:0/0", "bad Redis store URL redis://:***@127.0.0.1:0/0: the port must be a "
                 "number from 1 to 65535, got 0", id="port 0 (redis-py used 6379 in silence)"),
    pytest.param("rediss://127.0.0.1:00/0", "bad Redis store URL rediss://127.0.0.1:00/0: the port must be a "
                 "number from 1 to 65535, got 0", id="port 00"),
    pytest.param("redis://:6379/0", "bad Redis store URL redis://:6379/0: it names no host (redis-py used "
                 "localhost); write redis://127.0.0.1:6379/0 for this machine", id="no host (an empty variable?)"),
    pytest.param("redis://:pw@/0", "bad Redis store URL redis://:***@/0: it names no host (redis-py used "
                 "localhost); write redis://127.0.0.1:6379/0 for this machine", id="a password and no host"),
    pytest.param("redis+sentinel://h:0/svc", "bad sentinel address 'h:0' in redis+sentinel://h:0/svc; the port must "
                 "be a number from 1 to 65535", id="sentinel port 0"),
    pytest.param("redis+sentinel://h:26379,h2:70000/svc", "bad sentinel address 'h2:70000' in "
                 "redis+sentinel://h:26379,h2:70000/svc; the port must be a number from 1 to 65535",
                 id="sentinel port out of range"),
    pytest.param("redis+sentinel://:26379/svc", "bad sentinel address ':26379' in redis+sentinel://:26379/svc; "
                 "write host:port", id="sentinel without a host"),
])
def test_urls_that_could_never_connect_are_refused_at_construction(url: str, error: str) -> None:
    """Else the store would seem to be in an outage that never ends (/readyz 503, every layer's on_store_error)."""
    with pytest.raises(ValueError) as info:
        store_from_url(url)
    assert str(info.value) == error


def test_unknown_pool_option_is_refused_at_construction() -> None:
    with pytest.raises(TypeError, match=r"^bad option for Redis store redis://:\*\*\*@127\.0\.0\.1:1/0: "
                                        r"unknown option 'bogus'$"):
        store_from_url("redis://:pw@127.0.0.1:1/0", bogus=1)


@pytest.mark.parametrize(("url", "options", "error"), [
    pytest.param("redis://:pw@127.0.0.1:1/0\n", {}, "bad Redis store URL redis://:***@127.0.0.1:1/0: it begins or "
                 "ends with a space or a line break (a secrets file's last newline?); remove it",
                 id="a secrets file's newline (was: percent-encode the password)"),
    pytest.param(" redis://127.0.0.1:1/0  ", {}, "bad Redis store URL redis://127.0.0.1:1/0: it begins or ends with "
                 "a space or a line break (a secrets file's last newline?); remove it", id="spaces around it"),
    pytest.param("redis://127.0.0.1:1/3?db=4", {}, "bad Redis store URL redis://127.0.0.1:1/3?db=4: it names two "
                 "databases, '/3' and ?db=4; give one", id="two databases (?db= won in silence)"),
    pytest.param("redis://127.0.0.1:1/0?socket_timout=1", {}, "bad option for Redis store "
                 "redis://127.0.0.1:1/0?socket_timout=1: unknown option 'socket_timout'; did you mean "
                 "'socket_timeout'?", id="a misspelt query option"),
    pytest.param("redis://127.0.0.1:1/0", {"health_check_intervall": 5}, "bad option for Redis store "
                 "redis://127.0.0.1:1/0: unknown option 'health_check_intervall'; did you mean "
                 "'health_check_interval'?", id="a misspelt store option"),
    pytest.param("redis://:pw@127.0.0.1:1/0?ssl_cert_reqs=required", {}, "bad option for Redis store "
                 "redis://:***@127.0.0.1:1/0?ssl_cert_reqs=required: ssl_cert_reqs is an option of TLS connections: "
                 "write the URL rediss://", id="a TLS option on redis://"),
    pytest.param("redis://127.0.0.1:1/0?decode_responses=false", {}, "bad Redis store "
                 "redis://127.0.0.1:1/0?decode_responses=false: decode_responses cannot be set (the layers store "
                 "bytes, and would read text back)", id="decode_responses in the URL (any text is true)"),
    pytest.param("redis://127.0.0.1:1/0", {"decode_responses": True}, "bad Redis store redis://127.0.0.1:1/0: "
                 "decode_responses cannot be set (the layers store bytes, and would read text back)",
                 id="decode_responses as an option"),
    pytest.param("redis+unix:///run/redis.sock", {}, "unknown store scheme 'redis+unix://'; did you mean 'unix://'? "
                 "(known: memory://, redis://, rediss://, unix://, redis+sentinel://)",
                 id="redis+unix (was: did you mean redis+sentinel)"),
    pytest.param("redis://127.0.0.1:1/0?max_connections=0", {}, "bad Redis store "
                 "redis://127.0.0.1:1/0?max_connections=0: max_connections must be a whole number above 0 (leave it "
                 "out for 100), got 0", id="a pool of 0 in the URL (redis-py made it 100)"),
    pytest.param("redis://127.0.0.1:1/0", {"max_connections": 0}, "bad Redis store redis://127.0.0.1:1/0: "
                 "max_connections must be a whole number above 0 (leave it out for 100), got 0",
                 id="a pool of 0 as an option"),
    pytest.param("redis://127.0.0.1:1/0", {"max_connections": True}, "bad Redis store redis://127.0.0.1:1/0: "
                 "max_connections must be a whole number above 0 (leave it out for 100), got True",
                 id="a yes for a pool size (a pool of 1)"),
    pytest.param("redis://127.0.0.1:1/0", {"max_connections": -1}, "bad Redis store redis://127.0.0.1:1/0: "
                 "max_connections must be a whole number above 0 (leave it out for 100), got -1",
                 id="a negative pool (was redis-py's words, no store named)"),
    pytest.param("redis://127.0.0.1:1/0?health_check_interval=-1", {}, "bad Redis store "
                 "redis://127.0.0.1:1/0?health_check_interval=-1: health_check_interval must be a number of seconds, "
                 "0 (never) or above, got -1", id="a negative interval in the URL (a PING before every command)"),
    pytest.param("redis+sentinel://h/m", {"health_check_interval": "-5"}, "bad Redis store redis+sentinel://h/m: "
                 "health_check_interval must be a number of seconds, 0 (never) or above, got -5",
                 id="a negative interval from a variable"),
    pytest.param("redis://127.0.0.1:1/0", {"health_check_interval": float("nan")}, "bad Redis store "
                 "redis://127.0.0.1:1/0: health_check_interval must be a number of seconds, 0 (never) or above, "
                 "got nan", id="nan (never checked)"),
    pytest.param("redis://127.0.0.1:1/0", {"health_check_interval": True}, "bad Redis store redis://127.0.0.1:1/0: "
                 "health_check_interval must be a number of seconds, 0 (never) or above, got True",
                 id="a yes for an interval"),
    pytest.param("redis://127.0.0.1:1/0?retry_on_timeout=off", {}, "bad Redis store URL "
                 "redis://127.0.0.1:1/0?retry_on_timeout=off: retry_on_timeout must be true or false (or yes, no, 1, "
                 "0), got 'off'", id="off in the URL (redis-py read it as true)"),
    pytest.param("rediss://127.0.0.1:1/0?ssl_check_hostname=flase", {}, "bad Redis store URL "
                 "rediss://127.0.0.1:1/0?ssl_check_hostname=flase: ssl_check_hostname must be true or false (or yes, "
                 "no, 1, 0), got 'flase'", id="a misspelt false in the URL"),
    pytest.param("redis://127.0.0.1:1/0", {"socket_keepalive": "off"}, "store option socket_keepalive must be true "
                 "or false (or yes, no, 1, 0), got 'off'", id="off from a variable"),
])
def test_redis_url_mistakes_are_refused_with_advice(url: str, options: dict[str, Any], error: str) -> None:
    with pytest.raises((ValueError, TypeError)) as info:
        store_from_url(url, **options)
    assert str(info.value) == error


@pytest.mark.redis
def test_the_same_database_in_the_path_and_the_query_is_one(redis_url: str) -> None:
    store = store_from_url(f"{redis_url.rsplit('/', 1)[0]}/3?db=3&max_connections=7&health_check_interval=5")
    try:
        assert isinstance(store, RedisStore)
        assert (store.pool.connection_kwargs["db"], store.pool.connection_kwargs["health_check_interval"],
                store.pool.max_connections) == (3, 5, 7)
        store.set("k", b"v", ttl=30)
        assert store.get("k") == b"v"
        with redis.Redis.from_url(redis_url.rsplit("/", 1)[0] + "/3") as admin:
            assert admin.get("wsgistack:k") == b"v"
    finally:
        store.close()


def test_redis_store_needs_a_url_or_a_client() -> None:
    with pytest.raises(ValueError, match=r"^RedisStore needs a url or a client$"):
        RedisStore()


def test_rediss_url_builds_a_tls_pool_without_connecting() -> None:
    store = RedisStore("rediss://:pw@127.0.0.1:1/3")
    try:
        assert isinstance(store.pool, redis.ConnectionPool)
        assert store.pool.connection_class is redis.SSLConnection
        assert store.pool.connection_kwargs["db"] == 3
        assert store.url == "rediss://:***@127.0.0.1:1/3"
    finally:
        store.close()


def test_password_is_masked_in_errors_and_health() -> None:
    url = f"redis://:hunter2pw@127.0.0.1:{free_port()}/0"  # nothing listens there
    store = RedisStore(url)
    try:
        with pytest.raises(StoreError) as info:
            store.get("k")
        message = str(info.value)
        assert message.startswith(f"redis store {mask_url(url)} could not run GET: ")
        assert "Connection refused" in message
        assert "hunter2pw" not in message
        health = store.health()
        assert health["ok"] is False
        assert health["url"] == mask_url(url)
        assert "hunter2pw" not in repr(health) + repr(store)
    finally:
        store.close()


# -- Redis specifics -------------------------------------------------------------------------


@pytest.mark.redis
class TestRedis:
    """Pool sharing, key prefixes, ready clients, the other URL forms and ``limits``."""

    def test_stores_of_one_url_share_one_pool_and_breaker(self, redis_url: str) -> None:
        port = redis_url.split(":")[-1].split("/")[0]
        a = store_from_url(redis_url)
        assert isinstance(a, RedisStore)
        b = RedisStore(f"redis://127.0.0.1:{port}")  # same server, default db spelled out
        c = RedisStore(redis_url, socket_timeout=0.5)  # other timeouts: another pool
        e = RedisStore(redis_url + "?socket_timeout=2")  # in the URL too: its timeout is not the default's
        f = RedisStore(redis_url + "?socket_timeout=0.5")  # the same settings as c, spelled in the URL
        try:
            assert e.pool is not a.pool and e.pool.connection_kwargs["socket_timeout"] == 2.0
            assert a.pool.connection_kwargs["socket_timeout"] == 0.25
            assert f.pool is c.pool
            e.close()
            f.close()
            assert isinstance(a, RedisStore)
            assert a.pool is b.pool
            assert a.client is b.client
            assert a.breaker is b.breaker
            assert c.pool is not a.pool
            a.set("shared", b"1")
            assert b.get("shared") == b"1"
            a.close()
            assert b.get("shared") == b"1"  # closing one store leaves the pool to the others
        finally:
            a.close()
            b.close()
            c.close()
        d = RedisStore(redis_url)
        try:
            assert d.pool is not a.pool  # the last close released it
        finally:
            d.close()

    def test_own_breaker_settings_get_their_own_breaker(self, redis_url: str) -> None:
        a = RedisStore(redis_url)
        b = RedisStore(redis_url, failure_threshold=5, reset_timeout=1.0)
        mine = CircuitBreaker(2, 0.5)
        c = RedisStore(redis_url, breaker=mine)
        try:
            assert a.pool is b.pool is c.pool
            assert b.breaker is not a.breaker
            assert (b.breaker.failure_threshold, b.breaker.reset_timeout) == (5, 1.0)
            assert c.breaker is mine
        finally:
            for store in (a, b, c):
                store.close()

    def test_keys_carry_the_prefix_and_ttls_use_milliseconds(self, redis_url: str) -> None:
        raw = redis.Redis.from_url(redis_url)
        app = RedisStore(redis_url, key_prefix="app:")
        other = RedisStore(redis_url, key_prefix="other:")
        try:
            app.set("k", b"v", ttl=1.5)
            assert raw.get("app:k") == b"v"
            assert 1000 < raw.pttl("app:k") <= 1500
            assert other.get("k") is None
            assert list(app.scan("")) == ["k"]
            assert app.getex("k", 0.25) == b"v"
            assert 0 < raw.pttl("app:k") <= 250
            assert app.incr("n", ttl=0.75) == 1
            assert 500 < raw.pttl("app:n") <= 750
            assert app.incr("n") == 2
            assert 0 < raw.pttl("app:n") <= 750
            assert app.add("lock", b"1", ttl=2) is True
            assert 1500 < raw.pttl("app:lock") <= 2000
        finally:
            app.close()
            other.close()
            raw.close()

    def test_two_prefixes_on_one_redis_never_touch_each_other(self, redis_url: str) -> None:
        """Every method, the scripts' keys included, works under its own prefix: two stacks on one database
        write the same names, and each reads, locks, marks and deletes only its own."""
        raw = redis.Redis.from_url(redis_url)
        stores = {prefix: RedisStore(redis_url, key_prefix=prefix) for prefix in ("a:", "b:")}
        try:
            for prefix, store in stores.items():
                name = prefix.encode()
                store.set("k", name, 60)
                store.incr("n", 60)
                store.write([("w", name, 60)], ["gone"])
                assert store.add_then_write("used", name, 60, [("head", name, 60)]) is True
                _, token, seen = store.get_or_lock("entry", "lock", 60, "mark", 60)
                assert token is not None and seen is not None
                assert store.write_unless_marked("mark", seen, [("entry", name, 60)], ["k2"], unlock=("lock", token))
                _, token, _ = store.get_or_lock("entry2", "lock", 60)
                assert token is not None and store.unlock("lock", token, leave=(name, 60)) is True
            names = ("k", "n", "w", "used", "head", "entry", "mark", "lock")
            everything = set(redis_command(raw, "KEYS", "*"))
            assert everything == {(prefix + key).encode() for prefix in stores for key in names}
            for prefix, store in stores.items():
                name = prefix.encode()
                assert [store.get(key) for key in ("k", "n", "w", "used", "head", "entry", "lock")] == [
                    name, b"1", name, name, name, name, name]
            assert stores["a:"].delete_prefix("") == 8
            assert sorted(stores["b:"].scan("")) == ["entry", "head", "k", "lock", "mark", "n", "used", "w"]
            assert all(key.startswith(b"b:") for key in redis_command(raw, "KEYS", "*"))
        finally:
            for store in stores.values():
                store.close()
            raw.close()

    def test_a_ready_client_is_used_as_is(self, redis_url: str) -> None:
        client = redis.Redis.from_url(redis_url)
        store = RedisStore(client=client)
        try:
            assert store.client is client
            assert store.pool is client.connection_pool
            assert store.url == redis_url
            store.set("k", b"v")
            assert client.get("wsgistack:k") == b"v"
            store.close()
            assert client.ping() is True  # the caller's client stays open
        finally:
            client.close()

    def test_limits_storage_shares_the_pool(self, redis_url: str) -> None:
        from limits import parse
        from limits.storage import RedisStorage
        from limits.strategies import FixedWindowRateLimiter

        store = RedisStore(redis_url)
        try:
            storage = RedisStorage("redis://", connection_pool=store.pool)
            assert storage.storage.connection_pool is store.pool
            limiter = FixedWindowRateLimiter(storage)
            item = parse("2/minute")
            assert [limiter.hit(item, "client") for _ in range(3)] == [True, True, False]
        finally:
            store.close()

    def test_unix_socket_url(self, tmp_path: Path) -> None:
        binary = shutil.which("redis-server")
        assert binary
        sock = tmp_path / "redis.sock"
        proc = subprocess.Popen(
            [binary, "--port", "0", "--unixsocket", str(sock), "--save", "", "--appendonly", "no",
             "--dir", str(tmp_path)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 10
            while not sock.exists() and time.monotonic() < deadline:
                time.sleep(0.02)
            store = RedisStore(f"unix://{sock}?db=1")
            try:
                assert store.url == f"unix://{sock}?db=1"
                store.set("k", b"v", ttl=5)
                assert store.get("k") == b"v"
                raw = redis.Redis(unix_socket_path=str(sock), db=1)
                assert raw.get("wsgistack:k") == b"v"
                raw.close()
            finally:
                store.close()
        finally:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture
def sentinel_port(redis_url: str, redis_server: object, tmp_path: Path) -> Iterator[int]:
    """A redis-server --sentinel on loopback monitoring the private server as ``mymaster``."""
    binary = shutil.which("redis-server")
    if redis_server is None or binary is None:
        reason = "sentinel test needs the private redis-server (REDIS_URL is set or no binary)"
        print(reason)
        pytest.skip(reason)
    master_port = redis_url.split(":")[-1].split("/")[0]
    port = free_port()
    conf = tmp_path / "sentinel.conf"
    conf.write_text(
        f"port {port}\nbind 127.0.0.1\ndir {tmp_path}\n"
        f"sentinel monitor mymaster 127.0.0.1 {master_port} 1\n"
        "sentinel down-after-milliseconds mymaster 60000\n"
    )
    proc = subprocess.Popen([binary, str(conf), "--sentinel"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        probe = redis.Redis(port=port, socket_timeout=0.5)
        deadline = time.monotonic() + 5
        while True:
            try:
                if redis_command(probe, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", "mymaster"):
                    break
            except redis.RedisError as exc:
                if time.monotonic() > deadline or proc.poll() is not None:
                    reason = f"redis-server --sentinel did not start: {exc}"
                    print(reason)
                    pytest.skip(reason)
            time.sleep(0.05)
        probe.close()
        yield port
    finally:
        proc.kill()
        proc.wait(timeout=10)


@pytest.mark.redis
def test_sentinel_url_finds_the_master(sentinel_port: int, redis_url: str) -> None:
    store = RedisStore(f"redis+sentinel://127.0.0.1:{sentinel_port}/mymaster/2")
    raw = redis.Redis(port=int(redis_url.split(":")[-1].split("/")[0]), db=2)
    try:
        assert isinstance(store.pool, redis.sentinel.SentinelConnectionPool)
        store.set("k", b"v", ttl=5)
        assert store.get("k") == b"v"
        assert raw.get("wsgistack:k") == b"v"  # db 2 of the monitored master
        assert store.health()["ok"] is True
        assert store.incr("n", ttl=5) == 1
    finally:
        raw.flushdb()
        raw.close()
        store.close()


# -- combined operations: one round trip on Redis ------------------------------------------


def test_get_or_lock_reads_or_takes_the_lock(store: Store) -> None:
    """A lock taken holds a new random token, which the taker gets back (to give the lock back with)."""
    value, token, mark = store.get_or_lock("entry", "lock", 5)
    assert (value, mark, store.get("lock")) == (None, None, token)
    assert token is not None and len(token) == 16
    assert store.get_or_lock("entry", "lock", 5) == (None, None, None)  # someone holds it
    store.delete("lock")
    assert store.get_or_lock("entry", "lock", 5)[1] not in (None, token)  # each taker a token of its own
    store.set("entry", b"value", 5)
    assert store.get_or_lock("entry", "lock2", 5) == (b"value", None, None)
    assert store.get("lock2") is None  # a hit takes no lock


def test_get_or_lock_also_reads_the_mark(store: Store) -> None:
    """With a mark key, its value as of the same step comes back too, on a hit, a lock and a wait alike."""
    value, locked, made = store.get_or_lock("entry", "lock", 5, "mark", 30)  # no mark yet: one is set
    assert (value, locked, store.get("mark")) == (None, store.get("lock"), made)
    assert made is not None and len(made) == 16 and locked != made
    assert store.get_or_lock("other", "lock2", 5, "mark2")[2] != made  # each one new
    store.set("mark", b"n1", 5)
    assert store.get_or_lock("entry", "lock", 5, "mark") == (None, None, b"n1")
    store.delete("lock")
    value, locked, mark = store.get_or_lock("entry", "lock", 5, "mark")
    assert (value, locked, mark) == (None, store.get("lock"), b"n1") and locked is not None
    store.set("entry", b"value", 5)
    store.set("mark", b"n2", 5)
    assert store.get_or_lock("entry", "lock", 5, "mark") == (b"value", None, b"n2")
    assert store.get_or_lock("entry", "lock", 5) == (b"value", None, None)  # not asked: not read


def test_a_mark_the_full_memory_store_cannot_write_is_none_not_an_error() -> None:
    """The reader goes on without a mark (and so stores nothing later) rather than failing the request."""
    store = MemoryStore(max_entries=2)
    store.set("entry", b"value")
    store.set("other", b"x")  # full of keys that may not be evicted
    assert store.get_or_lock("entry", "lock", 5, "mark", 30) == (b"value", None, None)
    store.delete("entry")
    store.set("lock", b"1")
    assert store.get_or_lock("entry", "lock", 5, "mark", 30) == (None, None, None)  # someone holds the lock
    assert store.get("mark") is None


def test_get_or_lock_takes_the_lock_once_per_fill(store: Store) -> None:
    """The leader stores the value and drops the lock; no reader may miss the value and lead again.

    Read and lock are one step: as two, a reader could miss, the leader store and unlock, and the
    reader take the lock (its app called a second time).
    """
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads interleave as often as they can
    try:
        for round_ in range(20):
            key, lock = f"entry{round_}", f"lock{round_}"

            def fill(key: str = key, lock: str = lock) -> int:
                led = 0
                while True:
                    value, locked, _ = store.get_or_lock(key, lock, 5)
                    if value is not None:
                        return led
                    if locked:
                        led += 1
                        store.write([(key, b"value", 5)], [lock])  # the leader's save, lock dropped with it

            assert sum(run_threads(16, fill)) == 1  # type: ignore[arg-type]
    finally:
        sys.setswitchinterval(switch)


def test_write_unless_marked_stores_only_while_the_mark_holds_what_was_seen(store: Store) -> None:
    store.set("lock", b"1")
    # None (the reader found no mark) never matches: a mark gone (evicted) and one never set look alike.
    assert store.write_unless_marked("mark", None, [("a", b"A", 5)], ["lock"]) is False
    assert (store.get("a"), store.get("lock")) == (None, None)  # nothing stored; the deletes go all the same
    store.set("mark", b"n1")
    assert store.write_unless_marked("mark", None, [("b", b"B", 5)]) is False
    assert store.write_unless_marked("mark", b"n1", [("b", b"B", 5)]) is True  # the mark seen, unchanged
    assert store.get("b") == b"B"
    store.set("mark", b"n2")
    assert store.write_unless_marked("mark", b"n1", [("c", b"C", 5)]) is False  # another value since
    assert store.write_unless_marked("mark", b"n", [("c", b"C", 5)]) is False  # a prefix is not equal
    store.delete("mark")
    assert store.write_unless_marked("mark", b"n2", [("c", b"C", 5)]) is False  # gone since: not the same
    assert store.write_unless_marked("mark", b"", [("c", b"C", 5)]) is False  # empty is not none
    assert store.get("c") is None
    store.set("mark", b"n3")
    store.set("lock", b"1")
    assert store.write_unless_marked("mark", b"n3", [], ["lock"]) is False  # no sets: none went, on every backend
    assert store.get("lock") is None
    with pytest.raises(TypeError):
        store.write_unless_marked("mark", None, [("d", "text", 5)])  # type: ignore[list-item]


def test_a_lookup_never_sees_a_mark_without_the_deletes_written_with_it() -> None:
    """``write`` is one step: a reader finds the entry of the mark's generation, or none, never an older one.

    Each round marks the data with a new value and drops the entry in one write, then stores the entry
    for that mark; a reader that found mark i beside the entry of i - 1 would store an old answer.
    (memory://, whose threads can interleave between two calls of a write; Redis runs the write as one
    MULTI/EXEC, which test_combined_operations_are_one_round_trip_each counts.)
    """
    store = MemoryStore()
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads interleave as often as they can
    stop = threading.Event()
    seen: list[tuple[bytes | None, bytes | None]] = []

    def writer() -> None:
        for i in range(1000):
            if seen:
                break
            store.write([("mark", str(i).encode(), 5)], ["entry", "lock"])
            store.set("entry", str(i).encode(), 5)
        stop.set()

    def reader() -> None:
        while not stop.is_set():
            value, _, mark = store.get_or_lock("entry", "lock", 5, "mark")
            if value is not None and value != mark:
                seen.append((value, mark))

    threads = [threading.Thread(target=writer), *(threading.Thread(target=reader) for _ in range(6))]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
    finally:
        sys.setswitchinterval(switch)
    assert stop.is_set() and seen == []


def _give_back(store: Store, how: str, token: bytes) -> bool:
    """Give the lock ``lock`` back as its holder (``token``) does, one of the three ways; return whether it went
    (for the write, whether it is gone)."""
    if how == "unlock":
        return store.unlock("lock", token)
    if how == "hand over":
        return store.unlock("lock", token, leave=(b"0", 5))
    _, _, seen = store.get_or_lock("other", "other lock", 5, "mark")
    assert store.write_unless_marked("mark", seen, [("entry", b"value", 5)], unlock=("lock", token)) is True
    assert store.get("entry") == b"value"  # stored, whoever holds the lock
    store.delete("entry")
    return store.get("lock") is None


@pytest.mark.parametrize(("how", "left"), [
    pytest.param("unlock", None, id="unlock: deleted"),
    pytest.param("hand over", b"0", id="hand over: another value left in its place"),
    pytest.param("unlock with the write", None, id="unlock with the write: deleted in the same step"),
])
def test_a_lock_goes_only_as_its_own_holder_gives_it_back(store: Store, how: str, left: bytes | None) -> None:
    """A took the lock, it expired, B took it: whatever A gives back late (a slow fill), B's lock stays B's,
    and B's own giving back works as before."""
    _, a, _ = store.get_or_lock("entry", "lock", 0.1)
    assert a is not None and len(a) == 16
    time.sleep(0.2)
    _, b, _ = store.get_or_lock("entry", "lock", 5)
    assert b is not None and b != a
    assert _give_back(store, how, a) is False
    assert store.get("lock") == b
    assert store.get_or_lock("entry2", "lock", 5)[1] is None  # still held: nobody else takes it
    assert _give_back(store, how, b) is True
    assert store.get("lock") == left
    if left is not None:
        assert 4 < (store.ttl("lock") or 0) <= 5


def test_an_unlock_needs_the_token_that_took_the_lock(store: Store) -> None:
    """A lock taken with ``add`` (its value the taker's token) goes only with that token; a missing one is no error."""
    assert store.add("lock", b"t1", 5)
    assert store.unlock("lock", b"t2") is False
    assert store.unlock("lock", b"t") is False  # a prefix is not equal
    assert store.write_unless_marked("mark", None, [], unlock=("lock", b"t2")) is False
    assert store.get("lock") == b"t1"
    assert store.write_unless_marked("mark", None, [("a", b"A", 5)], unlock=("lock", b"t1")) is False
    assert (store.get("lock"), store.get("a")) == (None, None)  # no sets (no mark seen), the lock gone all the same
    assert store.unlock("lock", b"t1") is False  # gone already
    assert store.unlock("lock", b"t1", leave=(b"0", 5)) is False  # and not brought back
    assert store.get("lock") is None


@pytest.mark.parametrize("call", [
    pytest.param(lambda s: s.unlock("lock", "t1"), id="unlock"),
    pytest.param(lambda s: s.unlock("lock", "t1", leave=(b"0", 5)), id="unlock, leaving a value"),
    pytest.param(lambda s: s.write_unless_marked("mark", "n1", [("a", b"A", 5)]), id="write_unless_marked's seen"),
    pytest.param(lambda s: s.write_unless_marked("mark", b"n1", [], unlock=("lock", "t1")),
                 id="write_unless_marked's unlock"),
])
def test_a_token_or_mark_that_is_not_bytes_is_refused(store: Store, call: Any) -> None:
    """A token and a mark's value are bytes, as what get_or_lock returns: text was equal to the same bytes on
    Redis (a Lua string) and never on memory://, so the same call gave the lock back on one and not the other."""
    store.set("lock", b"t1", 5)
    store.set("mark", b"n1", 5)
    with pytest.raises(TypeError, match=r"^store values are bytes; encode JSON in the layer$"):
        call(store)
    assert (store.get("lock"), store.get("mark"), store.get("a")) == (b"t1", b"n1", None)


@pytest.mark.parametrize("call", [
    pytest.param(lambda s: s.unlock("lock", "t1"), id="unlock"),
    pytest.param(lambda s: s.unlock("lock", "t1", leave=(b"0", 5)), id="unlock, leaving a value"),
    pytest.param(lambda s: s.write_unless_marked("mark", "n1", [("a", b"A", 5)]), id="write_unless_marked's seen"),
    pytest.param(lambda s: s.write_unless_marked("mark", b"n1", [("a", b"A", 5)], unlock=("lock", "t1")),
                 id="write_unless_marked's unlock"),
])
def test_store_s_defaults_refuse_a_token_or_mark_that_is_not_bytes(call: Any) -> None:
    """As the built-in stores: the defaults said False (the lock stayed taken) or stored the sets and kept the
    lock, without a word."""
    test_a_token_or_mark_that_is_not_bytes_is_refused(_OwnStore(), call)


def test_get_or_lock_lock_expires(store: Store) -> None:
    assert store.get_or_lock("entry", "lock", 0.1)[1] is not None
    time.sleep(0.25)
    assert store.get_or_lock("entry", "lock", 0.1)[1] is not None


def test_write_sets_and_deletes_together(store: Store) -> None:
    store.set("old", b"1")
    store.write([("a", b"A", 5), ("b", b"B", None)], ["old"])
    assert (store.get("a"), store.get("b"), store.get("old")) == (b"A", b"B", None)
    with pytest.raises(TypeError):
        store.write([("c", "text", None)])  # type: ignore[list-item]


@pytest.mark.redis
def test_combined_operations_are_one_round_trip_each(redis_url: str) -> None:
    import redis as redis_py

    store = store_from_url(redis_url)
    client = redis_py.Redis.from_url(redis_url)
    client.config_resetstat()
    store.get_or_lock("e", "l", 5)
    store.write([("e", b"x", 5)], ["l"])
    stats = client.info("commandstats")
    calls = {name: stat["calls"] for name, stat in stats.items() if name != "cmdstat_config"}
    assert calls.get("cmdstat_evalsha", 0) + calls.get("cmdstat_eval", 0) == 1
    assert calls.get("cmdstat_set") == 2 and calls.get("cmdstat_del") == 1  # SET NX inside the script + pipeline
    assert calls.get("cmdstat_multi") == calls.get("cmdstat_exec") == 1  # the write is one transaction
    client.close()
    store.close()


@pytest.mark.redis
def test_a_lock_is_given_back_in_one_script(redis_url: str) -> None:
    """The token's check and the DEL (or the SET of a hand-over) are one EVALSHA, alone or with a save."""
    store = store_from_url(redis_url)
    client = redis.Redis.from_url(redis_url)
    ways: list[Callable[[bytes], object]] = [
        lambda token: store.unlock("l", token),
        lambda token: store.unlock("l", token, leave=(b"0", 1)),
        lambda token: store.write_unless_marked("m", b"seen", [("e", b"x", 5)], unlock=("l", token)),
        lambda token: store.write_unless_marked("m", None, [], unlock=("l", token)),
    ]
    try:
        for give_back in ways:
            give_back(b"someone else's")  # (its script loaded: a first EVALSHA gets NOSCRIPT, then SCRIPT LOAD)
            store.delete("l")
            token = store.get_or_lock("e", "l", 5)[1]
            assert token is not None
            client.config_resetstat()
            give_back(token)
            stats = client.info("commandstats")
            calls = {name: stat["calls"] for name, stat in stats.items() if name != "cmdstat_config"}
            assert calls.get("cmdstat_evalsha", 0) == 1
            assert "cmdstat_multi" not in calls and store.get("l") != token
    finally:
        client.close()
        store.close()


@pytest.mark.redis
def test_a_lookup_reads_its_mark_in_the_same_script(redis_url: str) -> None:
    """The mark's GET is part of get_or_lock's script, as sent directly and as read ahead in a pipeline."""
    store = RedisStore(redis_url)
    client = redis.Redis.from_url(redis_url)
    try:
        store.set("mark", b"n1", 5)
        _, token, mark = store.get_or_lock("entry", "lock", 5, "mark")
        assert (token, mark) == (store.get("lock"), b"n1") and token is not None
        store.delete("lock")
        command = store.read_command("get_or_lock", "entry", 5, "lock", "mark")
        assert command[:6] == ("EVALSHA", store._get_or_lock.sha, 3, "wsgistack:entry", "wsgistack:lock",
                               "wsgistack:mark")
        reply = redis_command(client, *command)
        answer = store.read_answer("get_or_lock", reply)
        assert answer == (None, store.get("lock"), b"n1") and answer[1] not in (None, token)  # a token of its own
        reply = redis_command(client, *command)
        assert store.read_answer("get_or_lock", reply) == (None, None, b"n1")  # the lock is held now
        store.set("entry", b"value", 5)
        reply = redis_command(client, *store.read_command("get_or_lock", "entry", 5, "lock"))
        assert store.read_answer("get_or_lock", reply) == (b"value", None, None)  # no mark asked for
    finally:
        client.close()
        store.close()


@pytest.mark.parametrize("reply", [
    pytest.param("WRONGTYPE Operation against a key holding the wrong kind of value", id="a command (any Redis)"),
    pytest.param("ERR Error running script (call to f_4a1b): @user_script:1: WRONGTYPE Operation against a key "
                 "holding the wrong kind of value", id="in a script, as Redis before 7.0 reports it"),
])
def test_a_value_of_another_type_is_no_outage(reply: str) -> None:
    from stores.base import StoreWrongType

    store = RedisStore("redis://127.0.0.1:1/0")
    try:
        def wrong() -> None:
            raise redis.ResponseError(reply)

        with pytest.raises(StoreWrongType):
            store.call("get", wrong)
        assert store.breaker.state == "closed"
    finally:
        store.close()


def test_a_unix_url_may_name_localhost_as_its_host() -> None:
    """unix://localhost/run/redis.sock: as a file: URL may (RFC 8089), and as redis-py reads it."""
    store = RedisStore("unix://localhost/run/redis/redis.sock?db=2")
    try:
        assert store.pool.connection_kwargs["path"] == "/run/redis/redis.sock"
    finally:
        store.close()


def test_keys_kept_apart_are_bounded_on_their_own() -> None:
    """The cache's write marks: a table of their own (as many as max_entries), outside max_entries."""
    store = MemoryStore(max_entries=8)
    store.allow_eviction("c:")
    store.keep_apart("c:w:")
    for i in range(8):
        store.set(f"c:e:{i}", b"v", 60)
    for i in range(10):
        store.set(f"c:w:{i}", b"m", 60)
    assert len(store) == 8  # the entries, all of them
    assert sorted(store.scan("c:w:")) == [f"c:w:{i}" for i in range(2, 10)]  # eight marks: the oldest went first
    store.get("c:w:2")  # used: now the newest
    store.set("c:w:10", b"m", 60)
    assert sorted(store.scan("c:w:")) == sorted(["c:w:2", *(f"c:w:{i}" for i in range(4, 11))])
    assert sorted(store.scan("c:e:")) == [f"c:e:{i}" for i in range(8)]
    value, locked, mark = store.get_or_lock("c:e:9", "c:l:9", 5, "c:w:9", 60)  # a lookup's mark, apart too
    assert (value, locked is not None, store.get("c:w:9")) == (None, True, mark)
    assert len(list(store.scan("c:e:"))) == 7  # the lock took an entry's room, the mark did not



def test_keys_kept_apart_drop_the_expired_before_the_least_recently_used(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr("stores.memory._monotonic", lambda: now[0])
    store = MemoryStore(max_entries=2)
    store.keep_apart("c:w:")
    store.set("c:w:live", b"m", 600)  # the least recently used
    store.set("c:w:old", b"m", 5)
    now[0] += 6
    store.set("c:w:new", b"m", 600)
    assert sorted(store.scan("c:w:")) == ["c:w:live", "c:w:new"]

@pytest.mark.redis
def test_a_new_connection_is_one_command_away(redis_url: str) -> None:
    """No HELLO and no CLIENT SETINFO before the first command: against a slow Redis each handshake command
    waits up to socket_timeout on its own (a new connection took 0.8 s for 0.25 s)."""
    admin = redis.Redis.from_url(redis_url)
    store = store_from_url(redis_url + "?socket_timeout=0.37")  # a pool of its own: a new connection
    try:
        admin.config_resetstat()
        store.set("k", b"v", 5)
        assert store.get("k") == b"v"
        stats = admin.info("commandstats")
        assert not [name for name in stats if "hello" in name or "setinfo" in name], stats
    finally:
        store.close()
        admin.close()


@pytest.mark.parametrize(("text", "said", "refuses"), [
    pytest.param("MISCONF Redis is configured to save RDB snapshots, but it's currently unable to persist to disk.",
                 "writes are refused: Redis cannot save its snapshot to disk (MISCONF, stop-writes-on-bgsave-error)",
                 False, id="MISCONF: an outage that ends once the disk does"),
    pytest.param("NOREPLICAS Not enough good replicas to write.",
                 "writes are refused: fewer replicas answer than min-replicas-to-write asks (NOREPLICAS)",
                 False, id="NOREPLICAS: an outage that ends once the replicas answer"),
    pytest.param("unknown command 'EVALSHA', with args beginning with: ",
                 "Redis does not know a command the layers send (unknown command 'EVALSHA'): renamed or disabled "
                 "(rename-command), or a Redis older than 6.2",
                 True, id="a renamed command: a configuration that never heals"),
    pytest.param("unknown command 'GETEX', with args beginning with: 'wsgistack:session:Q2x9' '120' ",
                 "Redis does not know a command the layers send (unknown command 'GETEX'): renamed or disabled "
                 "(rename-command), or a Redis older than 6.2",
                 True, id="its arguments (a session id, a client's address) are not repeated: /readyz shows this"),
    pytest.param("Command # 1 (GET k) of pipeline caused error: LOADING Redis is loading the dataset in memory",
                 "loading its data set (LOADING): it answers once it has read it in",
                 False, id="LOADING in a pipeline: an outage that ends once the data is read in"),
])
def test_what_a_refusal_says(text: str, said: str, refuses: bool) -> None:
    from stores.redis import refusal

    assert refusal(redis.exceptions.ResponseError(text)) == (said, refuses)


class _WriteLandsMeanwhile(MemoryStore):
    """A store with Store's default write_unless_marked, where another process's write sets the mark anew
    right after the sets go (between the default's separate calls)."""

    def write(self, sets: Sequence[tuple[str, bytes, float | None]] = (), deletes: Sequence[str] = ()) -> None:
        super().write(sets, deletes)
        if any(key == "entry" for key, _, _ in sets):
            MemoryStore.set(self, "mark", b"written meanwhile", 60)


def test_the_default_write_unless_marked_never_undoes_a_write_s_mark() -> None:
    """It makes the mark outlive what it stored by its TTL alone: setting it again with the value it saw
    would put back the mark a write just replaced (and entries stored before the write would be served)."""
    store = _WriteLandsMeanwhile()
    store.set("mark", b"seen", 60)
    assert Store.write_unless_marked(store, "mark", b"seen", [("entry", b"v", 600)])
    assert (store.get("mark"), store.get("entry")) == (b"written meanwhile", b"v")


def test_a_lock_never_has_two_holders_under_many_threads(store: Store) -> None:
    """Single flight under contention: threads take the lock (get_or_lock), and give it back each of the three
    ways (unlock, unlock leaving a value, write_unless_marked with the unlock); no two ever hold it at once."""
    holders: set[int] = set()
    guard = threading.Lock()
    overlaps: list[set[int]] = []
    taken = [0]
    counter = iter(range(1000))
    deadline = time.monotonic() + 10

    def work() -> None:
        me = next(counter)
        while taken[0] < 300 and time.monotonic() < deadline:
            _, token, seen = store.get_or_lock("entry", "lock", 30, "mark", 30)
            if token is None:
                continue
            with guard:
                holders.add(me)
                if len(holders) > 1:
                    overlaps.append(set(holders))
                taken[0] += 1
                how = taken[0] % 3
            time.sleep(0)
            with guard:
                holders.discard(me)  # before the lock goes: the next holder may take it at once
            if how == 0:
                assert store.unlock("lock", token) is True
            elif how == 1:
                assert store.unlock("lock", token, leave=(b"0", 0.001)) is True
            else:
                store.write_unless_marked("mark", seen, [("entry", b"v", 0.001)], unlock=("lock", token))
                assert store.get("lock") != token

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        run_threads(8, work)
    finally:
        sys.setswitchinterval(switch)
    assert overlaps == []
    assert taken[0] >= 300  # (taken often enough to tell)


def _locks_of(store: Store) -> list[Any]:
    """The locks a thread of ``store``'s process may hold for a moment: the memory store's own; a Redis store's
    breaker and the lock every Redis store is built under (a reload builds stores in a thread of its own)."""
    if isinstance(store, MemoryStore):
        return [store._lock]
    import stores.redis

    assert isinstance(store, RedisStore)
    return [stores.redis._SHARED_LOCK, store.breaker._lock]


@pytest.mark.filterwarnings("ignore:.*use of fork\\(\\) may lead to deadlocks:DeprecationWarning")
def test_a_process_forked_while_a_thread_holds_a_store_s_lock_can_use_the_store(store_url: str) -> None:
    """A process forks while another of its threads is inside a store step: a cache layer built on a
    carried-over memory:// store declares its prefixes under the store's lock; a Redis store is made under a
    lock every Redis store shares.  (serve's supervisor waits for its reload thread to end before it forks; a
    host or an app that forks from a threaded process need not.)  The child has no such thread: a lock copied
    as held was never given back, and its every request waited on the store for ever."""
    store = store_from_url(store_url)
    store.set("k", b"v")
    locks = _locks_of(store)
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        for lock in locks:
            lock.acquire()
        held.set()
        release.wait(10)
        for lock in reversed(locks):
            lock.release()

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert held.wait(5)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            signal.alarm(3)  # a lock that is never given back: the child dies of SIGALRM
            code = 1
            try:
                store.set("k", b"child")
                assert store.get("k") == b"child"
                if isinstance(store, RedisStore):
                    store.breaker.reset()
                store_from_url(store_url).close()  # another store of the same URL (a reload's)
                code = 0
            finally:
                os._exit(code)
    finally:
        release.set()
        holder.join(10)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    store.close()
