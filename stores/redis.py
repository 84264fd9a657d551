"""The Redis store: one connection pool per URL, short timeouts and a circuit breaker.

URLs: ``redis://[[user]:password@]host[:port][/db]``, ``rediss://…`` (TLS),
``unix:///path/to.sock?db=0`` and
``redis+sentinel://[[user]:password@]host:port[,host2:port2]/service_name[/db]``.
Every store made for the same URL (and the same timeouts and options) in one
process shares one connection pool and one circuit breaker, so the layers that
name one store hold one set of connections, and one layer noticing that Redis
is down protects the others.  ``.client`` and ``.pool`` let a library that
talks to Redis itself (``limits``) reuse that pool.

Every backend exception becomes :class:`~stores.base.StoreError` with a
sentence naming the store URL, password masked.  Keys get ``key_prefix``;
values are bytes, never pickle.

When not to use it: for one process with no state to share, ``memory://`` is
faster and has nothing to fail.  Do not point it at a Redis Cluster (keys are
not hash-tagged) or at a replica (writes fail: the start refuses one, and
/readyz fails while Redis refuses writes).
"""

from __future__ import annotations

import datetime
import importlib.util
import math
import os
import re
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar, cast
from urllib.parse import parse_qsl, unquote, urlsplit

import redis
from redis.backoff import NoBackoff
from redis.maint_notifications import MaintNotificationsConfig
from redis.retry import Retry
from redis.sentinel import Sentinel

from .base import Store, StoreBusy, StoreError, StoreWrongType, mask_url, new_mark, ttl_seconds
from .breaker import CircuitBreaker, StoreUnavailable

__all__ = ["RedisStore", "mask_url", "refusal"]

T = TypeVar("T")

#: Errors that mean "Redis is not answering" (they count against the breaker).
_DOWN: tuple[type[BaseException], ...] = (redis.ConnectionError, redis.TimeoutError, OSError)
_SCAN_COUNT = 500
_SENTINEL_PORT = 26379

# Counter creation and its TTL in one atomic round trip; the TTL is set only when
# INCRBY creates the key, exactly like the memory store.
_INCR_TTL = """
local created = redis.call('EXISTS', KEYS[1]) == 0
local value = redis.call('INCRBY', KEYS[1], ARGV[1])
if created then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return value
"""

# get_or_lock: the value, or the lock when there is none; and the mark's value (KEYS[3], when given) as of
# the same step, a missing mark set to ARGV[3] for ARGV[4] ms first (nil when Redis refuses the write: out
# of memory).  ARGV[1]: the lock's token, ARGV[2]: its PX.  Replies {1, value, mark} or {0, token or nil, mark}.
_GET_OR_LOCK = """
local mark = false
if KEYS[3] then
  mark = redis.call('GET', KEYS[3])
  if not mark then
    local set = redis.pcall('SET', KEYS[3], ARGV[3], 'PX', ARGV[4])
    if type(set) == 'table' and set.ok then mark = ARGV[3] end
  end
end
local value = redis.call('GET', KEYS[1])
if value then return {1, value, mark} end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return {0, ARGV[1], mark} end
return {0, false, mark}
"""

# unlock: only while the lock (KEYS[1]) holds its holder's token (ARGV[1]): DEL it, or, with ARGV[2] and
# ARGV[3], SET it to that value with that PX.  Replies 1 when it did, 0 when the lock holds something else.
_UNLOCK = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] then redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3]) else redis.call('DEL', KEYS[1]) end
return 1
"""


# write_unless_marked: the sets only if the mark still holds what was seen (ARGV[1]), its life then made as
# long as the longest set's (what is stored under it must not outlive it), then the deletes in any case, and
# the lock, when given, if it still holds its holder's token.
# KEYS: the mark, the n keys to set, the keys to delete, then the lock if any.  ARGV: seen, n, a value and its
# PX per set, then the lock's token if any.
# add_then_write: SET KEYS[1] NX (ARGV[1], PX ARGV[2]); when it is set, SET each further key i to ARGV[2i+1]
# with PX ARGV[2i+2]; a PX of "" is no expiry. Replies 1 when written, 0 when KEYS[1] was there.
_ADD_THEN_WRITE = """
local added
if ARGV[2] == '' then added = redis.call('SET', KEYS[1], ARGV[1], 'NX')
else added = redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) end
if not added then return 0 end
for i = 2, #KEYS do
  if ARGV[2 * i] == '' then redis.call('SET', KEYS[i], ARGV[2 * i - 1])
  else redis.call('SET', KEYS[i], ARGV[2 * i - 1], 'PX', ARGV[2 * i]) end
end
return 1
"""

_WRITE_UNLESS_MARKED = """
local n = tonumber(ARGV[2])
local last = #KEYS
if #ARGV > 2 * n + 2 then last = last - 1 end
local stored = 0
if n > 0 and redis.call('GET', KEYS[1]) == ARGV[1] then
  local longest = 0
  for i = 1, n do
    local px = tonumber(ARGV[2 * i + 2])
    redis.call('SET', KEYS[i + 1], ARGV[2 * i + 1], 'PX', px)
    if px > longest then longest = px end
  end
  local left = redis.call('PTTL', KEYS[1])
  if left >= 0 and left < longest then redis.call('PEXPIRE', KEYS[1], longest) end
  stored = 1
end
for i = n + 2, last do
  redis.call('DEL', KEYS[i])
end
if last < #KEYS and redis.call('GET', KEYS[#KEYS]) == ARGV[#ARGV] then redis.call('DEL', KEYS[#KEYS]) end
return stored
"""


#: The options that keep redis-py from sending CLIENT SETINFO (twice) on every new connection:
#: ``driver_info`` where it has one (lib_name and lib_version are deprecated there), else those two.
_NO_SETINFO: dict[str, Any] = ({"driver_info": None} if importlib.util.find_spec("redis.driver_info")
                               else {"lib_name": None, "lib_version": None})


def _ms(ttl: float) -> int:
    """Seconds to whole milliseconds for ``PX``, at least 1 (Redis refuses 0), at most MAX_TTL's; ValueError
    for a TTL that is not a number above 0 (:func:`~stores.base.ttl_seconds`)."""
    return max(1, math.ceil(ttl_seconds(ttl) * 1000))


def _px(ttl: float | None) -> int | None:
    """:func:`_ms`, or ``None`` (no expiry) for ``None``."""
    return None if ttl is None else _ms(ttl)


def _check_value(value: bytes) -> None:
    if not isinstance(value, bytes | bytearray):
        raise TypeError("store values are bytes; encode JSON in the layer")


@dataclass
class _Shared:
    """What every RedisStore for one URL shares: the client, its pool and breakers."""

    client: redis.Redis
    sentinel: Sentinel | None
    breakers: dict[tuple[int, float], CircuitBreaker] = field(default_factory=dict)
    users: int = 0


_SHARED: dict[tuple[object, ...], _Shared] = {}
_SHARED_LOCK = threading.Lock()


def _number_text(text: str) -> bool:
    """Whether ``text`` is a number of ASCII digits: ``str.isdigit()`` also takes '²', which ``int()`` refuses,
    and '٣', which it reads as 3 (a database or port no one meant)."""
    return text.isascii() and text.isdigit()


def _after_fork() -> None:
    """In a forked child: a new lock for :data:`_SHARED`.  A parent's thread making or closing a store when
    another forked is not in the child, and would never give the lock back: the child's next store would wait
    for it for ever.  (redis-py gives the child's pools
    new connections by itself.)"""
    global _SHARED_LOCK
    _SHARED_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_after_fork)


def _sentinel_parts(url: str) -> tuple[list[tuple[str, int]], str, int, dict[str, str]]:
    """Split a ``redis+sentinel://`` URL into (sentinels, service_name, db, auth)."""
    parts = urlsplit(url)
    masked = mask_url(url)
    if parts.query or parts.fragment:
        raise ValueError(
            f"redis+sentinel:// URLs take no query options ({masked}); "
            "pass socket and sentinel options as store options instead"
        )
    userinfo, _, hostlist = parts.netloc.rpartition("@")
    auth: dict[str, str] = {}
    user, colon, password = userinfo.partition(":")
    if user:
        auth["username"] = unquote(user)
    if colon and password:
        auth["password"] = unquote(password)
    sentinels: list[tuple[str, int]] = []
    for item in filter(None, hostlist.split(",")):
        host, port = item, str(_SENTINEL_PORT)
        if item.startswith("["):  # [::1]:26379
            host, _, rest = item[1:].partition("]")
            port = rest.lstrip(":") or port
        elif ":" in item:
            host, _, port = item.rpartition(":")
        if not host or not _number_text(port):
            raise ValueError(f"bad sentinel address {item!r} in {masked}; write host:port")
        if not 0 < int(port) < 65536:  # else an outage that never ends, not a mistake
            raise ValueError(f"bad sentinel address {item!r} in {masked}; the port must be a number from 1 to 65535")
        sentinels.append((host.lower(), int(port)))
    segments = [s for s in parts.path.split("/") if s]
    if not sentinels or not segments or len(segments) > 2:
        raise ValueError(
            f"a sentinel URL names its sentinels and the service: "
            f"redis+sentinel://host:26379[,host2:26379]/service_name[/db], got {masked}"
        )
    if len(segments) == 2 and not _number_text(segments[1]):
        raise ValueError(f"the database in {masked} must be a number, got {segments[1]!r}")
    return sentinels, unquote(segments[0]), int(segments[1]) if len(segments) == 2 else 0, auth


READ_ONLY = "a read-only replica: every write is refused (give the primary's URL, or redis+sentinel://)"
OUT_OF_MEMORY = "out of memory: writes are refused (maxmemory reached, eviction policy noeviction)"
_WRITES_REFUSED = (READ_ONLY, OUT_OF_MEMORY)
#: What the layers send Redis, and the least ACL that allows it (docs/stores.md, "A Redis user of its own"):
#: GET, GETEX, SET, DEL, UNLINK, INCRBY, PEXPIRE, PTTL, SCAN, EVALSHA, SCRIPT LOAD, MULTI, EXEC, PING
#: (and SELECT on connecting, for a database other than 0); inside scripts EXISTS, and the limits
#: strategies' LPUSH, LTRIM, LINDEX, EXPIRE, RENAME. ROLE and INFO are asked only at the start,
#: and may be denied.
ACL_NEEDED = ("it needs reads, writes, scripts (EVALSHA, SCRIPT LOAD) and transactions (MULTI, EXEC) on the store's "
              "keys, and PING: ACL ~<key_prefix>* +@read +@write +@scripting +@transaction +ping (and +select for "
              "a database other than 0)")
#: How long a write Redis refused (a replica, out of memory) keeps /readyz failing after it.
REFUSED_FRESH = 10.0

# What OpenSSL says when a handshake fails (the text also holds host names: match its own words only).
_TLS_FAILURE = re.compile(r"_ssl\.c:|\[ssl[:\]]|certificate verify failed|wrong version number|tlsv1 alert")


#: Why a store is not ready while a script runs past Redis's busy-reply-threshold.
BUSY = "busy running a script (BUSY): every command waits for it to end or be killed"
#: Why a store is not ready while Redis has ``maxclients`` connections: it answers a new one with an error
#: and closes it (an outage that ends when clients leave, not a network that does not reach it).
MAXCLIENTS = "Redis refuses new connections (maxclients reached)"
#: Why a store is not ready while every connection of its pool is taken: Redis was not asked (see StoreBusy).
POOL_BUSY = "every connection of the pool is in use (max_connections reached)"
#: Why a store is not ready while Redis reads its data set in (after a restart, a full resync): every command
#: gets LOADING until it is done, which may take minutes for a large one (an outage, but not a network's).
LOADING = "loading its data set (LOADING): it answers once it has read it in"
#: Redis's BUSY reply, alone or as redis-py words it for a pipeline or a transaction
#: ("Command # 1 (SET ...) of pipeline caused error: BUSY ...").
_BUSY = re.compile(r"(?:^|error: )BUSY ", re.IGNORECASE)


def refusal(exc: BaseException) -> tuple[str, bool]:
    """What a failed call says, in a few words, and whether Redis refused the configuration.

    A wrong or missing password, a database number the server does not have and
    a TLS handshake that fails are configuration errors; anything else (refused,
    timed out, reset) may be an outage that ends by itself.
    """
    chain: list[BaseException] = []
    seen: BaseException | None = exc
    while seen is not None and len(chain) < 8:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    text = " ".join(str(e) for e in chain).lower()
    if any(isinstance(e, redis.AuthenticationError) for e in chain) or any(
            word in text for word in ("noauth", "wrongpass", "invalid password", "invalid username-password")):
        return "authentication failed (a wrong or missing user name or password)", True
    denied = next((e for e in chain if isinstance(e, redis.exceptions.NoPermissionError)), None)
    if denied is not None or "noperm" in text:
        said = str(denied or exc).strip().removeprefix("NOPERM ")
        return f"the Redis user may not do what the layers need (NOPERM: {said}); {ACL_NEEDED}", True
    if "db index is out of range" in text:
        return "no database of that number on the server", True
    if any(isinstance(e, redis.exceptions.ReadOnlyError) for e in chain) or "read only replica" in text:
        return READ_ONLY, True
    if any(isinstance(e, redis.exceptions.OutOfMemoryError) for e in chain) or "when used memory >" in text:
        return OUT_OF_MEMORY, False
    if "noreplicas" in text or "not enough good replicas" in text:
        return ("writes are refused: fewer replicas answer than min-replicas-to-write asks (NOREPLICAS)"), False
    if "misconf" in text:
        return ("writes are refused: Redis cannot save its snapshot to disk (MISCONF, "
                "stop-writes-on-bgsave-error)"), False
    if "unknown command" in text:
        said = next((str(e) for e in chain if "unknown command" in str(e).lower()), text)
        # Not the arguments Redis quotes after the command: a key (a session id, a client's address)
        # has no place in /readyz, where this reason is shown.
        said = re.split(r",? with args beginning with", said, maxsplit=1, flags=re.IGNORECASE)[0]
        return (f"Redis does not know a command the layers send ({said.strip()}): renamed or disabled "
                "(rename-command), or a Redis older than 6.2"), True
    if _BUSY.search(text):
        return BUSY, False
    if any(isinstance(e, redis.exceptions.BusyLoadingError) for e in chain) or "loading the dataset" in text:
        return LOADING, False
    if "max number of clients reached" in text:  # it answered, and closed the connection: up, but full
        return MAXCLIENTS, False
    if any(isinstance(e, ssl.SSLError) for e in chain) or _TLS_FAILURE.search(text):
        return "TLS handshake failed (rediss:// to a port without TLS, or a certificate that does not verify)", True
    if any(isinstance(e, redis.TimeoutError | TimeoutError) for e in chain):
        return "no answer in time", False
    return "not reachable", False


def _number(name: str, value: Any, kind: type[int] | type[float]) -> Any:
    """``value`` as a positive number: stack.yaml's ``${VAR:-0.5}`` interpolates to the string ``"0.5"``."""
    number = value
    if isinstance(value, str):
        try:
            number = kind(value)
        except ValueError:
            number = None
    if (isinstance(number, bool) or not isinstance(number, int | float) or not 0 < number < math.inf
            or (kind is int and isinstance(number, float) and not number.is_integer())):
        what = "a whole number" if kind is int else "a number of seconds"
        raise ValueError(f"store option {name} must be {what} above 0, got {value!r}")
    return kind(number)


def _text(name: str, value: Any, *, numbers: bool) -> Any:
    """``value`` when it is text (``numbers``: or a number, which redis-py sends as its digits).

    Stores are built without connecting: a ``key_prefix: 12`` (or an empty value, None)
    passed ``check`` and every command raised TypeError, and a password YAML read as a
    boolean or a date failed on the first connection.  What it got is named, not shown.
    """
    if isinstance(value, str) or (numbers and (value is None or (
            isinstance(value, int | float) and not isinstance(value, bool)))):
        return value
    if value is None:
        raise ValueError(f"store option {name} must be text, got no value (YAML reads an empty value as null: "
                         "write '' for no prefix)")
    got = "a boolean" if isinstance(value, bool) else "a number" if isinstance(value, int | float) else \
        "a date" if isinstance(value, datetime.date | datetime.time) else "a list" if isinstance(value, list | tuple) \
        else "a mapping" if isinstance(value, dict) else type(value).__name__
    raise ValueError(f"store option {name} must be text, got {got} (quote it in stack.yaml)")


#: Options naming files the TLS context reads when the first connection is made.
_TLS_FILES = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_ca_path")


#: The words redis-py's to_bool reads as what they say; it reads any other text (``off``, ``flase``) as true.
_BOOLEAN_WORDS = frozenset({"", "1", "0", "true", "false", "t", "f", "yes", "no", "y", "n"})


def _boolean_word(name: str, value: str) -> str | None:
    """Why ``value`` of a true-or-false option ``name`` is refused, or None when redis-py reads it right."""
    if redis.connection.URL_QUERY_ARGUMENT_PARSERS.get(name) is not redis.connection.to_bool \
            or value.strip().lower() in _BOOLEAN_WORDS:
        return None
    return f"{name} must be true or false (or yes, no, 1, 0), got {value!r}"


def _parsed(name: str, value: Any) -> Any:
    """A string option parsed as redis-py parses the same option in a URL query (``max_connections=10``)."""
    parser = cast("Callable[[str], Any] | None", redis.connection.URL_QUERY_ARGUMENT_PARSERS.get(name))
    if parser is None or parser is list or not isinstance(value, str):
        return value
    wrong = _boolean_word(name, value)
    if wrong is not None:
        raise ValueError(f"store option {wrong}")
    try:
        return parser(value)
    except (ValueError, TypeError):
        raise ValueError(f"store option {name} cannot be {value!r}") from None


def _check_encoded(url: str) -> None:
    """Refuse a URL whose user name or password holds characters that had to be percent-encoded.

    A ``/``, ``?`` or ``#`` there ends the host part early (``urlsplit`` then sees
    the rest of the password as the path or the query), and a space is never
    valid: the store would connect somewhere else, or fail with a misleading error.
    """
    if url != url.strip():  # ${REDIS_URL} read from a secrets file keeps the file's last newline
        raise ValueError(f"bad Redis store URL {mask_url(url.strip())}: it begins or ends with a space or a "
                         "line break (a secrets file's last newline?); remove it")
    parts = urlsplit(url)
    if "@" in parts.path or "@" in parts.query or parts.fragment or any(c.isspace() for c in url):
        # The URL last: masking a message for display reads up to an "@" after "://host:" as a password.
        raise ValueError("bad Redis store URL: percent-encode the characters / ? # @ % & and spaces in its user "
                         "name and password (/ as %2F, ? as %3F, # as %23, @ as %40, % as %25, & as %26, a space "
                         f"as %20): {mask_url(url)}")


def _unknown_option(url: str, exc: TypeError) -> str:
    """What redis-py's ``unexpected keyword argument 'x'`` means: a misspelt option, or TLS's on a plain URL."""
    import difflib

    from . import _redis_option_names

    found = re.search(r"unexpected keyword argument '(\w+)'", str(exc))
    if found is None:
        return str(exc)
    name = found.group(1)
    if name.startswith("ssl_") and urlsplit(url).scheme.lower() != "rediss":
        return f"{name} is an option of TLS connections: write the URL rediss://"
    close = difflib.get_close_matches(name, sorted(_redis_option_names()), n=1)
    return f"unknown option {name!r}" + (f"; did you mean {close[0]!r}?" if close else "")


def _check_host_and_port(url: str) -> None:
    """Refuse a ``redis://`` or ``rediss://`` URL that redis-py would quietly point at another server.

    It reads no host (``redis://:6379/0``, an empty ``${REDIS_HOST}``) as localhost, and
    port 0 as 6379: the store would use a Redis nobody named.
    """
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:  # not a number, or out of range: parse_url says which
        return
    if port == 0:
        raise ValueError(f"bad Redis store URL {mask_url(url)}: the port must be a number from 1 to 65535, got 0")
    if not parts.hostname:
        raise ValueError(f"bad Redis store URL {mask_url(url)}: it names no host (redis-py used localhost); write "
                         "redis://127.0.0.1:6379/0 for this machine")


def _check_pool_numbers(url: str, settings: dict[str, Any]) -> None:
    """Refuse a pool size or health-check interval redis-py would take as something else.

    It reads ``max_connections`` 0 as its default (100) and a yes (True) as 1, and
    pings before every command with a negative ``health_check_interval`` (a round trip
    each), never with nan.
    """
    size = settings.get("max_connections")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise ValueError(f"bad Redis store {mask_url(url)}: max_connections must be a whole number above 0 (leave it "
                         f"out for 100), got {size!r}")
    interval = settings.get("health_check_interval")
    if interval is not None and (isinstance(interval, bool) or not isinstance(interval, int | float)
                                 or not 0 <= interval < math.inf):
        raise ValueError(f"bad Redis store {mask_url(url)}: health_check_interval must be a number of seconds, "
                         f"0 (never) or above, got {interval!r}")


def _pool_key(url: str, options: dict[str, Any]) -> tuple[object, ...]:
    """The identity of a pool: the normalised URL plus the options that shape it."""
    scheme = urlsplit(url).scheme.lower()
    if scheme == "redis+sentinel":
        sentinels, service, db, auth = _sentinel_parts(url)
        parsed: dict[str, Any] = {"sentinels": sentinels, "service": service, "db": db,
                                  "auth": sorted(auth.items())}
    else:
        path = urlsplit(url).path
        if scheme == "unix" and not path:
            raise ValueError(f"bad Redis store URL {mask_url(url)}: a unix:// URL names the socket's path, "
                             "e.g. unix:///run/redis/redis.sock?db=0")
        host = urlsplit(url).netloc.rpartition("@")[2]
        if scheme == "unix" and host and host.lower() != "localhost":  # unix://tmp/r.sock: "tmp" would be dropped
            raise ValueError(f"bad Redis store URL {mask_url(url)}: a unix:// URL has no host; the socket's "
                             f"path follows three slashes (unix:///{host}{path})")
        if scheme != "unix":
            _check_host_and_port(url)
        if scheme != "unix" and path not in ("", "/") and not _number_text(path[1:]):
            raise ValueError(f"bad Redis store URL {mask_url(url)}: the path names the database, a number "
                             f"such as /0, got {path!r}")
        for name, value in parse_qsl(urlsplit(url).query, keep_blank_values=True):
            wrong = _boolean_word(name, value)
            if wrong is not None:
                raise ValueError(f"bad Redis store URL {mask_url(url)}: {wrong}")
        try:
            parsed = redis.connection.parse_url(url)  # type: ignore[no-untyped-call]
        except ValueError as exc:
            raise ValueError(f"bad Redis store URL {mask_url(url)}: {exc}") from None
        for name in ("socket_timeout", "socket_connect_timeout"):  # as the keyword options are checked
            if name in parsed:
                try:
                    _number(name, parsed[name], float)
                except ValueError:
                    raise ValueError(f"bad Redis store URL {mask_url(url)}: {name} must be a number of seconds "
                                     f"above 0, got {parsed[name]!r}") from None
        if scheme != "unix" and _number_text(path[1:]) and int(path[1:]) != parsed.get("db", int(path[1:])):
            raise ValueError(f"bad Redis store URL {mask_url(url)}: it names two databases, {path!r} and "
                             f"?db={parsed['db']}; give one")
        parsed.setdefault("db", 0)
        if "host" in parsed:
            parsed["host"] = str(parsed["host"]).lower()
            parsed.setdefault("port", 6379)
    # What the URL's query sets wins over the keyword options, as in ConnectionPool.from_url: the
    # identity is the pool's real settings (two stores with other timeouts get two pools).
    settings = {**options, **parsed}
    decode = settings.get("decode_responses", False)
    if decode is not False:  # redis-py reads any text, "false" too, as true
        raise ValueError(f"bad Redis store {mask_url(url)}: decode_responses cannot be set (the layers store "
                         "bytes, and would read text back)")
    _check_pool_numbers(url, settings)
    facts = sorted((k, repr(v)) for k, v in settings.items())
    return (scheme, *facts)


def _make_client(url: str, options: dict[str, Any]) -> tuple[redis.Redis, Sentinel | None]:
    """Build a client and its pool (no connection is made yet)."""
    if urlsplit(url).scheme.lower() != "redis+sentinel":
        pool = redis.ConnectionPool.from_url(url, **options)
        client = redis.Redis(connection_pool=pool)
        sentinel = None
    else:
        sentinels, service, db, auth = _sentinel_parts(url)
        sentinel_kwargs = {
            **{k: v for k, v in options.items() if k.startswith("socket_") or k == "retry"},
            **auth,
            **options.pop("sentinel_kwargs", {}),
        }
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            sentinels, sentinel_kwargs=sentinel_kwargs, **auth, **options
        )
        client = cast(redis.Redis, sentinel.master_for(service, db=db))  # type: ignore[no-untyped-call]
    pool = client.connection_pool
    try:  # unknown options fail now, not on the first request
        pool.connection_class(**pool.connection_kwargs).disconnect()
    except TypeError as exc:
        raise TypeError(f"bad option for Redis store {mask_url(url)}: {_unknown_option(url, exc)}") from None
    for name in _TLS_FILES:  # a file that is not there would look like an outage that never ends
        file = pool.connection_kwargs.get(name)
        if isinstance(file, str) and file and not os.path.exists(file):
            raise ValueError(f"Redis store {mask_url(url)}: {name} {file!r} does not exist")
    return client, sentinel


class RedisStore(Store):
    """A :class:`~stores.base.Store` on Redis, shared per URL, guarded by a circuit breaker.

    Options:

    - ``url``: ``redis://``, ``rediss://``, ``unix://`` or ``redis+sentinel://`` (see module).
    - ``client``: a ready ``redis.Redis`` instead of a URL (its pool and timeouts are
      the caller's; ``close()`` leaves it open).
    - ``socket_timeout`` / ``socket_connect_timeout`` (0.25 s each): how long one
      command or connect may take before it counts as a failure.
    - ``key_prefix`` ("wsgistack:"): prepended to every key; ``scan`` strips it again.
    - ``breaker``: a :class:`~stores.breaker.CircuitBreaker` of your own; by default
      the stores of one URL share one built from ``failure_threshold`` (3) and
      ``reset_timeout`` (2.0 s).
    - ``**pool_options``: passed to ``redis.ConnectionPool`` (``max_connections``,
      ``health_check_interval`` (30 s), ``retry`` (none), ``ssl_*``…); for sentinel
      URLs also ``sentinel_kwargs`` for the connections to the sentinels.

    ``store = RedisStore("redis://:secret@127.0.0.1:6379/0")``
    ``store.set("k", b"v", ttl=30); store.get("k")``
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        client: redis.Redis | None = None,
        socket_timeout: float = 0.25,
        socket_connect_timeout: float = 0.25,
        key_prefix: str = "wsgistack:",
        breaker: CircuitBreaker | None = None,
        failure_threshold: int = 3,
        reset_timeout: float = 2.0,
        **pool_options: Any,
    ) -> None:
        socket_timeout = _number("socket_timeout", socket_timeout, float)
        socket_connect_timeout = _number("socket_connect_timeout", socket_connect_timeout, float)
        failure_threshold = _number("failure_threshold", failure_threshold, int)
        reset_timeout = _number("reset_timeout", reset_timeout, float)
        pool_options = {name: _parsed(name, value) for name, value in pool_options.items()}
        for name in ("username", "password", "client_name"):
            if name in pool_options:
                _text(name, pool_options[name], numbers=True)
        self.key_prefix = _text("key_prefix", key_prefix, numbers=False)
        self._shared: _Shared | None = None
        self._pool_key: tuple[object, ...] = ()
        if client is not None:
            kw = client.connection_pool.connection_kwargs
            db = kw.get("db", 0)
            where = (
                f"unix://{kw['path']}?db={db}" if kw.get("path")
                else f"redis://{kw.get('host', 'localhost')}:{kw.get('port', 6379)}/{db}"
            )
            self.url = mask_url(url) if url else where
            self.client = client
            self.breaker = breaker or CircuitBreaker(
                failure_threshold, reset_timeout, name=f"redis store {self.url}"
            )
        elif url is None:
            raise ValueError("RedisStore needs a url or a client")
        else:
            self.url = mask_url(url)
            _check_encoded(url)
            options = {
                "socket_timeout": socket_timeout,
                "socket_connect_timeout": socket_connect_timeout,
                **pool_options,
            }
            key = _pool_key(url, options)
            options.setdefault("health_check_interval", 30)
            options.setdefault("retry", Retry(NoBackoff(), 0))
            # Maintenance notifications cost a round trip on every new connection and
            # relax timeouts to 10 s during server maintenance: the budget is 250 ms.
            options.setdefault("maint_notifications_config", MaintNotificationsConfig(enabled=False))
            # RESP2: no HELLO on every new connection.  Each handshake command waits up to socket_timeout
            # on its own, so a new connection to a slow Redis took a multiple of it (0.8 s for 0.25 s).
            options.setdefault("protocol", 2)
            options.update({k: v for k, v in _NO_SETINFO.items() if k not in options})  # nor CLIENT SETINFO
            with _SHARED_LOCK:
                shared = _SHARED.get(key)
                if shared is None:
                    shared = _SHARED[key] = _Shared(*_make_client(url, options))
                if breaker is None:
                    breaker = shared.breakers.get((failure_threshold, reset_timeout))
                    if breaker is None:
                        breaker = CircuitBreaker(
                            failure_threshold, reset_timeout, name=f"redis store {self.url}"
                        )
                        shared.breakers[(failure_threshold, reset_timeout)] = breaker
                shared.users += 1
            self._shared, self._pool_key = shared, key
            self.client, self.breaker = shared.client, breaker
        self.pool = self.client.connection_pool
        password = self.pool.connection_kwargs.get("password")
        self._secret = password if isinstance(password, str) and len(password) >= 3 else None
        self._refused: tuple[float, str] | None = None  # when and why Redis last refused a write, for health()
        self._incr_ttl = self.client.register_script(_INCR_TTL)
        self._get_or_lock = self.client.register_script(_GET_OR_LOCK)
        self._write_unless = self.client.register_script(_WRITE_UNLESS_MARKED)
        self._add_then_write = self.client.register_script(_ADD_THEN_WRITE)
        self._unlock = self.client.register_script(_UNLOCK)
        #: Its Lua scripts, for another component's pipeline that carries them (a read ahead's read-or-lock)
        #: and loads them again after NOSCRIPT (a restarted or flushed server).
        self.scripts = (self._incr_ttl, self._get_or_lock, self._write_unless, self._add_then_write, self._unlock)

    # -- the boundary -------------------------------------------------------------

    def call(self, op: str, fn: Callable[[], T], *, doing: str | None = None) -> T:
        """Call Redis through the breaker; wrap whatever it raises in StoreError.

        The store's own operations go through here, and so may another
        component's round trip on this pool (the rate limiter's pipeline, with
        ``doing="count"``): the same breaker, the same errors, and /readyz
        learns why it failed.
        """
        what = doing or f"run {op}"

        def attempt() -> T:
            try:
                return fn()
            except redis.exceptions.MaxConnectionsError as exc:
                # The pool is exhausted (too many concurrent callers), Redis is not down, nor known up.
                self.breaker.failure = POOL_BUSY  # /readyz says so, not an earlier outage's reason
                raise StoreBusy(self._say(what, self._detail(exc))) from exc
            except _DOWN as exc:
                self.breaker.failure = self._why(exc)[0]  # /readyz says why, also once the breaker has opened
                detail = self._detail(exc)
                raise StoreUnavailable(self._say(what, detail), detail) from exc
            except redis.ResponseError as exc:
                if "WRONGTYPE" in str(exc):  # a foreign value, no failure (in a script: Redis < 7 wraps it in ERR)
                    raise StoreWrongType(self._say(what, self._detail(exc))) from exc
                if _BUSY.search(str(exc)):  # a script runs past busy-reply-threshold: nothing is served
                    self.breaker.failure = BUSY
                    detail = self._detail(exc)
                    raise StoreUnavailable(self._say(what, detail), detail) from exc
                self.breaker.failure = refusal(exc)[0]
                if self.breaker.failure in _WRITES_REFUSED:  # also when a script's write was refused
                    self._refused = (time.monotonic(), self.breaker.failure)
                raise StoreError(self._say(what, self._detail(exc))) from exc
            except redis.RedisError as exc:
                self.breaker.failure = refusal(exc)[0]
                raise StoreError(self._say(what, self._detail(exc))) from exc
            except (TypeError, ValueError) as exc:  # an option redis-py only checks when it connects
                raise StoreError(self._say(what, self._detail(exc))) from exc

        return self.breaker.call(attempt)

    def _why(self, exc: BaseException) -> tuple[str, bool]:
        """:func:`refusal`, told what Redis said first when the pool found a new connection already holding data.

        Redis answers a connection it will not serve (``maxclients`` reached) with an
        error before it is asked anything, and closes it; redis-py then reports only
        "Connection not ready" (unless a handshake, AUTH or SELECT, read the error).
        """
        found = refusal(exc)
        if found[0] != "not reachable" or "connection not ready" not in str(exc).lower():
            return found
        connection = self.pool.connection_class(**self.pool.connection_kwargs)
        try:
            connection.connect()
            if connection.can_read(timeout=self.pool.connection_kwargs.get("socket_timeout") or 0):
                connection.read_response()
        except Exception as said:
            return refusal(said)
        finally:
            connection.disconnect()
        return found

    def _detail(self, exc: BaseException) -> str:
        detail = str(exc).strip() or type(exc).__name__
        return detail.replace(self._secret, "***") if self._secret else detail

    def _say(self, what: str, detail: str) -> str:
        return f"redis store {self.url} could not {what}: {detail}"

    # -- the Store interface ----------------------------------------------------------

    def read_command(self, op: str, key: str, ttl: float | None = None, lock_key: str | None = None,
                     mark: str | None = None, mark_ttl: float | None = None) -> tuple[Any, ...]:
        """The Redis command :meth:`get`, :meth:`getex` or :meth:`get_or_lock` sends, for another layer's pipeline.

        ``op`` names the method; :meth:`read_answer` turns the reply into what the method returns.
        """
        if op == "getex" and ttl is not None:
            return ("GETEX", self.key_prefix + key, "PX", _ms(ttl))
        if op == "get":
            return ("GET", self.key_prefix + key)
        if op == "get_or_lock" and ttl is not None and lock_key is not None:
            keys, args = self._lock_and_mark(key, lock_key, ttl, mark, mark_ttl)
            return ("EVALSHA", self._get_or_lock.sha, len(keys), *keys, *args)
        raise ValueError(f"no read command for {op!r}")

    @staticmethod
    def read_answer(op: str, reply: Any) -> Any:
        """What the method ``op`` returns, from the reply to its :meth:`read_command`."""
        if op == "get_or_lock":
            found, value, mark = reply
            return (value, None, mark) if found == 1 else (None, value, mark)
        return reply

    def get(self, key: str) -> bytes | None:
        return cast("bytes | None", self.call("GET", partial(self.client.get, self.key_prefix + key)))

    def getex(self, key: str, ttl: float) -> bytes | None:
        fn = partial(self.client.getex, self.key_prefix + key, px=_ms(ttl))
        return cast("bytes | None", self.call("GETEX", fn))

    def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        _check_value(value)
        px = _px(ttl)
        self.call("SET", partial(self.client.set, self.key_prefix + key, value, px=px))

    def replace(self, key: str, value: bytes, ttl: float | None = None) -> bool:
        _check_value(value)
        px = _px(ttl)
        fn = partial(self.client.set, self.key_prefix + key, value, px=px, xx=True)
        return bool(self.call("SET XX", fn))

    def add(self, key: str, value: bytes, ttl: float | None = None) -> bool:
        _check_value(value)
        px = _px(ttl)
        fn = partial(self.client.set, self.key_prefix + key, value, px=px, nx=True)
        return bool(self.call("SET NX", fn))

    def _lock_and_mark(self, key: str, lock_key: str, ttl: float, mark: str | None,
                       mark_ttl: float | None) -> tuple[list[str], list[Any]]:
        """The keys and arguments of the get_or_lock script."""
        keys = [self.key_prefix + key, self.key_prefix + lock_key]
        args: list[Any] = [new_mark(), _ms(ttl)]
        mark_px = args[1] if mark_ttl is None else _ms(mark_ttl)
        if mark is not None:
            keys.append(self.key_prefix + mark)
            args += [new_mark(), mark_px]
        return keys, args

    def get_or_lock(self, key: str, lock_key: str, ttl: float, mark: str | None = None,
                    mark_ttl: float | None = None) -> tuple[bytes | None, bytes | None, bytes | None]:
        keys, args = self._lock_and_mark(key, lock_key, ttl, mark, mark_ttl)
        fn = partial(self._get_or_lock, keys=keys, args=args)
        answer = self.read_answer("get_or_lock", self.call("GET or SET NX", fn))
        return cast("tuple[bytes | None, bytes | None, bytes | None]", answer)

    def unlock(self, lock_key: str, token: bytes, leave: tuple[bytes, float] | None = None) -> bool:
        _check_value(token)  # (text would equal the same bytes in a Lua script, and never in memory://)
        args: list[Any] = [token]
        if leave is not None:
            _check_value(leave[0])
            args += [leave[0], _ms(leave[1])]
        fn = partial(self._unlock, keys=[self.key_prefix + lock_key], args=args)
        return bool(self.call("unlock", fn))

    def add_then_write(self, key: str, value: bytes, ttl: float | None,
                       sets: Sequence[tuple[str, bytes, float | None]]) -> bool:
        _check_value(value)
        p = self.key_prefix
        keys: list[str] = [p + key]
        args: list[Any] = [value, _px(ttl) or b""]  # (no PX: no expiry)
        for other_key, other, other_ttl in sets:
            _check_value(other)
            keys.append(p + other_key)
            args += [other, _px(other_ttl) or b""]
        return bool(self.call("SET NX, then SET", partial(self._add_then_write, keys=keys, args=args)))

    def write_unless_marked(self, mark: str, seen: bytes | None, sets: Sequence[tuple[str, bytes, float]],
                            deletes: Sequence[str] = (), unlock: tuple[str, bytes] | None = None) -> bool:
        for _, value, _ in sets:
            _check_value(value)
        for given in (seen, unlock and unlock[1]):
            if given is not None:
                _check_value(given)
        pxs = [_ms(ttl) for _, _, ttl in sets]
        if seen is None:  # never matches: nothing to store
            sets = ()
        if not sets and unlock is None:  # the deletes alone
            self.write((), deletes)
            return False
        p = self.key_prefix
        keys = [p + mark, *(p + key for key, _, _ in sets), *(p + key for key in deletes)]
        args: list[Any] = [seen or b"", len(sets)]
        for (_, value, _), px in zip(sets, pxs, strict=False):
            args += [value, px]
        if unlock is not None:
            keys.append(p + unlock[0])
            args.append(unlock[1])
        return bool(self.call("write unless marked", partial(self._write_unless, keys=keys, args=args)))

    def write(self, sets: Sequence[tuple[str, bytes, float | None]] = (), deletes: Sequence[str] = ()) -> None:
        for _, value, _ in sets:
            _check_value(value)
        pxs = [_px(ttl) for _, _, ttl in sets]  # checked before the call: a bad TTL is no store error

        def run() -> None:
            # MULTI/EXEC: no other client's command runs between these (a reader never sees the cache's
            # new marks beside the entries they go with); still one round trip.
            pipe = self.client.pipeline(transaction=True)
            for (key, value, _), px in zip(sets, pxs, strict=True):
                pipe.set(self.key_prefix + key, value, px=px)
            if deletes:
                pipe.delete(*(self.key_prefix + key for key in deletes))
            pipe.execute()

        self.call("SET/DEL transaction", run)

    def delete(self, key: str) -> bool:
        return bool(self.call("DEL", partial(self.client.delete, self.key_prefix + key)))

    def incr(self, key: str, ttl: float | None = None, amount: int = 1) -> int:
        name = self.key_prefix + key
        if ttl is None:
            return int(self.call("INCRBY", partial(self.client.incrby, name, amount)))
        fn = partial(self._incr_ttl, keys=[name], args=[amount, _ms(ttl)])
        return int(cast(int, self.call("INCRBY", fn)))

    def expire(self, key: str, ttl: float) -> bool:
        return bool(self.call("PEXPIRE", partial(self.client.pexpire, self.key_prefix + key, _ms(ttl))))

    def ttl(self, key: str) -> float | None:
        left = int(self.call("PTTL", partial(self.client.pttl, self.key_prefix + key)))
        # -2: missing, -1: no expiry; 0: less than a millisecond left, which is still above 0 (a TTL to pass on)
        return max(left, 1) / 1000 if left >= 0 else None

    def _pattern(self, prefix: str) -> str:
        escaped = "".join("\\" + c if c in "*?[]\\" else c for c in self.key_prefix + prefix)
        return escaped + "*"

    def _pages(self, prefix: str) -> Iterator[list[bytes]]:
        pattern, cursor = self._pattern(prefix), 0
        while True:
            page = partial(self.client.scan, cursor, match=pattern, count=_SCAN_COUNT)
            cursor, keys = cast("tuple[int, list[bytes]]", self.call("SCAN", page))
            yield keys
            if cursor == 0:
                return

    def scan(self, prefix: str) -> Iterator[str]:
        cut, seen = len(self.key_prefix.encode()), set()
        for keys in self._pages(prefix):
            for raw in keys:
                if raw not in seen:  # SCAN may return a key twice
                    seen.add(raw)
                    yield raw[cut:].decode("utf-8", "replace")

    def delete_prefix(self, prefix: str) -> int:
        """Delete page by page: each SCAN page (about 500 keys) goes in one UNLINK."""
        deleted = 0
        for keys in self._pages(prefix):
            if keys:
                deleted += int(self.call("UNLINK", partial(self.client.unlink, *keys)))
        return deleted

    def ping(self) -> bool:
        """Whether Redis takes a write now: a ``SET`` of the store's own key ``{key_prefix}ping``.

        A ``PING`` is answered during a write pause (``CLIENT PAUSE … WRITE``, a failover), by a
        replica and by a Redis out of memory, while every write the layers make waits or fails;
        a readiness probe that closed the breaker on it said ready when nothing worked.
        """
        try:
            set_ping = partial(self.client.set, self.key_prefix + "ping", b"1", px=60_000)
            answered = bool(self.call("SET (readiness)", set_ping))  # a failure records why (call)
        except Exception:
            return False
        self.breaker.failure = None
        return answered

    def health(self) -> dict[str, object]:
        """Also not ok for ``REFUSED_FRESH`` seconds after Redis refused a write (a replica, out of memory):
        it answers PING, but the layers cannot do their work."""
        facts = super().health()
        facts["breaker"] = self.breaker.state
        refused = self._refused
        if facts["ok"] and refused is not None and time.monotonic() - refused[0] < REFUSED_FRESH:
            facts["ok"], facts["error"] = False, refused[1]
        elif not facts["ok"] and self.breaker.failure:
            facts["error"] = self.breaker.failure
        return facts

    def probe(self) -> tuple[str, bool] | None:
        """PING, ROLE, a write, a read, a script and a transaction, outside the breaker: None when all pass,
        else what is wrong.

        A replica answers PING, but refuses every write the layers make: the
        configuration is refused, as a wrong password is.  So is a user whose ACL
        denies reads, writes, scripts (the rate limiter's and the cache's), transactions
        (:meth:`write`: logout, the refresh family sweep, the cache's invalidation;
        refused MULTI, its commands would run one by one and EXEC fail) or the
        store's keys: it would answer PING while every layer's work failed.
        """
        try:
            self.client.ping()
            if self._replica():
                return READ_ONLY, True
            key = self.key_prefix + "ping"
            self.client.set(key, b"1", px=60_000)
            self.client.get(key)  # a user that may write but not read would start, and every login get 503
            self.client.register_script("return 1")(keys=[key])  # EVALSHA (SCRIPT LOAD first), as the layers run
            transaction = self.client.pipeline(transaction=True)  # MULTI, SET, EXEC, as write() sends them
            transaction.set(key, b"1", px=60_000)
            transaction.execute()
        except Exception as exc:
            found = self._why(exc)
            sentinel = self._shared.sentinel if self._shared is not None else None
            if found[1] or sentinel is None:
                return found
            # redis-py reports a sentinel that refuses the password as "master not found": ask them.
            for node in sentinel.sentinels:
                try:
                    node.ping()
                except Exception as inner:
                    said, refuses = refusal(inner)
                    if refuses:
                        return f"a sentinel refuses it: {said}", True
            return found
        return None

    def memory_policy(self) -> tuple[str, int, str] | None:
        """``(maxmemory-policy, maxmemory bytes, run_id)`` from ``INFO``; None when the server will not say.

        The run id names the server: stores on two databases of one server share its ``maxmemory``.
        """
        try:
            info = self.client.info()
            return str(info.get("maxmemory_policy", "")), int(info.get("maxmemory", 0)), str(info.get("run_id", ""))
        except Exception:  # a user without INFO, a proxy that hides it: nothing to judge by
            return None

    def _replica(self) -> bool:
        """Whether ROLE says replica; False when the server does not let this user ask (NOPERM)."""
        try:
            role = self.client.role()
        except redis.ResponseError:
            return False
        first = role[0] if isinstance(role, list | tuple) and role else b""
        return (first.decode() if isinstance(first, bytes) else str(first)) in ("slave", "replica")

    def close(self) -> None:
        """Release this store's share of the pool; the last user disconnects it."""
        shared, self._shared = self._shared, None
        if shared is None:
            return
        with _SHARED_LOCK:
            shared.users -= 1
            if shared.users > 0 or _SHARED.get(self._pool_key) is not shared:
                return
            del _SHARED[self._pool_key]
        shared.client.connection_pool.disconnect()
        if shared.sentinel is not None:
            for node in shared.sentinel.sentinels:
                node.connection_pool.disconnect()

    def __repr__(self) -> str:
        return f"RedisStore({self.url!r}, key_prefix={self.key_prefix!r}, breaker={self.breaker.state!r})"
