"""The cache layer: what is stored, what is keyed, single-flight, streams, stale, purge, store failure."""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, cast

import pytest
import redis
from pydantic import ValidationError
from webtest import TestApp
from werkzeug.exceptions import HTTPException
from werkzeug.http import http_date, parse_date
from werkzeug.test import Client

import middleware.cache as cache_module
from middleware.base import API_VERSION, IDENTITY, SESSION_BOUND, Context, Identity, refuse
from middleware.cache import CacheMiddleware, purge
from middleware.errors import ErrorsMiddleware
from stores import Store, store_from_url
from stores.memory import MemoryStore

if TYPE_CHECKING:
    from _typeshed.wsgi import WSGIApplication

T0 = 1_700_000_000.0


class Origin:
    """A counting inner app that echoes what it saw; each test sets its answer."""

    def __init__(self) -> None:
        self.calls = 0
        self.status = "200 OK"
        self.headers: list[tuple[str, str]] = [("Content-Type", "application/json")]
        self.length = True
        self.body: bytes | None = None  # instead of the echo
        self.delay = 0.0
        self.fail: BaseException | None = None
        self.lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        with self.lock:
            self.calls += 1
            n = self.calls
        if self.delay:
            time.sleep(self.delay)
        if self.fail is not None:
            raise self.fail
        identity = environ.get(IDENTITY)
        body = json.dumps({
            "n": n, "path": environ["PATH_INFO"], "query": environ.get("QUERY_STRING", ""),
            "user": identity.subject if identity else None, "version": environ.get(API_VERSION),
            "host": environ.get("HTTP_HOST"), "xfh": environ.get("HTTP_X_FORWARDED_HOST"),
            "proto": environ.get("HTTP_X_FORWARDED_PROTO"), "lang": environ.get("HTTP_ACCEPT_LANGUAGE"),
        }).encode() if self.body is None else self.body
        headers = list(self.headers)
        if self.length:
            headers.append(("Content-Length", str(len(body))))
        start_response(self.status, headers)
        return [body]


def fake_auth(app: WSGIApplication) -> Any:
    """Stand-in for the auth layer: ``X-Test-User: alice:admin,ops`` becomes the identity."""

    def wrapped(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        user = environ.get("HTTP_X_TEST_USER")
        if user:
            name, _, roles = user.partition(":")
            environ[IDENTITY] = Identity(name, frozenset(r for r in roles.split(",") if r))
        if "HTTP_X_TEST_VERSION" in environ:
            environ[API_VERSION] = environ["HTTP_X_TEST_VERSION"]
        return app(environ, start_response)

    return wrapped


class Clock:
    """A wall clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


class Stack:
    """errors -> fake auth -> cache -> origin, with the events the layer emitted."""

    def __init__(self, store: Store, origin: Origin, **options: Any) -> None:
        self.store, self.origin = store, origin
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.context = Context(stores={"shared": store})
        self.context.listeners.append(lambda event, fields: self.events.append((event, fields)))
        self.layer = CacheMiddleware(origin, CacheMiddleware.Options(**options), self.context)
        self.wsgi = ErrorsMiddleware(fake_auth(self.layer), ErrorsMiddleware.Options(), self.context)
        self.web = TestApp(self.wsgi)

    def get(self, url: str = "/api/v1/search?q=x", **kw: Any) -> Any:
        return self.web.get(url, **kw)

    def names(self) -> list[str]:
        return [e for e, _ in self.events]


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    """A fresh store of each backend."""
    s = store_from_url(store_url)
    yield s
    s.close()


@pytest.fixture
def origin() -> Origin:
    """The counting inner app."""
    return Origin()


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    """The cache's wall clock, frozen at T0 until the test moves it."""
    c = Clock()
    monkeypatch.setattr(cache_module, "_clock", c)
    return c


@pytest.fixture
def make(store: Store, origin: Origin, clock: Clock) -> Callable[..., Stack]:
    """Build a Stack over the test's store and origin from keyword options."""
    return lambda **options: Stack(store, origin, **options)


# -- what is stored ---------------------------------------------------------------------

@pytest.mark.parametrize(("options", "response_headers", "request_headers", "expected"), [
    pytest.param({}, [], {}, ("MISS", "HIT", 1), id="plain GET is stored"),
    pytest.param({}, [("Set-Cookie", "a=b")], {}, ("MISS", "MISS", 2), id="Set-Cookie never stored"),
    pytest.param({}, [("Cache-Control", "private")], {}, ("MISS", "MISS", 2), id="private never stored"),
    pytest.param({}, [("Cache-Control", "no-store")], {}, ("MISS", "MISS", 2), id="no-store never stored"),
    pytest.param({}, [("Cache-Control", "no-cache")], {}, ("MISS", "MISS", 2), id="no-cache never stored"),
    pytest.param({}, [("Cache-Control", "max-age=0")], {}, ("MISS", "MISS", 2), id="max-age=0 never stored"),
    pytest.param({}, [("Cache-Control", "public, s-maxage=0, max-age=60")], {}, ("MISS", "MISS", 2),
                 id="s-maxage=0 wins over max-age"),
    pytest.param({}, [("Cache-Control", "Private")], {}, ("MISS", "MISS", 2), id="directive names ignore case"),
    pytest.param({}, [("Cache-Control", "No-Store")], {}, ("MISS", "MISS", 2), id="No-Store never stored"),
    pytest.param({}, [("Cache-Control", "Max-Age=0")], {}, ("MISS", "MISS", 2), id="Max-Age=0 never stored"),
    pytest.param({}, [("Expires", "0")], {}, ("MISS", "MISS", 2), id="Expires 0 is in the past"),
    pytest.param({}, [("Expires", "Thu, 01 Jan 1970 00:00:00 GMT")], {}, ("MISS", "MISS", 2),
                 id="past Expires never stored"),
    pytest.param({}, [("Expires", "Tue, 14 Nov 2023 22:14:20 GMT")], {}, ("MISS", "HIT", 1),
                 id="future Expires stored"),
    pytest.param({}, [("Expires", "Thu, 01 Jan 1970 00:00:00 GMT"), ("Cache-Control", "max-age=60")], {},
                 ("MISS", "HIT", 1), id="max-age wins over Expires"),
    pytest.param({}, [("Vary", "*")], {}, ("MISS", "MISS", 2), id="Vary star never stored"),
    pytest.param({}, [("Cache-Control", "public, max-age=60")], {}, ("MISS", "HIT", 1), id="public max-age"),
    pytest.param({"max_body_bytes": 10}, [], {}, ("MISS", "MISS", 2), id="body over max_body_bytes"),
    pytest.param({}, [], {"Authorization": "Bearer t"}, ("BYPASS", "BYPASS", 2), id="Authorization bypasses"),
    pytest.param({}, [], {"Cookie": "__Host-session=abc"}, ("BYPASS", "BYPASS", 2),
                 id="session cookie bypasses"),
    pytest.param({"cookie_names": ["sid"]}, [], {"Cookie": "sid=abc"}, ("BYPASS", "BYPASS", 2),
                 id="configured cookie name bypasses"),
    pytest.param({}, [], {"Cookie": "theme=dark"}, ("MISS", "HIT", 1), id="other cookies are not private"),
    pytest.param({}, [], {"X-Test-User": "alice"}, ("BYPASS", "BYPASS", 2),
                 id="identity without per_user bypasses"),
    pytest.param({}, [], {"Cache-Control": "no-cache"}, ("MISS", "MISS", 2), id="request no-cache refreshes"),
    pytest.param({}, [], {"Cache-Control": "no-store"}, ("BYPASS", "BYPASS", 2), id="request no-store"),
    pytest.param({}, [], {"Cache-Control": "No-Cache"}, ("MISS", "MISS", 2), id="request No-Cache"),
    pytest.param({}, [], {"Pragma": "No-Cache"}, ("MISS", "MISS", 2), id="request Pragma, any case"),
    pytest.param({}, [], {"Pragma": "no-cache"}, ("MISS", "MISS", 2), id="request Pragma no-cache"),
    pytest.param({"honor_request_no_cache": False}, [], {"Cache-Control": "no-cache"}, ("MISS", "HIT", 1),
                 id="request no-cache ignored when told"),
    pytest.param({"per_user": True}, [], {"Authorization": "Bearer t"}, ("BYPASS", "BYPASS", 2),
                 id="per_user, credentials without identity bypass"),
    pytest.param({"per_user": True}, [("Cache-Control", "private")], {}, ("MISS", "MISS", 2),
                 id="per_user, anonymous private answer not stored"),
    pytest.param({"per_user": True}, [("Cache-Control", "private")],
                 {"Authorization": "Bearer t", "X-Test-User": "alice"}, ("MISS", "HIT", 1),
                 id="per_user, private answer stored for its subject"),
])
def test_what_is_stored(make: Callable[..., Stack], origin: Origin, options: dict[str, Any],
                        response_headers: list[tuple[str, str]], request_headers: dict[str, str],
                        expected: tuple[str, str, int]) -> None:
    origin.headers += response_headers
    stack = make(**options)
    first = stack.get(headers=request_headers)
    second = stack.get(headers=request_headers)
    assert (first.headers["X-Cache"], second.headers["X-Cache"], origin.calls) == expected
    assert second.json["n"] == (1 if expected[1] == "HIT" else 2)


@pytest.mark.parametrize(("directives", "later", "expected", "after"), [
    pytest.param("no-cache", 5, "MISS", "HIT 0", id="no-cache fetches afresh and stores it"),
    pytest.param("max-age=0", 5, "MISS", "HIT 0", id="max-age=0, a browser's reload"),
    pytest.param("max-age=10", 5, "HIT", "HIT 5", id="max-age: young enough"),
    pytest.param("max-age=3", 5, "MISS", "HIT 0", id="max-age: too old"),
    pytest.param("max-age=5", 5, "HIT", "HIT 5", id="max-age: exactly as old (an age less than or equal to it)"),
    pytest.param("min-fresh=50", 5, "HIT", "HIT 5", id="min-fresh: fresh long enough"),
    pytest.param("min-fresh=55", 5, "HIT", "HIT 5", id="min-fresh: fresh exactly that long still (no less than)"),
    pytest.param("min-fresh=58", 5, "MISS", "HIT 0", id="min-fresh: not fresh long enough"),
    pytest.param("only-if-cached", 5, "HIT", "HIT 5", id="only-if-cached with an entry"),
    pytest.param("only-if-cached, max-age=3", 5, "504", "HIT 5", id="only-if-cached without one: 504"),
    pytest.param("no-store", 5, "BYPASS", "HIT 5", id="no-store: never read, never written"),
])
def test_request_directives(make: Callable[..., Stack], origin: Origin, clock: Clock, directives: str, later: int,
                            expected: str, after: str) -> None:
    """A request's Cache-Control on what it accepts (RFC 9111 §5.2.1); the entry it refreshes serves the next."""
    origin.headers.append(("Cache-Control", "max-age=60"))
    stack = make()
    stack.get()
    clock.now += later
    response = stack.get(headers={"Cache-Control": directives}, status="*")
    if expected == "504":
        assert response.status_int == 504 and origin.calls == 1
    else:
        assert response.headers["X-Cache"] == expected
        assert origin.calls == (1 if expected == "HIT" else 2)
    again = stack.get()
    assert f"{again.headers['X-Cache']} {again.headers['Age']}" == after


@pytest.mark.parametrize(("options", "headers", "ignored"), [
    pytest.param({}, {"Authorization": "Bearer t"}, "BYPASS", id="credentials"),
    pytest.param({}, {"Cookie": "__Host-session=abc"}, "BYPASS", id="a session cookie"),
    pytest.param({}, {"X-Test-User": "alice"}, "BYPASS", id="an identity without per_user"),
    pytest.param({"per_user": True}, {"Authorization": "Bearer t"}, "BYPASS",
                 id="per_user, credentials without identity"),
    pytest.param({}, {"Cache-Control": "only-if-cached, no-store"}, "HIT", id="request no-store"),
])
def test_only_if_cached_never_reaches_the_app_past_the_cache(make: Callable[..., Stack], origin: Origin,
                                                             options: dict[str, Any], headers: dict[str, str],
                                                             ignored: str) -> None:
    """A request that may not use what is stored gets the 504 of only-if-cached (RFC 9111 §5.2.1.7), not the app."""
    stack = make(**options)
    stack.get()  # an entry is there, but not for this request
    response = stack.get(headers={"Cache-Control": "only-if-cached", **headers}, status=504)
    assert response.json["error"]["message"] == "Gateway Timeout: only-if-cached, and no stored response fits " \
        "the request."
    assert origin.calls == 1
    told = make(**options, honor_request_no_cache=False)  # the request's directives are not followed
    assert told.get(headers={"Cache-Control": "only-if-cached", **headers}).headers["X-Cache"] == ignored


class UnreadableStore(MemoryStore):
    """A memory store whose reads fail."""

    def get_or_lock(self, key: str, lock_key: str, ttl: float, mark: str | None = None,
                    mark_ttl: float | None = None) -> tuple[bytes | None, bytes | None, bytes | None]:
        from stores import StoreError

        raise StoreError("connection refused")


def test_only_if_cached_when_the_store_fails(origin: Origin) -> None:
    """With ``on_store_error: open`` a failed read bypasses the cache, which only-if-cached refuses."""
    stack = Stack(UnreadableStore(), origin)
    assert stack.get(headers={"Cache-Control": "only-if-cached"}, status=504).json["error"]["code"] == 504
    assert origin.calls == 0
    assert stack.get().headers["X-Cache"] == "BYPASS"


@pytest.mark.parametrize(("status", "statuses", "headers", "expected"), [
    pytest.param("404 Not Found", [200], [], "MISS", id="404 not cacheable by default"),
    pytest.param("404 Not Found", [200, 404], [], "HIT", id="404 cacheable when listed"),
    pytest.param("203 Non-Authoritative Information", [200], [], "MISS", id="203 not listed"),
    pytest.param("410 Gone", [410], [], "HIT", id="410: heuristically cacheable"),
    pytest.param("301 Moved Permanently", [301], [], "HIT", id="301: heuristically cacheable"),
    pytest.param("302 Found", [200, 302], [], "MISS", id="302 without freshness: never ttl"),
    pytest.param("307 Temporary Redirect", [307], [], "MISS", id="307 without freshness"),
    pytest.param("403 Forbidden", [403], [], "MISS", id="403 without freshness"),
    pytest.param("400 Bad Request", [400], [("Cache-Control", "no-transform")], "MISS",
                 id="400 with directives but no freshness"),
    pytest.param("302 Found", [302], [("Cache-Control", "max-age=60")], "HIT", id="302 with max-age"),
    pytest.param("307 Temporary Redirect", [307], [("Cache-Control", "s-maxage=60")], "HIT", id="307 with s-maxage"),
    pytest.param("302 Found", [302], [("Expires", "Tue, 14 Nov 2023 22:14:20 GMT")], "HIT", id="302 with Expires"),
    pytest.param("302 Found", [302], [("Cache-Control", "public")], "HIT", id="302 marked public: ttl"),
    pytest.param("302 Found", [302], [("Cache-Control", "max-age=0")], "MISS", id="302 with max-age=0"),
])
def test_statuses(make: Callable[..., Stack], origin: Origin, status: str, statuses: list[int],
                  headers: list[tuple[str, str]], expected: str) -> None:
    """Only heuristically cacheable statuses get ``ttl``; others need freshness of their own (RFC 9110 §15.1)."""
    origin.status = status
    origin.headers += headers
    stack = make(statuses=statuses)
    stack.get(status="*")
    assert stack.get(status="*").headers["X-Cache"] == expected


@pytest.mark.parametrize(("body", "expected"), [
    (b"", ("MISS", "HIT", 1)),           # as werkzeug sends it: no Content-Length (RFC 9110 §8.6), no body
    (b"oops", ("MISS", "MISS", 2)),      # a 204 with a body is the app's mistake: not replayed
])
def test_a_listed_204_is_stored_without_content_length(make: Callable[..., Stack], origin: Origin,
                                                       body: bytes, expected: tuple[str, str, int]) -> None:
    origin.status, origin.length, origin.body, origin.headers = "204 No Content", False, body, []
    stack = make(statuses=[200, 204])
    first, second = stack.get(status=204), stack.get(status=204)
    assert (first.headers["X-Cache"], second.headers["X-Cache"], origin.calls) == expected
    assert second.body == body  # a hit replays no body; a miss passes what the app sent
    if second.headers["X-Cache"] == "HIT":
        assert "Content-Length" not in second.headers


@pytest.mark.parametrize("streamed", [
    pytest.param(False, id="asked for before the answer starts"),
    pytest.param(True, id="asked for while the body streams"),
])
def test_a_response_bound_to_its_session_is_not_stored(store: Store, origin: Origin, streamed: bool) -> None:
    """A page with a CSRF token (bound to the session id): per_user would hand it to the user's other
    sessions, whose writes the token then fails.  Also when a generator body asks for it after the headers."""
    def page(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if not streamed:
            environ[SESSION_BOUND] = True  # what the csrf layer's token does when the page asks for it
            return origin(environ, start_response)
        result = origin(environ, start_response)

        def body() -> Iterator[bytes]:
            environ[SESSION_BOUND] = True
            yield from result

        return body()

    stack = Stack(store, page, per_user=True)  # type: ignore[arg-type]
    headers = {"X-Test-User": "alice:user"}
    assert [stack.get(headers=headers).headers["X-Cache"] for _ in range(2)] == ["MISS", "MISS"]
    assert origin.calls == 2


def test_no_content_length_is_not_stored(make: Callable[..., Stack], origin: Origin) -> None:
    origin.length = False
    stack = make()
    stack.get()
    assert stack.get().headers["X-Cache"] == "MISS"
    assert origin.calls == 2


@pytest.mark.parametrize(("step", "expected"), [
    (-1.5, ("MISS", "HIT", 1)),      # another process's clock a moment behind: still the entry it is
    (-3600.0, ("MISS", "MISS", 2)),  # the clock stepped back an hour: its 60 s are not 60 s from now
])
def test_an_entry_born_ahead_of_the_clock_is_not_fresh(make: Callable[..., Stack], origin: Origin, clock: Clock,
                                                        step: float, expected: tuple[str, str, int]) -> None:
    stack = make(ttl=60)
    first = stack.get().headers["X-Cache"]
    clock.now += step
    second = stack.get()
    assert (first, second.headers["X-Cache"], origin.calls) == expected
    assert stack.get().headers["X-Cache"] == "HIT"  # refilled (or kept): served from the cache again


def test_hit_never_enters_the_app_and_replays_the_answer(make: Callable[..., Stack], origin: Origin) -> None:
    origin.headers.append(("X-Custom", "kept"))
    stack = make()
    first = stack.get()
    second = stack.get()
    assert origin.calls == 1
    assert second.body == first.body
    assert second.headers["X-Custom"] == "kept"
    assert second.headers["Content-Type"] == "application/json"
    assert second.headers["Age"] == "0"
    assert "Age" not in first.headers
    assert stack.names() == ["cache.miss", "cache.hit"]


def count_reads(store: Store, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record the key of every store read (``get`` or ``get_or_lock``), one entry per call from the layer.

    Not the write marks a save checks: on Redis that check is part of the save's script, and an
    in-process store, which has no round trips to save, reads the mark apart.
    """
    reads: list[str] = []
    depth = [0]

    def counting(name: str) -> Callable[..., Any]:
        real = getattr(store, name)

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            if depth[0] == 0 and not args[0].startswith("wsgistack:cache:w:"):
                reads.append(args[0])
            depth[0] += 1
            try:
                return real(*args, **kwargs)
            finally:
                depth[0] -= 1

        return wrapped

    monkeypatch.setattr(store, "get", counting("get"))
    monkeypatch.setattr(store, "get_or_lock", counting("get_or_lock"))
    return reads


@pytest.mark.parametrize(("age", "expected"), [("5", "5"), ("0", "0"), ("soon", "0")])
def test_a_hit_carries_its_own_x_cache_and_age_only(make: Callable[..., Stack], origin: Origin, age: str,
                                                    expected: str) -> None:
    """An app behind another cache sends X-Cache and Age of its own: a hit replays neither beside the layer's,
    and counts its Age from the app's (one that is not a number counts as none)."""
    origin.headers += [("X-Cache", "HIT from upstream"), ("Age", age)]
    stack = make()
    stack.get()
    hit = stack.get()
    assert (hit.headers.getall("X-Cache"), hit.headers.getall("Age"), origin.calls) == (["HIT"], [expected], 1)


def test_hit_is_one_store_read(make: Callable[..., Stack], store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    stack = make()
    stack.get()
    reads = count_reads(store, monkeypatch)
    assert stack.get().headers["X-Cache"] == "HIT"
    assert len(reads) == 1


def test_other_methods_pass_through(make: Callable[..., Stack], origin: Origin) -> None:
    stack = make()
    for _ in range(2):
        response = stack.web.post("/api/v1/search?q=x")
        assert "X-Cache" not in response.headers
    assert origin.calls == 2
    assert stack.events == []


# -- the session layer outside ------------------------------------------------------------

def _session_app(action: str) -> Callable[..., Iterable[bytes]]:
    """An app that uses the session as ``action`` says and puts what it holds in the body."""
    from middleware.base import SESSION

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        session = environ[SESSION]
        if action == "write":  # say a CSRF token, or the data of a form the client sent
            session["token"] = environ.get("HTTP_X_SECRET", "")
        elif action == "login":
            session["user"] = "alice"
        elif action == "destroy":
            session.destroy()
        body = json.dumps({"held": dict(session)}).encode()
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]

    return app


@pytest.mark.parametrize(("action", "options", "cookie", "first", "second"), [
    pytest.param("read", {}, False, "MISS", "HIT", id="reading an empty new session is not personal"),
    pytest.param("write", {}, False, "MISS", "MISS", id="a new session the app wrote is never stored"),
    pytest.param("write", {"per_user": True}, False, "MISS", "MISS",
                 id="per user too: the cookie and the body belong to one client"),
    pytest.param("destroy", {"per_user": True}, True, "MISS", "MISS", id="a logout is never stored"),
    pytest.param("read", {"cookie_names": []}, True, "MISS", "MISS",
                 id="a stored session read without per_user is never stored"),
    pytest.param("read", {"cookie_names": [], "per_user": True}, True, "MISS", "HIT",
                 id="a stored session read is stored for its user"),
])
def test_what_the_session_makes_personal_is_not_shared(
        store: Store, clock: Clock, action: str, options: dict[str, Any], cookie: bool, first: str,
        second: str) -> None:
    """The session layer outside marks a response private only after the cache decided: the cache asks it."""
    from middleware.session import SessionMiddleware

    context = Context(stores={"shared": store})
    web = TestApp(ErrorsMiddleware(SessionMiddleware(fake_auth(CacheMiddleware(
        _session_app(action), CacheMiddleware.Options(**options), context)),
        SessionMiddleware.Options(secret_key="k" * 40, cookie_name="sid", cookie_secure=False), context),
        ErrorsMiddleware.Options(), context))
    headers = {"X-Test-User": "alice"} if options.get("per_user") else {}
    if cookie:
        login = TestApp(SessionMiddleware(_session_app("login"), SessionMiddleware.Options(
            secret_key="k" * 40, cookie_name="sid", cookie_secure=False), context)).get("/")
        headers["Cookie"] = login.headers["Set-Cookie"].split(";", 1)[0]
    one = web.get("/api/v1/search?q=x", headers={**headers, "X-Secret": "alice's"})
    web.reset()  # another client: no cookie from the first answer
    two = web.get("/api/v1/search?q=x", headers={**headers, "X-Secret": "bob's"})
    assert (one.headers["X-Cache"], two.headers["X-Cache"]) == (first, second)
    if action == "write":
        assert two.json == {"held": {"token": "bob's"}}  # never the first client's
        assert "Set-Cookie" in two.headers


# -- HEAD ------------------------------------------------------------------------------

def test_head_is_served_from_the_get_entry(make: Callable[..., Stack], origin: Origin) -> None:
    stack = make()
    get = stack.get()
    head = stack.web.head("/api/v1/search?q=x")
    assert head.headers["X-Cache"] == "HIT"
    assert head.body == b""
    assert head.headers["Content-Length"] == get.headers["Content-Length"]
    assert origin.calls == 1


def test_head_miss_asks_the_app_and_stores_nothing(make: Callable[..., Stack], origin: Origin) -> None:
    stack = make()
    assert stack.web.head("/api/v1/search?q=x").headers["X-Cache"] == "MISS"
    assert stack.get().headers["X-Cache"] == "MISS"
    assert origin.calls == 2


# -- the key -----------------------------------------------------------------------------

@pytest.mark.parametrize(("first", "second", "shared"), [
    pytest.param("/s?a=1&b=2", "/s?b=2&a=1", True, id="query order of names ignored"),
    pytest.param("/s?a=1&a=2", "/s?a=2&a=1", False, id="order of repeated values kept"),
    pytest.param("/s?q=a+b", "/s?q=a%20b", True, id="query decoded before keying"),
    pytest.param("/s?q=caf%E9", "/s?q=caf%EA", False, id="invalid UTF-8 escapes keyed byte for byte"),
    pytest.param("/s?q=caf%C3%A9", "/s?q=caf%c3%a9", True, id="escape case ignored"),
    pytest.param("/s?q=", "/s?q", True, id="blank values kept"),
    pytest.param("/s?q=1", "/s?q=2", False, id="query values keyed"),
    pytest.param("/s/%7Euser", "/s/~user", True, id="path percent-decoded"),
    pytest.param("/s//x", "/s/x", False, id="slashes not collapsed"),
    pytest.param("/s/x/", "/s/x", False, id="trailing slash keyed"),
    pytest.param("/S", "/s", False, id="path case keyed"),
])
def test_key_normalisation(make: Callable[..., Stack], origin: Origin, first: str, second: str,
                           shared: bool) -> None:
    stack = make()
    stack.get(first)
    assert stack.get(second).headers["X-Cache"] == ("HIT" if shared else "MISS")


def test_api_version_is_keyed(make: Callable[..., Stack], origin: Origin) -> None:
    stack = make()
    v1 = stack.get("/api/search", headers={"X-Test-Version": "v1"})
    v2 = stack.get("/api/search", headers={"X-Test-Version": "v2"})
    again = stack.get("/api/search", headers={"X-Test-Version": "v1"})
    assert (v1.json["version"], v2.json["version"]) == ("v1", "v2")
    assert v2.headers["X-Cache"] == "MISS"
    assert again.headers["X-Cache"] == "HIT"
    assert again.json["version"] == "v1"


@pytest.mark.parametrize(("header", "value", "field"), [
    pytest.param("X-Forwarded-Host", "evil.example", "xfh", id="X-Forwarded-Host"),
    pytest.param("X-Forwarded-Proto", "http", "proto", id="X-Forwarded-Proto"),
    pytest.param("Host", "evil.example", "host", id="Host"),
])
def test_unkeyed_headers_cannot_poison(make: Callable[..., Stack], origin: Origin, header: str, value: str,
                                       field: str) -> None:
    stack = make()
    poisoned = stack.get(headers={header: value})
    assert poisoned.json[field] == value
    clean = stack.get()
    assert clean.headers["X-Cache"] == "MISS"
    assert clean.json[field] != value
    assert stack.get(headers={header: value}).headers["X-Cache"] == "HIT"


@pytest.mark.parametrize("header", ["X-Original-URL", "X-Rewrite-URL", "X-HTTP-Method-Override", "Forwarded"])
def test_routing_override_headers_are_keyed(make: Callable[..., Stack], header: str) -> None:
    stack = make()
    stack.get(headers={header: "/admin"})
    assert stack.get().headers["X-Cache"] == "MISS"


def test_vary_keys_on_the_named_request_headers(make: Callable[..., Stack], origin: Origin,
                                                 store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    origin.headers.append(("Vary", "Accept-Language"))
    stack = make()
    en = stack.get(headers={"Accept-Language": "en"})
    fr = stack.get(headers={"Accept-Language": "fr"})
    assert (en.headers["X-Cache"], fr.headers["X-Cache"]) == ("MISS", "MISS")
    reads = count_reads(store, monkeypatch)
    en2 = stack.get(headers={"Accept-Language": "en"})
    fr2 = stack.get(headers={"Accept-Language": "fr"})
    none = stack.get()
    assert (en2.headers["X-Cache"], en2.json["lang"]) == ("HIT", "en")
    assert (fr2.headers["X-Cache"], fr2.json["lang"]) == ("HIT", "fr")
    assert (none.headers["X-Cache"], none.json["lang"]) == ("MISS", None)
    assert en2.headers["Vary"] == "Accept-Language"
    # A Vary path costs two reads per lookup, and its fill reads the index once more before it writes
    # (the miss of the variant without Accept-Language).
    assert len(reads) == 7
    assert origin.calls == 3


def test_a_variant_matches_on_the_headers_its_own_response_named(store: Store, clock: Clock) -> None:
    """Vary names which request headers select a response; another Vary list is another variant (RFC 9111 §4.1)."""
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        tenant = environ.get("HTTP_X_TENANT")
        body = json.dumps({"lang": environ.get("HTTP_ACCEPT_LANGUAGE"), "tenant": tenant}).encode()
        start_response("200 OK", [("Content-Type", "application/json"),
                                  ("Vary", "X-Tenant" if tenant else "Accept-Language"),
                                  ("Content-Length", str(len(body)))])
        return [body]

    web = TestApp(CacheMiddleware(app, CacheMiddleware.Options(), Context(stores={"shared": store})))
    web.get("/s", headers={"Accept-Language": "fr"})
    web.get("/s", headers={"X-Tenant": "acme"})  # the index now names X-Tenant
    other = web.get("/s", headers={"X-Tenant": "fr", "Accept-Language": "de"})
    # The value "fr" of X-Tenant is not the value "fr" of Accept-Language.
    assert (other.headers["X-Cache"], other.json) == ("MISS", {"lang": "de", "tenant": "fr"})


def test_private_answers_never_reach_another_user(make: Callable[..., Stack], origin: Origin) -> None:
    origin.headers.append(("Cache-Control", "private, max-age=60"))
    stack = make(per_user=True)
    alice = {"Authorization": "Bearer a", "X-Test-User": "alice"}
    bob = {"Authorization": "Bearer b", "X-Test-User": "bob"}
    assert stack.get(headers=alice).json["user"] == "alice"
    assert stack.get(headers=alice).headers["X-Cache"] == "HIT"
    as_bob = stack.get(headers=bob)
    assert (as_bob.headers["X-Cache"], as_bob.json["user"]) == ("MISS", "bob")
    anonymous = stack.get()
    assert (anonymous.headers["X-Cache"], anonymous.json["user"]) == ("MISS", None)


def test_per_user_entries_are_per_role_set_too(make: Callable[..., Stack], origin: Origin) -> None:
    """A down-scoped token (or a user whose admin role was taken away) never gets what admin got."""
    stack = make(per_user=True)
    admin = {"Authorization": "Bearer a", "X-Test-User": "alice:admin,user"}
    assert stack.get(headers=admin).headers["X-Cache"] == "MISS"
    assert stack.get(headers={**admin, "X-Test-User": "alice:user,admin"}).headers["X-Cache"] == "HIT"
    assert stack.get(headers={**admin, "X-Test-User": "alice:user"}).headers["X-Cache"] == "MISS"
    assert stack.get(headers={**admin, "X-Test-User": "alice"}).headers["X-Cache"] == "MISS"
    assert origin.calls == 3
    # A subject that spells another's subject and roles (another issuer's may hold any character).
    spelled = stack.get(headers={**admin, "X-Test-User": "alice\nadmin,user"})
    assert (spelled.headers["X-Cache"], origin.calls) == ("MISS", 4)


def test_private_answers_not_shared_without_per_user(make: Callable[..., Stack], origin: Origin) -> None:
    stack = make()
    alice = stack.get(headers={"Authorization": "Bearer a", "X-Test-User": "alice"})
    assert (alice.headers["X-Cache"], alice.json["user"]) == ("BYPASS", "alice")
    anonymous = stack.get()
    assert (anonymous.headers["X-Cache"], anonymous.json["user"]) == ("MISS", None)


# -- freshness and Age -----------------------------------------------------------------------

@pytest.mark.parametrize(("options", "cache_control", "age", "later", "expected"), [
    pytest.param({"ttl": 30}, None, 0, 29, "HIT", id="ttl fallback, fresh"),
    pytest.param({"ttl": 30}, None, 0, 31, "MISS", id="ttl fallback, expired"),
    pytest.param({"ttl": 300}, "max-age=10", 0, 9, "HIT", id="max-age, fresh"),
    pytest.param({"ttl": 300}, "max-age=10", 0, 11, "MISS", id="max-age beats ttl"),
    pytest.param({"ttl": 300}, "max-age=100, s-maxage=5", 0, 6, "MISS", id="s-maxage beats max-age"),
    pytest.param({"ttl": 5}, "s-maxage=100", 0, 50, "HIT", id="s-maxage beats ttl"),
    pytest.param({}, "max-age=99999999999999999999", 0, 10**9, "HIT", id="a huge max-age is 2^31 seconds"),
    pytest.param({}, "max-age=60", 50, 0, "HIT", id="the app's Age counts: fresh"),
    pytest.param({}, "max-age=60", 50, 11, "MISS", id="the app's Age counts: stale"),
    pytest.param({}, "max-age=60", 60, 0, "MISS", id="older than its lifetime: not stored"),
])
def test_freshness(make: Callable[..., Stack], origin: Origin, clock: Clock, options: dict[str, Any],
                   cache_control: str | None, age: int, later: int, expected: str) -> None:
    """Freshness from the response's headers, and Age counted from the app's own (RFC 9111 §4.2)."""
    if cache_control:
        origin.headers.append(("Cache-Control", cache_control))
    if age:
        origin.headers.append(("Age", str(age)))
    stack = make(**options)
    stack.get()
    clock.now += later
    response = stack.get()
    assert response.headers["X-Cache"] == expected
    if expected == "HIT":
        assert response.headers["Age"] == str(later + age)


@pytest.mark.parametrize(("dated", "expected"), [
    pytest.param(None, http_date(T0), id="none given: the time it was received"),
    pytest.param(http_date(T0 - 3), http_date(T0 - 3), id="the app's own is kept"),
])
def test_a_hit_says_when_its_answer_was_made(make: Callable[..., Stack], origin: Origin, clock: Clock,
                                              dated: str | None, expected: str) -> None:
    """A response stored without Date gets the time the cache received it (RFC 9110 §6.6.1), so that a
    hit's Date and Age agree instead of the server stamping the time of the hit."""
    origin.headers.append(("Cache-Control", "max-age=60"))
    if dated is not None:
        origin.headers.append(("Date", dated))
    stack = make()
    stack.get()
    clock.now += 20
    hit = stack.get()
    assert (hit.headers["X-Cache"], hit.headers.getall("Date")) == ("HIT", [expected])


def test_an_answer_older_than_its_lifetime_is_not_stored(make: Callable[..., Stack], origin: Origin) -> None:
    origin.headers += [("Cache-Control", "max-age=60"), ("Age", "60")]
    stack = make()
    assert stack.get().headers["X-Cache"] == "MISS"
    assert [key for key in stack.store.scan("") if ":e:" in key] == []  # not even stored stale


class SlowBody(Origin):
    """An origin whose body takes ``took`` seconds of the test's clock after its headers."""

    def __init__(self, clock: Clock, took: float, max_age: int = 60) -> None:
        super().__init__()
        self.clock, self.took, self.max_age = clock, took, max_age

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "4"),
                                  ("Cache-Control", f"max-age={self.max_age}")])

        def body() -> Iterator[bytes]:
            yield b"ab"
            self.clock.now += self.took
            yield b"cd"

        return body()


@pytest.mark.parametrize(("max_age", "took", "later", "expected"), [
    pytest.param(60, 30, 0, "HIT 30", id="its age counts from its headers"),
    pytest.param(60, 30, 29, "HIT 59", id="fresh for what is left"),
    pytest.param(60, 30, 31, "MISS", id="stale 60 s after its headers, not 60 s after its body"),
    pytest.param(60, 59, 0, "HIT 59", id="a second left"),
    pytest.param(10, 15, 0, "MISS", id="stale before its body ended: not stored"),
])
def test_an_entry_is_as_old_as_its_answer_not_its_body(store: Store, clock: Clock, max_age: int, took: float,
                                                       later: int, expected: str) -> None:
    """A response's age counts from when it was received (RFC 9111 §4.2.3): its headers, not the end of a
    body the app took a while to make; its Date says so, and the hit's Age agrees with it."""
    stack = Stack(store, SlowBody(clock, took, max_age))
    stack.get("/x")
    if max_age < took:
        assert [key for key in store.scan("") if ":e:" in key or ":l:" in key] == []  # nor its lock left
    clock.now += later
    response = stack.get("/x")
    label = response.headers["X-Cache"]
    assert (f"{label} {response.headers['Age']}" if label == "HIT" else label) == expected
    if label == "HIT":
        dated = parse_date(response.headers["Date"])
        assert dated is not None and dated.timestamp() + int(response.headers["Age"]) == int(clock.now)


MAX_AGE_300 = ("Cache-Control", "max-age=300")


def sent(seconds: float) -> tuple[str, str]:
    """A ``Date`` header ``seconds`` from T0 (negative: in the past)."""
    return "Date", http_date(T0 + seconds)


@pytest.mark.parametrize(("headers", "later", "expected"), [
    pytest.param([("Cache-Control", "max-age=60"), sent(-100)], 0, "MISS", id="a Date older than max-age: stale"),
    pytest.param([MAX_AGE_300, sent(-100)], 0, "HIT 100", id="the age counts from the Date"),
    pytest.param([MAX_AGE_300, sent(-100)], 199, "HIT 299", id="from the Date: fresh"),
    pytest.param([MAX_AGE_300, sent(-100)], 201, "MISS", id="from the Date: stale"),
    pytest.param([sent(-100)], 0, "HIT 100", id="ttl counts from the Date too"),
    pytest.param([MAX_AGE_300, sent(-100), ("Age", "150")], 0, "HIT 150", id="an Age older than the Date"),
    pytest.param([MAX_AGE_300, sent(-100), ("Age", "50")], 0, "HIT 100", id="a Date older than the Age"),
    pytest.param([MAX_AGE_300, ("Age", "100, 10")], 0, "HIT 100", id="an Age list: its first member"),
    pytest.param([MAX_AGE_300, ("Age", "100"), ("Age", "10")], 0, "HIT 100", id="two Age lines: the first"),
    pytest.param([MAX_AGE_300, ("Age", "soon, 10")], 0, "HIT 0", id="an Age list whose first member is invalid"),
    pytest.param([MAX_AGE_300, sent(100)], 0, "HIT 0", id="a Date in the future: no age"),
    pytest.param([MAX_AGE_300, ("Date", "yesterday")], 0, "HIT 0", id="an invalid Date: no age"),
    pytest.param([("Expires", http_date(T0 + 60)), sent(-100)], 0, "HIT 100", id="Expires minus Date, and its age"),
    pytest.param([("Cache-Control", "max-age=abc")], 0, "MISS", id="an invalid max-age: stale, not ttl"),
    pytest.param([("Cache-Control", "max-age")], 0, "MISS", id="a max-age without a value"),
    pytest.param([("Cache-Control", "max-age=-1")], 0, "MISS", id="a negative max-age"),
    pytest.param([("Cache-Control", "max-age=60, s-maxage=1.5")], 0, "MISS", id="an invalid s-maxage"),
    pytest.param([("Cache-Control", "max-age=0"), ("Cache-Control", "max-age=600")], 0, "MISS",
                 id="max-age twice, in two lines, different"),
    pytest.param([("Cache-Control", "max-age=600, max-age=60")], 0, "MISS", id="max-age twice, different"),
    pytest.param([("Cache-Control", "max-age=60, Max-Age=060")], 0, "HIT 0", id="max-age twice, the same"),
    pytest.param([("Cache-Control", 'max-age="60"')], 0, "HIT 0", id="a quoted max-age"),
    pytest.param([("Expires", http_date(T0 + 60)), ("Expires", http_date(T0 + 600))], 0, "MISS",
                 id="Expires twice, different"),
])
def test_freshness_from_date_and_directives(make: Callable[..., Stack], origin: Origin, clock: Clock,
                                            headers: list[tuple[str, str]], later: int, expected: str) -> None:
    """The age includes the time since the response's Date; invalid or conflicting freshness is stale
    (RFC 9111 §4.2.1, §4.2.3)."""
    origin.headers += headers
    stack = make()
    stack.get()
    clock.now += later
    response = stack.get()
    label = response.headers["X-Cache"]
    assert (f"{label} {response.headers['Age']}" if label == "HIT" else label) == expected


LAST_MODIFIED = "Tue, 14 Nov 2023 22:00:00 GMT"
STORED = "Tue, 14 Nov 2023 22:13:20 GMT"  # T0, when the tests' clock stores a response
AFTER = "Tue, 14 Nov 2023 22:13:21 GMT"  # the second after


CONDITIONAL = [
    pytest.param([("ETag", '"abc"')], {"If-None-Match": '"abc"'}, 304, id="matching ETag"),
    pytest.param([("ETag", '"abc"')], {"If-None-Match": 'W/"abc"'}, 304, id="weak comparison"),
    pytest.param([("ETag", 'W/"abc"')], {"If-None-Match": '"x", "abc"'}, 304, id="a weak stored tag, in a list"),
    pytest.param([("ETag", '"abc"')], {"If-None-Match": '"other"'}, 200, id="another ETag"),
    pytest.param([("ETag", '"abc"')], {"If-None-Match": "*"}, 304, id="star: any current representation"),
    pytest.param([("Last-Modified", LAST_MODIFIED)], {"If-Modified-Since": LAST_MODIFIED}, 304,
                 id="not modified since"),
    pytest.param([("Last-Modified", LAST_MODIFIED)], {"If-Modified-Since": "Tue, 14 Nov 2023 21:59:59 GMT"}, 200,
                 id="modified since"),
    pytest.param([("Last-Modified", LAST_MODIFIED)], {"If-Modified-Since": "yesterday"}, 200,
                 id="an invalid date is ignored"),
    pytest.param([("Last-Modified", LAST_MODIFIED)], {"If-Modified-Since": "Tuesday, 14-Nov-23 22:00:00 GMT"}, 304,
                 id="an RFC 850 date"),
    pytest.param([("Last-Modified", LAST_MODIFIED)], {"If-Modified-Since": "Tue Nov 14 22:00:00 2023"}, 304,
                 id="an asctime date"),
    pytest.param([("Last-Modified", LAST_MODIFIED)], {"If-Modified-Since": f"{LAST_MODIFIED}, {AFTER}"}, 200,
                 id="two dates are ignored (RFC 9110 13.1.3)"),
    pytest.param([("Last-Modified", LAST_MODIFIED)],
                 {"If-Modified-Since": "Tue Nov 14 22:00:00 2023, Tue Nov 14 22:13:21 2023"}, 200,
                 id="two asctime dates are ignored"),
    pytest.param([("ETag", '"abc"'), ("Last-Modified", LAST_MODIFIED)],
                 {"If-None-Match": '"other"', "If-Modified-Since": LAST_MODIFIED}, 200,
                 id="If-None-Match decides alone"),
    pytest.param([], {"If-None-Match": '"abc"', "If-Modified-Since": LAST_MODIFIED}, 200,
                 id="no validators: the full answer"),
    pytest.param([("Date", STORED)], {"If-Modified-Since": AFTER}, 304,
                 id="no Last-Modified: the stored Date, before the client's copy (RFC 9111 4.3.2)"),
    pytest.param([("Date", STORED)], {"If-Modified-Since": STORED}, 200,
                 id="no Last-Modified: a Date of the client's copy's second cannot tell"),
    pytest.param([("Date", STORED)], {"If-Modified-Since": LAST_MODIFIED}, 200,
                 id="no Last-Modified: a Date after the client's copy"),
    pytest.param([], {"If-Modified-Since": AFTER}, 304,
                 id="no Last-Modified nor Date: stored before the client's copy, not modified since"),
    pytest.param([], {"If-Modified-Since": "Tue, 14 Nov 2023 22:13:19 GMT"}, 200,
                 id="no Last-Modified nor Date: stored after the client's copy"),
]


@pytest.mark.parametrize(("written", "since", "status"), [
    pytest.param(True, STORED, 200, id="a copy of the write's second, from before it: modified"),
    pytest.param(True, AFTER, 304, id="a copy from the second after the write"),
    pytest.param(False, AFTER, 304, id="no write: a copy from the second after the entry's"),
])
@pytest.mark.parametrize("stored_first", [True, False], ids=["on a hit", "on a miss"])
def test_without_last_modified_a_copy_of_the_entrys_own_second_is_not_taken_as_it(
        make: Callable[..., Stack], origin: Origin, clock: Clock, written: bool, since: str, status: int,
        stored_first: bool) -> None:
    """The client holds the answer of 22:13:20 (its Date, no Last-Modified); a write in that same second, and
    the refill after it, dated 22:13:20 too: a 304 to that client kept the old answer for the new entry's whole
    life (7.7 % of such revalidations in a concurrent run). A second-granular date cannot tell the two apart,
    so only a copy from a later second than the entry's gets the 304."""
    origin.headers.append(("Cache-Control", "max-age=60"))
    stack = make()
    clock.now = T0 + 0.2
    stack.get()
    assert stack.get().headers["Date"] == STORED  # the client's copy, from the entry
    if written:
        clock.now = T0 + 0.4
        stack.web.post("/api/v1/search?q=x")
    clock.now = T0 + 0.6
    if stored_first and written:
        stack.get()  # the refill, in the same second
    response = stack.get(headers={"If-Modified-Since": since}, status=status)
    assert response.headers["X-Cache"] == ("MISS" if written and not stored_first else "HIT")


@pytest.mark.parametrize("stored_first", [True, False], ids=["on a hit", "on a miss"])
@pytest.mark.parametrize(("validators", "conditions", "status"), CONDITIONAL)
def test_conditional_requests(make: Callable[..., Stack], origin: Origin, validators: list[tuple[str, str]],
                              conditions: dict[str, str], status: int, stored_first: bool) -> None:
    """If-None-Match / If-Modified-Since against the stored validators (RFC 9110 §13.1-13.2), the same on a
    miss as on a hit (§13.2.1): on a miss the app ignores them, the cache evaluates them on the app's 200,
    stores the body and sends the 304 alone."""
    origin.headers += [*validators, ("Cache-Control", "max-age=60"), ("Vary", "Accept-Language")]
    stack = make()
    full = stack.get() if stored_first else None
    response = stack.get(headers=conditions, status=status)
    assert response.headers["X-Cache"] == ("HIT" if stored_first else "MISS")
    if full is None:
        full = stack.get()
        assert (full.status_int, full.headers["X-Cache"]) == (200, "HIT")  # stored all the same
    if status == 304:
        assert response.body == b""
        assert "Content-Type" not in response.headers and "Content-Length" not in response.headers
        assert [response.headers.get(n) for n in ("ETag", "Last-Modified", "Cache-Control", "Vary")] == \
            [full.headers.get(n) for n in ("ETag", "Last-Modified", "Cache-Control", "Vary")]
    else:
        assert response.body == full.body
    assert origin.calls == 1


@pytest.mark.parametrize("stored_first", [True, False], ids=["on a hit", "on a miss"])
@pytest.mark.parametrize("conditions", [{"If-None-Match": '"v1"'}, {"If-None-Match": "*"},
                                        {"If-Modified-Since": AFTER}], ids=["etag", "star", "since"])
def test_only_a_200_is_answered_with_a_304(make: Callable[..., Stack], origin: Origin, conditions: dict[str, str],
                                           stored_first: bool) -> None:
    """A stored 404 whose validators match the request's conditions is replayed whole, never turned into a 304."""
    origin.status = "404 Not Found"
    origin.headers += [("ETag", '"v1"'), ("Last-Modified", LAST_MODIFIED)]
    stack = make(statuses=[200, 404])
    full = stack.get(status=404) if stored_first else None
    response = stack.get(headers=conditions, status=404)
    assert (response.headers["X-Cache"], response.headers["ETag"]) == ("HIT" if stored_first else "MISS", '"v1"')
    assert response.body == (full or stack.get(status=404)).body
    assert origin.calls == 1


@pytest.mark.parametrize(("validators", "conditions", "status"), CONDITIONAL)
def test_a_head_on_a_miss_gets_the_answer_a_get_would(make: Callable[..., Stack], origin: Origin,
                                                      validators: list[tuple[str, str]], conditions: dict[str, str],
                                                      status: int) -> None:
    """RFC 9110 §9.3.2: a HEAD is answered as the GET would be, its conditions too (§13.2.1); it stores nothing."""
    origin.headers += [*validators, ("Cache-Control", "max-age=60")]
    stack = make()
    response = stack.web.head("/api/v1/search?q=x", headers=conditions, status=status)
    assert response.headers["X-Cache"] == "MISS"
    assert ("Content-Type" in response.headers) is (status == 200)
    if status == 304:
        assert response.body == b""  # (this test's app sends a body to a HEAD too; a 304 carries none)
    assert stack.get().headers["X-Cache"] == "MISS"  # nothing stored


class Preconditions(Origin):
    """An app that evaluates If-Match and If-Unmodified-Since itself (RFC 9110 §13.1.1, §13.1.4), as Django's
    ``condition`` does: 412 when one fails, its usual answer otherwise."""

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        tags = [t.strip() for t in environ.get("HTTP_IF_MATCH", "").split(",") if t.strip()]
        since = parse_date(environ.get("HTTP_IF_UNMODIFIED_SINCE"))
        changed = parse_date(LAST_MODIFIED)
        if (tags and "*" not in tags and '"v2"' not in tags) or (since is not None and changed is not None
                                                                  and since < changed):
            with self.lock:
                self.calls += 1
            start_response("412 Precondition Failed", [("Content-Length", "0")])
            return []
        return super().__call__(environ, start_response)


@pytest.mark.parametrize(("conditions", "status"), [
    pytest.param({"If-Match": '"v1"'}, 412, id="If-Match of an older tag: the app's 412"),
    pytest.param({"If-Match": '"v1", "v2"'}, 200, id="If-Match of the current tag"),
    pytest.param({"If-Match": "*"}, 200, id="If-Match star"),
    pytest.param({"If-Unmodified-Since": "Tue, 14 Nov 2023 21:00:00 GMT"}, 412,
                 id="If-Unmodified-Since before its change: the app's 412"),
    pytest.param({"If-Unmodified-Since": LAST_MODIFIED}, 200, id="If-Unmodified-Since of its change"),
    pytest.param({"If-Match": '"v1"', "If-None-Match": '"v2"'}, 412, id="If-Match first, before If-None-Match"),
])
def test_preconditions_for_the_app_are_never_answered_from_the_store(
        make: Callable[..., Stack], conditions: dict[str, str], status: int) -> None:
    """If-Match and If-Unmodified-Since are not for a cache to evaluate (RFC 9111 §4.3.2): such a request goes
    to the app, as on a miss, and gets its 412, never a stored 200 of another tag; it stores nothing."""
    origin = Preconditions()
    origin.headers += [("ETag", '"v2"'), ("Last-Modified", LAST_MODIFIED), ("Cache-Control", "max-age=60")]
    stack = Stack(make().store, origin)
    stored = stack.get()
    response = stack.get(headers=conditions, status=status)
    assert (response.headers["X-Cache"], origin.calls) == ("BYPASS", 2)
    if status == 200:
        assert response.json["n"] == 2
    again = stack.get()
    assert (again.headers["X-Cache"], again.body, origin.calls) == ("HIT", stored.body, 2)


@pytest.mark.parametrize(("method", "status", "user", "dropped"), [
    pytest.param("POST", "200 OK", None, True, id="a POST that succeeds"),
    pytest.param("PUT", "204 No Content", None, True, id="a PUT that succeeds"),
    pytest.param("DELETE", "303 See Other", None, True, id="a DELETE that redirects"),
    pytest.param("PATCH", "200 OK", None, True, id="a PATCH"),
    pytest.param("POST", "409 Conflict", None, False, id="an error changes nothing"),
    pytest.param("POST", "500 Internal Server Error", None, False, id="a failure changes nothing"),
    pytest.param("OPTIONS", "200 OK", None, False, id="OPTIONS is safe"),
    pytest.param("POST", "200 OK", "alice:admin", True, id="the writer's own per-user entry"),
])
def test_a_write_drops_the_entries_of_its_uri(make: Callable[..., Stack], origin: Origin, method: str, status: str,
                                              user: str | None, dropped: bool) -> None:
    """A cache MUST invalidate the target URI on a non-error answer to an unsafe method (RFC 9111 §4.4)."""
    stack = make(per_user=True)
    headers = {"X-Test-User": user} if user else {}
    stack.get(headers=headers)
    other = stack.get("/api/v1/search?q=other", headers=headers)
    origin.status = status
    stack.web.request("/api/v1/search?q=x", method=method, headers=headers, expect_errors=True)
    origin.status = "200 OK"
    assert stack.get(headers=headers).headers["X-Cache"] == ("MISS" if dropped else "HIT")
    assert stack.get("/api/v1/search?q=other", headers=headers).body == other.body  # another URI stays


@pytest.mark.parametrize(("status", "field", "value", "dropped"), [
    pytest.param("201 Created", "Location", "/api/v1/items/5", True, id="the Location of what a POST made"),
    pytest.param("201 Created", "Location", "5", True, id="a Location relative to the write's URI"),
    pytest.param("201 Created", "Location", "http://localhost/api/v1/items/5", True, id="an absolute Location"),
    pytest.param("201 Created", "Location", "http://localhost:80/api/v1/items/%35", True,
                 id="its default port and an escape"),
    pytest.param("201 Created", "Location", "/api/v1/items/caf%C3%A9", True, id="a path of UTF-8 escapes"),
    pytest.param("201 Created", "Location", "/api/v1/items/caf\xc3\xa9", True,
                 id="a path of raw UTF-8 bytes (latin-1 text, as PEP 3333 has header values)"),
    pytest.param("200 OK", "Content-Location", "/api/v1/items/5", True, id="a Content-Location"),
    pytest.param("303 See Other", "Location", "/api/v1/items/5", True, id="a redirect's Location"),
    pytest.param("201 Created", "Location", "http://other.example/api/v1/items/5", False,
                 id="another host: never (RFC 9111 4.4)"),
    pytest.param("201 Created", "Location", "https://localhost/api/v1/items/5", False, id="another scheme"),
    pytest.param("201 Created", "Location", "/api/v1/items/5?full=1", False, id="another query: another URI"),
    pytest.param("400 Bad Request", "Location", "/api/v1/items/5", False, id="an error changes nothing"),
])
def test_a_write_drops_the_entries_its_location_names(make: Callable[..., Stack], origin: Origin, status: str,
                                                      field: str, value: str, dropped: bool) -> None:
    """RFC 9111 §4.4: the URIs in Location and Content-Location of a non-error answer to an unsafe method, of
    the write's own origin, are invalidated too: a 404 stored for /items/5 does not outlive the POST making it."""
    origin.status = "404 Not Found"
    stack = make(statuses=[200, 404])
    item = "/api/v1/items/caf%C3%A9" if "caf" in value else "/api/v1/items/5"
    stack.get(item, status=404)
    other = stack.get("/api/v1/items/6", status=404)
    origin.status, origin.headers = status, [*origin.headers, (field, value)]
    stack.web.post("/api/v1/items/", expect_errors=True)
    origin.status, origin.headers = "200 OK", origin.headers[:-1]
    after = stack.get(item, status="*")
    assert (after.status_int, after.headers["X-Cache"]) == ((200, "MISS") if dropped else (404, "HIT"))
    assert stack.get("/api/v1/items/6", status=404).body == other.body  # another URI stays


@pytest.mark.parametrize(("writer", "reader", "after"), [
    pytest.param("alice:admin", "bob:user", "MISS", id="another user's entry"),
    pytest.param(None, "bob:user", "MISS", id="a user's entry, after an anonymous write"),
    pytest.param("alice:admin", None, "MISS", id="the anonymous entry, after a user's write"),
])
def test_a_write_makes_every_users_entry_of_its_uri_stale(make: Callable[..., Stack], origin: Origin,
                                                         writer: str | None, reader: str | None, after: str) -> None:
    """RFC 9111 §4.4 invalidates the URI, not one user's answer of it: every per-user entry of it is stale."""
    stack = make(per_user=True)
    reads = {"X-Test-User": reader} if reader else {}
    stack.get(headers=reads)
    other = stack.get("/api/v1/search?q=other", headers=reads)
    assert stack.get(headers=reads).headers["X-Cache"] == "HIT"
    stack.web.post("/api/v1/search?q=x", headers={"X-Test-User": writer} if writer else {})
    again = stack.get(headers=reads)
    assert (again.headers["X-Cache"], stack.get(headers=reads).headers["X-Cache"]) == (after, "HIT")  # and stored
    assert stack.get("/api/v1/search?q=other", headers=reads).body == other.body  # another URI stays


@pytest.mark.redis
def test_an_entry_outlives_the_mark_it_was_stored_under_never(redis_url: str, origin: Origin) -> None:
    """A lookup's mark lives mark_life (60 s); an entry stored under it, longer: the save makes the mark as long,
    since an entry whose mark went is stale (a miss, though no write happened)."""
    store = store_from_url(redis_url)
    try:
        origin.headers.append(("Cache-Control", "max-age=3600"))
        stack = Stack(store, origin)
        stack.get()
        [mark] = list(store.scan("wsgistack:cache:w:"))
        admin = redis.Redis.from_url(redis_url)
        try:
            assert admin.pttl(f"wsgistack:{mark}") > 3_500_000
        finally:
            admin.close()
    finally:
        store.close()


def test_a_write_drops_every_variant_of_its_uri(make: Callable[..., Stack], origin: Origin, clock: Clock) -> None:
    """Variants stored before the write stay out of reach once another variant is filled again."""
    origin.headers.append(("Vary", "Accept-Language"))
    stack = make()
    de = stack.get(headers={"Accept-Language": "de"})
    stack.get(headers={"Accept-Language": "fr"})
    assert stack.get(headers={"Accept-Language": "de"}).headers["X-Cache"] == "HIT"
    stack.web.post("/api/v1/search?q=x")
    assert stack.get(headers={"Accept-Language": "fr"}).headers["X-Cache"] == "MISS"
    again = stack.get(headers={"Accept-Language": "de"})
    assert (again.headers["X-Cache"], again.json["n"] > de.json["n"]) == ("MISS", True)
    assert stack.get(headers={"Accept-Language": "de"}).headers["X-Cache"] == "HIT"  # and stored again


def test_a_fill_that_began_before_a_write_does_not_bring_back_the_variants(
        make: Callable[..., Stack], origin: Origin) -> None:
    """The fill found the index; a write dropped it meanwhile: it stores under a new generation."""
    origin.headers.append(("Vary", "Accept-Language"))
    stack = make()
    stack.get(headers={"Accept-Language": "de"})
    calls: list[int] = []

    def write_meanwhile(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ["REQUEST_METHOD"] == "GET" and not calls:  # the fr fill, after its lookup found the index
            calls.append(1)
            stack.web.post("/api/v1/search?q=x")
        return Origin.__call__(origin, environ, start_response)

    stack.layer.app = write_meanwhile
    stack.get(headers={"Accept-Language": "fr"})
    assert stack.get(headers={"Accept-Language": "de"}).headers["X-Cache"] == "MISS"  # not the pre-write de


@pytest.mark.parametrize(("vary", "user", "elsewhere"), [
    pytest.param(False, None, False, id="an entry"),
    pytest.param(True, None, False, id="a Vary variant"),
    pytest.param(False, "alice:admin", False, id="the writer's own per-user entry"),
    pytest.param(False, None, True, id="a write in another process"),
])
def test_a_write_keeps_out_the_answer_of_a_fill_in_flight(store: Store, origin: Origin, clock: Clock, vary: bool,
                                                          user: str | None, elsewhere: bool) -> None:
    """A fill that began before a successful write stores nothing: its answer may predate the write (§4.4)."""
    if vary:
        origin.headers.append(("Vary", "Accept-Language"))
    stack = Stack(store, origin, per_user=True)
    writer = Stack(store, origin, per_user=True) if elsewhere else stack
    headers = {"X-Test-User": user} if user else {}
    if vary:
        headers["Accept-Language"] = "de"
    written: list[int] = []

    def write_meanwhile(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ["REQUEST_METHOD"] == "GET" and not written:  # the fill has read the data: now the write
            written.append(1)
            clock.now += 1
            writer.web.post("/api/v1/search?q=x", headers=headers)
        return Origin.__call__(origin, environ, start_response)

    stack.layer.app = write_meanwhile
    assert stack.get(headers=headers).headers["X-Cache"] == "MISS"
    assert list(store.scan("wsgistack:cache:l:")) == []  # the fill lock went all the same
    again = stack.get(headers=headers)
    assert (again.headers["X-Cache"], again.json["n"]) == ("MISS", 3)  # not the pre-write answer
    assert stack.get(headers=headers).headers["X-Cache"] == "HIT"  # a fill that began after the write is stored


@pytest.mark.parametrize("after", [0.0, 0.5, 2.5])
def test_a_fill_that_looks_up_after_a_write_is_stored_at_once(make: Callable[..., Stack], origin: Origin,
                                                              clock: Clock, after: float) -> None:
    """Its lookup found the write's mark (and no entry): its answer is from after the write, and stored."""
    origin.headers.append(("Vary", "Accept-Language"))
    stack = make()
    stack.get(headers={"Accept-Language": "de"})
    stack.web.post("/api/v1/search?q=x")
    clock.now += after
    fill = stack.get(headers={"Accept-Language": "de"})
    again = stack.get(headers={"Accept-Language": "de"})
    assert (fill.headers["X-Cache"], again.headers["X-Cache"], again.body) == ("MISS", "HIT", fill.body)


def test_after_a_write_concurrent_misses_call_the_app_once(store: Store, origin: Origin, clock: Clock) -> None:
    """No herd after a write: the first fill is stored, and the requests that waited on it (in this process
    and in another) are answered from it."""
    origin.delay = 0.3
    stacks = [Stack(store, origin), Stack(store, origin)]  # two processes
    [(label, _)] = _concurrently([stacks[0].wsgi], 1)  # stored, for the requests as _concurrently makes them
    assert label == "MISS"
    assert Client(stacks[1].wsgi).post("/api/v1/search?q=x").status_code == 200
    assert [key.split(":")[2] for key in store.scan("wsgistack:cache:")] == ["w"]  # the entry gone, the mark set
    before = origin.calls
    results = _concurrently([s.wsgi for s in stacks], 8)
    assert origin.calls - before == 1
    assert sorted(label for label, _ in results) == ["HIT"] * 7 + ["MISS"]
    assert len({body for _, body in results}) == 1


@pytest.mark.parametrize("evicted", [False, True], ids=["the write's mark kept", "the write's mark evicted"])
def test_a_slow_get_that_read_before_a_write_stores_nothing(store: Store, origin: Origin, clock: Clock,
                                                           evicted: bool) -> None:
    """The GET looked the entry up and called the app; a write succeeds while the app is still answering
    it: that answer may predate the write and is not stored, even when a full store (or Redis's allkeys-lru)
    evicted the write's mark meanwhile.  The next GET's is, at once."""
    stack = Stack(store, origin)
    inside, finish = threading.Event(), threading.Event()

    def slow_reads(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        answer = Origin.__call__(origin, environ, start_response)  # the data is read
        if environ["REQUEST_METHOD"] == "GET" and not finish.is_set():
            inside.set()
            finish.wait(10)  # and the answer is made slowly
        return answer

    stack.layer.app = slow_reads
    slow: list[Any] = []
    reader = threading.Thread(target=lambda: slow.append(TestApp(stack.wsgi).get("/api/v1/search?q=x")))
    reader.start()
    assert inside.wait(10)
    stack.web.post("/api/v1/search?q=x")  # another thread: the write succeeds while the GET is in the app
    if evicted:
        for mark in list(store.scan("wsgistack:cache:w:")):
            store.delete(mark)
    finish.set()
    reader.join(10)
    assert (slow[0].headers["X-Cache"], slow[0].json["n"]) == ("MISS", 1)
    assert list(store.scan("wsgistack:cache:l:")) == []  # its lock went all the same
    after = stack.get()
    assert (after.headers["X-Cache"], after.json["n"]) == ("MISS", 3)  # not the answer read before the write
    assert stack.get().body == after.body  # stored: a HIT


@pytest.mark.redis
def test_a_write_drops_its_entries_when_redis_is_out_of_memory(redis_url: str, origin: Origin, clock: Clock) -> None:
    """Redis at maxmemory (noeviction, as for a store that holds sessions) refuses the write's marks, and with
    them its transaction: the entries go all the same (DEL is allowed), and nothing stale is served."""
    store, admin = store_from_url(redis_url), redis.Redis.from_url(redis_url)
    try:
        stack = Stack(store, origin)
        assert [stack.get().headers["X-Cache"] for _ in range(2)] == ["MISS", "HIT"]
        admin.config_set("maxmemory", 1)
        stack.web.post("/api/v1/search?q=x")
        # Refused twice: as the write's answer starts, and again once it is closed.
        assert [fields["layer"] for event, fields in stack.events if event == "store.error"] == ["cache", "cache"]
        after = stack.get()
        assert (after.headers["X-Cache"], after.json["n"]) == ("BYPASS", 3)  # the app's answer after the write
    finally:
        admin.config_set("maxmemory", 0)
        admin.close()
        store.close()


@pytest.mark.redis
def test_another_users_entry_is_stale_after_an_out_of_memory_write(redis_url: str, origin: Origin,
                                                                   clock: Clock) -> None:
    """The write's new mark was refused with its transaction, and the fallback deleted the old one: the next
    lookup can set none either, and an entry stored under a mark that went is stale, not served."""
    store, admin = store_from_url(redis_url), redis.Redis.from_url(redis_url)
    try:
        stack = Stack(store, origin, per_user=True)
        bob = {"X-Test-User": "bob:user"}
        assert [stack.get(headers=bob).headers["X-Cache"] for _ in range(2)] == ["MISS", "HIT"]
        admin.config_set("maxmemory", 1)
        stack.web.post("/api/v1/search?q=x", headers={"X-Test-User": "alice:admin"})
        after = stack.get(headers=bob)
        assert (after.headers["X-Cache"], after.json["n"]) == ("MISS", 3)  # the app's answer after the write
    finally:
        admin.config_set("maxmemory", 0)
        admin.close()
        store.close()


def test_a_head_reads_the_uris_mark_too(make: Callable[..., Stack], origin: Origin) -> None:
    """A HEAD is answered from the GET entry: one a write made stale (another user's) is stale for it too."""
    stack = make(per_user=True)
    bob = {"X-Test-User": "bob:user"}
    stack.get(headers=bob)
    assert stack.web.head("/api/v1/search?q=x", headers=bob).headers["X-Cache"] == "HIT"
    stack.web.post("/api/v1/search?q=x", headers={"X-Test-User": "alice:admin"})
    assert stack.web.head("/api/v1/search?q=x", headers=bob).headers["X-Cache"] == "MISS"
    assert list(stack.store.scan("wsgistack:cache:l:")) == []  # it takes no lock
    assert stack.get(headers=bob).headers["X-Cache"] == "MISS"  # a HEAD stores nothing


def test_head_misses_write_nothing(origin: Origin, clock: Clock) -> None:
    """No lock and no mark of their own: on a small memory store, HEADs of other URIs (a monitor, a link
    checker) pushed out the marks of cached entries, which were then stale."""
    store = MemoryStore(max_entries=3)
    stack = Stack(store, origin)
    urls = ["/api/v1/search?q=a", "/api/v1/search?q=b"]
    for url in urls:
        stack.get(url)
    for probe in ("/api/v1/search?q=probe0", "/api/v1/search?q=probe1"):
        assert stack.web.head(probe).headers["X-Cache"] == "MISS"
    assert [stack.get(url).headers["X-Cache"] for url in urls] == ["HIT", "HIT"]


@pytest.mark.redis
def test_a_fill_in_flight_across_an_out_of_memory_write_stores_nothing(redis_url: str, origin: Origin,
                                                                      clock: Clock) -> None:
    """The write's marks were refused with its transaction: its deletes take the old marks too, so the GET
    that read before the write finds none at its save (once memory frees up) and stores nothing."""
    store, admin = store_from_url(redis_url), redis.Redis.from_url(redis_url)
    stack = Stack(store, origin)
    inside, finish = threading.Event(), threading.Event()

    def slow_reads(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        answer = Origin.__call__(origin, environ, start_response)
        if environ["REQUEST_METHOD"] == "GET" and not finish.is_set():
            inside.set()
            finish.wait(10)
        return answer

    stack.layer.app = slow_reads
    slow: list[Any] = []
    reader = threading.Thread(target=lambda: slow.append(TestApp(stack.wsgi).get("/api/v1/search?q=x")))
    try:
        reader.start()
        assert inside.wait(10)
        admin.config_set("maxmemory", 1)
        stack.web.post("/api/v1/search?q=x")
        admin.config_set("maxmemory", 0)  # memory frees up before the slow GET saves
        finish.set()
        reader.join(10)
        assert (slow[0].headers["X-Cache"], slow[0].json["n"]) == ("MISS", 1)
        after = stack.get()
        assert (after.headers["X-Cache"], after.json["n"]) == ("MISS", 3)  # not the answer read before the write
        assert stack.get().body == after.body
    finally:
        finish.set()
        admin.config_set("maxmemory", 0)
        admin.close()
        store.close()


def test_a_working_set_over_half_a_memory_store_still_hits(origin: Origin, clock: Clock) -> None:
    """Each URI looked up has a write mark beside its entry: kept apart, the marks take no room from the
    entries (counted with them, 60 keys in a store of 100 got no hit at all), and as many are kept as
    entries (an entry whose mark was lost is stale: a quarter of them, and 60 URIs got no hit)."""
    store = MemoryStore(max_entries=100)
    stack = Stack(store, origin)
    urls = [f"/api/v1/search?q={i}" for i in range(60)]
    for url in urls:
        assert stack.get(url).headers["X-Cache"] == "MISS"
    for _ in range(3):
        assert [stack.get(url).headers["X-Cache"] for url in urls] == ["HIT"] * 60
    assert origin.calls == 60
    assert len(list(store.scan("wsgistack:cache:w:"))) == 60  # one per URI, kept apart


@pytest.mark.redis
def test_a_foreign_value_at_one_variant_leaves_the_others(redis_url: str, origin: Origin, clock: Clock) -> None:
    origin.headers.append(("Vary", "Accept-Language"))
    store, client = store_from_url(redis_url), redis.Redis.from_url(redis_url)
    try:
        stack = Stack(store, origin)
        for lang in ("en", "fr"):
            stack.get(headers={"Accept-Language": lang})
        before = set(client.keys("*:cache:e:*"))
        en_variant = next(k for k in before if not cast(bytes, client.get(k)).startswith(b'{"v":')
                          and b'"en"' in cast(bytes, client.get(k)))
        client.delete(en_variant)
        client.rpush(en_variant, b"x")
        assert stack.get(headers={"Accept-Language": "en"}).headers["X-Cache"] == "MISS"  # stored over it
        assert stack.get(headers={"Accept-Language": "fr"}).headers["X-Cache"] == "HIT"
        assert stack.get(headers={"Accept-Language": "en"}).headers["X-Cache"] == "HIT"
    finally:
        client.close()
        store.close()


@pytest.mark.parametrize(("lock_timeout", "took", "expected"), [
    pytest.param(5, 59, "HIT", id="a fill shorter than a mark"),
    pytest.param(5, 60, "MISS", id="a fill as long as a mark stores nothing"),
    pytest.param(120, 119, "HIT", id="a mark lives lock_timeout when longer"),
])
def test_a_fill_longer_than_a_write_mark_stores_nothing(make: Callable[..., Stack], origin: Origin, clock: Clock,
                                                        lock_timeout: float, took: int, expected: str) -> None:
    """A write's mark has gone by then: the fill could not tell whether one happened while it ran."""
    stack = make(lock_timeout=lock_timeout)

    def slow(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        clock.now += took
        return Origin.__call__(origin, environ, start_response)

    stack.layer.app = slow
    stack.get()
    assert stack.get().headers["X-Cache"] == expected


def test_the_index_lives_as_long_as_its_longest_variant(make: Callable[..., Stack], origin: Origin,
                                                         store: Store) -> None:
    """A short-lived variant stored last must not take the index (and so the long-lived ones) with it."""
    stack = make()
    origin.headers += [("Vary", "Accept-Language"), ("Cache-Control", "max-age=60")]
    stack.get(headers={"Accept-Language": "de"})
    origin.headers[-1] = ("Cache-Control", "max-age=1")
    stack.get(headers={"Accept-Language": "fr"})
    [index] = [raw for key in store.scan("wsgistack:cache:e:") if (raw := store.get(key)) and raw[:5] == b'{"v":']
    assert json.loads(index)["x"] - T0 == 60


def test_age_counts_whole_seconds_since_stored(make: Callable[..., Stack], clock: Clock) -> None:
    stack = make()
    stack.get()
    clock.now += 7.9
    assert stack.get().headers["Age"] == "7"


# -- stale-if-error ------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize(("failure", "window", "expected_status", "expected_cache"), [
    pytest.param(RuntimeError("db down"), 600, 200, "STALE", id="exception, stale served"),
    pytest.param(refuse(503, "Upstream down."), 600, 200, "STALE", id="503 raised, stale served"),
    pytest.param("502 Bad Gateway", 600, 200, "STALE", id="502 answered, stale served"),
    pytest.param(refuse(404, "Gone."), 600, 404, None, id="404 raised, passes"),
    pytest.param(RuntimeError("db down"), 0, 500, None, id="exception, stale off"),
    pytest.param("502 Bad Gateway", 0, 502, "MISS", id="502 answered, stale off"),
])
def test_stale_if_error(make: Callable[..., Stack], origin: Origin, clock: Clock, failure: Any, window: int,
                        expected_status: int, expected_cache: str | None, method: str) -> None:
    """A HEAD is answered as the GET is, without the body."""
    stack = make(ttl=10, stale_if_error=window)
    fresh = stack.get()
    clock.now += 20
    if isinstance(failure, str):
        origin.status = failure
    else:
        origin.fail = failure
    before = len(stack.names())
    response = stack.web.request("/api/v1/search?q=x", method=method, status="*")
    assert response.status_int == expected_status
    assert response.headers.get("X-Cache") == expected_cache
    # One event per request: a stale serve is no miss as well (it made hit ratios wrong); a failure is a miss.
    assert [e for e in stack.names()[before:] if e.startswith("cache.")] == (
        ["cache.stale"] if expected_cache == "STALE" else ["cache.miss"])
    if expected_cache == "STALE":
        assert response.body == (fresh.body if method == "GET" else b"")
        assert response.headers["Content-Length"] == fresh.headers["Content-Length"]
        assert response.headers["Age"] == "20"


class ClosedAnswer(Origin):
    """An origin whose answers record that the server closed them."""

    def __init__(self) -> None:
        super().__init__()
        self.closed = 0

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        origin = self

        class Answer(list[bytes]):
            def close(self) -> None:
                origin.closed += 1

        return Answer(super().__call__(environ, start_response))


def test_a_5xx_the_stale_entry_replaces_is_closed_and_gives_its_lock_back(store: Store, clock: Clock) -> None:
    origin = ClosedAnswer()
    stack = Stack(store, origin, ttl=10, stale_if_error=600)
    fresh = stack.get()
    clock.now += 20
    origin.status = "502 Bad Gateway"
    stale = stack.get()
    assert (stale.status_int, stale.headers["X-Cache"], stale.body) == (200, "STALE", fresh.body)
    assert (origin.calls, origin.closed) == (2, 2)
    assert list(store.scan("wsgistack:cache:l:")) == []


class NoCode(HTTPException):
    """A werkzeug HTTPException subclass that names no status."""

    code = None
    description = "An error without a status."


@pytest.mark.parametrize("failure", [HTTPException(), NoCode()], ids=["HTTPException()", "a subclass, code None"])
@pytest.mark.parametrize(("window", "expected_status", "expected_cache"), [
    pytest.param(0, 500, None, id="stale off: a 500"),
    pytest.param(600, 200, "STALE", id="stale served"),
])
def test_an_http_exception_without_a_code_is_a_failure_of_the_app(
        make: Callable[..., Stack], origin: Origin, clock: Clock, store: Store, failure: HTTPException,
        window: int, expected_status: int, expected_cache: str | None) -> None:
    """Not a refusal the app answered with (a 4xx passes as it is): a 5xx, as the errors layer renders it."""
    stack = make(ttl=10, stale_if_error=window)
    fresh = stack.get()
    clock.now += 20
    origin.fail = failure
    before = len(stack.names())
    response = stack.get(status="*")
    assert (response.status_int, response.headers.get("X-Cache")) == (expected_status, expected_cache)
    if expected_cache == "STALE":
        assert response.body == fresh.body
    else:
        assert response.json["error"]["code"] == 500
    assert [e for e in stack.names()[before:] if e.startswith("cache.")] == (
        ["cache.stale"] if expected_cache == "STALE" else ["cache.miss"])
    assert list(store.scan("wsgistack:cache:l:")) == []  # its lock given back
    origin.fail = None
    after = stack.get()
    assert (after.headers["X-Cache"], after.json["n"], origin.calls) == ("MISS", 3, 3)  # nothing stored for it
    assert stack.get().headers["X-Cache"] == "HIT"


class LateFailure:
    """An origin that answers once, then fails after its start_response, as PEP 3333 lets it."""

    def __init__(self, mode: str) -> None:
        self.mode, self.calls = mode, 0

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        self.calls += 1
        body = b'{"n": 1}'
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        if self.calls == 1:
            return [body]
        try:
            raise RuntimeError("the backend failed after the status line")
        except RuntimeError:
            if self.mode == "raises":
                raise
            start_response("500 Internal Server Error", [("Content-Type", "text/plain")], sys.exc_info())
        return [b"failed"]


@pytest.mark.parametrize("mode", ["raises", "start_response(500, exc_info)"])
def test_stale_after_the_apps_own_start_response(store: Store, clock: Clock, mode: str) -> None:
    """The stale entry's start_response comes second: with exc_info, so a strict server (webtest's lint
    here, Waitress) takes it instead of refusing a second call."""
    from werkzeug.test import EnvironBuilder

    late = LateFailure(mode)
    stack = Stack(store, late, ttl=10, stale_if_error=600)  # type: ignore[arg-type]
    fresh = stack.get()
    clock.now += 20
    seen: list[Any] = []

    def strict(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Callable[[bytes], None]:
        if seen and exc_info is None:
            raise AssertionError("start_response called a second time without exc_info")
        seen[:] = [status, dict(headers)]
        return lambda data: None

    builder = EnvironBuilder(path="/api/v1/search", query_string="q=x", headers=[("Host", "localhost:80")])
    body = b"".join(stack.wsgi(builder.get_environ(), strict))
    assert (seen[0], seen[1]["X-Cache"], body) == ("200 OK", "STALE", fresh.body)


@pytest.mark.parametrize(("cache_control", "expected_status", "expected_cache"), [
    pytest.param("max-age=10, must-revalidate", 500, None, id="must-revalidate: the app's error"),
    pytest.param("public, max-age=10, proxy-revalidate", 500, None, id="proxy-revalidate: the app's error"),
    pytest.param("s-maxage=10", 500, None, id="s-maxage: the app's error"),
    pytest.param("public, max-age=10", 200, "STALE", id="max-age alone: stale served"),
])
def test_must_revalidate_turns_stale_off(make: Callable[..., Stack], origin: Origin, clock: Clock,
                                         cache_control: str, expected_status: int,
                                         expected_cache: str | None) -> None:
    """s-maxage implies proxy-revalidate for a shared cache (RFC 9111 §5.2.2.10)."""
    origin.headers.append(("Cache-Control", cache_control))
    stack = make(stale_if_error=600)
    stack.get()
    clock.now += 20
    origin.fail = RuntimeError("db down")
    response = stack.get(status=expected_status)
    assert (response.status_int, response.headers.get("X-Cache")) == (expected_status, expected_cache)


@pytest.mark.parametrize(("cache_control", "expected_status", "expected_cache"), [
    pytest.param(None, 200, "STALE", id="no directive: stale served"),
    pytest.param("no-cache", 502, "MISS", id="no-cache: the app's error"),
    pytest.param("max-age=0", 502, "MISS", id="max-age=0 (a reload): the app's error"),
    pytest.param("max-age=600", 502, "MISS", id="max-age young enough, but no max-stale: the app's error"),
    pytest.param("min-fresh=1", 502, "MISS", id="min-fresh: the app's error"),
    pytest.param("max-age=600, max-stale", 200, "STALE", id="max-stale without a value: stale served"),
    pytest.param("max-age=600, max-stale=30", 200, "STALE", id="stale for less than max-stale: served"),
    pytest.param("max-age=600, max-stale=5", 502, "MISS", id="stale for longer than max-stale: the app's error"),
    pytest.param("max-age=15, max-stale", 502, "MISS", id="max-stale, but older than max-age: the app's error"),
    pytest.param("max-stale=5", 502, "MISS", id="max-stale alone, too short: the app's error"),
    pytest.param("max-stale=30", 200, "STALE", id="max-stale alone, long enough: served"),
])
def test_stale_if_error_honours_the_requests_directives(make: Callable[..., Stack], origin: Origin, clock: Clock,
                                                        cache_control: str | None, expected_status: int,
                                                        expected_cache: str) -> None:
    """Without max-stale, a request that sent max-age or min-fresh wants no stale answer (RFC 9111 §5.2.1.1)."""
    stack = make(ttl=10, stale_if_error=600)
    stack.get()
    clock.now += 20  # 20 s old, stale for 10 s
    origin.status = "502 Bad Gateway"
    response = stack.get(headers={"Cache-Control": cache_control} if cache_control else {}, status="*")
    assert (response.status_int, response.headers.get("X-Cache")) == (expected_status, expected_cache)
    assert origin.calls == 2


# The response's stale-if-error (RFC 5861 §3): 10 s fresh, then asked 20 s after it was stored (10 s stale).
@pytest.mark.parametrize(("option", "cache_control", "elapsed", "expected_status", "expected_cache"), [
    pytest.param(0, "max-age=10, stale-if-error=60", 20, 200, "STALE", id="option off: the directive serves"),
    pytest.param(0, "max-age=10, stale-if-error=60", 69, 200, "STALE", id="stale for 59 s of 60: served"),
    pytest.param(0, "max-age=10, stale-if-error=60", 71, 502, "MISS", id="stale for 61 s of 60: the app's error"),
    pytest.param(5, "max-age=10, stale-if-error=60", 20, 200, "STALE", id="option smaller: the directive's"),
    pytest.param(600, "max-age=10, stale-if-error=60", 200, 200, "STALE", id="option larger: the option's"),
    pytest.param(0, "max-age=10, Stale-If-Error=60", 20, 200, "STALE", id="its name in any case"),
    pytest.param(0, 'max-age=10, stale-if-error="60"', 20, 200, "STALE", id="quoted"),
    pytest.param(0, "stale-if-error=60", 320, 200, "STALE", id="ttl's freshness, then the directive's"),
    pytest.param(0, "max-age=10, stale-if-error=60, must-revalidate", 20, 502, "MISS", id="must-revalidate forbids"),
    pytest.param(0, "public, max-age=10, stale-if-error=60, proxy-revalidate", 20, 502, "MISS",
                 id="proxy-revalidate forbids"),
    pytest.param(0, "s-maxage=10, stale-if-error=60", 20, 502, "MISS", id="s-maxage forbids"),
    pytest.param(0, "max-age=10, stale-if-error=abc", 20, 502, "MISS", id="not a number: none"),
    pytest.param(0, "max-age=10, stale-if-error", 20, 502, "MISS", id="no value: none"),
    pytest.param(0, "max-age=10, stale-if-error=60, stale-if-error=30", 20, 502, "MISS", id="two values: none"),
    pytest.param(0, "max-age=10", 20, 502, "MISS", id="no directive, option off: the app's error"),
    pytest.param(5, "max-age=10", 20, 502, "MISS", id="no directive: the option's 5 s"),
])
@pytest.mark.parametrize("failure", ["502 Bad Gateway", "raises"])
def test_the_responses_stale_if_error_lets_it_answer_a_failing_app(
        make: Callable[..., Stack], origin: Origin, clock: Clock, store: Store, option: int, cache_control: str,
        elapsed: int, expected_status: int, expected_cache: str | None, failure: str) -> None:
    """RFC 5861 §3: an answer that says ``stale-if-error=N`` may stand in for a failing app N seconds past its
    freshness, beyond the layer's own window; must-revalidate, proxy-revalidate and s-maxage forbid it
    (RFC 9111 §4.2.4).  The store keeps it that long."""
    origin.headers.append(("Cache-Control", cache_control))
    stack = make(stale_if_error=option)
    fresh = stack.get()
    [key] = [k for k in store.scan("wsgistack:cache:e:")]
    remaining = store.ttl(key)
    assert remaining is not None
    if expected_cache == "STALE":
        assert remaining > elapsed - 1  # kept in the store for as long as it may answer
    clock.now += elapsed
    if failure == "raises":
        origin.fail = RuntimeError("db down")
    else:
        origin.status = failure
    response = stack.get(status="*")
    if failure == "raises" and expected_cache != "STALE":
        expected_status, expected_cache = 500, None
    assert (response.status_int, response.headers.get("X-Cache")) == (expected_status, expected_cache)
    if expected_cache == "STALE":
        assert (response.body, response.headers["Age"]) == (fresh.body, str(elapsed))
        assert "Warning" not in response.headers


@pytest.mark.parametrize(("option", "cache_control", "request_cc", "expected_status", "expected_cache"), [
    pytest.param(0, "max-age=10, stale-if-error=60", "no-cache", 502, "MISS", id="no-cache refuses it"),
    pytest.param(0, "max-age=10, stale-if-error=60", "max-age=0", 502, "MISS", id="a reload refuses it"),
    pytest.param(0, "max-age=10, stale-if-error=60", "max-age=60, max-stale=30", 200, "STALE",
                 id="unless with a max-stale that covers it"),
    pytest.param(0, "max-age=10, stale-if-error=60", "no-cache, stale-if-error=30", 200, "STALE",
                 id="the request's stale-if-error lets it answer"),
    pytest.param(0, "max-age=10, stale-if-error=60", "max-age=0, stale-if-error=5", 502, "MISS",
                 id="the request's stale-if-error, too short"),
    pytest.param(600, "max-age=10", "min-fresh=5, stale-if-error=15", 200, "STALE",
                 id="the request's with the option's window"),
    pytest.param(600, "max-age=10", "stale-if-error=5", 200, "STALE",
                 id="the request's, too short, refuses nothing the request did not"),
    pytest.param(0, "max-age=10", "stale-if-error=60", 502, "MISS", id="the request's alone: nothing kept stale"),
    pytest.param(600, "max-age=10, must-revalidate", "stale-if-error=60", 502, "MISS",
                 id="the request's, on a must-revalidate answer"),
    pytest.param(600, "max-age=10", "Stale-If-Error=30, Max-Age=0", 200, "STALE", id="in any case"),
    pytest.param(600, "max-age=10", "no-cache, stale-if-error=-1", 502, "MISS", id="a negative one: none"),
])
def test_the_requests_stale_if_error(make: Callable[..., Stack], origin: Origin, clock: Clock, option: int,
                                     cache_control: str, request_cc: str, expected_status: int,
                                     expected_cache: str) -> None:
    """RFC 5861 §4: a request's ``stale-if-error=N`` accepts an answer stale for up to N seconds when the app
    fails, whatever else it said (no-cache, max-age, min-fresh); only within the time the entry is kept."""
    origin.headers.append(("Cache-Control", cache_control))
    stack = make(stale_if_error=option)
    stack.get()
    clock.now += 20  # stale for 10 s
    origin.status = "502 Bad Gateway"
    response = stack.get(headers={"Cache-Control": request_cc}, status="*")
    assert (response.status_int, response.headers.get("X-Cache")) == (expected_status, expected_cache)
    assert origin.calls == 2

# -- single-flight ---------------------------------------------------------------------------

def _concurrently(apps: list[Any], n: int, path: str = "/api/v1/search?q=x",
                  headers: list[dict[str, str]] | None = None) -> list[tuple[str, bytes]]:
    """``n`` requests at once (released by a barrier), the i-th to ``apps[i % len]`` with ``headers[i]``."""
    barrier = threading.Barrier(n)
    results: list[tuple[str, bytes]] = []

    def one(i: int) -> None:
        client = Client(apps[i % len(apps)])
        barrier.wait()
        response = client.get(path, headers=headers[i] if headers else None)
        results.append((response.headers.get("X-Cache", ""), response.get_data()))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    return results


def test_single_flight_calls_the_app_once(make: Callable[..., Stack], origin: Origin) -> None:
    origin.delay = 0.3
    stack = make()
    results = _concurrently([stack.wsgi], 8)
    assert origin.calls == 1
    assert sorted(label for label, _ in results) == ["HIT"] * 7 + ["MISS"]
    assert len({body for _, body in results}) == 1


def _languages(app: Any, languages: list[str]) -> list[tuple[str, str]]:
    """One concurrent request per language; (X-Cache, language the body was made for) of each."""
    results = _concurrently([app], len(languages), headers=[{"Accept-Language": lang} for lang in languages])
    return [(label, json.loads(body)["lang"]) for label, body in results]


def test_single_flight_per_vary_variant_on_a_cold_cache(make: Callable[..., Stack], origin: Origin) -> None:
    """Waiters for another variant than the leader's lead its fill in turn: one app call per variant."""
    origin.delay = 0.2
    origin.headers.append(("Vary", "Accept-Language"))
    stack = make()
    results = _languages(stack.wsgi, ["en"] * 4 + ["fr"] * 4)
    assert origin.calls == 2
    assert sorted(results) == sorted([("MISS", "en"), ("MISS", "fr")] + [("HIT", "en")] * 3 + [("HIT", "fr")] * 3)


def test_uncacheable_answers_are_not_queued(make: Callable[..., Stack], origin: Origin) -> None:
    """When the fill stores nothing, the waiters ask the app at once, together, not one after another."""
    origin.delay = 0.3
    origin.headers.append(("Cache-Control", "no-store"))
    stack = make()
    started = time.monotonic()
    results = _concurrently([stack.wsgi], 6)
    assert origin.calls == 6 and [label for label, _ in results] == ["MISS"] * 6
    assert time.monotonic() - started < 1.2  # the leader's 0.3 s, then the rest in parallel


def test_single_flight_across_processes(store: Store, origin: Origin, clock: Clock) -> None:
    origin.delay = 0.3
    # Two layers over one store stand for two worker processes.
    stacks = [Stack(store, origin), Stack(store, origin)]
    results = _concurrently([s.wsgi for s in stacks], 6)
    assert origin.calls == 1
    assert sorted(label for label, _ in results) == ["HIT"] * 5 + ["MISS"]


class PeerFillsOnLockRead(MemoryStore):
    """A store on which the peer's fill (its entry and the lock's DEL) lands just as the lock is read."""

    armed: tuple[str, str, bytes] | None = None  # (lock key, entry key, entry)

    def get(self, key: str) -> bytes | None:
        if self.armed is not None and key == self.armed[0]:
            lock_key, entry_key, raw = self.armed
            self.armed = None
            self.write([(entry_key, raw, 60)], [lock_key])
        return super().get(key)


def test_a_waiter_sees_the_entry_of_a_peer_that_just_finished(origin: Origin, clock: Clock) -> None:
    """Waiting for another process's fill, B reads the lock before the entry: once the lock is gone,
    the entry stored in the same round trip is there, and B answers from it instead of filling again."""
    store = PeerFillsOnLockRead()
    a, b = Stack(store, origin), Stack(store, origin)  # two processes
    assert a.get().headers["X-Cache"] == "MISS"
    [entry_key] = list(store.scan("wsgistack:cache:e:"))
    raw = store.get(entry_key)
    assert raw is not None
    store.delete(entry_key)  # a cold key again, which process A is filling:
    lock_key = f"wsgistack:cache:l:{entry_key[-32:]}"
    assert store.add(lock_key, b"1", ttl=5)
    store.armed = (lock_key, entry_key, raw)
    response = b.get()
    assert (response.headers["X-Cache"], origin.calls) == ("HIT", 1)


@pytest.mark.parametrize("elsewhere", [False, True], ids=["in this process", "in another process"])
@pytest.mark.parametrize(("waiter", "fails", "expected"), [
    pytest.param("max-age=1", True, (500, None, None, 3), id="max-age: the old entry is too old, the fill fails"),
    pytest.param("no-cache", True, (500, None, None, 3), id="no-cache: never the old entry, the fill fails"),
    pytest.param("max-age=1", False, (200, "HIT", "0", 2), id="max-age: the fill's answer, Age 0"),
    pytest.param("no-cache", False, (200, "HIT", "0", 2), id="no-cache: the fill's answer, fetched meanwhile"),
    pytest.param("min-fresh=400", False, (200, "MISS", None, 3),
                 id="min-fresh: the fill's answer is not fresh long enough, the app"),
])
def test_a_waiter_gets_only_what_its_directives_accept(store: Store, origin: Origin, clock: Clock, elsewhere: bool,
                                                       waiter: str, fails: bool,
                                                       expected: tuple[int, str | None, str | None, int]) -> None:
    """A request waiting on another one's fill (a no-cache reload) is never answered with the old entry its own
    Cache-Control refuses (RFC 9111 §5.2.1): the fill's answer if it accepts that, else the app's."""
    leader_stack = Stack(store, origin)
    waiter_stack = Stack(store, origin) if elsewhere else leader_stack
    old = leader_stack.get()
    clock.now += 2  # the entry is 2 s old
    origin.delay = 0.4
    if fails:
        origin.fail = RuntimeError("db down")
    led: list[Any] = []
    leader = threading.Thread(target=lambda: led.append(TestApp(leader_stack.wsgi).get(
        "/api/v1/search?q=x", headers={"Cache-Control": "no-cache"}, expect_errors=True)))
    leader.start()
    time.sleep(0.15)  # the leader is in the app
    response = TestApp(waiter_stack.wsgi).get("/api/v1/search?q=x", headers={"Cache-Control": waiter},
                                              expect_errors=True)
    leader.join(10)
    assert (response.status_int, response.headers.get("X-Cache"), response.headers.get("Age"),
            origin.calls) == expected
    assert response.body != old.body
    if not fails:
        assert led[0].headers["X-Cache"] == "MISS"
        assert (response.body == led[0].body) == (expected[1] == "HIT")

class Overlaps(Origin):
    """An Origin that records how many of its calls ran at once, at most."""

    def __init__(self) -> None:
        super().__init__()
        self.running = self.most = 0

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
        try:
            return super().__call__(environ, start_response)
        finally:
            with self.lock:
                self.running -= 1


def test_an_answer_that_cannot_be_stored_lets_every_process_ask_at_once(store: Store) -> None:
    """Four processes miss together; the one that fills finds its answer private: the three waiting for it
    ask the app together, as one process's threads do, not one after another (each waiting for the last)."""
    origin = Overlaps()
    origin.delay = 0.3
    origin.headers.append(("Cache-Control", "private"))
    stacks = [Stack(store, origin) for _ in range(4)]  # four processes on one store
    results = _concurrently([stack.wsgi for stack in stacks], 4)
    assert [label for label, _ in results] == ["MISS"] * 4
    assert (origin.calls, origin.most) == (4, 3)  # the filler alone, then the other three at once
    [lock] = [key for key in store.scan("wsgistack:cache:l:")]
    assert store.get(lock) == b"0"  # "ask the app", for a second: then the next miss fills again


class AnswersItself(Origin):
    """Answers a request carrying the environ key ``asks`` with ``status`` (its own condition), after the delay."""

    def __init__(self, asks: str, status: str) -> None:
        super().__init__()
        self.asks, self.own = asks, status

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if self.asks not in environ:
            return super().__call__(environ, start_response)
        with self.lock:
            self.calls += 1
        time.sleep(self.delay)
        start_response(self.own, [("ETag", '"abc"')] if self.own[:3] == "304" else [("Content-Length", "0")])
        return []


class PersonalFor(Origin):
    """Marks the answer to a request with X-Personal as this session's alone (a CSRF token handed out)."""

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if "HTTP_X_PERSONAL" in environ:
            environ[SESSION_BOUND] = True
        return super().__call__(environ, start_response)


@pytest.mark.parametrize(("made", "first", "status"), [
    pytest.param(lambda: AnswersItself("HTTP_IF_NONE_MATCH", "304 Not Modified"), {"If-None-Match": '"abc"'}, 304,
                 id="its own 304 (as Flask's send_file answers)"),
    pytest.param(lambda: AnswersItself("HTTP_RANGE", "206 Partial Content"), {"Range": "bytes=0-3"}, 206,
                 id="its own 206 (the range it asked for)"),
    pytest.param(lambda: AnswersItself("HTTP_RANGE", "416 Range Not Satisfiable"), {"Range": "bytes=999-"}, 416,
                 id="its own 416"),
    pytest.param(PersonalFor, {"X-Personal": "1"}, 200, id="an answer made for its session"),
])
def test_only_the_leaders_own_unstorable_answer_keeps_single_flight(store: Store, made: Callable[[], Origin],
                                                                    first: dict[str, str], status: int) -> None:
    """The fill lock's holder got an answer only its own request made unstorable; the others' can be stored:
    they take the lock in turn, the first fills, the rest are hits (not one app call each)."""
    origin = made()
    origin.delay = 0.3
    origin.headers.append(("Cache-Control", "max-age=60"))
    stacks = [Stack(store, origin) for _ in range(4)]  # four processes on one store
    results: dict[int, tuple[int, str]] = {}

    def run(i: int) -> None:
        time.sleep(0 if i == 0 else 0.05)
        response = TestApp(stacks[i].wsgi).get("/api/v1/search?q=x", headers=first if i == 0 else {}, status="*")
        results[i] = (response.status_int, response.headers.get("X-Cache", ""))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert results[0] == (status, "MISS")
    assert (sorted(results[i][1] for i in (1, 2, 3)), origin.calls) == (["HIT", "HIT", "MISS"], 2)


def test_the_ask_the_app_mark_lives_a_second_not_lock_timeout() -> None:
    """Misses ask the app at once only briefly: then the next one fills again (a lock_timeout of 10 s would
    leave single-flight off for 10 s)."""
    store = MemoryStore()
    origin = Origin()
    origin.headers.append(("Cache-Control", "private"))
    Stack(store, origin, lock_timeout=10).get()
    [lock] = list(store.scan("wsgistack:cache:l:"))
    assert store.get(lock) == b"0"
    time.sleep(1.2)
    assert store.get(lock) is None


def test_an_entry_outlives_the_mark_it_was_stored_under_in_memory_too(monkeypatch: pytest.MonkeyPatch,
                                                                     clock: Clock) -> None:
    """memory://: the save makes the lookup's mark (60 s) as long as the entry (an hour): two minutes on, a hit."""
    import stores.memory as memory_module

    monotonic = [1000.0]
    monkeypatch.setattr(memory_module, "_monotonic", lambda: monotonic[0])
    origin = Origin()
    origin.headers.append(("Cache-Control", "max-age=3600"))
    stack = Stack(MemoryStore(), origin)
    stack.get()
    monotonic[0] += 120
    clock.now += 120
    assert stack.get().headers["X-Cache"] == "HIT"


class FirstFillFails(Origin):
    """The first call fails after 0.2 s (raises ``failure``); the others answer as Origin does."""

    def __init__(self, failure: BaseException | None = None) -> None:
        super().__init__()
        self.failure = failure or RuntimeError("the first fill fails")

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        with self.lock:
            first = self.calls == 0
            if first:
                self.calls += 1
        if first:
            time.sleep(0.2)
            raise self.failure
        return super().__call__(environ, start_response)


class Held:
    """An app that holds the calls of ``X-Who: a`` and ``b`` until their gate opens; ``a`` answers as ``first``
    asks (``stored``, ``private`` or ``fails``), the others with a storable answer naming who asked."""

    def __init__(self, first: str) -> None:
        self.first = first
        self.calls: list[str] = []
        self.entered = {who: threading.Event() for who in ("a", "b")}
        self.gates = {who: threading.Event() for who in ("a", "b")}

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        who = environ["HTTP_X_WHO"]
        self.calls.append(who)
        if who in self.gates:
            self.entered[who].set()
            assert self.gates[who].wait(10)
        if who == "a" and self.first == "fails":
            raise RuntimeError("the slow fill fails")
        headers = [("Content-Type", "text/plain"), ("Content-Length", "1")]
        if who == "a" and self.first == "private":
            headers.append(("Cache-Control", "private"))
        start_response("200 OK", headers)
        return [who.encode()]


@pytest.mark.parametrize("first", [
    pytest.param("stored", id="its answer stored: the lock given back with the save"),
    pytest.param("private", id="its answer not storable: the lock handed over to 'ask the app'"),
    pytest.param("fails", id="the app raised: the lock given back"),
])
def test_a_slow_leader_whose_lock_expired_leaves_the_next_leaders_lock(store: Store, clock: Clock,
                                                                       first: str) -> None:
    """A leads, its app outlives its lock_timeout, B takes the lock and leads; when A's fill ends, it leaves
    B's lock alone, so C (a reload in a third process) waits for B's answer instead of asking the app too."""
    app = Held(first)
    a = Stack(store, app, lock_timeout=0.1)  # type: ignore[arg-type]  # three processes on one store
    b, c = Stack(store, app, lock_timeout=5), Stack(store, app, lock_timeout=5)  # type: ignore[arg-type]
    results: dict[str, tuple[int, str]] = {}

    def run(who: str, stack: Stack, headers: dict[str, str] | None = None) -> threading.Thread:
        def one() -> None:
            response = stack.web.get("/api/v1/search?q=x", headers={"X-Who": who, **(headers or {})},
                                     expect_errors=True)
            results[who] = (response.status_int, response.headers.get("X-Cache", ""))

        thread = threading.Thread(target=one)
        thread.start()
        return thread

    threads = [run("a", a)]
    try:
        assert app.entered["a"].wait(10)
        time.sleep(0.15)  # A's lock expires while its app runs
        threads.append(run("b", b))
        assert app.entered["b"].wait(10)
        [lock] = list(store.scan("wsgistack:cache:l:"))
        held = store.get(lock)  # B's
        app.gates["a"].set()
        threads[0].join(10)
        assert store.get(lock) == held  # A's ending left B's lock as B took it
        clock.now += 1  # B's answer is made after A's (a reload takes it as fetched for it)
        threads.append(run("c", c, {"Cache-Control": "no-cache"}))
        time.sleep(0.1)  # C waits for B's fill
    finally:
        for gate in app.gates.values():
            gate.set()
        for thread in threads:
            thread.join(10)
    assert (results["b"], results["c"]) == ((200, "MISS"), (200, "HIT"))
    assert results["a"][0] == (500 if first == "fails" else 200)
    assert app.calls == ["a", "b"]  # not C: it got B's answer
    assert list(store.scan("wsgistack:cache:l:")) == []  # B gave its own lock back


def test_a_lock_given_up_without_an_entry_is_taken_before_filling(store: Store) -> None:
    """B fails its fill; A, waiting for B, takes the lock before filling, so B's retry waits for A."""
    origin = FirstFillFails()
    origin.delay = 0.3
    a, b = Stack(store, origin), Stack(store, origin)  # two processes
    results: dict[str, tuple[int, str, bytes]] = {}

    def run(name: str, stack: Stack, start: float) -> None:
        time.sleep(start)
        response = TestApp(stack.wsgi).get("/api/v1/search?q=x", expect_errors=True)
        results[name] = (response.status_int, response.headers.get("X-Cache", ""), response.body)

    threads = [threading.Thread(target=run, args=args) for args in (("b", b, 0.0), ("a", a, 0.05),
                                                                     ("b again", b, 0.3))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert origin.calls == 2  # the failed fill and one more, not one per process
    assert results["b"][0] == 500
    assert (results["a"][:2], results["b again"][:2]) == ((200, "MISS"), (200, "HIT"))
    assert results["a"][2] == results["b again"][2]


class AlwaysFails(Origin):
    """Every call fails after 0.2 s."""

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        with self.lock:
            self.calls += 1
        time.sleep(0.2)
        raise RuntimeError("db down")


@pytest.mark.parametrize(("made", "calls", "labels"), [
    pytest.param(FirstFillFails, 2, [""] + ["HIT"] * 6 + ["MISS"], id="a passing failure: one more call"),
    pytest.param(lambda: FirstFillFails(HTTPException()), 2, [""] + ["HIT"] * 6 + ["MISS"],
                 id="a passing HTTPException without a code: a failure too"),
    pytest.param(AlwaysFails, 8, [""] * 8, id="a lasting one: the retry, then the others at once"),
])
def test_waiters_in_one_process_retry_a_failed_fill_once(store: Store, clock: Clock, made: Callable[[], Origin],
                                                         calls: int, labels: list[str]) -> None:
    """When the fill they wait for fails, one waiter asks the app again and the others wait for it; when it
    fails too, the others ask at once (not one after another, nor all at the first failure)."""
    origin = made()
    origin.delay = 0.3
    stack = Stack(store, origin)
    started = time.monotonic()
    results = _concurrently([stack.wsgi], 8)
    assert origin.calls == calls
    assert sorted(label for label, _ in results) == labels
    assert time.monotonic() - started < 1.5  # AlwaysFails: 3 x 0.2 s (8 x 0.2 s one after another)


def test_waiters_give_up_after_lock_timeout(make: Callable[..., Stack], origin: Origin) -> None:
    origin.delay = 0.4
    stack = make(lock_timeout=0.05)
    results = _concurrently([stack.wsgi], 3)
    assert origin.calls == 3
    assert [label for label, _ in results] == ["MISS"] * 3


def test_uncacheable_leader_releases_waiters_at_once(make: Callable[..., Stack], origin: Origin) -> None:
    origin.headers.append(("Cache-Control", "no-store"))
    origin.delay = 0.2
    stack = make(lock_timeout=5)
    started = time.monotonic()
    _concurrently([stack.wsgi], 3)
    assert origin.calls == 3
    assert time.monotonic() - started < 2


# -- streams and the tee -------------------------------------------------------------------------

class Stream:
    """An app iterable that records how far it was pulled and whether it was closed."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks, self.pulled, self.closed = chunks, 0, False

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self.chunks:
            self.pulled += 1
            yield chunk

    def close(self) -> None:
        self.closed = True


def _streaming_app(stream: Stream, headers: list[tuple[str, str]]) -> Any:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Stream:
        start_response("200 OK", headers)
        return stream

    return app


def _call(layer: Any, path: str = "/events") -> tuple[list[Any], Iterable[bytes]]:
    seen: list[Any] = []
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": path, "QUERY_STRING": "", "wsgi.url_scheme": "http",
               "HTTP_HOST": "localhost"}
    result = layer(environ, lambda status, headers, exc_info=None: seen.append((status, headers)))
    return seen, result


@pytest.mark.parametrize("headers", [
    pytest.param([("Content-Type", "text/event-stream")], id="event stream"),
    pytest.param([("Content-Type", "text/event-stream"), ("Content-Length", "12")], id="event stream with length"),
    pytest.param([("Content-Type", "application/octet-stream")], id="no Content-Length"),
])
def test_streams_pass_through_unbuffered_and_uncached(store: Store, headers: list[tuple[str, str]]) -> None:
    stream = Stream([b"data: 1\n\n", b"data: 2\n\n", b"data: 3\n\n"])
    layer = CacheMiddleware(_streaming_app(stream, headers), CacheMiddleware.Options(),
                            Context(stores={"shared": store}))
    seen, result = _call(layer)
    assert result is stream  # handed over untouched: no buffering, no tee
    assert dict(seen[0][1])["X-Cache"] == "MISS"
    assert list(store.scan("wsgistack:cache:e:")) == []


def test_cacheable_body_is_teed_chunk_by_chunk(store: Store) -> None:
    stream = Stream([b"ab", b"cd", b"ef"])
    app = _streaming_app(stream, [("Content-Type", "text/plain"), ("Content-Length", "6")])
    layer = CacheMiddleware(app, CacheMiddleware.Options(), Context(stores={"shared": store}))
    seen, result = _call(layer)
    chunks = iter(result)
    assert next(chunks) == b"ab"
    assert stream.pulled == 1  # the client has the first chunk before the app made the second
    assert list(chunks) == [b"cd", b"ef"]
    result.close()  # type: ignore[attr-defined]
    assert stream.closed
    seen, again = _call(layer)
    assert dict(seen[0][1])["X-Cache"] == "HIT"
    assert b"".join(again) == b"abcdef"


def test_closed_early_stores_nothing_and_releases(store: Store) -> None:
    stream = Stream([b"ab", b"cd", b"ef"])
    app = _streaming_app(stream, [("Content-Type", "text/plain"), ("Content-Length", "6")])
    layer = CacheMiddleware(app, CacheMiddleware.Options(), Context(stores={"shared": store}))
    _, result = _call(layer)
    next(iter(result))
    result.close()  # type: ignore[attr-defined]
    assert stream.closed
    assert layer._inflight == {}
    seen, _ = _call(layer)
    assert dict(seen[0][1])["X-Cache"] == "MISS"


def test_short_body_is_not_stored(store: Store) -> None:
    app = _streaming_app(Stream([b"abc"]), [("Content-Type", "text/plain"), ("Content-Length", "6")])
    layer = CacheMiddleware(app, CacheMiddleware.Options(), Context(stores={"shared": store}))
    _, result = _call(layer)
    list(result)
    assert list(store.scan("wsgistack:cache:e:")) == []


# -- purge -----------------------------------------------------------------------------------------

def _fill(stack: Stack, urls: list[str]) -> None:
    for url in urls:
        assert stack.get(url).headers["X-Cache"] == "MISS"


URLS = ["/api/v1/search?q=a", "/api/v1/search?q=b", "/api/v1/searches", "/api/v1/other", "/api/v2/search?q=a"]


@pytest.mark.parametrize(("pattern", "purged"), [
    pytest.param("/api/v1/search*", ["/api/v1/search?q=a", "/api/v1/search?q=b", "/api/v1/searches"],
                 id="prefix glob"),
    pytest.param("/api/v1/search", ["/api/v1/search?q=a", "/api/v1/search?q=b"], id="exact path"),
    pytest.param("/api/*/search", ["/api/v1/search?q=a", "/api/v1/search?q=b", "/api/v2/search?q=a"],
                 id="glob in the middle"),
    pytest.param("*", URLS, id="everything"),
    pytest.param("/nothing*", [], id="no match"),
])
def test_purge_by_pattern(make: Callable[..., Stack], store: Store, pattern: str, purged: list[str]) -> None:
    stack = make()
    _fill(stack, URLS)
    assert purge(store, pattern) == len(purged)
    for url in URLS:
        assert stack.get(url).headers["X-Cache"] == ("MISS" if url in purged else "HIT"), url


def test_purge_reaches_vary_variants_and_respects_key_prefix(make: Callable[..., Stack], origin: Origin,
                                                             store: Store) -> None:
    origin.headers.append(("Vary", "Accept-Language"))
    stack = make(key_prefix="other:")
    stack.get(headers={"Accept-Language": "en"})
    assert purge(store, "/api/*") == 0  # default prefix: not this layer's entries
    assert purge(store, "/api/*", prefix="other:") == 2  # the Vary index and the variant
    assert stack.get(headers={"Accept-Language": "en"}).headers["X-Cache"] == "MISS"


@pytest.mark.parametrize(("vary", "user", "stored_first", "pattern"), [
    pytest.param(False, None, True, "/api/v1/*", id="the refill of a stale entry, a pattern"),
    pytest.param(False, None, True, "/api/v1/search", id="the refill of a stale entry, an exact path"),
    pytest.param(False, None, False, "/api/v1/*", id="a fill on a cold cache"),
    pytest.param(True, None, True, "/api/v1/*", id="the refill of a Vary variant"),
    pytest.param(True, None, False, "*", id="a Vary variant's fill on a cold cache"),
    pytest.param(False, "alice:admin", True, "/api/*/search", id="a per-user refill"),
])
def test_a_purge_keeps_out_the_answer_of_a_fill_in_flight(store: Store, origin: Origin, clock: Clock, vary: bool,
                                                          user: str | None, stored_first: bool, pattern: str) -> None:
    """The data changes while a GET is in the app, then the entries are purged: that GET's answer, read
    before the change, is not stored; the next request asks the app, whose answer is."""
    if vary:
        origin.headers.append(("Vary", "Accept-Language"))
    stack = Stack(store, origin, ttl=1, per_user=user is not None)
    headers = {"Accept-Language": "de"} if vary else {}
    if user:
        headers["X-Test-User"] = user
    if stored_first:
        stack.get(headers=headers)
        clock.now += 2  # stale: the next GET fills it again
    inside, finish = threading.Event(), threading.Event()

    def slow_reads(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        answer = Origin.__call__(origin, environ, start_response)  # the data is read
        if not finish.is_set():
            inside.set()
            finish.wait(10)  # and the answer is made slowly
        return answer

    stack.layer.app = slow_reads
    slow: list[Any] = []
    reader = threading.Thread(target=lambda: slow.append(
        TestApp(stack.wsgi).get("/api/v1/search?q=x", headers=headers)))
    reader.start()
    assert inside.wait(10)
    assert purge(store, pattern) == ((2 if vary else 1) if stored_first else 0)  # the data changed: purged
    finish.set()
    reader.join(10)
    assert slow[0].headers["X-Cache"] == "MISS"
    assert list(store.scan("wsgistack:cache:l:")) == []  # its lock went all the same
    after = stack.get(headers=headers)
    assert (after.headers["X-Cache"], after.json["n"]) == ("MISS", origin.calls)  # not the answer read before
    assert stack.get(headers=headers).headers["X-Cache"] == "HIT"  # the next fill is stored

@pytest.mark.parametrize(("method", "user", "query", "status", "message"), [
    pytest.param("GET", "root:admin", "pattern=/api/*", 405, "The cache purge endpoint accepts POST or DELETE.",
                 id="GET refused"),
    pytest.param("POST", None, "pattern=/api/*", 401, "Purging the cache needs an authenticated identity.",
                 id="no identity"),
    pytest.param("POST", "alice:reader", "pattern=/api/*", 403, "Purging the cache needs one of the roles: admin.",
                 id="wrong role"),
    pytest.param("DELETE", "root:admin", "", 400, "The purge endpoint needs a pattern query parameter that "
                 "starts with '/' or '*', such as ?pattern=/api/v1/search*.", id="no pattern"),
])
def test_purge_endpoint_refusals(make: Callable[..., Stack], method: str, user: str | None, query: str,
                                 status: int, message: str) -> None:
    stack = make(purge_path="/_stack/cache/purge")
    headers = {"X-Test-User": user} if user else {}
    response = stack.web.request(f"/_stack/cache/purge?{query}", method=method, headers=headers, status=status)
    assert response.json["error"]["message"] == message
    if status == 405:
        assert response.headers["Allow"] == "POST, DELETE"
    if status == 401:
        assert response.headers["WWW-Authenticate"] == "Bearer"


@pytest.mark.parametrize("method", ["POST", "DELETE"])
def test_purge_endpoint_purges(make: Callable[..., Stack], method: str) -> None:
    stack = make(purge_path="/_stack/cache/purge", purge_roles=["admin", "ops"])
    _fill(stack, URLS)
    response = stack.web.request("/_stack/cache/purge?pattern=/api/v1/search*", method=method,
                                 headers={"X-Test-User": "carol:ops"})
    assert response.json == {"purged": 3, "pattern": "/api/v1/search*"}
    assert response.headers["Cache-Control"] == "no-store"
    assert stack.get("/api/v1/search?q=a").headers["X-Cache"] == "MISS"
    assert stack.get("/api/v1/other").headers["X-Cache"] == "HIT"


# -- store failure ----------------------------------------------------------------------------------

@pytest.mark.redis
def test_store_down_bypasses_and_recovers(redis_server: Any, redis_url: str, origin: Origin,
                                          clock: Clock) -> None:
    if redis_server is None:
        pytest.skip("needs the private redis-server to stop and start it")
    from stores.redis import RedisStore

    store = RedisStore(redis_url, reset_timeout=0.2)
    stack = Stack(store, origin)
    assert stack.get().headers["X-Cache"] == "MISS"
    redis_server.stop()
    try:
        for _ in range(4):  # also once the circuit is open
            response = stack.get()
            assert (response.status_int, response.headers["X-Cache"]) == (200, "BYPASS")
        errors = [f for e, f in stack.events if e == "store.error"]
        assert errors and all(f["layer"] == "cache" and f["store"] == "shared" for f in errors)
    finally:
        redis_server.start()
    time.sleep(0.3)
    assert [stack.get().headers["X-Cache"] for _ in range(3)] == ["MISS", "HIT", "HIT"]
    store.close()


@pytest.mark.redis
def test_store_down_closed_answers_503(redis_server: Any, redis_url: str, origin: Origin) -> None:
    if redis_server is None:
        pytest.skip("needs the private redis-server to stop and start it")
    from stores.redis import RedisStore

    store = RedisStore(redis_url, reset_timeout=0.2, failure_threshold=50)
    stack = Stack(store, origin, on_store_error="closed")
    redis_server.stop()
    try:
        response = stack.get(status=503)
        assert response.json["error"]["message"] == "The response cache is unavailable."
        assert response.headers["Retry-After"] == "5"
        assert origin.calls == 0
    finally:
        redis_server.start()
    store.close()


class BrokenStore(MemoryStore):
    """A memory store whose writes fail."""

    def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        from stores import StoreError

        raise StoreError("disk full")

    def write_unless_marked(self, mark: str, seen: bytes | None, sets: Any, deletes: Any = (),
                            unlock: tuple[str, bytes] | None = None) -> bool:
        from stores import StoreError

        raise StoreError("disk full")


def test_failed_write_still_answers(origin: Origin) -> None:
    stack = Stack(BrokenStore(), origin)
    assert stack.get().headers["X-Cache"] == "MISS"
    assert stack.get().headers["X-Cache"] == "MISS"
    assert ("store.error", {"store": "shared", "layer": "cache", "error": "disk full"}) in stack.events


# -- options ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(("options", "message"), [
    pytest.param({"statuses": [200, 500]}, "statuses may list only codes from 200 to 499 (got 500); "
                 "error responses are never cached", id="5xx status"),
    pytest.param({"statuses": [200, 304]}, "statuses may not list 304: a 304 answers one request's Range or "
                 "condition and would be replayed to requests without it", id="304"),
    pytest.param({"statuses": [206]}, "statuses may not list 206", id="206"),
    pytest.param({"statuses": [200, 416]}, "statuses may not list 416: a 416 answers one request's Range or "
                 "condition and would be replayed to requests without it", id="416"),
    pytest.param({"purge_path": "purge"}, "purge_path must start with '/' (got 'purge')", id="relative purge path"),
    pytest.param({"purge_path": "/p", "purge_roles": []}, "purge_roles may not be empty when purge_path is set",
                 id="no purge roles"),
    pytest.param({"ttl": 0}, "greater than 0", id="zero ttl"),
    pytest.param({"key_prefix": ""}, "key_prefix '' would take in the keys under 'session:' too: in a memory:// "
                 "store they would be evicted to make room for cached answers", id="an empty key prefix"),
    pytest.param({"key_prefix": "re"}, "key_prefix 're' would take in the keys under 'revoked:' too",
                 id="a key prefix the revoked tokens' keys start with"),
    pytest.param({"key_prefix": "session:A"}, "key_prefix 'session:A' would take in the keys under 'session:' too",
                 id="a key prefix inside the sessions' keys"),
    pytest.param({"key_prefix": "revoked:e"}, "key_prefix 'revoked:e' would take in the keys under 'revoked:' too",
                 id="a key prefix inside the revoked tokens' keys"),
    pytest.param({"shelf": 1}, "Extra inputs are not permitted", id="unknown option"),
])
def test_options_refused(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message.replace("?", r"\?").replace("(", r"\(").replace(")", r"\)")):
        CacheMiddleware.Options(**options)


def test_unknown_store_is_named() -> None:
    with pytest.raises(LookupError, match=r"unknown store 'shared' \(known: cache\)"):
        CacheMiddleware(Origin(), CacheMiddleware.Options(), Context(stores={"cache": MemoryStore()}))


# -- from stack.yaml ----------------------------------------------------------------------------------

def test_built_from_yaml(make_stack: Callable[..., TestApp]) -> None:
    stack = make_stack({
        "stores": {"shared": "memory://"},
        "app": {"factory": "stack_support:echo_app"},
        "pipeline": [
            {"versioning": {"supported": ["v1", "v2"]}},
            {"cache": {"store": "shared", "ttl": 60, "paths": ["/api/*"]}},
        ],
    })
    first = stack.get("/api/search?q=x", headers={"X-API-Version": "v2"})
    second = stack.get("/api/search?q=x", headers={"X-API-Version": "v2"})
    assert first.json["path"] == "/api/v2/search"
    assert (first.headers["X-Cache"], second.headers["X-Cache"]) == ("MISS", "HIT")
    assert "X-Cache" not in stack.get("/other").headers  # outside the cache's paths


def test_yaml_option_errors_name_the_key(make_stack: Callable[..., TestApp]) -> None:
    from config import ConfigError

    with pytest.raises(ConfigError) as info:
        make_stack("pipeline:\n  - cache: {statuses: [200, 503]}\n")
    assert "statuses may list only codes from 200 to 499 (got 503)" in str(info.value)


@pytest.mark.parametrize("value", [
    pytest.param(b"garbage", id="not JSON"),
    pytest.param(b'{"v": 3}', id="a Vary index of another shape"),
    pytest.param(b'{"s": "200 OK"}\nbody', id="no expiry"),
    pytest.param(b"\xff\xfe\n", id="not UTF-8"),
    pytest.param(b'{"x": 1}\nbody', id="an expiry and nothing else"),
    pytest.param(b'{"x": 9e99, "f": 9e99, "t": 0, "s": "200 OK", "h": 5}\nbody', id="headers not a list"),
    pytest.param(b'{"x": 9e99, "f": 9e99, "t": 0, "s": "200 OK", "h": [["A"]]}\nbody', id="a header not a pair"),
    pytest.param(b'{"x": 9e99, "f": 9e99, "t": 0, "s": 200, "h": []}\nbody', id="a status not text"),
    pytest.param(b'{"x": 9e99, "f": "soon", "t": 0, "s": "200 OK", "h": []}\nbody', id="freshness not a number"),
    pytest.param(b'[1, 2]\nbody', id="a list"),
    pytest.param(b'{"x": 9e99, "f": 9e99, "t": 1e400, "s": "200 OK", "h": []}\nbody', id="born at infinity"),
    pytest.param(b'{"x": 9e99, "f": 9e99, "t": NaN, "s": "200 OK", "h": []}\nbody', id="born at NaN"),
    pytest.param(b'{"x": 9e99, "f": 9e99, "t": 1' + b"0" * 400 + b', "s": "200 OK", "h": []}\nbody',
                 id="born at a number no float holds"),
    pytest.param(b'{"x": NaN, "f": 9e99, "t": 0, "s": "200 OK", "h": []}\nbody', id="an expiry of NaN"),
    pytest.param(b'{"v": [1], "g": "1", "x": 9e99}', id="a Vary index naming a number"),
    pytest.param(b'{"v": [["a"]], "g": "1", "x": 9e99}', id="a Vary index naming a list"),
    pytest.param(b"[" * 5000 + b"]" * 5000 + b"\nbody", id="nested deeper than Python recurses"),
    pytest.param(b'{"v": ' + b"[" * 5000 + b"]" * 5000 + b"}", id="a Vary index nested too deep"),
])
def test_foreign_values_are_misses(make: Callable[..., Stack], store: Store, value: bytes) -> None:
    stack = make()
    stack.get()
    keys = list(store.scan("wsgistack:cache:e:"))
    assert len(keys) == 1
    store.set(keys[0], value, ttl=60)
    assert stack.get().headers["X-Cache"] == "MISS"
    assert stack.get().headers["X-Cache"] == "HIT"


def test_an_entry_stored_without_a_write_mark_is_a_hit(make: Callable[..., Stack], store: Store) -> None:
    """An entry written before entries carried the mark they were stored under is served, not taken as stale."""
    stack = make()
    stack.get()
    [key] = store.scan("wsgistack:cache:e:")
    head, _, body = (store.get(key) or b"").partition(b"\n")
    entry = json.loads(head)
    del entry["m"]
    store.set(key, json.dumps(entry).encode() + b"\n" + body, ttl=60)
    hit = stack.get()
    assert (hit.headers["X-Cache"], hit.json["n"], stack.origin.calls) == ("HIT", 1, 1)


@pytest.mark.redis
@pytest.mark.parametrize("where", ["the entry", "the write mark"])
def test_a_value_of_another_redis_type_is_written_over(redis_url: str, origin: Origin, clock: Clock,
                                                       where: str) -> None:
    """Something else wrote a list there: a miss, stored over it (not a BYPASS, or no caching, for good)."""
    store = store_from_url(redis_url)
    client = redis.Redis.from_url(redis_url)
    try:
        stack = Stack(store, origin)
        stack.get()
        [entry] = [k for k in cast(list[bytes], client.keys("*")) if b":cache:e:" in k]
        key = entry if where == "the entry" else entry.replace(b":cache:e:", b":cache:w:", 1)  # its URI's mark
        client.delete(entry, key)
        client.rpush(key, b"x")
        assert stack.get().headers["X-Cache"] == "MISS"
        assert stack.get().headers["X-Cache"] == "HIT"
    finally:
        client.close()
        store.close()


def test_with_the_flask_core(make_stack: Callable[..., TestApp]) -> None:
    stack = make_stack({
        "pipeline": [
            {"versioning": {"supported": ["v1", "v2"]}},
            {"cache": {"ttl": 60}},
        ],
    })
    first = stack.get("/api/health", headers={"X-API-Version": "v2"})
    second = stack.get("/api/health", headers={"X-API-Version": "v2"})
    other = stack.get("/api/health")
    assert (first.json["version"], other.json["version"]) == ("v2", "v1")
    assert (first.headers["X-Cache"], second.headers["X-Cache"], other.headers["X-Cache"]) == ("MISS", "HIT", "MISS")
    assert second.body == first.body


def test_long_body_is_not_stored(store: Store) -> None:
    app = _streaming_app(Stream([b"abc", b"def", b"ghi"]), [("Content-Type", "text/plain"), ("Content-Length", "6")])
    layer = CacheMiddleware(app, CacheMiddleware.Options(), Context(stores={"shared": store}))
    _, result = _call(layer)
    assert list(result) == [b"abc", b"def", b"ghi"]
    assert list(store.scan("wsgistack:cache:e:")) == []


@pytest.mark.parametrize(("size", "expected"), [
    pytest.param(1_048_576, ["MISS", "HIT"], id="1 MiB: stored"),
    pytest.param(1_048_577, ["MISS", "MISS"], id="a byte over 1 MiB: not stored"),
])
def test_max_body_bytes_is_one_mebibyte_by_default(make: Callable[..., Stack], origin: Origin, size: int,
                                                   expected: list[str]) -> None:
    origin.body = b"x" * size
    stack = make()
    answers = [stack.get() for _ in range(2)]
    assert [(a.headers["X-Cache"], len(a.body)) for a in answers] == [(label, size) for label in expected]


def test_a_full_memory_store_evicts_cache_entries_only(origin: Origin, clock: Clock) -> None:
    """Clients choose cache keys at will; filling the store must not push out other layers' state."""
    store = MemoryStore(max_entries=8)
    store.set("revoked:jti-1", b"1", ttl=900)
    stack = Stack(store, origin)
    for i in range(50):
        assert stack.get(f"/api/v1/search?q={i}").headers["X-Cache"] == "MISS"
    assert store.get("revoked:jti-1") == b"1"
    assert len(store) <= 8
    assert stack.get("/api/v1/search?q=49").headers["X-Cache"] == "HIT"  # the newest entries stay


@pytest.mark.parametrize("on_store_error", ["open", "closed"])
def test_counts_of_wrong_passwords_filling_the_store_leave_the_cache_room(origin: Origin, clock: Clock,
                                                                           on_store_error: str) -> None:
    """Wrong passwords for made-up names (one count each) cannot turn the cache off, nor make it answer 503."""
    store = MemoryStore(max_entries=100)
    store.allow_eviction("login-failures:", lowest=False)  # as the core's login declares them
    for i in range(100):
        store.incr(f"login-failures:{i:032x}", ttl=900)
    stack = Stack(store, origin, on_store_error=on_store_error)
    assert [stack.get("/api/v1/search?q=x").headers["X-Cache"] for _ in range(2)] == ["MISS", "HIT"]
    assert "store.error" not in stack.names()
    assert len(store) <= 100
    assert len(list(store.scan("login-failures:"))) >= 50  # the cache took room from them down to half


class Closing:
    """An answer whose close() runs ``then`` (a transaction that commits when the response is closed)."""

    def __init__(self, body: bytes, then: Callable[[], None]) -> None:
        self.body, self.then = body, then

    def __iter__(self) -> Iterator[bytes]:
        yield self.body

    def close(self) -> None:
        self.then()


def test_a_write_that_commits_after_its_answer_started_leaves_nothing_stale(store: Store, clock: Clock) -> None:
    """Flask's teardown_request, a transaction ending in close(): a GET that looks up between the write's
    start_response and its commit reads the old data; the write's second mark, once closed, keeps it out."""
    data = {"v": 0}
    during: list[Any] = []
    stack: Stack

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        body = json.dumps({"v": data["v"]}).encode()
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        if environ["REQUEST_METHOD"] == "GET":
            return [body]

        def commit() -> None:
            during.append(TestApp(stack.wsgi).get("/api/v1/search?q=x"))  # between start_response and commit
            data["v"] = 1

        return Closing(body, commit)

    stack = Stack(store, app)  # type: ignore[arg-type]
    assert stack.get().headers["X-Cache"] == "MISS"
    stack.web.post("/api/v1/search?q=x")
    assert (during[0].headers["X-Cache"], during[0].json) == ("MISS", {"v": 0})
    after = stack.get()
    assert (after.headers["X-Cache"], after.json) == ("MISS", {"v": 1})
    assert stack.get().json == {"v": 1}


@pytest.mark.parametrize(("reader", "writer"), [
    pytest.param({"Forwarded": "for=198.51.100.1;proto=https"}, {"Forwarded": "for=203.0.113.9;proto=https"},
                 id="clients named in Forwarded: one entry for both, and a write reaches it"),
    pytest.param({}, {"X-HTTP-Method-Override": "PUT"}, id="a write that overrides its method"),
])
def test_a_write_reaches_the_entry_other_clients_get(make: Callable[..., Stack], origin: Origin,
                                                     reader: dict[str, str], writer: dict[str, str]) -> None:
    stack = make()
    assert [stack.get(headers=reader).headers["X-Cache"] for _ in range(2)] == ["MISS", "HIT"]
    if "Forwarded" in writer:  # another client behind the same proxy: the same entry
        assert stack.get(headers=writer).headers["X-Cache"] == "HIT"
    stack.web.post("/api/v1/search?q=x", headers=writer)
    assert stack.get(headers=reader).headers["X-Cache"] == "MISS"


def test_forwarded_keys_on_its_scheme_and_host() -> None:
    value = 'for=198.51.100.1;Proto=HTTPS;host="Example.org", for=10.0.0.1;proto=http'
    assert cache_module._forwarded_key(value) == "proto=https;host=example.org;proto=http"


@pytest.mark.parametrize(("options", "request_headers"), [
    pytest.param({}, {"Cache-Control": "no-cache"}, id="stale_if_error off"),
    pytest.param({"stale_if_error": 600}, {"Cache-Control": "no-cache"}, id="the request said no-cache"),
])
def test_no_stale_answer_for_a_failing_app_unless_asked_for(make: Callable[..., Stack], origin: Origin,
                                                            options: dict[str, Any],
                                                            request_headers: dict[str, str]) -> None:
    stack = make(**options)
    assert stack.get().headers["X-Cache"] == "MISS"
    origin.status = "500 Internal Server Error"
    failed = stack.get(headers=request_headers, status=500)
    assert "X-Cache" not in failed.headers or failed.headers["X-Cache"] == "MISS"


def test_two_apps_mounted_at_other_prefixes_keep_their_own_entries(make: Callable[..., Stack], origin: Origin) -> None:
    stack = make()
    first = stack.get(extra_environ={"SCRIPT_NAME": "/one"})
    second = stack.get(extra_environ={"SCRIPT_NAME": "/two"})
    assert [first.headers["X-Cache"], second.headers["X-Cache"]] == ["MISS", "MISS"]
    assert stack.get(extra_environ={"SCRIPT_NAME": "/one"}).headers["X-Cache"] == "HIT"
    assert origin.calls == 2
