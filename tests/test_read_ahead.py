"""Reads ahead: the session's and the blocklist's Redis reads ride in the rate limiter's round trip.

Every stack here is built from YAML by the builder (which scopes the reads)
on a real redis-server, with a connection class that counts round trips
(one socket write per pipeline or command).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, cast

import pytest
import redis
from webtest import TestApp

from config import build, parse, read_text
from middleware.auth import AuthMiddleware
from middleware.base import IDENTITY, SESSION
from stores.breaker import CircuitBreaker
from stores.redis import RedisStore

if TYPE_CHECKING:
    from _typeshed.wsgi import WSGIApplication

pytestmark = pytest.mark.redis

SECRET = "s" * 40
JWT = "j" * 40


class Counting(redis.Connection):
    """A real connection that counts its socket writes: one per round trip."""

    writes = 0

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        type(self).writes += 1
        super().send_packed_command(command, check_health)  # type: ignore[no-untyped-call]


#: Called with the environ of every request that reaches the app (a test's look at the store meanwhile).
ON_CALL: list[Callable[[dict[str, Any]], None]] = []


def app_factory(options: dict[str, Any] | None = None) -> Callable[..., Iterable[bytes]]:
    """``/login`` puts a user in the session; every other path echoes the session user and the identity."""

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        for hook in ON_CALL:
            hook(environ)
        session = environ[SESSION]
        if environ["PATH_INFO"] == "/login":
            session["user"] = {"sub": "alice", "roles": ["user"]}
        identity = environ.get(IDENTITY)
        body = json.dumps({"session_user": (session.get("user") or {}).get("sub"),
                           "identity": identity.subject if identity else None,
                           "path": environ["PATH_INFO"]}).encode()
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]

    return app


PIPELINE = f"""
app: {{factory: "test_read_ahead:app_factory"}}
pipeline:
  - errors: {{}}
  - ratelimit: {{store: shared, limits: ["1000/minute"]}}
  - session: {{store: shared, secret_key: "{SECRET}", cookie_name: sid, cookie_secure: false{{session_scope}}}}
  - auth: {{store: shared, secret: "{JWT}", default: optional}}
"""


@pytest.fixture
def stack(redis_url: str) -> Iterator[Callable[..., tuple[TestApp, RedisStore]]]:
    made: list[Any] = []

    def make(session_scope: str = "") -> tuple[TestApp, RedisStore]:
        pool = redis.ConnectionPool.from_url(redis_url, connection_class=Counting)
        store = RedisStore(client=redis.Redis(connection_pool=pool), breaker=CircuitBreaker(50, 0.2, name="t"))
        built = build(parse(read_text(PIPELINE.replace("{session_scope}", session_scope))),
                      stores={"shared": store})
        made.append((built, pool))
        return TestApp(built.app, extra_environ={"REMOTE_ADDR": "192.0.2.9"}), store

    yield make
    for built, pool in made:
        built.close()
        pool.disconnect()


def _round_trips(app: TestApp, path: str, **kwargs: Any) -> tuple[int, Any]:
    before = Counting.writes
    response = app.get(path, **kwargs)
    return Counting.writes - before, response


def test_the_session_read_rides_in_the_rate_limiters_round_trip(stack: Callable[..., tuple[TestApp, RedisStore]],
                                                                 redis_url: str) -> None:
    app, store = stack()
    app.get("/login")
    assert "sid" in app.cookies
    probe = redis.Redis.from_url(redis_url)
    [key] = probe.keys(store.key_prefix + "session:*")
    probe.pexpire(key, 1_000_000)  # as if the session had been idle for a while
    trips, response = _round_trips(app, "/me")
    assert (trips, response.json) == (1, {"session_user": "alice", "identity": "alice", "path": "/me"})
    # The read still slides the idle timeout, as GETEX does when the session layer sends it.
    assert 1790_000 < probe.pttl(key) <= 1800_000
    probe.close()


def test_the_blocklist_read_rides_along_for_a_known_token(stack: Callable[..., tuple[TestApp, RedisStore]]) -> None:
    from middleware.auth import AuthMiddleware

    app, _ = stack()

    service = next(layer for layer in _layers(app) if isinstance(layer, AuthMiddleware)).tokens
    token = service.issue("bob", ["user"])["access_token"]
    headers = {"Authorization": f"Bearer {token}"}
    first, response = _round_trips(app, "/me", headers=headers)
    assert (first, response.json["identity"]) == (2, "bob")  # a token seen first: verified, then read
    again, response = _round_trips(app, "/me", headers=headers)
    assert (again, response.json["identity"]) == (1, "bob")  # known: its blocklist read rides along
    service.revoke(token)
    refused = app.get("/me", headers=headers, status=401)
    assert "revoked" in refused.json["error"]["message"]


def test_a_request_outside_the_session_layers_scope_reads_nothing_ahead(
        stack: Callable[..., tuple[TestApp, RedisStore]], redis_url: str) -> None:
    app, _ = stack(session_scope=", paths: ['/login', '/me']")
    app.get("/login")
    probe = redis.Redis.from_url(redis_url)
    probe.config_resetstat()
    trips, _ = _round_trips(app, "/elsewhere", expect_errors=True)
    stats = {k.removeprefix("cmdstat_"): v["calls"] for k, v in probe.info("commandstats").items()}
    probe.close()
    assert trips == 1 and "getex" not in stats


def test_a_failed_read_ahead_leaves_the_layer_to_read_and_to_apply_its_policy(
        stack: Callable[..., tuple[TestApp, RedisStore]]) -> None:
    """The key holds a list: the read ahead fails (WRONGTYPE) without failing the rate limiter; the
    session layer then reads itself, meets the same foreign value, and takes it as a corrupt session."""
    app, store = stack()
    app.get("/login")
    sid_key = next(iter(store.client.keys(store.key_prefix + "session:*")))
    store.client.delete(sid_key)
    store.client.rpush(sid_key, b"not a string")
    before = Counting.writes
    answer = app.get("/me")
    assert Counting.writes - before == 3  # the rate limiter's pipeline, the session's own GETEX, its DEL
    assert answer.json["session_user"] is None
    assert store.client.exists(sid_key) == 0
    assert "RateLimit-Remaining" in answer.headers  # the limiter counted the request all the same


def _layers(app: TestApp) -> list[Any]:
    """The layer instances of a built stack, outermost first (through the scope shims)."""
    found, current = [], app.app
    while current is not None:
        found.append(current)
        current = getattr(current, "layer", None) or getattr(current, "app", None)
    return found


def test_a_store_that_does_not_answer_is_waited_for_once(stack: Callable[..., tuple[TestApp, RedisStore]]) -> None:
    """When the rate limiter's round trip times out, the layers read for meet the same failure at once
    and apply their on_store_error, instead of each waiting socket_timeout for the same store again."""
    app, _ = stack()
    app.get("/login")
    service = next(layer for layer in _layers(app) if isinstance(layer, AuthMiddleware)).tokens
    token = service.issue("bob", ["user"])["access_token"]
    app.get("/me", headers={"Authorization": f"Bearer {token}"})  # known now: its blocklist read rides along
    sent: list[bytes] = []
    real = Counting.send_packed_command

    def silent(self: Counting, command: Any, check_health: bool = True) -> None:
        sent.append(b"".join(command) if isinstance(command, list) else command)
        raise redis.TimeoutError("Timeout reading from socket")  # what a store that does not answer gives

    Counting.send_packed_command = silent  # type: ignore[method-assign]
    try:
        by_token = app.get("/me", headers={"Authorization": f"Bearer {token}"}, status=503)
        token_sends = len(sent)
        by_cookie = app.get("/me", status=503)
    finally:
        Counting.send_packed_command = real  # type: ignore[method-assign]
    # Each request: the rate limiter's pipeline only, no GET (auth) or GETEX (session) of their own.
    assert (token_sends, len(sent)) == (1, 2)
    assert by_token.json["error"]["message"] == "The token store is unavailable; retry shortly."
    assert by_cookie.json["error"]["message"].startswith("the session could not be loaded")
    assert by_token.headers["Retry-After"] == by_cookie.headers["Retry-After"] == "5"


# -- the cache's read-or-lock ---------------------------------------------------------------

class Rewrite:
    """A plain factory layer that rewrites one path, with no ``preview_environ``: reads ahead cannot foresee it."""

    def __init__(self, app: WSGIApplication, source: str = "/a", target: str = "/b") -> None:
        self.app, self.source, self.target = app, source, target

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        if environ["PATH_INFO"] == self.source:
            environ["PATH_INFO"] = self.target
        return self.app(environ, start_response)


class ForeseenRewrite(Rewrite):
    """The same rewrite, with the ``preview_environ`` any layer may give: the reads ahead see it."""

    def preview_environ(self, environ: dict[str, Any]) -> dict[str, Any]:
        return {"PATH_INFO": self.target} if environ["PATH_INFO"] == self.source else {}


CACHED = f"""
app: {{factory: "test_read_ahead:app_factory"}}
pipeline:
  - errors: {{}}
  - ratelimit: {{store: shared, limits: ["{{limit}}"]}}
  - test_read_ahead:Rewrite: {{}}
  - test_read_ahead:ForeseenRewrite: {{source: /c, target: /d}}
  - session: {{store: shared, secret_key: "{SECRET}", cookie_name: sid, cookie_secure: false}}
  - auth: {{store: shared, secret: "{JWT}", default: optional, rules: [{{paths: ["/private/*"], auth: required}}]}}
  - versioning: {{supported: [v1, v2], default: v1}}
  - cache: {{store: shared, ttl: 60, per_user: true, cookie_names: [sid]}}
"""


def _cached(redis_url: str, text: str) -> Iterator[tuple[TestApp, redis.Redis]]:
    pool = redis.ConnectionPool.from_url(redis_url, connection_class=Counting)
    store = RedisStore(client=redis.Redis(connection_pool=pool), breaker=CircuitBreaker(50, 0.2, name="t"))
    built = build(parse(read_text(text)), stores={"shared": store})
    probe = redis.Redis.from_url(redis_url)
    app = TestApp(built.app, extra_environ={"REMOTE_ADDR": "192.0.2.9"})
    app.get("/warm-up")  # connects and loads the scripts (a fresh server answers NOSCRIPT once)
    store.unlock("warm-up", b"none")  # and the one that gives a fill lock back, which a fill that stores never runs
    yield app, probe
    probe.close()
    built.close()
    pool.disconnect()


@pytest.fixture
def cached(redis_url: str, request: pytest.FixtureRequest) -> Iterator[tuple[TestApp, redis.Redis]]:
    yield from _cached(redis_url, CACHED.replace("{limit}", getattr(request, "param", "1000/minute")))


PURGE = "/cache/purge"


@pytest.fixture
def purgeable(redis_url: str) -> Iterator[tuple[TestApp, redis.Redis]]:
    """The cached stack, its cache with a purge endpoint."""
    text = CACHED.replace("{limit}", "1000/minute").replace("cookie_names: [sid]}",
                                                            f"cookie_names: [sid], purge_path: {PURGE}}}")
    assert PURGE in text
    yield from _cached(redis_url, text)


def _locks(probe: redis.Redis) -> list[bytes]:
    """The fill locks held (not the "ask the app" a fill of an answer it could not store leaves for a second)."""
    return [k for k in cast(list[bytes], probe.keys("*")) if b"cache:l:" in k and probe.get(k) != b"0"]


@pytest.mark.parametrize(("path", "seen_as"), [
    ("/api/v2/search?q=a", "/api/v2/search"),
    ("/api/search?q=a", "/api/v1/search"),  # rewritten by the versioning layer: its preview shows how
    ("/other?q=a", "/other"),
    ("/c?q=a", "/d"),  # a factory layer's preview_environ
])
def test_a_cached_get_reads_and_locks_in_the_rate_limiters_round_trip(
        cached: tuple[TestApp, redis.Redis], path: str, seen_as: str) -> None:
    app, probe = cached
    trips, miss = _round_trips(app, path)
    # The limiter's pipeline read the entry and took the fill lock; the cache's one round trip stores the
    # entry and drops the lock.
    assert (trips, miss.headers["X-Cache"], miss.json["path"]) == (2, "MISS", seen_as)
    assert _locks(probe) == []
    trips, hit = _round_trips(app, path)
    assert (trips, hit.headers["X-Cache"], hit.body) == (1, "HIT", miss.body)


def test_a_write_is_one_transaction_and_the_next_get_reads_its_mark_ahead(cached: tuple[TestApp, redis.Redis]) -> None:
    """The write's marks and deletes go in one MULTI/EXEC (twice); the next GET's read ahead finds the new mark
    (no round trip of the cache's own for it), and that GET's answer is stored at once."""
    app, probe = cached
    path = "/api/v1/search?q=w"
    app.get(path)
    marks = {k: probe.get(k) for k in probe.keys("*") if b"cache:w:" in k}  # lookups set one per key they read
    probe.config_resetstat()
    before = Counting.writes
    app.post(path)
    stats = {k.removeprefix("cmdstat_"): v["calls"] for k, v in probe.info("commandstats").items()}
    # The limiter's pipeline, then the cache's marks and deletes in one transaction, once when the app
    # answers and once when its answer is closed (a commit after start_response).
    assert (Counting.writes - before, stats.get("multi"), stats.get("exec")) == (3, 2, 2)
    [mark] = [k for k in probe.keys("*") if b"cache:w:" in k and probe.get(k) != marks.get(k)]
    found: list[Any] = []
    ON_CALL.append(lambda environ: found.extend(v for k, v in environ.items()
                                                if k.startswith("wsgistack.cache.mark.")))
    try:
        trips, miss = _round_trips(app, path)
    finally:
        ON_CALL.clear()
    assert (trips, miss.headers["X-Cache"]) == (2, "MISS")  # the limiter's pipeline (read, lock, mark), the save
    assert [seen for _, seen, _ in found] == [probe.get(mark)]
    trips, hit = _round_trips(app, path)
    assert (trips, hit.headers["X-Cache"], hit.body) == (1, "HIT", miss.body)


@pytest.mark.parametrize(("path", "seen_as"), [
    ("/api/v2/search?q=a", "/api/v2/search"),
    ("/api/search?q=a", "/api/v1/search"),
    (f"{PURGE}/x?q=a", f"{PURGE}/x"),  # under the purge path, not it: an entry as any other
    (f"{PURGE}d?q=a", f"{PURGE}d"),
])
def test_with_a_purge_path_a_cached_get_is_still_read_ahead(purgeable: tuple[TestApp, redis.Redis], path: str,
                                                             seen_as: str) -> None:
    app, probe = purgeable
    trips, miss = _round_trips(app, path)
    assert (trips, miss.headers["X-Cache"], miss.json["path"], _locks(probe)) == (2, "MISS", seen_as, [])
    trips, hit = _round_trips(app, path)
    assert (trips, hit.headers["X-Cache"], hit.body) == (1, "HIT", miss.body)


@pytest.mark.parametrize("path", [f"{PURGE}?pattern=/api/*", f"/{PURGE}"],
                         ids=["the purge path", "two leading slashes"])
def test_a_get_of_the_purge_path_is_not_read_ahead_as_an_entry(purgeable: tuple[TestApp, redis.Redis],
                                                                path: str) -> None:
    """Refused by the cache's purge endpoint (GET is not a purge): no entry read, no lock taken, no write mark
    set for it in the rate limiter's round trip (nor a lock to give back after it)."""
    app, probe = purgeable
    trips, refused = _round_trips(app, path, status=405)
    assert (trips, refused.headers["Allow"]) == (1, "POST, DELETE")
    assert [k for k in probe.keys("*") if PURGE.encode() in k] == []


@pytest.mark.parametrize(("roles", "status", "challenge"), [
    pytest.param(None, 401, "Bearer", id="no identity"),
    pytest.param(["user"], 403, None, id="without the role"),
    pytest.param(["admin"], 200, None, id="purged"),
])
def test_a_purge_through_the_read_ahead_stack_checks_its_role_and_the_next_get_misses(
        purgeable: tuple[TestApp, redis.Redis], roles: list[str] | None, status: int, challenge: str | None) -> None:
    app, probe = purgeable
    path = "/api/v1/search?q=p"
    miss = app.get(path)
    assert app.get(path).headers["X-Cache"] == "HIT"
    service = next(layer for layer in _layers(app) if isinstance(layer, AuthMiddleware)).tokens
    headers = {} if roles is None else {
        "Authorization": f"Bearer {service.issue('root', roles)['access_token']}"}
    response = app.post(f"{PURGE}?pattern=/api/v1/search*", headers=headers, status=status)
    assert response.headers.get("WWW-Authenticate") == challenge
    assert [k for k in probe.keys("*") if PURGE.encode() in k] == []  # the purge request is no entry either
    trips, after = _round_trips(app, path)
    if status == 200:
        assert response.json == {"purged": 1, "pattern": "/api/v1/search*"}
        # The entry and its write mark gone: the limiter's pipeline found nothing and took the lock (and set a
        # new mark), the cache's one round trip stored the app's new answer.
        assert (trips, after.headers["X-Cache"], _locks(probe)) == (2, "MISS", [])
        trips, hit = _round_trips(app, path)
        assert (trips, hit.headers["X-Cache"]) == (1, "HIT")
    else:
        assert (trips, after.headers["X-Cache"], after.body) == (1, "HIT", miss.body)


def test_a_known_bearer_token_gives_the_per_user_key_ahead(cached: tuple[TestApp, redis.Redis]) -> None:
    app, _ = cached
    service = next(layer for layer in _layers(app) if isinstance(layer, AuthMiddleware)).tokens
    token = service.issue("bob", ["user"])["access_token"]
    headers = {"Authorization": f"Bearer {token}"}
    first, response = _round_trips(app, "/api/v1/search?q=b", headers=headers)
    # Not verified before: no identity to key on ahead; the blocklist read and the cache read their own.
    assert (first, response.headers["X-Cache"], response.json["identity"]) == (4, "MISS", "bob")
    again, response = _round_trips(app, "/api/v1/search?q=b", headers=headers)
    assert (again, response.headers["X-Cache"]) == (1, "HIT")
    anonymous = app.get("/api/v1/search?q=b")
    assert (anonymous.headers["X-Cache"], anonymous.json["identity"]) == ("MISS", None)


@pytest.mark.parametrize(("path", "status", "trips"), [
    ("/private/x", 401, 1),  # no credentials where they are required: auth's preview says a 401 comes
    # Rewritten to /b by a layer the read could not foresee: the cache reads /b itself and stores it,
    # and the limiter deletes the lock it took for /a.
    ("/a", 200, 4),
    ("/api/v9/search", 404, 1),  # the versioning layer will refuse: nothing read ahead
])
def test_a_lock_taken_ahead_for_nothing_is_given_back(cached: tuple[TestApp, redis.Redis], path: str,
                                                      status: int, trips: int) -> None:
    app, probe = cached
    taken, response = _round_trips(app, path, status=status)
    assert taken == trips
    assert _locks(probe) == []
    if status == 200:
        assert (response.json["path"], response.headers["X-Cache"]) == ("/b", "MISS")
        assert app.get("/b").headers["X-Cache"] == "HIT"


def test_a_revoked_token_does_not_hold_up_the_next_fill(cached: tuple[TestApp, redis.Redis]) -> None:
    """A known token names its user's key ahead and takes the lock; when the auth layer then refuses
    the token as revoked, the lock goes at once, and the user's next request fills without waiting."""
    app, probe = cached
    service = next(layer for layer in _layers(app) if isinstance(layer, AuthMiddleware)).tokens
    old = service.issue("carol", ["user"])["access_token"]
    app.get("/api/v1/other", headers={"Authorization": f"Bearer {old}"})  # verified once: known
    service.revoke(old)
    taken, _ = _round_trips(app, "/api/v1/search?q=c", headers={"Authorization": f"Bearer {old}"}, status=401)
    assert (taken, _locks(probe)) == (2, [])  # the limiter's pipeline (read, lock), then the lock given back
    new = service.issue("carol", ["user"])["access_token"]
    started = time.monotonic()
    response = app.get("/api/v1/search?q=c", headers={"Authorization": f"Bearer {new}"})
    assert (response.headers["X-Cache"], response.json["identity"]) == ("MISS", "carol")
    assert time.monotonic() - started < 1.0  # a lock left behind would hold it up to lock_timeout (5 s)


@pytest.mark.parametrize("cached", ["2/minute"], indirect=True)
def test_a_request_over_the_limit_gives_its_lock_back(cached: tuple[TestApp, redis.Redis]) -> None:
    app, probe = cached  # the warm-up request used one of the two
    app.get("/api/v1/search?q=first")
    taken, refused = _round_trips(app, "/api/v1/search?q=second", status=429)
    assert (taken, refused.headers["RateLimit-Remaining"], _locks(probe)) == (2, "0", [])


def test_a_session_user_seen_before_gives_the_per_user_key_ahead(cached: tuple[TestApp, redis.Redis]) -> None:
    """The session layer remembers which user a session held; the auth layer's preview makes that the
    identity the cache keys on, so a logged-in browser's cached search is one round trip too."""
    app, probe = cached
    app.get("/login")
    trips, miss = _round_trips(app, "/api/v1/search?q=s")
    assert (trips, miss.headers["X-Cache"], miss.json["identity"]) == (2, "MISS", "alice")
    trips, hit = _round_trips(app, "/api/v1/search?q=s")
    assert (trips, hit.headers["X-Cache"], hit.body) == (1, "HIT", miss.body)
    # The user leaves the session behind this process's back: the hint is stale, the guess wrong.
    [key] = probe.keys("*session:*")
    probe.set(key, json.dumps({"created_at": time.time(), "data": {}}), px=probe.pttl(key))
    trips, response = _round_trips(app, "/api/v1/search?q=s")
    # Read ahead under alice's key (and its lock, the entry being there: none), then the cache bypassed
    # the request, which carries a session cookie but no identity now.
    assert (response.headers["X-Cache"], response.json["identity"], _locks(probe)) == ("BYPASS", None, [])
    assert trips == 1


def test_a_wrong_guess_gives_the_lock_back_before_the_app_runs(cached: tuple[TestApp, redis.Redis]) -> None:
    """The session's user left it behind this process's back (a logout handled by another process): the
    guess locks alice's key, the cache bypasses the request and gives the lock back at once, so alice's
    own requests for that key do not wait while this one runs; and the stale hint is dropped."""
    app, probe = cached
    app.get("/login")
    [key] = probe.keys("*session:*")
    probe.delete(key)  # ended elsewhere
    seen: list[list[bytes]] = []
    ON_CALL.append(lambda environ: seen.append(_locks(probe)))
    try:
        trips, response = _round_trips(app, "/api/v1/search?q=z")
    finally:
        ON_CALL.clear()
    assert (response.headers["X-Cache"], response.json["identity"]) == ("BYPASS", None)
    assert seen == [[]]  # no lock while the app ran
    assert trips == 2  # the limiter's pipeline (which guessed alice's key and locked it), the lock's DEL
    trips, _ = _round_trips(app, "/api/v1/search?q=z")
    assert trips == 1  # no hint any more: nothing guessed, nothing locked


class BrokenPreview:
    """A factory layer whose ``preview_environ`` fails for requests without X-Tenant (the layer does not)."""

    def __init__(self, app: WSGIApplication) -> None:
        self.app = app

    def preview_environ(self, environ: dict[str, Any]) -> dict[str, Any]:
        return {"tenant": environ["HTTP_X_TENANT"]}

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        return self.app(environ, start_response)


def test_a_preview_that_fails_reads_nothing_ahead(redis_url: str, caplog: pytest.LogCaptureFixture) -> None:
    text = CACHED.replace("{limit}", "3/minute").replace(
        "  - test_read_ahead:Rewrite: {}\n", "  - test_read_ahead:Rewrite: {}\n  - test_read_ahead:BrokenPreview: {}\n")
    built = build(parse(read_text(text)), stores={"shared": RedisStore(redis_url)})
    app = TestApp(built.app, extra_environ={"REMOTE_ADDR": "192.0.2.9"})
    try:
        with caplog.at_level("WARNING", logger="wsgistack.ratelimit"):
            statuses = [app.get("/api/v1/search?q=p", expect_errors=True).status_int for _ in range(4)]
    finally:
        built.close()
    assert statuses == [200, 200, 200, 429]  # served, and counted
    warnings = [r for r in caplog.records if "could not work out its key" in r.getMessage()]
    assert len(warnings) == 3  # once per read it spoils (the session's, the blocklist's, the cache's), not per request


# -- a layer that changes the Cookie header without saying so --------------------------------

class StripCookie:
    """A factory layer that drops the cookies of /public requests, with no ``preview_environ``."""

    def __init__(self, app: WSGIApplication) -> None:
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        if environ["PATH_INFO"].startswith("/public"):
            environ.pop("HTTP_COOKIE", None)
        return self.app(environ, start_response)


class HeaderToCookie:
    """A factory layer for clients that cannot keep cookies: X-Session replaces the Cookie header."""

    def __init__(self, app: WSGIApplication) -> None:
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        if "HTTP_X_SESSION" in environ:
            environ["HTTP_COOKIE"] = f"sid={environ['HTTP_X_SESSION']}"
        return self.app(environ, start_response)


def login_app_factory(options: dict[str, Any] | None = None) -> Callable[..., Iterable[bytes]]:
    """``/login?NAME`` puts NAME in the session; every other path echoes the session's user."""

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        session = environ[SESSION]
        if environ["PATH_INFO"] == "/login":
            session["user"] = {"sub": environ["QUERY_STRING"]}
        body = json.dumps({"session_user": (session.get("user") or {}).get("sub")}).encode()
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]

    return app


@pytest.mark.parametrize("limiter", ["", '  - ratelimit: {store: shared, limits: ["1000/minute"]}\n'],
                         ids=["alone", "behind a rate limiter"])
def test_a_cookie_header_changed_by_a_layer_in_between_is_the_one_the_session_follows(
        redis_url: str, limiter: str) -> None:
    """The rate limiter reads the cookie's session ahead; a layer in between that then drops or replaces
    the Cookie header (and cannot say so ahead) makes the session layer read the new cookie's session,
    as it does without the rate limiter: the answer read ahead is for another key and goes unused."""
    text = (f'app: {{factory: "test_read_ahead:login_app_factory"}}\npipeline:\n  - errors: {{}}\n{limiter}'
            "  - test_read_ahead:StripCookie: {}\n  - test_read_ahead:HeaderToCookie: {}\n"
            f'  - session: {{store: shared, secret_key: "{SECRET}", cookie_name: sid, cookie_secure: false}}\n')
    built = build(parse(read_text(text)), stores={"shared": RedisStore(redis_url)})
    app = TestApp(built.app, extra_environ={"REMOTE_ADDR": "192.0.2.9"})
    try:
        alice = app.get("/login?alice").headers["Set-Cookie"].split(";")[0].split("=", 1)[1]
        app.reset()
        bob = app.get("/login?bob").headers["Set-Cookie"].split(";")[0].split("=", 1)[1]
        app.reset()
        me = app.get("/me", headers={"Cookie": f"sid={alice}"}).json
        public = app.get("/public/x", headers={"Cookie": f"sid={alice}"}).json
        replaced = app.get("/me", headers={"Cookie": f"sid={alice}", "X-Session": bob}).json
    finally:
        built.close()
    assert (me, public, replaced) == ({"session_user": "alice"}, {"session_user": None}, {"session_user": "bob"})


# -- a layer that changes the Authorization header without saying so -------------------------

class StripAuthorization:
    """A factory layer that drops the Authorization header of /public requests, with no ``preview_environ``."""

    def __init__(self, app: WSGIApplication) -> None:
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        if environ["PATH_INFO"].startswith("/public"):
            environ.pop("HTTP_AUTHORIZATION", None)
        return self.app(environ, start_response)


class HeaderToBearer:
    """A factory layer for clients that cannot set Authorization: X-Token replaces it."""

    def __init__(self, app: WSGIApplication) -> None:
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        if "HTTP_X_TOKEN" in environ:
            environ["HTTP_AUTHORIZATION"] = f"Bearer {environ['HTTP_X_TOKEN']}"
        return self.app(environ, start_response)


@pytest.mark.parametrize("limiter", ["", '  - ratelimit: {store: shared, limits: ["1000/minute"]}\n'],
                         ids=["alone", "behind a rate limiter"])
def test_an_authorization_header_changed_by_a_layer_in_between_is_the_one_auth_verifies(
        redis_url: str, limiter: str) -> None:
    """The rate limiter reads a known token's blocklist entry ahead; a layer in between that then drops or
    replaces the Authorization header (and cannot say so ahead) makes the auth layer verify the header the
    request has when it gets there, as it does without the rate limiter."""
    text = (f'app: {{factory: "test_read_ahead:app_factory"}}\npipeline:\n  - errors: {{}}\n{limiter}'
            "  - test_read_ahead:StripAuthorization: {}\n  - test_read_ahead:HeaderToBearer: {}\n"
            f'  - session: {{store: shared, secret_key: "{SECRET}", cookie_name: sid, cookie_secure: false}}\n'
            f'  - auth: {{store: shared, secret: "{JWT}", default: required}}\n')
    built = build(parse(read_text(text)), stores={"shared": RedisStore(redis_url)})
    app = TestApp(built.app, extra_environ={"REMOTE_ADDR": "192.0.2.9"})
    try:
        service = next(layer for layer in _layers(app) if isinstance(layer, AuthMiddleware)).tokens
        alice, bob = (service.issue(name, ["user"])["access_token"] for name in ("alice", "bob"))
        for token in (alice, bob):  # verified once: known, their blocklist reads ride along
            app.get("/me", headers={"Authorization": f"Bearer {token}"})
        me = app.get("/me", headers={"Authorization": f"Bearer {alice}"}).json["identity"]
        public = app.get("/public/x", headers={"Authorization": f"Bearer {alice}"}, status=401)
        replaced = app.get("/me", headers={"Authorization": f"Bearer {alice}", "X-Token": bob}).json["identity"]
    finally:
        built.close()
    assert (me, public.json["error"]["message"], replaced) == (
        "alice", "Unauthorized: this resource needs a bearer token.", "bob")


# -- replies the rate limiter's pipeline must send again ------------------------------------------

def _counter_keys(probe: redis.Redis) -> list[bytes]:
    return [k for k in cast(list[bytes], probe.keys("*")) if b"ratelimit" in k]


def test_a_counter_of_another_type_is_counted_anew_without_reading_ahead_twice(
        cached: tuple[TestApp, redis.Redis]) -> None:
    """Another type of value at the counter's key: the limiter deletes it and counts again, and sends only
    its own commands again; the read ahead already took the fill lock, and a second read-or-lock would
    find that lock held (by this very request) and make the cache wait for it until lock_timeout."""
    app, probe = cached
    [counter] = _counter_keys(probe)
    probe.delete(counter)
    probe.rpush(counter, b"not a counter")
    started = time.monotonic()
    trips, miss = _round_trips(app, "/api/v1/search?q=t")
    # The pipeline, the DEL, the counter's commands again, the cache's save (which drops its lock).
    assert (trips, miss.headers["X-Cache"], _locks(probe)) == (4, "MISS", [])
    assert miss.headers["RateLimit-Remaining"] == "999"  # counted from zero (the warm-up's count was in it)
    assert time.monotonic() - started < 1.0
    assert probe.type(counter) == b"string"
    trips, hit = _round_trips(app, "/api/v1/search?q=t")
    assert (trips, hit.headers["X-Cache"], hit.body) == (1, "HIT", miss.body)


def test_after_a_script_flush_one_round_trip_loads_every_script_and_the_reads_ahead_still_answer(
        cached: tuple[TestApp, redis.Redis]) -> None:
    """A restarted or flushed Redis answers NOSCRIPT to every EVALSHA of the pipeline: the limiter loads
    the scripts of its store (the counters' and the read-or-lock's alike) and sends again what did not
    run, in one more round trip; the cache takes the answer read ahead instead of meeting NOSCRIPT itself."""
    app, probe = cached
    path = "/api/v1/search?q=f"
    app.get(path)
    probe.script_flush()
    trips, hit = _round_trips(app, path)
    assert (trips, hit.headers["X-Cache"], _locks(probe)) == (2, "HIT", [])  # the pipeline, the reload and rerun
    probe.script_flush()
    trips, miss = _round_trips(app, path + "&new")
    # The same two, then the cache's save, whose script is loaded already.
    assert (trips, miss.headers["X-Cache"], _locks(probe)) == (3, "MISS", [])
    trips, hit = _round_trips(app, path + "&new")
    assert (trips, hit.headers["X-Cache"], hit.body) == (1, "HIT", miss.body)


# -- requests refused or answered between the rate limiter and the cache --------------------------

class Answer:
    """A factory layer that answers /answered itself (a layer between the limiter and the cache)."""

    def __init__(self, app: WSGIApplication) -> None:
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        if environ["PATH_INFO"].endswith("/answered"):
            start_response("204 No Content", [])
            return []
        return self.app(environ, start_response)


REFUSING = f"""
app: {{factory: "test_read_ahead:app_factory"}}
pipeline:
  - errors: {{}}
  - ratelimit: {{store: shared, limits: ["1000/minute"]}}
  - validation: {{max_query_length: 40, max_body_bytes: 10}}
  - session: {{store: shared, secret_key: "{SECRET}", cookie_name: sid, cookie_secure: false}}
  - csrf: {{cookie_name: sid}}
  - auth: {{store: shared, secret: "{JWT}", default: optional, rules: [{{paths: ["/api/*/admin"], roles: [admin]}}]}}
  - versioning: {{supported: [v1, v2], default: v1}}
  - test_read_ahead:Answer: {{}}
  - cache: {{store: shared, ttl: 60, per_user: true, cookie_names: [sid]}}
"""


@pytest.fixture
def refusing(redis_url: str) -> Iterator[tuple[TestApp, redis.Redis]]:
    """The cached stack with validation, csrf and a layer that answers, between the limiter and the cache."""
    yield from _cached(redis_url, REFUSING)


@pytest.mark.parametrize(("path", "body", "status"), [
    pytest.param("/api/v1/search?q=" + "x" * 40, b"", 414, id="validation: query too long"),
    pytest.param("/api/v1/search?q=b", b"x" * 100, 413, id="validation: body too large"),
    pytest.param("/api/v1/admin", b"", 403, id="auth: the role is missing"),
    pytest.param("/api/v1/answered", b"", 204, id="answered by a layer in between"),
])
def test_a_lock_taken_ahead_for_a_request_that_never_reaches_the_cache_is_given_back(
        refusing: tuple[TestApp, redis.Redis], path: str, body: bytes, status: int) -> None:
    """The user's token is known, so the limiter reads (and locks) the user's entry ahead; the request then
    stops before the cache: the limiter gives that lock back (with its token) after the inner layers return."""
    app, probe = refusing
    service = next(layer for layer in _layers(app) if isinstance(layer, AuthMiddleware)).tokens
    bearer = {"Authorization": f"Bearer {service.issue('dave', ['user'])['access_token']}"}
    app.get("/api/v1/other", headers=bearer)  # verified once: known
    before = Counting.writes
    app.request(path, method="GET", headers=bearer, body=body, status=status)
    assert (Counting.writes - before, _locks(probe)) == (2, [])  # the limiter's pipeline, the lock given back


@pytest.mark.parametrize("host", ["other.example", "localhost"], ids=["another host", "the same host"])
def test_an_absolute_form_target_is_read_ahead_under_the_host_it_names(refusing: tuple[TestApp, redis.Redis],
                                                                      host: str) -> None:
    """``GET http://other.example/…`` takes its host from the target (the validation layer makes it Host, a
    cache key header): the read ahead sees that host too, so a hit is one round trip, and no write mark is
    left for the URI under the Host header the request came with."""
    app, probe = refusing
    uri = f"http://{host}/api/v1/search?q=h"
    environ = {"REQUEST_URI": uri, "RAW_URI": uri}
    trips, miss = _round_trips(app, "/api/v1/search?q=h", extra_environ=environ, headers={"Host": "localhost"})
    assert (trips, miss.headers["X-Cache"], _locks(probe)) == (2, "MISS", [])
    trips, hit = _round_trips(app, "/api/v1/search?q=h", extra_environ=environ, headers={"Host": "localhost"})
    assert (trips, hit.headers["X-Cache"]) == (1, "HIT")
    assert len([k for k in probe.keys("*") if b"cache:w:/api/v1/search" in k]) == 1


# -- two rate limiters on the same Redis ----------------------------------------------------------

TWO_LIMITERS = f"""
app: {{factory: "test_read_ahead:app_factory"}}
pipeline:
  - errors: {{}}
  - ratelimit: {{store: shared, limits: ["1000/minute"]}}
  - session: {{store: shared, secret_key: "{SECRET}", cookie_name: sid, cookie_secure: false}}
  - auth: {{store: shared, secret: "{JWT}", default: optional}}
  - ratelimit: {{store: shared, key: user, namespace: per-user, limits: ["500/minute"]}}
  - cache: {{store: shared, ttl: 60, per_user: true, cookie_names: [sid], lock_timeout: 2}}
"""


@pytest.fixture
def two_limiters(redis_url: str) -> Iterator[tuple[TestApp, redis.Redis]]:
    """A limiter by address outside the session and auth layers, one by user inside them, then the cache."""
    yield from _cached(redis_url, TWO_LIMITERS)


@pytest.mark.parametrize("who", ["anonymous", "a session", "a known token"])
def test_a_read_made_ahead_by_the_outer_limiter_is_not_made_again_by_the_inner_one(
        two_limiters: tuple[TestApp, redis.Redis], who: str) -> None:
    """Both limiters would read the cache's entry ahead: the inner one leaves what the outer read (its
    read-or-lock would find the lock the outer's took, held by this very request, and the cache would
    wait for it until lock_timeout), and reads only what the outer could not foresee."""
    app, probe = two_limiters
    headers: dict[str, str] = {}
    if who == "a session":
        app.get("/login")
    elif who == "a known token":
        service = next(layer for layer in _layers(app) if isinstance(layer, AuthMiddleware)).tokens
        headers = {"Authorization": f"Bearer {service.issue('erin', ['user'])['access_token']}"}
        app.get("/other", headers=headers)  # verified once: known
    started = time.monotonic()
    trips, miss = _round_trips(app, "/search?q=2", headers=headers)
    assert (trips, miss.headers["X-Cache"], _locks(probe)) == (3, "MISS", [])  # two pipelines, the save
    assert time.monotonic() - started < 1.0
    trips, hit = _round_trips(app, "/search?q=2", headers=headers)
    assert (trips, hit.headers["X-Cache"], hit.body) == (2, "HIT", miss.body)
