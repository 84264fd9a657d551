"""The response cache: repeated GETs are answered from a store without entering the app.

A hit costs one store read, one small JSON decode and ``start_response``.  The
key covers the method class, the decoded path, the query (pairs sorted by
name), the API version, the scheme, host and proxy headers an app might echo
(``key_headers``), every request header the response names in ``Vary``, and,
with ``per_user``, the identity's subject and roles.  A miss calls the app once per key
(single-flight, across threads and, through a store lock, across processes)
and tees the body into the store while it streams to the client.

Never stored: ``Set-Cookie`` responses, ``Cache-Control: private/no-store/
no-cache``, ``Vary: *``, bodies without ``Content-Length`` or larger than
``max_body_bytes``, ``text/event-stream``, invalid or conflicting freshness,
and statuses that are not heuristically cacheable without explicit freshness.
Requests with ``Authorization`` or a session cookie bypass the cache unless
``per_user`` is on; so do those with ``If-Match`` or ``If-Unmodified-Since``
(the app's to evaluate).  A write that succeeds marks its URI anew: every
user's entry stored under the old mark is stale, and a fill that looked the
entry up before the write stores nothing; :func:`purge` deletes the marks of the paths
it purges, with the same effect.

Do not use it outside ``auth``/``session`` or outside ``versioning``: it must
see the identity and the API version.  Do not use it for endpoints whose
answer changes with state the key cannot see (writes, time-critical data).
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import math
import re
import secrets
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from operator import itemgetter
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import parse_qsl, unquote_to_bytes, urljoin, urlsplit

from pydantic import Field, model_validator
from werkzeug.datastructures import RequestCacheControl
from werkzeug.exceptions import HTTPException, MethodNotAllowed
from werkzeug.http import (
    http_date,
    parse_cache_control_header,
    parse_date,
    parse_etags,
    parse_list_header,
    unquote_etag,
)
from werkzeug.wsgi import get_current_url

from stores.base import Store, StoreError, StoreWrongType, new_mark

from .base import (
    API_VERSION,
    IDENTITY,
    READ_AHEAD,
    ROUTE,
    SESSION,
    SESSION_BOUND,
    VERSIONS,
    Context,
    LayerOptions,
    ReadKey,
    add_vary,
    cookies,
    decoded_path,
    note,
    read_ahead,
    refuse,
    rooted_path,
)

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

__all__ = ["DEFAULT_PREFIX", "CacheMiddleware", "purge"]

DEFAULT_PREFIX = "wsgistack:cache:"
#: The store keys of the other built-in layers, which must never be evicted for the cache.
KEPT_NAMESPACES = ("session:", "revoked:", "refresh-used:", "family-access:", "family-revoked:",
                   "family-head:", "login-failures:")
# Entry keys are f"{prefix}e:{path}#{32 hex digits}", and write marks f"{prefix}w:{path}#{32 hex digits}",
# so a path glob maps to a scan prefix of each.
_DIGEST = 32
_PURGE_BATCH = 1000  # keys a purge deletes in one step (one round trip)
_VARY_INDEX = b'{"v":'  # how an entry that lists a path's Vary headers starts (its variants are stored apart)
_clock = time.time  # wall clock: entries carry it across processes (tests replace it)
_SAFE = frozenset({"OPTIONS", "TRACE"})  # besides GET and HEAD: methods that never invalidate (RFC 9110 §9.2.1)
_MAX_DELTA = 2**31  # the largest delta-seconds a cache needs to honour (RFC 9111 §1.2.2)
_GLOB = re.compile(r"[*?\[]")
# Never stored with an entry: hop-by-hop headers and the ones this layer writes.
_UNSTORED = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
                       "trailer", "transfer-encoding", "upgrade", "age", "x-cache"})
Headers = list[tuple[str, str]]
#: Answers only the request's own headers made (its conditions, its Range): another request's may be stored.
_ITS_OWN = frozenset({"304", "412", "206", "416"})
# What a 304 carries of the stored response (RFC 9110 §15.4.5): no body, and nothing that describes one.
_SENT_WITH_304 = frozenset({"cache-control", "content-location", "date", "etag", "expires", "last-modified",
                            "vary"})
# The statuses whose freshness may be guessed (``ttl``) when the response gives none (RFC 9110 §15.1);
# any other is stored only with max-age, s-maxage, Expires or public.
_HEURISTIC = frozenset({"200", "203", "204", "206", "300", "301", "308", "404", "405", "410", "414", "501"})
# Seconds a successful write marks its URI at least (``lock_timeout`` when longer): a fill that looked
# the entry up before the write stores nothing, and a fill that takes longer than this stores nothing either.
_MARK_LIFE = 60.0
#: What a fill lock holds once its filler found its answer not cacheable, and for how many
#: seconds at most: the requests of other processes waiting for it ask the app at once, as one process's do.
_ASK_APP = b"0"
_ASK_APP_LIFE = 1.0


# Seconds an entry may seem born ahead of the clock reading it (another process's clock, a moment ahead):
# more, and the clock stepped back since it was stored, so its freshness (on the same clock) says nothing.
_BORN_AHEAD = 2.0


def _fresh_at(entry: dict[str, Any], now: float) -> bool:
    """Whether ``entry`` is fresh at ``now``: before its end, and not born in the future of ``now``
    (after the wall clock stepped back an hour, an entry for 60 s would be fresh for the hour)."""
    return bool(entry["f"] > now >= entry["t"] - _BORN_AHEAD)


def _environ_name(header: str) -> str:
    name = header.strip().upper().replace("-", "_")
    return name if name in ("CONTENT_TYPE", "CONTENT_LENGTH") else f"HTTP_{name}"


def _digest(parts: object) -> str:
    return hashlib.blake2b(repr(parts).encode(), digest_size=_DIGEST // 2).hexdigest()


def _directives(header: str) -> dict[str, list[str]]:
    """A response's Cache-Control: each directive (lower case, RFC 9111 §5.2) with every value it was given."""
    found: dict[str, list[str]] = {}
    for item in parse_list_header(header):
        name, _, value = item.partition("=")
        value = value.strip()
        if len(value) > 1 and value[0] == value[-1] == '"':
            value = value[1:-1]
        found.setdefault(name.strip().lower(), []).append(value)
    return found


def _delta(values: list[str]) -> int | None:
    """The delta-seconds ``values`` give, at most 2^31 (RFC 9111 §1.2.2).

    ``None`` when one is not a number, or when they differ.
    """
    if not all(v.isascii() and v.isdigit() for v in values):
        return None
    digits = [v.lstrip("0") or "0" for v in values]
    seconds = {_MAX_DELTA if len(d) > 10 else min(int(d), _MAX_DELTA) for d in digits}
    return seconds.pop() if len(seconds) == 1 else None


def purge(store: Store, pattern: str, prefix: str = DEFAULT_PREFIX) -> int:
    """Delete the cached entries whose path matches the glob ``pattern``; return how many.

    ``pattern`` is matched (``fnmatch``, case-sensitive) against the path as the
    app saw it, after versioning rewrote it: ``purge(store, "/api/v1/search*")``.

    The write marks of those paths go first: a fill in flight (every lookup that
    may fill reads its URI's mark, and sets one when there is none) finds its
    mark gone at its save and stores nothing, as after a write; so an answer the
    app made from the data before the change the purge follows is not stored
    after it.  Every user's entries of those URIs are stale at once with them.
    """
    literal = _GLOB.split(pattern, maxsplit=1)[0]
    start = len(prefix) + 2

    def matching(kind: str) -> list[str]:
        return [key for key in list(store.scan(f"{prefix}{kind}:{literal}"))
                if fnmatch.fnmatchcase(key[start:-_DIGEST - 1], pattern)]

    marks = matching("w")  # first: a fill that looked up before this scan found one of these
    entries = matching("e")
    keys = marks + entries
    for at in range(0, len(keys), _PURGE_BATCH):
        store.write((), keys[at:at + _PURGE_BATCH])
    return len(entries)


class CacheOptions(LayerOptions):
    """Options of the ``cache`` layer (see :class:`CacheMiddleware`)."""

    store: str = "shared"
    ttl: int = Field(300, gt=0)
    statuses: tuple[int, ...] = (200,)
    stale_if_error: int = Field(0, ge=0)
    lock_timeout: float = Field(5.0, gt=0)
    max_body_bytes: int = Field(1_048_576, ge=0)
    cookie_names: tuple[str, ...] = ("__Host-session",)
    per_user: bool = False
    honor_request_no_cache: bool = True
    purge_path: str | None = None
    purge_roles: tuple[str, ...] = ("admin",)
    key_prefix: str = DEFAULT_PREFIX
    key_headers: tuple[str, ...] = ("Host", "X-Forwarded-Host", "X-Forwarded-Proto", "X-Forwarded-Port",
                                    "X-Forwarded-Prefix", "Forwarded", "X-Original-URL", "X-Rewrite-URL",
                                    "X-HTTP-Method-Override")
    on_store_error: Literal["open", "closed"] = "open"

    @model_validator(mode="after")
    def _can_be_right(self) -> CacheOptions:
        bad = [s for s in self.statuses if not 200 <= s <= 499]
        if bad:
            raise ValueError(f"statuses may list only codes from 200 to 499 (got {bad[0]}); "
                             "error responses are never cached")
        # Statuses that are not heuristically cacheable (302, 307, 403…) are accepted: a response with one is
        # stored only when it gives its own freshness (max-age, s-maxage, Expires) or is public (_HEURISTIC).
        # 416 too: it answers a Range (one past the end), and stored, every GET of the URI would get it.
        partial = [s for s in self.statuses if s in (206, 304, 416)]
        if partial:
            raise ValueError(f"statuses may not list {partial[0]}: a {partial[0]} answers one request's "
                             "Range or condition and would be replayed to requests without it")
        if self.purge_path is not None and not self.purge_path.startswith("/"):
            raise ValueError(f"purge_path must start with '/' (got {self.purge_path!r})")
        if self.purge_path is not None and not self.purge_roles:
            raise ValueError("purge_roles may not be empty when purge_path is set")
        # Either way round: "re" takes in every "revoked:" key, "session:A" the sessions whose ids start with A.
        kept = [ns for ns in KEPT_NAMESPACES if ns.startswith(self.key_prefix) or self.key_prefix.startswith(ns)]
        if kept:  # a memory:// store evicts the keys under the cache's prefix to make room
            raise ValueError(f"key_prefix {self.key_prefix!r} would take in the keys under {kept[0]!r} too: in a "
                             "memory:// store they would be evicted to make room for cached answers (a revoked "
                             "token or a session could come back or go); use a prefix of its own, such as "
                             f"{DEFAULT_PREFIX!r}")
        return self


class _Plan:
    """What the start_response of a miss decided: fresh for ``ttl`` from an age of ``age`` (+ ``window`` stale).

    ``received`` is when the app's headers came (RFC 9111 §4.2.3's response_time): the age counts from
    there, not from the end of a body the app may take a while to make.
    """

    __slots__ = ("age", "headers", "length", "received", "status", "ttl", "vary", "window")

    def __init__(self, status: str, headers: Headers, length: int, ttl: int, window: int, vary: list[str],
                 age: int = 0, received: float = 0.0) -> None:
        self.status, self.headers, self.length = status, headers, length
        self.ttl, self.window, self.vary, self.age = ttl, window, vary, age
        self.received = received


class _Flight(threading.Event):
    """One process's fill of a key, which its other requests for the key wait on.

    ``failed``: its app raised (a 5xx); ``retry``: it was led by a request that
    waited on a fill that failed (see :meth:`CacheMiddleware._fill`).
    """

    def __init__(self, retry: bool = False) -> None:
        super().__init__()
        self.failed, self.retry = False, retry


class _Fill:
    """One miss on its way through the app: the flight it leads and what it will store.

    ``keep`` is false for a ``HEAD``: nothing is stored, but a stale entry still
    answers the app's failure.  ``began`` is when the app was called: a fill that
    ends more than a write's mark lives after it stores nothing.
    """

    def __init__(self, layer: CacheMiddleware, environ: WSGIEnvironment, base: str, subject: str | None,
                 flight: _Flight | None, stale: dict[str, Any] | None, keep: bool = True) -> None:
        self.layer, self.environ, self.base, self.subject = layer, environ, base, subject
        self.flight, self.stale, self.keep = flight, stale, keep
        self.lock: tuple[str, bytes] | None = None  # the fill lock this fill holds: (its key, its token)
        self.plan: _Plan | None = None
        self.started = self.returned = self.swap = False
        self.unchanged = False  # the request's conditions hold for the app's 200: the client gets a 304
        self.exc_info: Any = None  # the app's failure the stale entry replaces (its 5xx's exc_info, its exception)
        self.began = 0.0

    def start_response(self, start_response: StartResponse) -> StartResponse:
        def wrapped(status: str, headers: Headers, exc_info: Any = None) -> Any:
            if self.stale is not None and not self.returned and status[:1] == "5":
                self.swap, self.exc_info = True, exc_info  # answered with the stale entry once the app returns
                return lambda data: None
            self.started = True
            personal = _personal(self.environ, self.subject)
            plan = None if personal else self.layer._plan(status, headers, self.subject)
            if plan is None or not self.keep:
                # Waiters elsewhere ask the app at once when no one's answer could be stored; not when only
                # this request's could not (its own 304 or 412, the 206 or 416 of its Range, an answer made
                # from its session).
                self.release(peers_ask=not personal and status[:3] not in _ITS_OWN)
                if plan is not None and self._holds(status, headers, plan):  # a HEAD: the 304 a GET would get
                    return self._not_modified(start_response, headers, exc_info)
                return start_response(status, [*headers, ("X-Cache", "MISS")], exc_info)
            self.plan = plan
            if getattr(self.environ.get(SESSION), "accessed", False):
                # The session layer outside adds Vary: Cookie to this answer (made from the session),
                # and would not to a hit, where nobody reads it: stored with the entry, for the caches
                # downstream. The entry's own variants stay keyed by its Vary (the cookie is cookie_names').
                stored = list(self.plan.headers)
                add_vary(stored, "Cookie")
                self.plan.headers = stored
            if self._holds(status, headers, plan):
                # A cache evaluates the conditions (RFC 9110 §13.2.1), on a miss as on a hit: the
                # body is stored as it comes, and the client gets the 304 a hit would give.
                return self._not_modified(start_response, headers, exc_info)
            return start_response(status, [*headers, ("X-Cache", "MISS")], exc_info)

        return wrapped

    def _holds(self, status: str, headers: Headers, plan: _Plan) -> bool:
        """Whether the request's conditions hold for the app's storable answer: the client gets a 304."""
        environ = self.environ
        return status[:3] == "200" and ("HTTP_IF_NONE_MATCH" in environ or "HTTP_IF_MODIFIED_SINCE" in environ) \
            and _not_modified(environ, {"s": status, "h": headers, "t": _clock() - plan.age})

    def _not_modified(self, start_response: StartResponse, headers: Headers, exc_info: Any) -> Any:
        self.unchanged = True
        kept = [(n, v) for n, v in headers if n.lower() in _SENT_WITH_304]
        start_response("304 Not Modified", [*kept, ("X-Cache", "MISS")], exc_info)
        return lambda data: None

    def replaced(self) -> Any:
        """The ``exc_info`` a second ``start_response`` (the stale entry's) must give (PEP 3333): None
        unless the app's own status went to the server first; then the server replaces that status, or
        re-raises when the app's bytes already went out."""
        if not self.started:
            return None
        if self.exc_info is not None:
            return self.exc_info
        try:  # a 5xx after a 2xx without exc_info (which PEP 3333 asks for): one of our own
            raise RuntimeError("the app answered with an error after it had started its response")
        except RuntimeError:
            return sys.exc_info()

    def finish(self, body: bytes) -> None:
        plan = self.plan
        # A body made after the headers may still have used the session (a generator that asked for the
        # CSRF token or read the stored session): asked again now, it stores nothing then.
        if plan is not None and _personal(self.environ, self.subject):
            plan = None
        # A fill that took longer than a write's mark lives could have missed one whose mark has gone
        # again: it stores nothing.  Within it, every write that succeeded after the app was called
        # (one whose change the app may not have seen) still has its mark when the save checks it.
        if plan is not None and len(body) == plan.length and _clock() - self.began < self.layer.mark_life:
            try:
                self.layer._save(self.environ, self.base, plan, body, unlock=self.lock)
                self.lock = None  # given back in the same round trip as the write
            except StoreError as exc:
                self.layer._store_error(exc)
        self.release()

    def release(self, peers_ask: bool = False, failed: bool = False) -> None:
        """Let the requests waiting for this fill go: to its entry, or, with ``peers_ask`` (the answer
        is not cacheable), to the app, all at once, in other processes too; ``failed`` (the app raised):
        in this process, one of them asks again and the others wait for it."""
        layer, flight, self.flight = self.layer, self.flight, None
        if flight is None:
            return
        with layer._lock:
            if layer._inflight.get(self.base) is flight:
                del layer._inflight[self.base]
        flight.failed = failed
        flight.set()
        if self.lock is not None:
            if peers_ask:
                layer._hand_over(*self.lock)
            else:
                layer._drop_lock(*self.lock)


class _AfterClose:
    """The app's answer, with ``then()`` called once the server closed it (after the app's own ``close``)."""

    __slots__ = ("result", "then")

    def __init__(self, result: Iterable[bytes], then: Callable[[], object]) -> None:
        self.result, self.then = result, then

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.result)

    def close(self) -> None:
        _close_then(self.result, self.then)


def _close_then(result: Iterable[bytes], then: Callable[[], object]) -> None:
    """Close ``result`` (when it can be closed), then call ``then``, whatever closing raised."""
    try:
        close = getattr(result, "close", None)
        if close is not None:
            close()
    finally:
        then()


class _Asks:
    """A request's Cache-Control on a stored response (RFC 9111 §5.2.1).

    ``max-age``: no older one (``no-cache`` and ``Pragma: no-cache``: none at
    all); ``min-fresh``: fresh for that long still; ``only-if-cached``: a 504
    rather than the app.  A response that does not do is fetched afresh and
    stored for the next requests.  ``max-stale`` (``True`` without a value):
    how long past its freshness a stale entry may still stand in for a failing
    app; without it, a request with ``max-age`` or ``min-fresh`` takes none.
    ``stale-if-error`` (RFC 5861 §4): how long past its freshness one may stand
    in for a failing app whatever else the request said.
    """

    __slots__ = ("max_age", "max_stale", "min_fresh", "only_if_cached", "stale_if_error")

    def __init__(self, max_age: int | None, min_fresh: int | None, only_if_cached: bool,
                 max_stale: int | bool | None = None, stale_if_error: int | None = None) -> None:
        self.max_age, self.min_fresh, self.only_if_cached = max_age, min_fresh, only_if_cached
        self.max_stale, self.stale_if_error = max_stale, stale_if_error

    def accepts(self, entry: dict[str, Any], now: float, fetched: bool = False) -> bool:
        """Whether ``entry`` may answer; ``fetched``: it is the answer of a fill that ended while this
        request waited for it, made by the app since the request came: as good as validated (``no-cache``
        holds), and as old as its ``Age`` says."""
        if self.max_age is not None:
            if fetched:
                if self.max_age >= 0 and int(now - entry["t"]) > self.max_age:
                    return False
            elif now - entry["t"] > self.max_age:
                return False
        return self.min_fresh is None or entry["f"] - now >= self.min_fresh

    def takes_stale(self, entry: dict[str, Any], now: float) -> bool:
        """Whether the stale ``entry`` may answer this request when the app fails (RFC 9111 §5.2.1.1-3)."""
        if self.stale_if_error is not None and now - entry["f"] <= self.stale_if_error:
            return True  # the client takes it in that case "regardless of other freshness information" (RFC 5861)
        if self.max_age == -1 or self.min_fresh is not None:
            return False  # no-cache: no stored response at all; min-fresh: a fresh one only
        if self.max_stale is None or self.max_stale is False:
            return self.max_age is None  # max-age without max-stale: "does not wish to receive a stale response"
        if self.max_stale is not True and now - entry["f"] > self.max_stale:
            return False
        return self.max_age is None or now - entry["t"] <= self.max_age


def _subject_key(identity: Any) -> str:
    """The part of a ``per_user`` key that names the identity: its subject and its roles.

    The roles too: a token with fewer roles (or a user whose role was taken away)
    must not be answered with what a token with more roles was given.  Both as
    ``repr``: quoted, so no subject (another issuer's may hold any character)
    can spell another subject's key with its roles.
    """
    return f"{str(identity.subject)!r}{sorted(identity.roles)!r}"


def _personal(environ: WSGIEnvironment, subject: str | None) -> bool:
    """Whether the session makes this response one client's, though the session layer outside marks it so later.

    A response that sets or expires the session cookie, or holds something of its
    session alone (``SESSION_BOUND``: a CSRF token), is never stored; one built
    from a stored session is stored only per user (keyed by ``subject``).
    """
    if environ.get(SESSION_BOUND):
        return True
    session = environ.get(SESSION)
    if session is None or not getattr(session, "accessed", False):
        return False
    return bool(getattr(session, "sets_cookie", True)) or (subject is None and not session.new)


class _Tee:
    """Pass the app's body through chunk by chunk, keeping a copy when it will be stored.

    For a 304 (the request's conditions held: ``fill.unchanged``) the body is read and stored, not sent.
    """

    def __init__(self, result: Iterable[bytes], fill: _Fill) -> None:
        self.result, self.fill = result, fill

    def __iter__(self) -> Iterator[bytes]:
        kept: list[bytes] | None = []
        size = 0
        for chunk in self.result:
            if kept is not None:
                plan = self.fill.plan
                size += len(chunk)
                if (self.fill.started and plan is None) or (plan is not None and size > plan.length):
                    kept = None  # not storable, or longer than its Content-Length: stop copying
                else:
                    kept.append(chunk)
            if not self.fill.unchanged:
                yield chunk
        if kept is not None:
            self.fill.finish(b"".join(kept))

    def close(self) -> None:
        _close_then(self.result, self.fill.release)


def _time(value: object) -> bool:
    """Whether ``value`` is a finite number of seconds a float holds (not NaN, inf, nor 10**400)."""
    if type(value) is float:
        return math.isfinite(value)
    return type(value) is int and -_LARGEST_TIME < value < _LARGEST_TIME


_LARGEST_TIME = 2**53


def _well_formed(entry: object) -> bool:
    """Whether a stored head has the shape this layer writes (anything else, another writer's, is a miss)."""
    if type(entry) is not dict:
        return False
    status, headers = entry.get("s"), entry.get("h")
    if not (_time(entry.get("x")) and _time(entry.get("f")) and _time(entry.get("t"))
            and type(status) is str and status[:3].isdigit() and type(headers) is list):
        return False
    return all(type(pair) is list and len(pair) == 2 and type(pair[0]) is str and type(pair[1]) is str
               for pair in headers)


class CacheMiddleware:
    """Serve cacheable GET (and HEAD) responses from a store.

    Options:
      ``store``: name of the context store (``shared``).
      ``ttl``: seconds an entry is fresh when the app sends no ``s-maxage``/``max-age`` (300).
      ``statuses``: cacheable status codes (``[200]``; 200 to 499 only, not 206, 304 nor 416).  Those
      RFC 9110 §15.1 does not call heuristically cacheable (302, 307, 400, 403…) are stored only
      when the response gives its freshness (``max-age``, ``s-maxage``, ``Expires``) or is ``public``.
      ``stale_if_error``: seconds a stale entry may answer when the app raises or sends 5xx (0: off);
      a response's own ``stale-if-error=N`` (RFC 5861) may make it longer for that response.
      ``lock_timeout``: seconds concurrent misses wait for the one filling the key (5); a
      successful write marks its URI for this long, at least 60 s.
      ``max_body_bytes``: larger bodies are passed through uncached (1 MiB).
      ``cookie_names``: session cookies that make a request private (``["__Host-session"]``).
      ``per_user``: cache requests with credentials too, keyed on the identity's subject
      (``Cache-Control: private`` answers are then stored for that subject only).
      ``honor_request_no_cache``: a request ``Cache-Control: no-cache``/``no-store`` bypasses (true).
      ``purge_path``: admin endpoint (POST/DELETE ``?pattern=/api/v1/*``); off when ``None``.
      ``purge_roles``: roles allowed to purge (``["admin"]``).
      ``key_prefix``: store key prefix (``wsgistack:cache:``).
      ``key_headers``: request headers always in the key (Host and proxy headers an app may echo).
      ``on_store_error``: ``open`` bypasses the cache when the store fails; ``closed`` answers 503.

    Usage::

        opts = CacheMiddleware.Options(ttl=60, stale_if_error=600)
        app = CacheMiddleware(app, opts, Context(stores={"shared": MemoryStore()}))
    """

    Options = CacheOptions

    def __init__(self, app: WSGIApplication, options: CacheOptions, context: Context) -> None:
        self.app = app
        self.options = options
        self.context = context
        self.store = context.store(options.store)
        self.prefix = options.key_prefix
        allow_eviction = getattr(self.store, "allow_eviction", None)
        if allow_eviction is not None:  # a bounded memory store may drop entries to make room, never other state
            allow_eviction(self.prefix)
        keep_apart = getattr(self.store, "keep_apart", None)
        if keep_apart is not None:  # the write marks take no room from the entries (a lost one stores nothing)
            keep_apart(f"{self.prefix}w:")
        self.statuses = frozenset(str(s) for s in options.statuses)
        self.key_environ = tuple(_environ_name(h) for h in options.key_headers)
        # Key headers read otherwise: Forwarded by its proto and host; a write's method override not at all.
        self._forwarded = self.key_environ.index("HTTP_FORWARDED") if "HTTP_FORWARDED" in self.key_environ else -1
        self._override = self.key_environ.index("HTTP_X_HTTP_METHOD_OVERRIDE") \
            if "HTTP_X_HTTP_METHOD_OVERRIDE" in self.key_environ else -1
        self.cookie_names = options.cookie_names
        self.purge_path = options.purge_path
        self.purge_roles = frozenset(options.purge_roles)
        self._inflight: dict[str, _Flight] = {}
        self._index_key = f"wsgistack.cache.index.{id(self)}"  # the Vary index this request found
        self._seen_key = f"wsgistack.cache.mark.{id(self)}"  # the write mark this request's lookup found
        self._uri_key = f"wsgistack.cache.uri.{id(self)}"  # (a user's key, its URI's mark key)
        self._lock = threading.Lock()
        self.mark_life = max(options.lock_timeout, _MARK_LIFE)
        self._hit, self._miss, self._stale = (context.emitter(f"cache.{e}") for e in ("hit", "miss", "stale"))
        context.offer_read(self.store, "get_or_lock", self._ahead)  # a rate limiter outside may read the entry for us

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET").upper()  # as werkzeug routes it
        if self.purge_path is not None and decoded_path(environ) == self.purge_path:
            return self._purge(environ, start_response)
        if method != "GET" and method != "HEAD":
            if method in _SAFE:
                return self.app(environ, start_response)
            return self._write(environ, start_response)
        subject, reason = self._who(environ)
        if reason is not None:
            self._give_back(environ)
            return self._bypass(environ, start_response, reason)
        base = self._base_key(environ, subject)
        # A HEAD reads the URI's mark too (an entry a write made stale is stale for it as well), but sets
        # nothing: it stores nothing, and a mark or lock of its own would only push others out.
        lock_key = self._lock_key(base) if method == "GET" else None
        mark = self._uri_mark(environ, base, subject)
        try:
            try:
                entry, locked = self._lookup(environ, base, lock_key, mark)
            except StoreWrongType:  # a value of another type at the key or its mark (not written here): a miss,
                self.store.write((), [base, mark])  # and gone: looked up afresh (and marked)
                entry, locked = self._lookup(environ, base, lock_key, mark)
        except StoreWrongType:  # written there again meanwhile: a miss, and this request's fill stores nothing
            entry, locked = None, None
        except StoreError as exc:
            return self._store_failed(environ, start_response, exc)
        finally:
            self._give_back(environ)
        now = _clock()
        asks = self._asks(environ) if "HTTP_CACHE_CONTROL" in environ or "HTTP_PRAGMA" in environ else None
        if entry is not None and _fresh_at(entry, now) and (asks is None or asks.accepts(entry, now)):
            self._hit()
            note(environ, "cache", "HIT")
            return self._serve(entry, "HIT", method, start_response, now, environ)
        if asks is not None and asks.only_if_cached:
            if locked and lock_key is not None:
                self._drop_lock(lock_key, locked)
            raise _only_if_cached()
        # The stored answer stands in for a failing app only with stale_if_error on or its own
        # stale-if-error (kept past its freshness: "x" > "f"), and not for a request that said no-cache,
        # max-age or min-fresh without a max-stale or stale-if-error that covers it (RFC 9111 §4.2.4,
        # §5.2.1, RFC 5861: the client asked for no stale response; max-age=0 is a browser's reload).
        stale = entry if entry is not None and entry["x"] > now and (
            self.options.stale_if_error or entry["x"] > entry["f"]) and (
            asks is None or asks.takes_stale(entry, now)) else None
        if method == "HEAD":  # no body to store: ask the app, keep nothing (a stale entry answers its failure)
            return self._ask(environ, start_response, _Fill(self, environ, base, subject, None, stale, keep=False),
                             "HEAD")
        return self._fill(environ, start_response, base, subject, stale, locked, asks, entry)

    # -- request side -----------------------------------------------------------------
    def _asks(self, environ: WSGIEnvironment) -> _Asks | None:
        """What the request's Cache-Control (or, without one, Pragma) asks of a stored response."""
        if not self.options.honor_request_no_cache:
            return None
        header = environ.get("HTTP_CACHE_CONTROL")
        if header:  # directive names are case-insensitive (RFC 9111 §5.2)
            cc = parse_cache_control_header(header.lower(), cls=RequestCacheControl)
            max_age = -1 if cc.no_cache else cc.max_age  # no-cache: no stored response, however young
            stale_if_error = cc.stale_if_error  # RFC 5861 §4; werkzeug gives -1 for "-1"
            return _Asks(max_age, cc.min_fresh, bool(cc.only_if_cached), cc.max_stale,
                         stale_if_error if stale_if_error is not None and stale_if_error >= 0 else None)
        if "no-cache" in environ.get("HTTP_PRAGMA", "").lower():
            return _Asks(-1, None, False)
        return None

    def _take(self, lock_key: str) -> bytes | Literal[False]:
        """Take the fill lock with a token of this request's: the token, or False when someone holds it."""
        token = new_mark()
        return token if self.store.add(lock_key, token, ttl=self.options.lock_timeout) else False

    def _drop_lock(self, lock_key: str, token: bytes) -> None:
        """Give a fill lock back at once (when the store cannot, it expires after ``lock_timeout``).

        Only while it holds ``token``: a fill that outlived ``lock_timeout`` leaves the lock the next
        leader took since.
        """
        with contextlib.suppress(StoreError):
            self.store.unlock(lock_key, token)

    def _hand_over(self, lock_key: str, token: bytes) -> None:
        """Leave the lock saying "ask the app" for a moment: the other processes' waiters then all ask at once.

        Dropped instead, each of them would take the lock in turn and wait for its app's answer before
        the next one asked: N processes, N times the app's time, for an answer none may store.  Only
        while it holds ``token``, as :meth:`_drop_lock`.
        """
        with contextlib.suppress(StoreError):
            self.store.unlock(lock_key, token, leave=(_ASK_APP, min(_ASK_APP_LIFE, self.options.lock_timeout)))

    def _who(self, environ: WSGIEnvironment) -> tuple[str | None, str | None]:
        """``(subject or None, bypass reason or None)`` for this request."""
        if self.options.honor_request_no_cache:
            header = environ.get("HTTP_CACHE_CONTROL")
            # no-store: nothing of this exchange may be stored (RFC 9111 §5.2.1.5)
            if header and "no-store" in header.lower() and parse_cache_control_header(
                    header.lower(), cls=RequestCacheControl).no_store:
                return None, "request Cache-Control"
        if "HTTP_IF_MATCH" in environ or "HTTP_IF_UNMODIFIED_SINCE" in environ:
            # Preconditions for the app, not a cache (RFC 9111 §4.3.2): a stored 200 would answer a
            # request whose condition the app fails with a 412.
            return None, "request preconditions"
        private = "HTTP_AUTHORIZATION" in environ or (
            "HTTP_COOKIE" in environ and any(n in cookies(environ) for n in self.cookie_names))
        identity = environ.get(IDENTITY)
        if not self.options.per_user:
            return None, ("credentials" if private or identity is not None else None)
        if identity is None:
            return None, ("credentials without identity" if private else None)
        return _subject_key(identity), None

    def _base_key(self, environ: WSGIEnvironment, subject: str | None, writing: bool = False) -> str:
        path = decoded_path(environ)
        qs: str = environ.get("QUERY_STRING", "")
        if not qs:
            query: list[tuple[str, str]] = []
        elif "%" in qs or "+" in qs:
            # Decoded byte for byte (latin-1): two queries that differ in bytes never share a key,
            # whatever the app later makes of invalid UTF-8.
            query = sorted(parse_qsl(qs, keep_blank_values=True, encoding="latin-1"), key=itemgetter(0))
        else:  # what parse_qsl gives when there is nothing to decode, without its cost
            query = sorted([(n, v) for n, _, v in (f.partition("=") for f in qs.split("&") if f)],
                           key=itemgetter(0))
        # A flat list has fixed positions, so its repr is unambiguous and cheap to hash.
        headers: list[str | None] = [environ.get(n) for n in self.key_environ]
        if self._forwarded >= 0 and (forwarded := headers[self._forwarded]) is not None:
            headers[self._forwarded] = _forwarded_key(forwarded)
        if writing and self._override >= 0:
            headers[self._override] = None
        parts = ["GET", environ.get("wsgi.url_scheme"), environ.get("SCRIPT_NAME", ""), path,
                 environ.get(API_VERSION), subject, *headers]
        for pair in query:
            parts += pair
        return f"{self.prefix}e:{path}#{_digest(parts)}"

    def _ahead(self, environ: WSGIEnvironment) -> ReadKey | None:
        """The read-or-lock :meth:`_lookup` will make for this GET (see ``ReadAhead``), if any.

        ``(entry, lock_timeout, lock, write mark, its lifetime)``: the mark is read (or set) in the same step.
        """
        method = environ.get("REQUEST_METHOD")
        if method != "GET" or (
                self.purge_path is not None and decoded_path(environ) == self.purge_path):
            return None
        subject, reason = self._who(environ)
        if reason is not None:
            return None
        base = self._base_key(environ, subject)
        return (base, self.options.lock_timeout, self._lock_key(base), self._uri_mark(environ, base, subject),
                self.mark_life)

    def _lock_key(self, base: str) -> str:
        """The single-flight lock of the entry ``base``."""
        return f"{self.prefix}l:{base[-_DIGEST:]}"

    def _uri_mark(self, environ: WSGIEnvironment, base: str, subject: str | None) -> str:
        """The write mark of this request's URI: the anonymous entry's, which every user's entry of it reads.

        A write to the URI sets it anew (see :meth:`_write`); an entry filled under another value than
        the one a lookup finds there is stale, whoever's it is (RFC 9111 §4.4).
        """
        if subject is None:
            return self._mark_key(base)
        found = environ.get(self._uri_key)  # the read ahead worked it out already
        if found is not None and found[0] == base:
            mark: str = found[1]
            return mark
        mark = self._mark_key(self._base_key(environ, None))
        environ[self._uri_key] = (base, mark)
        return mark

    def _mark_key(self, base: str) -> str:
        """The mark a successful write to the URI of ``base`` leaves (see :meth:`_write`): named by the
        path and digest of ``base``, so that :func:`purge` finds the marks of the paths it purges."""
        return f"{self.prefix}w:{base[len(self.prefix) + 2:]}"

    @staticmethod
    def _variant(base: str, vary: list[str], environ: WSGIEnvironment, generation: str) -> str:
        """The key of this request's variant: the header names as well as their values (RFC 9111 §4.1).

        ``generation`` is the index's: a write that drops the index (RFC 9111 §4.4)
        leaves the variants stored before it out of reach of the next index.
        """
        return base[:-_DIGEST] + _digest((base, generation, vary, [environ.get(_environ_name(h)) for h in vary]))

    def _lookup(self, environ: WSGIEnvironment, base: str, lock_key: str | None = None,
                mark: str | None = None) -> tuple[dict[str, Any] | None, bytes | Literal[False] | None]:
        """The entry for this request (fresh or stale), and whether the fill lock was taken.

        One read, two when the path has a Vary.  With ``lock_key``, a missing
        entry also takes the single-flight lock in the same round trip (its
        token, or ``False`` when someone holds it); ``None`` means no lock was tried.  A rate limiter
        outside may have made this read in its round trip (``ReadAhead``).  The
        read with ``lock_key`` also finds the URI's write mark (``mark``), as of the
        same step, for this request's save to compare with (see :meth:`_seen`); an
        entry filled under another mark than that is stale (a write since), and a miss.
        """
        locked: bytes | Literal[False] | None = None
        if lock_key is None:
            raw = self.store.get(base)
            if mark is not None:  # a HEAD: the mark as it is, none set (one read more)
                environ[self._seen_key] = (base, self.store.get(mark), mark)
        else:
            ahead, answer = read_ahead(environ, self.store, "get_or_lock", base)
            raw, token, seen = answer if ahead else self.store.get_or_lock(
                base, lock_key, self.options.lock_timeout, mark, self.mark_life)
            environ[self._seen_key] = (base, seen, mark)
            locked = (token or False) if raw is None else None
        try:
            if raw is not None and raw[:5] == _VARY_INDEX:
                index = json.loads(raw)
                vary, generation = index["v"], str(index.get("g", ""))
                if type(vary) is not list or not all(type(name) is str for name in vary):
                    return None, locked  # not written by this layer
                if self._stale_by_write(environ, base, index):
                    return None, locked
                environ[self._index_key] = (base, vary, generation)  # a fill of another variant keeps it
                try:
                    raw = self.store.get(self._variant(base, vary, environ, generation))
                except StoreWrongType:  # a value of another type at this variant's key: a miss, stored over
                    raw = None
            if raw is None:
                return None, locked
            head, _, body = raw.partition(b"\n")
            entry: dict[str, Any] = json.loads(head.decode())
            if not _well_formed(entry) or self._stale_by_write(environ, base, entry):
                return None, locked
            entry["b"] = body
            return entry, locked
        except (ValueError, KeyError, TypeError, RecursionError):  # not written by this layer: a miss
            return None, locked

    def _give_back(self, environ: WSGIEnvironment) -> None:
        """Delete the fill locks read ahead for this layer that it will not use, at once.

        A guess made before the inner layers ran can be wrong (a session whose user
        left, a token that turns out revoked): the lock it took must not hold up that
        key's real requests while this one runs.
        """
        found = environ.get(READ_AHEAD)
        if not found:
            return
        store, entries = id(self.store), f"{self.prefix}e:"
        for name in [n for n in found if n[0] == store and n[1] == "get_or_lock" and n[2].startswith(entries)]:
            answer = found.pop(name)
            if isinstance(answer, tuple) and answer[1]:
                self._drop_lock(self._lock_key(name[2]), answer[1])

    def _write(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        """A write to a URI, once it succeeds, drops that URI's entries (RFC 9111 §4.4), and those of the
        URIs of its origin its answer names in ``Location`` or ``Content-Location``.

        Every user's entry of the URI, under each API version when the versioning
        layer answers the URI per version: the URI's write mark gets a new random
        value (for :attr:`mark_life` seconds at least), so an entry stored under
        the old one is stale at its next lookup, and a fill whose lookup found the
        old one stores nothing (``Store.write_unless_marked``).  The anonymous
        entry and the writer's own are deleted as well (the others age out).  The
        marks and the deletes are one step, in one round trip.

        Twice: when the app starts its answer, and again once its answer is closed.
        An app may commit after ``start_response`` (Flask's ``teardown_request``, a
        transaction that ends in ``close()``): a GET that looked up in between found the
        first mark, read the old data, and would store it for the whole ``ttl``; the
        second mark keeps it out.
        """
        keys: list[str] = []
        uris: list[str] = []  # the anonymous keys, whose marks every user's lookup of the URI reads

        def wrapped(status: str, headers: Headers, exc_info: Any = None) -> Any:
            if status[:1] in "23" and not keys:
                identity = environ.get(IDENTITY)
                for variant in (v for uri in _named_uris(environ, headers) for v in _versions_of(uri)):
                    # The write's own key headers, bar a method override (a POST that says it is a PUT
                    # drops the entries GETs of the URI made without one).
                    uris.append(self._base_key(variant, None, writing=True))
                    if self.options.per_user and identity is not None:
                        keys.append(self._base_key(variant, _subject_key(identity), writing=True))
                keys[:0] = uris
                self._invalidate(keys, uris)
                note(environ, "cache", f"{environ.get('REQUEST_METHOD')} succeeded: entries of the URI dropped")
            return start_response(status, headers, exc_info)

        return _AfterClose(self.app(environ, wrapped), lambda: self._invalidate(keys, uris) if keys else None)

    def _invalidate(self, keys: list[str], uris: list[str]) -> None:
        """Mark the URIs of ``uris`` with a new value and delete ``keys``, in one step (see :meth:`_write`)."""
        # A value no lookup can have found before: a fill that looked up before this write
        # found the old one (or none), and its save stores nothing.
        written = new_mark()
        marks = [(self._mark_key(key), written, self.mark_life) for key in uris]
        # One step (MULTI/EXEC on Redis): no lookup finds the new mark beside an entry or a
        # Vary index the write drops. A Vary index goes too: its variants are then never read.
        try:
            self.store.write(marks, keys)
        except StoreError as exc:
            self._store_error(exc)
            # Redis out of memory (noeviction) refuses the marks' SETs and with them the whole
            # transaction (a DEL in MULTI too); a DEL alone it takes.  The marks go first: a fill
            # that looked up before this write then finds none at its save (which never matches)
            # and stores nothing, even once memory frees up; then the entries.
            with contextlib.suppress(StoreError):
                for key in [mark for mark, _, _ in marks] + keys:
                    self.store.delete(key)

    # -- answers ----------------------------------------------------------------------
    @staticmethod
    def _serve(entry: dict[str, Any], label: str, method: str, start_response: StartResponse,
               now: float, environ: WSGIEnvironment | None = None, exc_info: Any = None) -> list[bytes]:
        age = ("Age", str(max(0, int(now - entry["t"]))))
        if environ is not None and ("HTTP_IF_NONE_MATCH" in environ or "HTTP_IF_MODIFIED_SINCE" in environ) \
                and _not_modified(environ, entry):
            kept = [(n, v) for n, v in entry["h"] if n.lower() in _SENT_WITH_304]
            start_response("304 Not Modified", [*kept, age, ("X-Cache", label)], exc_info)
            return []
        headers = [(n, v) for n, v in entry["h"]]
        headers.append(age)
        headers.append(("X-Cache", label))
        start_response(entry["s"], headers, exc_info)
        return [] if method == "HEAD" else [entry["b"]]

    def _bypass(self, environ: WSGIEnvironment, start_response: StartResponse, reason: str) -> Iterable[bytes]:
        if "HTTP_CACHE_CONTROL" in environ:  # nothing stored may answer it: only-if-cached is a 504 here too
            asks = self._asks(environ)
            if asks is not None and asks.only_if_cached:
                raise _only_if_cached()
        self.context.emit("cache.bypass", reason=reason)
        note(environ, "cache", f"BYPASS ({reason})")
        return self.app(environ, _with(start_response, ("X-Cache", "BYPASS")))

    def _store_error(self, exc: StoreError) -> None:
        self.context.emit("store.error", store=self.options.store, layer="cache", error=str(exc))

    def _store_failed(self, environ: WSGIEnvironment, start_response: StartResponse,
                      exc: StoreError) -> Iterable[bytes]:
        self._store_error(exc)
        if self.options.on_store_error == "closed":
            raise refuse(503, "The response cache is unavailable.", headers=[("Retry-After", "5")])
        return self._bypass(environ, start_response, "store error")

    # -- misses -----------------------------------------------------------------------
    def _fill(self, environ: WSGIEnvironment, start_response: StartResponse, base: str,
              subject: str | None, stale: dict[str, Any] | None, locked: bytes | Literal[False] | None = None,
              asks: _Asks | None = None, found: dict[str, Any] | None = None) -> Iterable[bytes]:
        """Call the app for a miss, or wait for the fill of the same key in flight and answer from it.

        ``found`` is the entry this request's lookup found and did not take (stale, or refused by its
        ``asks``): a waiter takes only another one, which the fill it waited for stored, and only if its
        ``asks`` accept it; otherwise it asks the app itself.
        """
        lock_key = self._lock_key(base)
        waited_until = time.monotonic() + self.options.lock_timeout
        retry = False
        while True:
            with self._lock:
                flight = self._inflight.get(base)
                leader = flight is None
                if flight is None:
                    flight = self._inflight[base] = _Flight(retry)
            if leader:
                break
            if locked:  # taken while a thread of this process fills the key: give it back
                self._drop_lock(lock_key, locked)
            locked = None
            flight.wait(max(0.0, waited_until - time.monotonic()))
            hit = self._fresh(environ, base, asks, found)
            if hit is not None:
                return self._waited(environ, hit, start_response)
            if time.monotonic() >= waited_until:
                break
            # The fill we waited for failed (the app raised): maybe a passing failure, so one of us
            # asks again and the others wait for it; when that one fails too, all ask at once.
            if flight.failed and not flight.retry:
                retry = True
                continue
            # The fill we waited for stored another Vary variant: lead the fill of ours (one
            # request per variant calls the app). When it stored nothing (not cacheable, or its
            # retry failed too), ask the app at once, as the others do.
            if not self._varies(base):
                break
        fill = _Fill(self, environ, base, subject, flight if leader else None, stale)
        if leader:
            try:
                if locked is None:
                    locked = self._take(lock_key)
                deadline = time.monotonic() + self.options.lock_timeout
                # Another process fills the key: wait for its entry. When its lock goes without an
                # entry (it failed, or it was a thread of ours giving the lock back), take the lock
                # before filling, so that at most one process fills at a time.
                while not locked:
                    hit, ask_app = self._await_peer(environ, base, lock_key, deadline, asks, found)
                    if hit is not None:
                        fill.release()
                        return self._waited(environ, hit, start_response)
                    if ask_app or time.monotonic() >= deadline:
                        break  # its answer could not be stored, or waited long enough: fill without the lock
                    locked = self._take(lock_key)
                if locked:
                    fill.lock = (lock_key, locked)
            except StoreError as exc:
                self._store_error(exc)
        return self._ask(environ, start_response, fill, "GET")

    def _ask(self, environ: WSGIEnvironment, start_response: StartResponse, fill: _Fill,
             method: str) -> Iterable[bytes]:
        """Call the app for ``fill``; its stale entry answers when the app raises or answers 5xx."""
        stale = fill.stale
        # Counted once its answer is the app's: one the stale entry replaces is a stale serve, not a miss too.
        note(environ, "cache", "MISS")
        try:
            fill.began = _clock()
            result = self.app(environ, fill.start_response(start_response))
        except Exception as exc:
            answered = isinstance(exc, HTTPException) and (exc.code or 500) < 500  # a 4xx: an answer
            # Maybe a passing failure: one waiter of this process asks again, and the other processes'
            # waiters take the lock in turn.
            fill.release(failed=not answered)
            if stale is None or answered:
                self._miss()
                raise
            fill.exc_info = sys.exc_info()
            return self._serve_stale(environ, stale, start_response, method, fill.replaced())
        fill.returned = True
        if fill.swap:
            _Tee(result, fill).close()
            return self._serve_stale(environ, stale or {}, start_response, method, fill.replaced())
        self._miss()
        if fill.started and fill.plan is None and not fill.unchanged:
            return result  # not cacheable: hand the iterable over untouched (streams stay streams)
        return _Tee(result, fill)

    def _varies(self, base: str) -> bool:
        """Whether the key holds a Vary index (its entries are stored per variant)."""
        try:
            raw = self.store.get(base)
        except StoreError:
            return False
        return raw is not None and raw[:5] == _VARY_INDEX

    def _waited(self, environ: WSGIEnvironment, hit: dict[str, Any], start_response: StartResponse) -> list[bytes]:
        """A request that waited for another one's fill and is answered from it: a hit."""
        self._hit()
        note(environ, "cache", "HIT (after waiting for the fill)")
        return self._serve(hit, "HIT", "GET", start_response, _clock(), environ)

    def _serve_stale(self, environ: WSGIEnvironment, stale: dict[str, Any], start_response: StartResponse,
                     method: str, exc_info: Any = None) -> list[bytes]:
        self._stale()
        note(environ, "cache", "STALE")
        return self._serve(stale, "STALE", method, start_response, _clock(), exc_info=exc_info)

    def _fresh(self, environ: WSGIEnvironment, base: str, asks: _Asks | None = None,
               found: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """The entry a request that waited for a fill may take: fresh, and, with ``asks``, one they accept.

        One that is not ``found`` (what the request's own lookup found and did not take) was stored
        since the request came, by the fill it waited for: that counts as fetched for it (see
        :meth:`_Asks.accepts`); ``found`` itself stays refused.
        """
        try:
            entry = self._lookup(environ, base)[0]
        except StoreError:
            return None
        now = _clock()
        if entry is None or not _fresh_at(entry, now):
            return None
        if asks is None:
            return entry
        fetched = found is None or (entry["t"], entry["f"]) != (found["t"], found["f"])
        return entry if asks.accepts(entry, now, fetched) else None

    def _await_peer(self, environ: WSGIEnvironment, base: str, lock_key: str, deadline: float,
                    asks: _Asks | None = None,
                    found: dict[str, Any] | None = None) -> tuple[dict[str, Any] | None, bool]:
        """Another process fills this key: poll for its entry until its lock goes or ``deadline``.

        ``(entry or None, ask the app now)``: the second when the filler's answer could not be
        stored (see :meth:`_hand_over`), or when the lock says so as the wait begins.
        """
        if self.store.get(lock_key) == _ASK_APP:
            return None, True
        delay = 0.005
        while time.monotonic() < deadline:
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
            # The lock first: once it is gone, an entry the peer stored (in the same step as it gave
            # the lock back) is there to read; the other order can miss both.
            lock = self.store.get(lock_key)
            hit = self._fresh(environ, base, asks, found)
            if hit is not None or lock is None:
                return hit, False
            if lock == _ASK_APP:
                return None, True
        return None, False

    def _plan(self, status: str, headers: Headers, subject: str | None) -> _Plan | None:
        """Whether (and how long) a response may be stored, decided from its status and headers."""
        code = status[:3]
        if code not in self.statuses:
            return None
        length = cache_control = date = age_header = None
        expires: list[str] = []
        vary: list[str] = []
        for name, value in headers:
            lname = name.lower()
            if lname == "set-cookie":
                return None
            if lname == "cache-control":
                cache_control = value if cache_control is None else f"{cache_control}, {value}"
            elif lname == "expires":
                expires.append(value.strip())
            elif lname == "date":
                date = value
            elif lname == "age" and age_header is None:
                # A list (two lines, or two members joined): its first member (RFC 9111 §5.1), not
                # the last line's, nor nothing for the list, which both made an old answer younger.
                age_header = value.split(",", 1)[0].strip()
            elif lname == "vary":
                vary += (v.strip().lower() for v in value.split(",") if v.strip())
            elif lname == "content-length":
                length = value.strip()
            elif lname == "content-type" and value.lower().startswith("text/event-stream"):
                return None
        if length is None and code == "204":
            length = "0"  # a 204 has no body, nor may it say Content-Length (RFC 9110 §8.6): werkzeug drops it
        if length is None or not length.isdigit() or int(length) > self.options.max_body_bytes or "*" in vary:
            return None
        ttl, window = self.options.ttl, self.options.stale_if_error
        lifetime = None
        public = False
        if cache_control:  # directive names are case-insensitive (RFC 9111 §5.2)
            cc = _directives(cache_control)
            if "no-store" in cc or "no-cache" in cc or ("private" in cc and subject is None):
                return None
            public = "public" in cc
            given = {name: _delta(cc[name]) for name in ("s-maxage", "max-age") if name in cc}
            if None in given.values():
                return None  # not a number, or given twice with different values: stale at once (§4.2.1)
            lifetime = given.get("s-maxage", given.get("max-age"))
            # s-maxage implies proxy-revalidate for a shared cache (RFC 9111 §5.2.2.10): never served stale
            if not cc.keys().isdisjoint(("must-revalidate", "proxy-revalidate", "s-maxage")):
                window = 0
            elif "stale-if-error" in cc:  # RFC 5861 §3: the app lets it answer its failures that long
                window = max(window, _delta(cc["stale-if-error"]) or 0)  # not a number, or two: none
        now = _clock()
        sent = parse_date(date) if date is not None else None
        if lifetime is None and expires:
            if len(set(expires)) > 1:
                return None  # two Expires that differ: stale at once (§4.2.1)
            lifetime = _expires_in(expires[0], sent.timestamp() if sent is not None else now)
        if lifetime is None and not public and code not in _HEURISTIC:
            return None  # no freshness given, and this status's may not be guessed (RFC 9110 §15.1, RFC 9111 §4.2.2)
        ttl = min(ttl if lifetime is None else lifetime, _MAX_DELTA)  # RFC 9111 §1.2.2: at most 2^31 seconds
        # The age it has already (§4.2.3): an Age the app sent (it is a cache or a proxy itself), or the time
        # since its Date, whichever is larger.
        age = (_delta([age_header]) or 0) if age_header is not None else 0
        if sent is not None:
            age = min(max(age, int(now - sent.timestamp())), _MAX_DELTA)
        if ttl - age <= 0:
            return None
        kept = [(n, v) for n, v in headers if n.lower() not in _UNSTORED]
        if date is None:  # a cache records when it received a response without one (RFC 9110 §6.6.1): hits
            kept.append(("Date", http_date(now)))  # then say when it was made, beside their Age
        return _Plan(status, kept, int(length), ttl, window, sorted(set(vary)), age, now)

    def _seen(self, environ: WSGIEnvironment, base: str) -> tuple[str, bytes | None]:
        """The write mark of ``base``'s URI and the value this request's lookup found there (``None``: none).

        Every request that fills made that lookup (``get_or_lock``) before it called
        the app, the ones that waited on another fill first too: their save compares
        with what they found then.
        """
        found = environ.get(self._seen_key)
        if found is not None and found[0] == base:
            return found[2], found[1]
        # No lookup found a mark (it met a value of another type, or the store could not set one): the save
        # stores nothing, since it cannot tell a write from an eviction.
        return self._mark_key(base), None

    def _stale_by_write(self, environ: WSGIEnvironment, base: str, stored: dict[str, Any]) -> bool:
        """Whether an entry (or Vary index) was filled under another write mark than the one this request
        found: a write to its URI succeeded since (another user's too, with ``per_user``).

        Also when the lookup found no mark and could not set one (a Redis out of memory): a save makes
        the mark outlive what it stores, so a mark gone was deleted by a write (or evicted), and what
        was stored under it is stale.  Entries written before entries carried their mark are not.
        """
        filled = stored.get("m")
        if filled is None:
            return False
        seen = self._seen(environ, base)[1]
        return seen is None or filled != seen.decode("latin-1")

    def _save(self, environ: WSGIEnvironment, base: str, plan: _Plan, body: bytes,
              unlock: tuple[str, bytes] | None = None) -> None:
        """Store the entry (and its Vary index) and give the fill lock back (``unlock``: its key and token, as
        :meth:`_drop_lock`): one round trip.

        Nothing is stored when the URI's write mark no longer holds what this
        request's lookup found there: a write succeeded since; nor when the
        answer went stale while its body was made (as one stale on arrival).
        """
        now = _clock()
        # Age counts from when the app's own source made it: its age when its headers came, and the time since.
        born = plan.received - plan.age
        life = born + plan.ttl + plan.window - now
        if born + plan.ttl <= now:
            if unlock is not None:
                self._drop_lock(*unlock)
            return
        mark, seen = self._seen(environ, base)
        head: dict[str, Any] = {"s": plan.status, "h": plan.headers, "t": born, "f": born + plan.ttl,
                                "x": born + plan.ttl + plan.window}
        if seen is not None:
            head["m"] = seen.decode("latin-1")  # the mark it is stored under: a later one makes it stale
        raw = json.dumps(head, separators=(",", ":")).encode() + b"\n" + body
        sets: list[tuple[str, bytes, float]] = []
        index_life: float = life
        if plan.vary:
            generation, until = self._generation(environ, base, plan.vary, now)
            sets.append((self._variant(base, plan.vary, environ, generation), raw, life))
            index_life = max(life, until - now)  # as long as the longest-lived variant
            index: dict[str, Any] = {"v": plan.vary, "g": generation, "x": now + index_life}
            if seen is not None:
                index["m"] = head["m"]
            raw = json.dumps(index, separators=(",", ":")).encode()
        sets.append((base, raw, index_life))
        # One step: the sets go only if the mark still holds what the lookup found (the lock goes anyway,
        # if it still holds this fill's token: one that expired meanwhile is another leader's now).
        # - A lookup before a write found the mark as it was before it; the write put a new random value
        #   there (two writes: the later one's), so nothing is stored: the answer may predate the write.
        # - A lookup after a write found the write's mark and, the marks and deletes being one step, none
        #   of the entries or the Vary index the write dropped.  The mark is set once the write's app has
        #   answered, so this fill's app call began after that: its answer is stored, at once, and the
        #   requests that waited on the fill are answered from it.
        # - A mark that goes during the fill (expired: the fill took longer than mark_life, which
        #   _Fill.finish refuses anyway; evicted from a full store): the value the lookup found differs
        #   from the nothing left, so nothing is stored.  A lookup that found no mark set one (so a mark
        #   is never "still missing"); one that could not set it found None, which never matches.
        try:
            self.store.write_unless_marked(mark, seen, sets, unlock=unlock)
        except StoreWrongType:  # a value of another type at the mark (not written here): no mark, so it goes
            self.store.delete(mark)
            self.store.write_unless_marked(mark, seen, sets, unlock=unlock)

    def _generation(self, environ: WSGIEnvironment, base: str, vary: list[str], now: float) -> tuple[str, float]:
        """The generation a fill of a Vary variant stores under, and until when the index must live.

        The index this request found, if it is still there as found: read again
        now, because something may have dropped it meanwhile (a purge, its
        expiry), and writing it back would bring back every variant stored
        before.  Otherwise a new generation (one extra read per Vary fill).  A
        write drops the index in the same step as it sets its mark: a fill that
        found the index found the mark from before the write, and its whole save
        is kept out (``Store.write_unless_marked``), even when another fill has
        stored an index again meanwhile; a fill that found the write's mark did
        not find the index.
        """
        found = environ.get(self._index_key)
        if found is not None and found[0] == base and found[1] == vary:
            try:
                raw = self.store.get(base)
                index = json.loads(raw) if raw is not None and raw[:5] == _VARY_INDEX else None
            except (StoreError, ValueError):
                index = None
            if index is not None and index.get("v") == vary and str(index.get("g", "")) == found[2]:
                return found[2], float(index.get("x", now))
        return secrets.token_hex(4), now

    # -- admin ------------------------------------------------------------------------
    def _purge(self, environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
        environ[ROUTE] = self.purge_path  # a fixed label for metrics, as the other layers' own paths
        if environ.get("REQUEST_METHOD") not in ("POST", "DELETE"):
            raise MethodNotAllowed(["DELETE", "POST"], "The cache purge endpoint accepts POST or DELETE.")
        identity = environ.get(IDENTITY)
        if identity is None:
            raise refuse(401, "Purging the cache needs an authenticated identity.",
                         headers=[("WWW-Authenticate", "Bearer")])
        if not self.purge_roles & set(identity.roles):
            roles = ", ".join(sorted(self.purge_roles))
            raise refuse(403, f"Purging the cache needs one of the roles: {roles}.")
        pattern = dict(parse_qsl(environ.get("QUERY_STRING", ""))).get("pattern", "")
        if not pattern.startswith(("/", "*")):
            raise refuse(400, "The purge endpoint needs a pattern query parameter that starts with '/' "
                              "or '*', such as ?pattern=/api/v1/search*.")
        try:
            count = purge(self.store, pattern, self.prefix)
        except StoreError as exc:
            self._store_error(exc)
            raise refuse(503, "The response cache is unavailable.", headers=[("Retry-After", "5")]) from None
        note(environ, "cache", f"purged {count} entries matching {pattern}")
        body = json.dumps({"purged": count, "pattern": pattern}).encode()
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body))),
                                  ("Cache-Control", "no-store")])
        return [body]


def _named_uris(environ: WSGIEnvironment, headers: Headers) -> list[WSGIEnvironment]:
    """``environ``, and the same request for each other URI the write's answer names in ``Location`` or
    ``Content-Location``: of the write's own origin only (RFC 9111 §4.4), and under its ``SCRIPT_NAME``."""
    found = [environ]
    here: str | None = None
    for name, value in headers:
        if name.lower() not in ("location", "content-location"):
            continue
        if here is None:
            here = get_current_url(environ)
        try:
            origin, target = urlsplit(here), urlsplit(urljoin(here, value.strip()))
            if (target.scheme.lower(), target.hostname, target.port or _PORTS.get(target.scheme.lower())) != \
                    (origin.scheme.lower(), origin.hostname, origin.port or _PORTS.get(origin.scheme.lower())):
                continue
            # As PEP 3333 gives PATH_INFO: the bytes of the escapes and of the header's own (latin-1) text.
            path = unquote_to_bytes(target.path.encode("latin-1")).decode("latin-1")
        except ValueError:  # not a URI (a port that is not a number, a bracket left open), nor latin-1 text
            continue
        script = environ.get("SCRIPT_NAME", "").rstrip("/")
        if not path.startswith(script + "/"):
            continue  # not an URI of this app
        uri = {**environ, "PATH_INFO": path[len(script):], "QUERY_STRING": target.query}
        if all((uri["PATH_INFO"], uri["QUERY_STRING"]) != (e.get("PATH_INFO"), e.get("QUERY_STRING", ""))
               for e in found):
            found.append(uri)
    return found


_PORTS = {"http": 80, "https": 443}


def _versions_of(environ: WSGIEnvironment) -> list[WSGIEnvironment]:
    """``environ``, and for a URI the versioning layer answers per version (``Vary``), the same
    request under each other version: one URI, whose every answer a write makes stale (RFC 9111 §4.4)."""
    versions = environ.get(VERSIONS)
    version = environ.get(API_VERSION)
    if versions is None or version is None:
        return [environ]
    supported, start = versions
    path = rooted_path(environ.get("PATH_INFO", ""))
    if path[start:start + len(version)] != version:
        return [environ]  # a URI the write's answer named, without the version where the write's own has it
    tail = path[start + len(version):]
    return [environ] + [{**environ, "PATH_INFO": path[:start] + other + tail, API_VERSION: other}
                        for other in supported if other != version]


def _forwarded_key(value: str) -> str:
    """``Forwarded``'s part of the key: its ``proto`` and ``host`` parameters alone (its ``for`` names each
    client: keyed on it, every client had an entry of its own, which another's write left in place)."""
    kept = []
    for element in value.split(","):
        for pair in element.split(";"):
            key, _, found = pair.partition("=")
            name = key.strip().lower()
            if name in ("proto", "host"):
                kept.append(name + "=" + found.strip().strip('"').lower())
    return ";".join(kept)


def _not_modified(environ: WSGIEnvironment, entry: dict[str, Any]) -> bool:
    """Whether the request's If-None-Match / If-Modified-Since hold for the stored 200 (RFC 9110 §13.1)."""
    if entry["s"][:3] != "200":
        return False
    etag = last_modified = date = None
    for name, value in entry["h"]:
        lname = name.lower()
        if lname == "etag":
            etag = unquote_etag(value)[0]
        elif lname == "last-modified":
            last_modified = value
        elif lname == "date":
            date = value
    if_none_match = environ.get("HTTP_IF_NONE_MATCH")
    if if_none_match is not None:  # it decides alone when present (§13.2.2), compared weakly (§13.1.2)
        tags = parse_etags(if_none_match)
        return tags.star_tag or (etag is not None and tags.contains_weak(etag))
    asked = environ.get("HTTP_IF_MODIFIED_SINCE", "")
    # One date alone (RFC 9110 §13.1.3): a list of them, two fields joined by the server, is ignored (parse_date
    # would take the first). A date's own comma is the one after its weekday.
    since = parse_date(asked) if "," not in _WEEKDAY.sub("", asked, count=1) else None
    if since is None:
        return False
    modified = parse_date(last_modified) if last_modified is not None else None
    if modified is not None:
        return modified.timestamp() <= since.timestamp()
    # Without a Last-Modified, its Date (RFC 9111 §4.3.2), or the second it was made in, and strictly
    # before the client's copy: a date says a second, and a copy of the entry's own second may be an older
    # answer of that second (a write and the refill after it), which "not modified" would keep for the
    # new entry's whole life.  Send Last-Modified or an ETag for those 304s.
    dated = parse_date(date) if date is not None else None
    when = dated.timestamp() if dated is not None else math.floor(entry["t"])
    return when < since.timestamp()


_WEEKDAY = re.compile(r"^\s*[A-Za-z]+,")


def _expires_in(expires: str, origin: float) -> int:
    """Seconds of freshness an ``Expires`` gives from ``origin``, the response's Date or now (RFC 9111 §4.2.1).

    An invalid date, ``0`` say, is in the past.
    """
    at = parse_date(expires)
    return 0 if at is None else int(at.timestamp() - origin)


def _only_if_cached() -> HTTPException:
    """The answer to ``only-if-cached`` when nothing stored may be used (RFC 9111 §5.2.1.7)."""
    return refuse(504, "Gateway Timeout: only-if-cached, and no stored response fits the request.")


def _with(start_response: StartResponse, header: tuple[str, str]) -> StartResponse:
    def wrapped(status: str, headers: Headers, exc_info: Any = None) -> Any:
        return start_response(status, [*headers, header], exc_info)

    return wrapped
