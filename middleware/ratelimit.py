"""Rate limiting per client address, user or header, on the ``limits`` library.

Each request is matched against ``rules`` (path globs and methods, first match
wins, then the top-level default rule), keyed (client address, user, a header
or a combination) and counted against every limit of its rule.  Passes carry
``RateLimit-Limit``, ``RateLimit-Remaining`` and ``RateLimit-Reset``; refusals
are a 429 with the same headers and ``Retry-After``, rendered by ``errors``.

On Redis one request costs one round trip: the hit and the window statistics
of every limit of the rule go out as one pipeline of ``limits``' own Lua
scripts (the keys are the ones ``limits``' ``RedisStorage`` uses); the moving
window's two are ``limits``' timed by Redis's clock, one clock for every process.

When not to use it: when a gateway in front of the server already limits, or
with a ``memory://`` store while several processes serve (each process counts
on its own, so clients get N per process).  ``key: user`` only sees users
when the layer sits inside ``auth``.
"""

from __future__ import annotations

import bisect
import contextlib
import difflib
import fnmatch
import hashlib
import re
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable
from math import ceil, floor, inf
from typing import TYPE_CHECKING, Annotated, Any, Literal, NamedTuple, cast

import redis
from limits import RateLimitItem, parse_many
from limits.storage import MemoryStorage, RedisStorage
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator
from redis.exceptions import NoScriptError, RedisError, ResponseError

from middleware.base import (
    IDENTITY,
    LONGEST_ADDRESS,
    READ_AHEAD,
    TOKEN,
    Context,
    Headers,
    LayerOptions,
    Methods,
    ReadAhead,
    RulePaths,
    client_ip,
    client_key,
    decoded_path,
    decorate_error,
    escape_control,
    note,
    refuse,
    rewrites_inside,
    routed_path,
    with_head,
)
from stores.base import StoreError
from stores.breaker import StoreUnavailable
from stores.memory import MemoryStore

if TYPE_CHECKING:
    from collections.abc import Iterable

    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

__all__ = ["RateLimitMiddleware"]

Strategy = Literal["fixed-window", "moving-window", "sliding-window-counter"]
Result = tuple[bool, int, float]  # (allowed, remaining, reset time in epoch seconds)
_STORE_ERRORS = (StoreError, RedisError, OSError)
_STORE_RETRY_AFTER = "5"
_UNTAKEN = object()


def _limit_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


def _check_limit(text: str) -> str:
    try:
        items = parse_many(text)
    except ValueError:
        raise ValueError(
            f"{text!r} is not a rate limit; write it like '10/second' or '100 per minute' "
            "(units: second, minute, hour, day, month, year)"
        ) from None
    if any(item.amount < 1 for item in items):  # it would refuse every request, each told to retry in vain
        raise ValueError(f"{text!r} allows no request at all; to refuse every request, do not route it here")
    if _NO_PERIOD.search(text):  # the limits library reads 5/0 minutes as 5/minute
        raise ValueError(f"{text!r} counts over 0 units of time; write 1 or more ('5/minute', '5 per 2 minutes')")
    return text


#: A period of zero units (``5/0 minutes``, ``5 per 0 hours``).
_NO_PERIOD = re.compile(r"(?:/|\bper\b)\s*0+\s*[a-z]", re.I)


#: One ``limits`` string, checked on its own so an error names its index (``limits[1]``).
Limit = Annotated[str, AfterValidator(_check_limit)]


def _distinct_limits(value: list[str]) -> list[str]:
    """Refuse one limit written twice (``4/minute`` and ``4 per 1 minute``): it would count each request twice."""
    seen: dict[tuple[int, str, int], str] = {}
    for text in value:
        for item in parse_many(text):
            key = (item.amount, item.GRANULARITY.name, item.multiples)  # the same counter in the store
            if key in seen:
                raise ValueError(f"{text!r} repeats the limit {seen[key]!r}: the same limit twice counts each "
                                 "request twice (halving it); write it once")
            seen[key] = text
    return value


def _check_key(value: str | list[str] | None) -> str | list[str] | None:
    for part in [value] if isinstance(value, str) else value or ():
        name = part[7:] if part.startswith("header:") else None
        if part not in ("client_ip", "user") and not (name and TOKEN.fullmatch(name)):
            # A value close to a known one is a typo, shown with the fix; any other may be a secret
            # pasted into the wrong option, and is not repeated.
            if name is not None:
                raise ValueError(f"{part!r} names no header field: write header:NAME, like 'header:X-API-Key'")
            close = difflib.get_close_matches(part, ["client_ip", "user"], n=1, cutoff=0.6)
            raise ValueError(f"unknown key function {part!r}; did you mean {close[0]!r}?" if close else
                             "unknown key function (known: client_ip, user, header:NAME)")
    if isinstance(value, list) and not value:
        raise ValueError("key must name at least one of client_ip, user, header:NAME")
    return value


class _Rule(BaseModel):
    """One entry of ``rules``: which requests, which limits, keyed how."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    paths: RulePaths = Field(default_factory=lambda: ["*"])
    methods: Methods = Field(default_factory=list)
    limits: list[Limit] = Field(default_factory=list)
    key: str | list[str] | None = None
    strategy: Strategy | None = None
    on_store_error: Literal["open", "closed"] | None = None

    _split = field_validator("limits", mode="before")(_limit_list)
    _distinct = field_validator("limits")(_distinct_limits)
    _key = field_validator("key")(_check_key)




def _sliding(item: RateLimitItem, prev: int, prev_ttl: float, cur: int, cur_ttl: float,
             now: float) -> tuple[int, float]:
    """Remaining and reset of a sliding window counter, computed the way ``limits`` does."""
    expiry = item.get_expiry()
    remaining = max(0, item.amount - floor(prev * prev_ttl / expiry + cur))
    if not (prev or cur):
        return remaining, now
    prev_reset = prev_ttl % (expiry / prev) if prev else inf
    cur_reset = (cur_ttl % expiry or expiry) if cur else inf
    return remaining, now + min(prev_reset, cur_reset)


_FIELDS = ("ratelimit-limit", "ratelimit-remaining", "ratelimit-reset")
_RETRY_IN = re.compile(r"retry in \d+ seconds")
_LIMIT_IS = re.compile(r"the limit is [^;]*;")


def _most_restrictive(response_headers: Headers, ours: Headers) -> Headers:
    """The response's headers with one set of RateLimit fields: ours, or a layer's inside us if tighter.

    The fields are single-valued: with two limiters (by address outside auth,
    by user inside it), the one with fewer requests left (or, as many, the later
    reset) speaks for both.  A set that is incomplete or not whole numbers (an
    app's own) is replaced by ours.  When ours has nothing left, a ``Retry-After``
    from inside waits at least until our reset.
    """
    found = _fields_of(response_headers)
    if not found:
        return [*response_headers, *ours]
    try:
        theirs = (int(found["ratelimit-remaining"]), -int(found["ratelimit-reset"]))
        int(found["ratelimit-limit"])
        valid = theirs[0] >= 0 and theirs[1] <= 0
    except (KeyError, ValueError):
        valid = False
    remaining, reset = int(ours[1][1]), int(ours[2][1])
    kept = response_headers
    if not valid or (remaining, -reset) < theirs:
        kept = [*(h for h in response_headers if h[0].lower() not in _FIELDS), *ours]
    if remaining > 0:
        return kept
    out = []
    for name, value in kept:
        if len(name) == 11 and name.lower() == "retry-after" and value.isdigit() and int(value) < reset:
            value = str(reset)
        out.append((name, value))
    return out


def _fields_of(headers: Iterable[tuple[str, str]]) -> dict[str, str]:
    """The RateLimit fields among ``headers``, by their lower-case names (a layer's inside us, or none).

    A 429 without them comes from a policy of another kind (the core's lockout of a user name after
    wrong passwords): ours would tell the client it has requests left, and a client going by
    ``RateLimit-Remaining`` would retry at once.  Such a refusal goes out with its own ``Retry-After`` alone.
    """
    found: dict[str, str] = {}
    for name, value in headers:  # (a loop, not a comprehension: this runs for every answer counted)
        if len(name) in (15, 19) and (lowered := name.lower()) in _FIELDS:
            found[lowered] = value
    return found


def _decorate_tighter(exc: BaseException, ours: Headers, item: RateLimitItem) -> None:
    """:func:`decorate_error` for our RateLimit fields: the tighter set of ours and an inner limiter's.

    An inner 429's message is made to say what its headers now say: the wait, and, when our fields
    speak for both, our limit (``item``), whose reset that wait is.
    """
    extra: Headers | None = getattr(exc, "wsgistack_headers", None)
    if extra is None:
        decorate_error(exc, ours)
        return
    extra[:] = _most_restrictive(extra, ours)
    text = original = getattr(exc, "description", None)
    if not isinstance(text, str):
        return
    found = _fields_of(extra)
    if (found.get("ratelimit-limit"), found.get("ratelimit-remaining"), found.get("ratelimit-reset")) == \
            (ours[0][1], ours[1][1], ours[2][1]):
        text = _LIMIT_IS.sub(lambda _: f"the limit is {item};", text, count=1)
    wait = next((v for n, v in extra if n.lower() == "retry-after"), None)
    if wait is not None:
        text = _RETRY_IN.sub(f"retry in {wait} seconds", text)
    if text != original:
        exc.description = text  # type: ignore[attr-defined]


def _seconds(delta: float) -> int:
    """Whole seconds until a reset, rounded up.

    A microsecond is forgiven: ``now + 60 - now`` may come to 60.0000002 at today's
    epoch, and must read 60.  Anything more is a real wait (a client that waits the
    seconds said must find the window ended).
    """
    return max(0, ceil(delta - 1e-6))


class _Compiled(NamedTuple):
    """A rule ready for the request path; ``keys`` are the ``limits`` keys around the client key.

    ``groups`` name each limit's table of keys in a ``memory://`` store (each capped on its own): the
    counter's name and limit, and the key it counts by.  ``key`` holds the parts of that key as ``_key``
    reads them: ``client_ip``, ``user``, or a header's name in the environ (``HTTP_X_API_KEY``).
    """

    id: str
    paths: re.Pattern[str] | None
    methods: frozenset[str] | None
    items: list[RateLimitItem]
    amounts: list[str]  # RateLimit-Limit of each item
    keys: list[tuple[str, str]]
    groups: list[str]
    key: tuple[str, ...]
    strategy: str
    closed: bool  # on_store_error: closed
    passed: Callable[[], None]  # emits ratelimit.pass for this rule


class _MemoryStorage(MemoryStorage):
    """``limits``' MemoryStorage with its expiry sweep started at most once a second.

    The stock storage starts a new timer thread every 10 ms while requests
    flow; starting a thread stalls the request that does it.  Expired
    counters are also dropped when next read, so sweeping less often only
    delays freeing memory.
    """

    _next_sweep = 0.0

    def _MemoryStorage__schedule_expiry(self) -> None:
        now = time.monotonic()
        if now >= self._next_sweep:
            self._next_sweep = now + 1.0
            getattr(MemoryStorage, "_MemoryStorage__schedule_expiry")(self)  # noqa: B009

    def _MemoryStorage__expire_events(self) -> None:
        """``limits``' sweep, for keys that may be cleared while it runs.

        The stock one reads each key it listed with ``[key]``: one cleared meanwhile
        (``_track`` clears the oldest keys of a flood, without the storage's per-key
        locks) raised KeyError, and the sweep thread died with a traceback on stderr,
        every few seconds under a flood of made-up keys.
        """
        now = time.time()
        for key in list(self.events):
            with self.locks[key]:
                events = self.events.get(key)
                if events:
                    kept = events[:bisect.bisect_left(events, -now, key=lambda event: -event.expiry)]
                    if self.events.get(key) is events:  # not cleared (nor replaced) meanwhile
                        self.events[key] = kept
                if not self.events.get(key):
                    self.locks.pop(key, None)
        for key in list(self.expirations):
            ends = self.expirations.get(key)
            if ends is not None and ends <= now:
                self.storage.pop(key, None)
                self.expirations.pop(key, None)
                self.locks.pop(key, None)


class _MemoryCounter:
    """The counters of a ``memory://`` store, behind one lock, so concurrent threads count exactly.

    Fixed windows are counted here, in one dict per window length: a window
    starts at its key's first hit and ends ``expiry`` seconds later, as in
    ``limits``' storages.  Entries of one dict end in the order they
    started, so expired ones are dropped from its front as new windows open
    (no sweeper thread).  This is the hot path of the default stack:
    ``limits``' MemoryStorage takes four wrapped calls, a per-key RLock and a
    timer thread per hit, about 5 µs, where this takes one.  Moving and
    sliding windows use ``limits``' MemoryStorage.
    """

    def __init__(self) -> None:
        self._storage: _MemoryStorage | None = None
        # Ordered dicts: their oldest entries are dropped from the front, which in a plain dict costs a scan
        # past every entry deleted before (until the next resize): at the key cap, each new client's.
        # Each limit of each rule, as keyed (``group``), has its own, each capped on its own: a flood of made-up
        # keys on one rule (a header's values) cannot push another's counts out (the login's), nor one through a
        # layer keyed by header another layer's on the same store (both named ``default``, of one window length).
        # Layers whose rules count in the same counters (same name, limit and key) share a table, as they share
        # the counts.
        #: (group, expiry) -> key -> [count, monotonic end]
        self.windows: dict[tuple[str, float], OrderedDict[str, list[float]]] = {}
        #: (group, strategy, expiry) -> key -> when its entries end, for the moving and sliding windows (see _track)
        self.tracked: dict[tuple[str, str, int], OrderedDict[str, float]] = {}
        self.lock = threading.Lock()

    @property
    def storage(self) -> _MemoryStorage:
        """``limits``' storage for moving and sliding windows, made on first use (it starts a thread)."""
        if self._storage is None:
            with self.lock:
                if self._storage is None:
                    self._storage = _MemoryStorage()
        return self._storage

    def hit(self, strategy: str, items: list[RateLimitItem], keys: list[str], now: float,
            groups: list[str] | None = None) -> list[Result]:
        """Count a hit on each limit; ``groups`` name the table (and cap) each key is kept in."""
        if groups is None:
            groups = [""] * len(keys)
        if strategy == "fixed-window":
            return self._fixed(items, keys, now, groups)
        s, out = self.storage, []
        with self.lock:
            for item, key, group in zip(items, keys, groups, strict=True):
                expiry, amount = item.get_expiry(), item.amount
                self._track(group, strategy, expiry, key, now)
                if strategy == "moving-window":
                    allowed = s.acquire_entry(key, amount, expiry)
                    start, count = s.get_moving_window(key, amount, expiry)
                    out.append((allowed, max(0, amount - count), start + expiry))
                else:
                    allowed = s.acquire_sliding_window_entry(key, amount, expiry)
                    remaining, reset = _sliding(item, *s.get_sliding_window(key, expiry), now)
                    out.append((allowed, remaining, reset))
        return out

    def _track(self, group: str, strategy: str, expiry: int, key: str, now: float) -> None:
        """Keep at most MAX_MEMORY_KEYS keys in ``limits``' storage per limit of a rule.

        ``tracked`` holds each key's last hit plus how long its entries live after it
        (a moving window: one window; a sliding window's counter: two), ordered by
        last hit: the front ends first.  Keys that ended are forgotten (``limits``'
        own timer drops their entries); past the cap, the key hit least recently is
        cleared from the storage, and that client starts anew.  Call with the lock held.
        """
        tracked = self.tracked.get((group, strategy, expiry))
        if tracked is None:
            tracked = self.tracked[(group, strategy, expiry)] = OrderedDict()
        if key in tracked:
            del tracked[key]  # inserted again at the end
        tracked[key] = now + (expiry if strategy == "moving-window" else 2 * expiry)
        while tracked:
            first = next(iter(tracked))
            if tracked[first] > now:
                break
            del tracked[first]
        if len(tracked) > MAX_MEMORY_KEYS:
            oldest = next(iter(tracked))
            del tracked[oldest]
            if strategy == "moving-window":
                self.storage.clear(oldest)
            else:
                self.storage.clear_sliding_window(oldest, expiry)

    def _fixed(self, items: list[RateLimitItem], keys: list[str], now: float, groups: list[str]) -> list[Result]:
        """Windows timed by the monotonic clock (a wall clock stepped back an hour would hold every
        window open an hour longer); their ends are given back on ``now``'s clock."""
        out: list[Result] = []
        with self.lock:
            tick = time.monotonic()
            for item, key, group in zip(items, keys, groups, strict=True):
                expiry = item.get_expiry()
                windows = self.windows.get((group, expiry))
                if windows is None:
                    windows = self.windows[(group, expiry)] = OrderedDict()
                entry = windows.get(key)
                if entry is None or entry[1] <= tick:
                    if entry is not None:
                        del windows[key]  # inserted again at the end: the dict stays ordered by window end
                    while windows:  # drop the windows that ended, from the oldest
                        first = next(iter(windows))
                        if windows[first][1] > tick:
                            break
                        del windows[first]
                    entry = windows[key] = [0, tick + expiry]
                    if len(windows) > MAX_MEMORY_KEYS:  # a flood of new keys: the oldest window goes first
                        del windows[next(iter(windows))]
                entry[0] += 1
                count, amount = int(entry[0]), item.amount
                out.append((count <= amount, max(0, amount - count), now + entry[1] - tick))
        return out


#: Keys a ``memory://`` store counts per limit of a rule: past it, the key whose window started first
#: (fixed windows) or that was hit least recently (moving, sliding) is dropped and that client starts
#: anew, so a flood of made-up keys (IPv6 networks, header values) cannot grow the process without
#: bound, nor take another rule's counts with it.  A key costs about 0.3 KiB (fixed) or 0.6 KiB (sliding);
#: a moving window's 0.6 KiB plus about 0.15 KiB per request counted in it (``limits`` keeps an entry per
#: accepted request: up to 100 KiB a key under 600/minute, 10 GB at the cap), hence fixed or sliding
#: windows for high limits in memory.
MAX_MEMORY_KEYS = 100_000
_COUNTERS: weakref.WeakKeyDictionary[MemoryStore, _MemoryCounter] = weakref.WeakKeyDictionary()
_COUNTERS_LOCK = threading.Lock()


def _memory_counter(store: MemoryStore) -> _MemoryCounter:
    """The counters that live as long as ``store``: a reload that keeps the store keeps the counts."""
    with _COUNTERS_LOCK:
        counter = _COUNTERS.get(store)
        if counter is None:
            counter = _COUNTERS[store] = _MemoryCounter()
        return counter


#: ``limits``' moving-window scripts (acquire; then the oldest entry in the window and the count), timed by
#: Redis's clock instead of a timestamp each process sends: processes whose clocks disagree stamped the
#: entries of one list with their own, and one whose clock ran ahead took the others' for older than they
#: were (a client let through a window early, or at once past a minute of skew).  The window script also
#: returns that clock's reading (as TIME gives it), for the reset on the process's own clock.  The list holds
#: what ``limits``' holds: each accepted request's time, newest first.
_NOW = "local t = redis.call('time')\nlocal now = tonumber(t[1]) + tonumber(t[2]) / 1000000\n"
_ACQUIRE_MOVING = _NOW + """
local limit = tonumber(ARGV[1])
local expiry = tonumber(ARGV[2])
local amount = tonumber(ARGV[3])
if amount > limit then
    return false
end
local entry = redis.call('lindex', KEYS[1], limit - amount)
if entry and tonumber(entry) >= now - expiry then
    return false
end
for i = 1, amount do
    redis.call('lpush', KEYS[1], now)
end
redis.call('ltrim', KEYS[1], 0, limit - 1)
redis.call('expire', KEYS[1], expiry)
return true
"""
_MOVING = _NOW + """
local target = now - tonumber(ARGV[1])
local low, high, found = 0, tonumber(ARGV[2]) - 1, nil
while low <= high do  -- the list is newest first: the last entry still in the window
    local mid = math.floor((low + high) / 2)
    local value = tonumber(redis.call('lindex', KEYS[1], mid))
    if value and value >= target then
        found = mid
        low = mid + 1
    else
        high = mid - 1
    end
end
-- (the clock as TIME gave it: Lua's tostring keeps 14 digits, a tenth of a millisecond at today's epoch)
if found then
    return {redis.call('lindex', KEYS[1], found), found + 1, t[1], t[2]}
end
return {false, 0, t[1], t[2]}
"""


class _RedisCounter:
    """``limits``' RedisStorage on the store's pool; every limit's hit and stats in one pipeline."""

    def __init__(self, store: Any) -> None:
        prefix = getattr(store, "key_prefix", "") + "ratelimit"
        self.storage = RedisStorage("redis://", connection_pool=store.pool, key_prefix=prefix)
        self.store = store
        self.client: redis.Redis = store.client
        s = self.storage
        self.acquire_moving = self.client.register_script(_ACQUIRE_MOVING)
        self.moving = self.client.register_script(_MOVING)
        # The store's own too: the reads ahead in the pipeline run its read-or-lock script.
        self.scripts = [s.lua_incr_expire, self.acquire_moving, self.moving,
                        s.lua_acquire_sliding_window, s.lua_sliding_window, *getattr(store, "scripts", ())]

    def _commands(self, strategy: str, item: RateLimitItem, key: str, now: float) -> list[tuple[Any, ...]]:
        s, expiry, amount = self.storage, item.get_expiry(), item.amount
        if strategy == "fixed-window":
            k = s.prefixed_key(key)
            return [("EVALSHA", s.lua_incr_expire.sha, 1, k, expiry, 1), ("PTTL", k)]
        if strategy == "moving-window":
            k = s.prefixed_key(key)
            return [("EVALSHA", self.acquire_moving.sha, 1, k, amount, expiry, 1),
                    ("EVALSHA", self.moving.sha, 1, k, expiry, amount)]
        prev, cur = s.prefixed_key(s._previous_window_key(key)), s.prefixed_key(s._current_window_key(key))
        return [("EVALSHA", s.lua_acquire_sliding_window.sha, 2, prev, cur, amount, expiry, 1),
                ("EVALSHA", s.lua_sliding_window.sha, 2, prev, cur, expiry)]

    def _run(self, commands: list[tuple[Any, ...]], own: int | None = None) -> list[Any]:
        """One pipeline through the store's boundary (its breaker and error mapping): StoreErrors only."""
        return cast("list[Any]", self.store.call("pipeline", lambda: self._pipeline(commands, own), doing="count"))

    def _pipeline(self, commands: list[tuple[Any, ...]], own: int | None = None, anew: bool = True) -> list[Any]:
        """Send ``commands`` as one pipeline; the first ``own`` (default all) must succeed, the rest may fail."""
        pipe = self.client.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)  # type: ignore[no-untyped-call]
        results: list[Any] = pipe.execute(raise_on_error=False)
        missing = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
        if missing:  # a restarted or flushed server: load every script, run what did not run, one round trip
            pipe = self.client.pipeline(transaction=False)
            for script in self.scripts:
                pipe.script_load(script.script)
            for i in missing:
                pipe.execute_command(*commands[i])  # type: ignore[no-untyped-call]
            again: list[Any] = pipe.execute(raise_on_error=False)
            for loaded in again[:len(self.scripts)]:
                if isinstance(loaded, Exception):  # (scripting denied, say): the count failed
                    raise loaded
            for i, result in zip(missing, again[len(self.scripts):], strict=True):
                results[i] = result
        if anew and any(isinstance(r, ResponseError) and "WRONGTYPE" in str(r) for r in results[:own]):
            # A value of another type at a counter's key (something else wrote it): the counter starts
            # anew, instead of this client's every request failing until someone deletes the key.  Only
            # the counter's commands again: the others ran (a read ahead's read-or-lock took its lock, and
            # sent again it would find that lock held, by this very request).
            self.client.delete(*{key for command in commands[:own] for key in _keys_of(command)})
            mine = commands if own is None else commands[:own]
            return self._pipeline(mine, anew=False) + results[len(mine):]
        for result in results[:own]:
            if isinstance(result, Exception):
                raise result
        return results

    def hit(self, strategy: str, items: list[RateLimitItem], keys: list[str], now: float,
            groups: list[str] | None = None) -> list[Result]:
        return self.hit_with(strategy, items, keys, now)[0]

    def hit_with(self, strategy: str, items: list[RateLimitItem], keys: list[str], now: float,
                 extra: list[tuple[Any, ...]] | None = None) -> tuple[list[Result], list[Any]]:
        """Count a hit on every limit and send ``extra`` commands in the same round trip.

        Returns the limits' results and the extra commands' answers (an exception where one failed).
        """
        commands = [c for item, key in zip(items, keys, strict=True) for c in self._commands(strategy, item, key, now)]
        own = len(commands)
        if extra:
            commands.extend(extra)
            results = self._run(commands, own)
        else:
            results = self._run(commands)
        return self._results(strategy, items, results, now), results[own:]

    def _results(self, strategy: str, items: list[RateLimitItem], results: list[Any], now: float) -> list[Result]:
        out: list[Result] = []
        for i, item in enumerate(items):
            first, second, expiry = results[2 * i], results[2 * i + 1], item.get_expiry()
            if strategy == "fixed-window":
                count, pttl = int(first), int(second)
                reset = now + (pttl / 1000 if pttl > 0 else expiry)
                out.append((count <= item.amount, max(0, item.amount - count), reset))
            elif strategy == "moving-window":  # the reset on our clock: as far from now as on Redis's
                then = int(second[2]) + int(second[3]) / 1000000  # as the script computes it, to the bit
                start, count = (then, 0) if second[0] is None else (float(second[0]), int(second[1]))
                out.append((bool(first), max(0, item.amount - count), now + start + expiry - then))
            else:
                prev, prev_ms, cur, cur_ms = (float(v or 0) for v in second)
                remaining, reset = _sliding(item, int(prev), max(0.0, prev_ms) / 1000, int(cur),
                                            max(0.0, cur_ms) / 1000, now)
                out.append((bool(first), remaining, reset))
        return out


def _rule_digest(rule: _Rule) -> str:
    """A rule's name in its counters' keys: what it matches (paths, methods, key), not its place in ``rules``.

    A rule inserted above it, or rules reordered, leave its counts where they were: by
    place, the login rule's counts went to whichever rule took its place, and the login
    rule started again from zero (five more password guesses at once).  The limits are
    part of the key already.
    """
    what = (sorted(rule.paths), sorted(rule.methods), rule.key)
    return "rule-" + hashlib.blake2b(repr(what).encode(), digest_size=6).hexdigest()


def _environ_name(part: str) -> str:
    """A part of a rule's key as ``_key`` reads it: ``client_ip``, ``user``, or where a header is in the environ.

    WSGI keeps ``Content-Type`` and ``Content-Length`` as ``CONTENT_TYPE`` and ``CONTENT_LENGTH``, without
    the ``HTTP_`` of every other header (read as ``HTTP_CONTENT_TYPE``, every request fell back to its address).
    """
    if part in ("client_ip", "user"):
        return part
    name = part[7:].upper().replace("-", "_")
    return name if name in ("CONTENT_TYPE", "CONTENT_LENGTH") else "HTTP_" + name


def _keys_of(command: tuple[Any, ...]) -> tuple[str, ...]:
    """The keys one of the counter's commands names (``EVALSHA sha numkeys key…``, ``PTTL key``)."""
    if command[0] == "EVALSHA":
        return tuple(command[3:3 + int(command[2])])
    return (command[1],)


class RateLimitMiddleware:
    """Count requests per key and refuse with 429 past the limits.

    Options:

    ``store`` (``"shared"``): the stack store holding the counters; a
        ``memory://`` store maps to ``limits``' MemoryStorage, a Redis store
        to ``limits``' RedisStorage on the same connection pool.
    ``limits`` (``[]``), ``key`` (``"client_ip"``), ``strategy``
        (``"fixed-window"``): the default rule, used when no rule matches.
        Limits are ``limits`` strings (``["10/second", "100/minute"]``);
        a key is ``client_ip``, ``user``, ``header:NAME`` or a list of them.
    ``rules`` (``[]``): ``{paths, methods, limits, key?, strategy?, on_store_error?}``;
        the first matching rule wins; ``limits: []`` exempts the requests it matches.
    ``mode`` (``"enforce"``): ``shadow`` counts and reports would-be refusals
        (``ratelimit.shadow_reject``) but lets every request through, headerless.
    ``on_store_error`` (``"open"``): ``open`` lets requests through (logged,
        ``store.error`` emitted); ``closed`` answers 503 with ``Retry-After``.
    ``ipv6_prefix`` (``64``): IPv6 clients are counted per network of this size.
    ``namespace`` (``""``): keeps this layer's counters apart from those of other
        ratelimit layers on the same store (rule ids become ``NAMESPACE:default``,
        ``NAMESPACE:r0`` … in keys, events and notes).  Without it two layers whose
        rules have equal limits count in one counter per client.

    Usage::

        opts = RateLimitMiddleware.Options(limits=["10/second", "100/minute"], key="client_ip")
        app = RateLimitMiddleware(app, opts, Context(stores={"shared": MemoryStore()}))
    """

    class Options(LayerOptions):
        store: str = "shared"
        limits: list[Limit] = Field(default_factory=list)
        key: str | list[str] = "client_ip"
        strategy: Strategy = "fixed-window"
        rules: list[_Rule] = Field(default_factory=list)
        mode: Literal["enforce", "shadow"] = "enforce"
        on_store_error: Literal["open", "closed"] = "open"
        ipv6_prefix: int = Field(default=64, ge=1, le=128)
        namespace: str = Field(default="", pattern=r"^[A-Za-z0-9_.-]{0,64}$")

        _split = field_validator("limits", mode="before")(_limit_list)
        _distinct = field_validator("limits")(_distinct_limits)
        _key = field_validator("key")(_check_key)

        @model_validator(mode="after")
        def _something_to_limit(self) -> RateLimitMiddleware.Options:
            if not self.limits and not any(rule.limits for rule in self.rules):
                raise ValueError("ratelimit needs limits (e.g. ['100/minute']) or rules with limits")
            return self

    def __init__(self, app: WSGIApplication, options: Options, context: Context) -> None:
        self.app = app
        self.options = options
        self.context = context
        self.log = context.logger.getChild("ratelimit")
        self.store_name = options.store
        store = context.store(options.store)
        pool = getattr(store, "pool", None)
        self.counter: _MemoryCounter | _RedisCounter
        if isinstance(store, MemoryStore):
            self.counter = _memory_counter(store)
        elif pool is not None:
            self.counter = _RedisCounter(store)
        else:
            raise ValueError(f"store {options.store!r} is a {type(store).__name__}; "
                             "the ratelimit layer counts in memory:// or Redis stores only")
        default = _Rule(limits=options.limits, key=options.key, strategy=options.strategy,
                        on_store_error=options.on_store_error)
        ns = f"{options.namespace}:" if options.namespace else ""
        self.rules = [self._compile(f"{ns}r{i}", r, options, f"{ns}{_rule_digest(r)}", context)
                      for i, r in enumerate(options.rules)]
        self.default = self._compile(f"{ns}default", default, options, f"{ns}default", context) \
            if options.limits else None
        self.rewrites = rewrites_inside(context)  # versioning inside: rules hold for the path it routes to
        self.enforce = options.mode == "enforce"
        self.closed = options.on_store_error == "closed"
        others = [r.id for r in self.rules if r.closed != self.closed]
        self.policy = ("closed" if self.closed else "open") + (
            f" ({'open' if self.closed else 'closed'} for rule {', '.join(others)})" if others else "")
        self.prefix = options.ipv6_prefix
        self._last_log = 0.0
        # The reads of the layers inside this one (built before it) on the same Redis ride in its pipeline.
        self.read_aheads = [ahead for ahead in context.read_ahead
                            if pool is not None and getattr(ahead.store, "pool", None) is pool]
        self._failed_keys: list[ReadAhead] = []

    @staticmethod
    def _compile(rid: str, rule: _Rule, options: Options, counter: str, context: Context) -> _Compiled:
        """``rid`` names the rule in events and notes (its place); ``counter`` in its counters' keys (what it is)."""
        paths = None if "*" in rule.paths else re.compile("|".join(fnmatch.translate(p) for p in rule.paths))
        methods = with_head(rule.methods)
        key = rule.key if rule.key is not None else options.key
        parts = tuple(_environ_name(part) for part in ([key] if isinstance(key, str) else key))
        items = [item for text in rule.limits for item in parse_many(text)]
        strategy = rule.strategy or options.strategy
        # The strategy is part of the key: its counters have different Redis types.
        keys, groups = [], []
        for item in items:
            before, after = item.key_for(counter, strategy, "\0").split("\0")
            keys.append((before, after))
            # A memory table per limit as keyed: the default rules of two layers keyed apart (by address, by
            # header) share a name, and one table would let a flood through one push the other's keys out.
            groups.append(f"{before}{after} by {'|'.join(parts)}")
        closed = (rule.on_store_error or options.on_store_error) == "closed"
        return _Compiled(rid, paths, methods or None, items, [str(i.amount) for i in items], keys, groups, parts,
                         strategy, closed, context.emitter("ratelimit.pass", rule=rid))

    def _key(self, environ: WSGIEnvironment, parts: tuple[str, ...]) -> str:
        out = []
        for part in parts:
            if part == "user":
                identity = environ.get(IDENTITY)
                if identity is not None:
                    out.append("u:" + identity.subject)
                    continue
            elif part != "client_ip":  # a header, by its name in the environ
                value = environ.get(part)
                if value:  # the name in the digest: two layers keyed by two headers count a value apart
                    out.append("h:" + hashlib.blake2b(f"{part}:{value}".encode("latin-1"), digest_size=12).hexdigest())
                    continue
            ip = client_ip(environ) or "unknown"
            # A part that falls back to the address says so: a layer keyed by user beside one keyed by
            # address, both without a namespace, must not count an anonymous request twice in one counter
            # (nor two layers keyed by two headers, both missing).
            fallback = "ip:" if part == "client_ip" else ("u-ip:" if part == "user" else f"h-ip:{part}:")
            # (an IPv4 address as it is, without a call: client_key for IPv6 networks and long text)
            short = ":" not in ip and len(ip) <= LONGEST_ADDRESS
            out.append(fallback + (ip if short else client_key(ip, self.prefix)))
        return out[0] if len(out) == 1 else "|".join(dict.fromkeys(out))

    def _rules_for(self, environ: WSGIEnvironment) -> tuple[_Compiled | None, _Compiled | None]:
        """The first rule for the request path and the first for the path it is routed to (versioning inside).

        Usually one rule, twice.  When the two spellings pick different rules (``precedence: [accept, …]``
        routes ``/api/v2/x`` to ``/api/v1/x``), the request meets both: with the first rule that matches
        either spelling, a client would pick the spelling of the looser rule and step around the other.
        """
        method = environ.get("REQUEST_METHOD", "GET").upper()  # as werkzeug routes it
        path = decoded_path(environ)
        routed: str | None = None  # worked out once a rule's method fits
        first = second = None
        for candidate in self.rules:
            if candidate.methods is not None and method not in candidate.methods:
                continue
            if candidate.paths is None:  # every path, so both spellings
                return first or candidate, second or candidate
            if routed is None:
                routed = routed_path(environ, self.rewrites) if self.rewrites else path
            if first is None and candidate.paths.match(path):
                first = candidate
            if second is None and (candidate is first if routed == path else candidate.paths.match(routed)):
                second = candidate
            if first is not None and second is not None:
                return first, second
        return first or self.default, second or self.default

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        rule = self.default
        if self.rules:
            rule, also = self._rules_for(environ)
            if also is not rule and also is not None:
                if rule is self.default:  # no rule names the path as asked: the path it is routed to decides
                    rule = also           # (/api/status under a rule for /api/v1/status, an exemption too)
                elif rule is None or not rule.items:
                    rule = also if also.items else rule  # an exemption as asked does not exempt the resource
                elif also.items:  # a rule for each spelling: counted under both; reads ahead ride on the first
                    inner = also

                    def app(env: WSGIEnvironment, start: StartResponse) -> Iterable[bytes]:
                        return self._limit(env, start, inner, self.app, read_ahead=False)

                    return self._limit(environ, start_response, rule, app)
        return self._limit(environ, start_response, rule, self.app)

    def _limit(self, environ: WSGIEnvironment, start_response: StartResponse, rule: _Compiled | None,
               app: WSGIApplication, read_ahead: bool = True) -> Iterable[bytes]:
        """Count the request under ``rule`` and answer: refused, or ``app``'s answer with the RateLimit headers."""
        if rule is None or not rule.items:
            return app(environ, start_response)
        key = self._key(environ, rule.key)
        now = time.time()
        keys = [a + key + b for a, b in rule.keys]
        locks = None
        try:
            if self.read_aheads and read_ahead:  # only ever set for a Redis counter
                results, locks = self._hit_and_read(environ, rule, keys, now)
            else:
                results = self.counter.hit(rule.strategy, rule.items, keys, now, rule.groups)
        except _STORE_ERRORS as exc:
            # shadow mode never refuses, not even a closed rule in an outage
            return self._store_failed(environ, start_response, exc, rule.closed and self.enforce, app)
        try:
            return self._answer(environ, start_response, rule, key, results, now, app)
        finally:
            if locks:  # a lock read ahead for a layer that never took it (refused in between) goes now
                self._unlock_untaken(environ, locks)

    def _answer(self, environ: WSGIEnvironment, start_response: StartResponse, rule: _Compiled, key: str,
                results: list[Result], now: float, app: WSGIApplication) -> Iterable[bytes]:
        """Refuse past a limit, else call the app with the RateLimit headers."""
        if len(results) == 1:
            pick, allowed = 0, results[0][0]
        else:
            refused = [i for i, r in enumerate(results) if not r[0]]
            allowed = not refused
            if refused:  # Retry-After: until every limit that refused, or that is used up now, has room again
                blocking = refused + [i for i, r in enumerate(results) if r[0] and r[1] <= 0]
                pick = max(blocking, key=lambda i: results[i][2])
            else:  # the limit closest to running out; of two as close, the one that resets later
                pick = min(range(len(results)), key=lambda i: (results[i][1], -results[i][2]))
        _, remaining, reset = results[pick]
        item = rule.items[pick]
        # No window resets later than its length from now (limits' memory windows stamp entries with
        # their own clock reading, a moment after ``now``: 60.2 s would read as 61).
        reset = min(reset, now + item.get_expiry())
        if not allowed:
            return self._over(environ, start_response, rule.id, key, item, reset, now, app)
        rule.passed()
        if not self.enforce:
            return app(environ, start_response)
        wait = _seconds(reset - now)
        if remaining <= 0 and wait < 1:  # nothing left: the same wait a refusal would give (Retry-After)
            wait = 1
        headers = [("RateLimit-Limit", rule.amounts[pick]), ("RateLimit-Remaining", str(remaining)),
                   ("RateLimit-Reset", str(wait))]

        def start(status: str, response_headers: Headers, exc_info: Any = None) -> Any:
            if status[:3] == "429" and not _fields_of(response_headers):
                return start_response(status, response_headers, exc_info)  # another policy's refusal: see below
            return start_response(status, _most_restrictive(response_headers, headers), exc_info)

        try:
            return app(environ, start)
        except Exception as exc:
            if getattr(exc, "code", None) != 429 or _fields_of(getattr(exc, "wsgistack_headers", None) or ()):
                _decorate_tighter(exc, headers, item)
            raise

    def _hit_and_read(self, environ: WSGIEnvironment, rule: _Compiled, keys: list[str],
                      now: float) -> tuple[list[Result], list[tuple[Any, tuple[int, str, str], str, bytes]]]:
        """Count the hit and, in the same pipeline, read what the inner layers will read for this request.

        Also returns the locks the reads took (``get_or_lock``): ``(store, answer name, lock key, token)``.
        """
        assert isinstance(self.counter, _RedisCounter)
        # What a rate limiter outside read ahead already (also a failure of its round trip): not read again,
        # its answers kept (a second read-or-lock would find the first one's lock held, by this very request).
        answers: dict[tuple[int, str, str], Any] = environ.get(READ_AHEAD) or {}
        wanted: list[tuple[ReadAhead, tuple[int, str, str], tuple[Any, ...]]] = []
        for ahead in self.read_aheads:
            try:
                found: tuple[Any, ...] | None = ahead.key(environ)
            except Exception:  # a layer's preview_environ that fails: its reader reads for itself
                self._key_failed(ahead)
                continue
            if found is not None:
                name = (id(ahead.store), ahead.op, found[0])
                if name not in answers and all(name != other for _, other, _ in wanted):
                    wanted.append((ahead, name, found))
        if not wanted:
            return self.counter.hit(rule.strategy, rule.items, keys, now, rule.groups), []
        commands = [ahead.store.read_command(ahead.op, *found)  # type: ignore[attr-defined]
                    for ahead, _, found in wanted]
        try:
            results, replies = self.counter.hit_with(rule.strategy, rule.items, keys, now, commands)
        except StoreUnavailable as exc:
            # Redis did not answer: the inner layers meet the same failure at once, instead of each
            # waiting socket_timeout for their own read (read_ahead raises it for them).
            answers.update((name, exc) for _, name, _ in wanted)
            environ[READ_AHEAD] = answers
            raise
        locks: list[tuple[Any, tuple[int, str, str], str, bytes]] = []
        for (ahead, name, found), reply in zip(wanted, replies, strict=True):
            if isinstance(reply, Exception):
                continue  # a failed read: the layer reads itself
            answer = answers[name] = ahead.store.read_answer(ahead.op, reply)  # type: ignore[attr-defined]
            if ahead.op == "get_or_lock" and answer[1]:
                locks.append((ahead.store, name, found[2], answer[1]))
        environ[READ_AHEAD] = answers
        return results, locks

    def _key_failed(self, ahead: ReadAhead) -> None:
        """Log, once per read, that working out its key raised (a layer's ``preview_environ``, say)."""
        if ahead not in self._failed_keys:
            self._failed_keys.append(ahead)
            self.log.warning("a read ahead (%s on %r) could not work out its key; that layer reads for itself",
                             ahead.op, getattr(ahead.store, "url", ahead.store), exc_info=True)

    @staticmethod
    def _unlock_untaken(environ: WSGIEnvironment,
                        locks: list[tuple[Any, tuple[int, str, str], str, bytes]]) -> None:
        """Give back the locks taken ahead for layers that did not take their answer (best effort), each only
        while it holds the token it was taken with (``Store.unlock``)."""
        answers = environ.get(READ_AHEAD) or {}
        for store, name, lock_key, token in locks:
            if answers.pop(name, _UNTAKEN) is not _UNTAKEN:
                with contextlib.suppress(StoreError):  # else it expires after the reader's lock timeout
                    store.unlock(lock_key, token)

    def _over(self, environ: WSGIEnvironment, start_response: StartResponse, rid: str, key: str,
              item: RateLimitItem, reset: float, now: float, app: WSGIApplication) -> Iterable[bytes]:
        """Refuse with 429 (enforce), or report and let through (shadow)."""
        limit = str(item)
        if not self.enforce:
            self.context.emit("ratelimit.shadow_reject", rule=rid, limit=limit)
            self.log.info("shadow mode: would have limited %s on %s %s (%s, rule %s)", escape_control(key),
                          escape_control(environ.get("REQUEST_METHOD", "")), escape_control(decoded_path(environ)),
                          limit, rid)
            note(environ, "ratelimit", f"shadow: would have refused {key} under {limit}")
            return app(environ, start_response)
        self.context.emit("ratelimit.reject", rule=rid, limit=limit)
        note(environ, "ratelimit", f"refused {key} under {limit} (rule {rid})")
        wait = max(1, _seconds(reset - now))
        headers = [("Retry-After", str(wait)), ("RateLimit-Limit", str(item.amount)),
                   ("RateLimit-Remaining", "0"), ("RateLimit-Reset", str(wait))]
        raise refuse(429, f"Too many requests: the limit is {limit}; retry in {wait} seconds.", headers=headers)

    def _store_failed(self, environ: WSGIEnvironment, start_response: StartResponse,
                      exc: BaseException, closed: bool, app: WSGIApplication) -> Iterable[bytes]:
        self.context.emit("store.error", store=self.store_name, layer="ratelimit")
        now = time.monotonic()
        if now - self._last_log > 10:  # one line per 10 s while the store is down
            self._last_log = now
            self.log.warning("rate-limit store %r failed (%s); failing %s", self.store_name, exc, self.policy)
        if closed:
            note(environ, "ratelimit", "store down: refused (on_store_error closed)")
            raise refuse(503, "The rate-limit store is unavailable; retry shortly.",
                         headers=[("Retry-After", _STORE_RETRY_AFTER)])
        note(environ, "ratelimit", "store down: let through (on_store_error open)")
        return app(environ, start_response)
