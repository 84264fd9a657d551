"""The session layer: lazy server-side sessions, signed ids, timeouts, store failures.

Everything that touches the store runs against both backends (``store_url``:
memory:// and a real redis-server).  ``CountingStore`` is a thin pass-through
around the real store that records which operations a request made.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any, cast
from urllib.parse import parse_qsl

import pytest
import redis
from itsdangerous import Signer
from pydantic import ValidationError
from webtest import TestApp
from werkzeug.exceptions import Forbidden

import middleware.session as session_module
from middleware.base import SESSION, SESSION_USER_HINT, TRACE, Context, refuse
from middleware.errors import ErrorsMiddleware
from middleware.session import KEY_PREFIX, Session, SessionMiddleware, _make_private
from stores import Store, StoreError, store_from_url

SECRET = "k" * 40
OLD_SECRET = "o" * 40
COOKIE_RE = re.compile(r"__Host-session=([A-Za-z0-9_-]{43})\.[A-Za-z0-9_-]+; "
                       r"Secure; HttpOnly; Path=/; SameSite=Lax")
EXPIRED = ("__Host-session=; Expires=Thu, 01 Jan 1970 00:00:00 GMT; Max-Age=0; "
           "Secure; HttpOnly; Path=/; SameSite=Lax")


class CountingStore(Store):
    """Pass every call to a real store and record the operation names; ``failing`` ones raise StoreError."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.calls: list[str] = []
        self.failing: set[str] = set()

    def _call(self, op: str) -> None:
        self.calls.append(op)
        if op in self.failing:
            raise StoreError(f"{op} failed: connection refused")

    def get(self, key: str) -> bytes | None:
        self.calls.append("get")
        return self.inner.get(key)

    def getex(self, key: str, ttl: float) -> bytes | None:
        self._call("getex")
        return self.inner.getex(key, ttl)

    def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        self._call("set")
        self.inner.set(key, value, ttl)

    def replace(self, key: str, value: bytes, ttl: float | None = None) -> bool:
        self._call("replace")
        return self.inner.replace(key, value, ttl)

    def delete(self, key: str) -> bool:
        self._call("delete")
        return self.inner.delete(key)

    def incr(self, key: str, ttl: float | None = None, amount: int = 1) -> int:
        self.calls.append("incr")
        return self.inner.incr(key, ttl, amount)

    def expire(self, key: str, ttl: float) -> bool:
        self.calls.append("expire")
        return self.inner.expire(key, ttl)

    def add(self, key: str, value: bytes, ttl: float | None = None) -> bool:
        self.calls.append("add")
        return self.inner.add(key, value, ttl)

    def scan(self, prefix: str) -> Iterator[str]:
        self.calls.append("scan")
        return self.inner.scan(prefix)

    def ping(self) -> bool:
        return self.inner.ping()

    def close(self) -> None:
        self.inner.close()


def probe(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    """A tiny app driven by the path: /get, /set?k=v, /rotate, /destroy, /login, /logout, /id, /."""
    session: Session = environ[SESSION]
    query = dict(parse_qsl(environ.get("QUERY_STRING", "")))
    headers = [("Content-Type", "application/json")]
    for name in ("Cache-Control", "Vary", "CDN-Cache-Control", "Surrogate-Control"):
        if name in query:
            headers.append((name, query.pop(name)))
    path = environ["PATH_INFO"]
    body: Any = None
    if path == "/get":
        body = dict(session)
    elif path == "/set":
        session.update(query)
        body = dict(session)
    elif path == "/rotate":
        session.rotate()
    elif path == "/login":
        session.rotate()
        session["user"] = {"sub": "ada", "roles": ["admin"]}
    elif path == "/destroy":
        session.destroy()
        if query:
            session.update(query)
    elif path == "/destroy-twice":  # two parts of an app that each end the session
        session.destroy()
        session.destroy()
    elif path == "/logout":  # read first (as the auth layer does), then end the session
        session.get("user")
        session.destroy()
    elif path == "/id":
        body = {"id": session.id, "new": session.new}
    start_response("200 OK", headers)
    return [json.dumps(body).encode()]


@pytest.fixture
def store(store_url: str) -> Iterator[CountingStore]:
    """A real store (memory:// or Redis) behind a call counter."""
    real = store_from_url(store_url)
    yield CountingStore(real)
    real.close()


def make(store: Store, *, loopback_only: bool = True, app: Any = probe,
         context: Context | None = None, **options: Any) -> TestApp:
    """A TestApp over errors -> session -> ``app``; ``.layer`` is the session layer."""
    options.setdefault("secret_key", SECRET)
    context = context or Context(stores={"shared": store}, loopback_only=loopback_only)
    layer = SessionMiddleware(app, SessionMiddleware.Options(**options), context)
    test_app = TestApp(ErrorsMiddleware(layer, ErrorsMiddleware.Options(), context))
    test_app.layer = layer
    return test_app


def new_cookie(resp: Any) -> tuple[str, str]:
    """The (cookie value, session id) of the one Set-Cookie the response issued."""
    issued = resp.headers.getall("Set-Cookie")
    assert len(issued) == 1, issued
    match = COOKIE_RE.fullmatch(issued[0])
    assert match, issued[0]
    return issued[0].split(";")[0].split("=", 1)[1], match.group(1)


def jar(value: str) -> dict[str, str]:
    return {"Cookie": f"__Host-session={value}"}


def stored(store: CountingStore, sid: str) -> Any:
    raw = store.inner.get(KEY_PREFIX + sid)
    return None if raw is None else json.loads(raw)


# ------------------------------------------------------------------ options


@pytest.mark.parametrize(("options", "loopback_only", "message"), [
    pytest.param({"secret_key": ""}, True,
                 "secret_key is required for the session layer; generate one with: "
                 "python3 -c 'import secrets; print(secrets.token_urlsafe(32))'", id="no secret_key"),
    pytest.param({"secret_key": "short"}, True,
                 "secret_key must be at least 32 characters long (it has 5)", id="short secret_key"),
    pytest.param({"secret_key_fallbacks": ["x" * 31]}, True,
                 "secret_key_fallbacks[0] must be at least 32 characters long (it has 31)",
                 id="short fallback"),
    pytest.param({"cookie_secure": False}, True,
                 "cookie_name '__Host-session' needs cookie_secure: true (browsers drop __Host- "
                 "cookies without Secure); a loopback-only development server must also pick "
                 "another cookie_name", id="__Host- without Secure"),
    pytest.param({"cookie_domain": "example.org"}, True,
                 "cookie_name '__Host-session' may not be combined with cookie_domain (browsers "
                 "drop __Host- cookies with a Domain)", id="__Host- with Domain"),
    pytest.param({"cookie_path": "/app"}, True,
                 "cookie_name '__Host-session' needs cookie_path '/' (got '/app')",
                 id="__Host- with a Path"),
    pytest.param({"cookie_name": "__Secure-sid", "cookie_secure": False}, True,
                 "cookie_name '__Secure-sid' needs cookie_secure: true", id="__Secure- insecure"),
    pytest.param({"cookie_name": "sid", "cookie_secure": False, "cookie_samesite": "None"}, True,
                 "cookie_samesite 'None' needs cookie_secure: true", id="SameSite=None insecure"),
    pytest.param({"cookie_name": "sid", "cookie_secure": False}, False,
                 "cookie_secure: false is only allowed when the server listens only on loopback "
                 "and trusts no proxy; on any other address, or behind a proxy that forwards other "
                 "clients' requests, the session cookie would travel over plain HTTP",
                 id="insecure cookie on a public listener"),
    pytest.param({"cookie_name": "__host-session", "cookie_secure": False}, True,
                 "cookie_name '__host-session' needs cookie_secure: true", id="__host- in lower case"),
    pytest.param({"cookie_name": "__HOST-session", "cookie_domain": "example.org"}, True,
                 "cookie_name '__HOST-session' may not be combined with cookie_domain", id="__HOST- in upper case"),
    pytest.param({"cookie_name": "__secure-sid", "cookie_secure": False}, True,
                 "cookie_name '__secure-sid' needs cookie_secure: true", id="__secure- in lower case"),
    *(pytest.param({"cookie_name": name, **options}, True, f"cookie_name {name!r} needs {needs}",
                   id=f"{name} {why}")
      for name, options, needs, why in list[tuple[str, dict[str, object], str, str]]([
          ("__Http-sid", {"cookie_httponly": False}, "cookie_httponly: true (browsers drop __Http- and "
           "__Host-Http- cookies without HttpOnly)", "readable by scripts"),
          ("__Host-Http-session", {"cookie_httponly": False}, "cookie_httponly: true", "readable by scripts"),
          ("__http-sid", {"cookie_httponly": False}, "cookie_httponly: true", "in lower case, readable by scripts"),
          ("__HOST-HTTP-session", {"cookie_httponly": False}, "cookie_httponly: true", "in capitals"),
          ("__Http-sid", {"cookie_secure": False}, "cookie_secure: true", "insecure"),
          ("__Host-Http-session", {"cookie_path": "/app"}, "cookie_path '/' (got '/app')", "with a Path"),
      ])),
    pytest.param({"cookie_name": "a b"}, True, "cookie_name 'a b' is not a valid cookie name",
                 id="bad cookie name"),
    *(pytest.param({"cookie_name": name}, True,
                   f"cookie_name {name!r} is not a valid cookie name: a token of ASCII letters, digits and "
                   "!#$%&'*+-.^_`|~ (RFC 6265)", id=f"cookie name {why}")
      for name, why in [("sid\r\nX-Forged: 1", "with a line break (the server refuses the header)"),
                        ("sid\n", "ending in a line feed"), ("s\x00id", "with NUL"), ("s\x01id", "with a control"),
                        ("s\x7fid", "with DEL"), ("sid;", "with a separator"), ("s\u00e9", "not ASCII")]),
    pytest.param({"cookie_name": "sid", "cookie_path": "app"}, True,
                 "cookie_path must start with '/' (got 'app')", id="relative path"),
    pytest.param({"idle_timeout": 7200, "absolute_timeout": 3600}, True,
                 "idle_timeout (7200 s) may not exceed absolute_timeout (3600 s)",
                 id="idle longer than absolute"),
    pytest.param({"cookie_samesite": "lax"}, True, "Input should be 'Lax', 'Strict' or 'None'",
                 id="samesite spelling"),
    pytest.param({"store": "nowhere"}, True, "unknown store 'nowhere' (known: shared)",
                 id="unknown store"),
    *(pytest.param({"cookie_name": "sid", "cookie_domain": domain}, True,
                   f"cookie_domain\n  Value error, cookie_domain {domain!r} is not a host name",
                   id=f"cookie_domain {why}")
      for domain, why in [("example.org; SameSite=None", "with another attribute"),
                          ("example.org,evil.example", "with a comma"),
                          ("example .org", "with a space"), ("example.org\r\nX-Forged: 1", "with a line break"),
                          ("exa_mple.org", "with an underscore"), ("xn--caf-dma.example/", "with a slash"),
                          ("café.example", "not ASCII"), ("..example.org", "with an empty label"),
                          ("example..org", "with an empty label inside"), (".", "a dot alone")]),
])
def test_refused_options(options: dict[str, Any], loopback_only: bool, message: str) -> None:
    options = {"secret_key": SECRET, **options}
    context = Context(stores={"shared": store_from_url("memory://")}, loopback_only=loopback_only)
    with pytest.raises((ValidationError, ValueError, LookupError), match=re.escape(message)):
        SessionMiddleware(probe, SessionMiddleware.Options(**options), context)


@pytest.mark.parametrize("name", ["s%id", "s'x", "a!b#c$d&e*f+g.h^i_j`k|l~m", "SID-2"])
def test_every_token_character_makes_a_cookie_name(name: str) -> None:
    """RFC 6265's cookie-name is an RFC 9110 token: these are names a browser stores and sends back."""
    app = make(store_from_url("memory://"), cookie_name=name)
    issued = app.get("/set?a=1").headers["Set-Cookie"]
    assert issued.startswith(f"{name}=")
    assert app.get("/get", headers={"Cookie": issued.split(";")[0]}).json == {"a": "1"}


def test_insecure_cookie_is_refused_behind_a_trusted_proxy() -> None:
    """A loopback listener behind a proxy serves other machines: their cookie must be Secure."""
    options = SessionMiddleware.Options(secret_key=SECRET, cookie_name="sid", cookie_secure=False)
    context = Context(stores={"shared": store_from_url("memory://")}, loopback_only=True, proxied=True)
    with pytest.raises(ValueError, match="listens only on loopback and trusts no proxy"):
        SessionMiddleware(probe, options, context)
    context.proxied = False
    SessionMiddleware(probe, options, context)  # the same settings, no proxy: a development server


def test_secret_key_is_hidden_in_repr() -> None:
    opts = SessionMiddleware.Options(secret_key=SECRET, secret_key_fallbacks=[OLD_SECRET])
    assert SECRET not in repr(opts) and OLD_SECRET not in repr(opts)


@pytest.mark.parametrize(("options", "expected"), [
    pytest.param({}, "__Host-session=V; Secure; HttpOnly; Path=/; SameSite=Lax", id="defaults"),
    pytest.param({"cookie_samesite": "Strict"},
                 "__Host-session=V; Secure; HttpOnly; Path=/; SameSite=Strict", id="strict"),
    pytest.param({"cookie_samesite": "None"},
                 "__Host-session=V; Secure; HttpOnly; Path=/; SameSite=None", id="samesite none"),
    pytest.param({"cookie_name": "sid", "cookie_domain": "example.org", "cookie_path": "/app"},
                 "sid=V; Domain=example.org; Secure; HttpOnly; Path=/app; SameSite=Lax",
                 id="domain and path"),
    pytest.param({"cookie_name": "sid", "cookie_domain": ".Example-1.org"},
                 "sid=V; Domain=Example-1.org; Secure; HttpOnly; Path=/; SameSite=Lax",
                 id="a domain with a leading dot (which browsers ignore)"),
    pytest.param({"cookie_domain": ""}, "__Host-session=V; Secure; HttpOnly; Path=/; SameSite=Lax",
                 id="an empty domain (${COOKIE_DOMAIN:-}) is none: allowed with __Host-"),
    pytest.param({"cookie_name": "sid", "cookie_domain": "  "},
                 "sid=V; Secure; HttpOnly; Path=/; SameSite=Lax", id="a blank domain is none"),
    pytest.param({"cookie_httponly": False},
                 "__Host-session=V; Secure; Path=/; SameSite=Lax", id="readable by scripts"),
    pytest.param({"cookie_name": "dev", "cookie_secure": False},
                 "dev=V; HttpOnly; Path=/; SameSite=Lax", id="insecure on loopback"),
    pytest.param({"cookie_name": "__Http-sid", "cookie_domain": "example.org", "cookie_path": "/app"},
                 "__Http-sid=V; Domain=example.org; Secure; HttpOnly; Path=/app; SameSite=Lax",
                 id="__Http-: Secure and HttpOnly, any Domain and Path"),
    pytest.param({"cookie_name": "__Host-Http-session"},
                 "__Host-Http-session=V; Secure; HttpOnly; Path=/; SameSite=Lax", id="__Host-Http-"),
])
def test_cookie_flags(options: dict[str, Any], expected: str) -> None:
    app = make(store_from_url("memory://"), **options)
    issued = app.get("/set?a=1").headers.getall("Set-Cookie")
    assert len(issued) == 1
    name, rest = issued[0].split("=", 1)
    value, attrs = rest.split(";", 1)
    assert f"{name}=V;{attrs}" == expected
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}\.[A-Za-z0-9_-]{43}", value)


# ------------------------------------------------------------- laziness, I/O


@pytest.mark.parametrize(("path", "with_cookie", "calls", "cookie_issued"), [
    pytest.param("/", False, [], False, id="untouched, no cookie"),
    pytest.param("/", True, [], False, id="untouched, with cookie"),
    pytest.param("/get", False, [], False, id="read, no cookie: no store access"),
    pytest.param("/id", False, [], False, id="new id that is never written"),
    pytest.param("/set?a=1", False, ["set"], True, id="first write"),
    pytest.param("/get", True, ["getex"], False, id="read refreshes the idle TTL"),
    pytest.param("/set?a=2", True, ["getex", "replace"], False, id="change: one read, one write where it still is"),
    pytest.param("/rotate", True, ["getex", "delete", "set"], True, id="rotate"),
    pytest.param("/destroy", True, ["delete"], False, id="destroy without reading"),
])
def test_store_calls(store: CountingStore, path: str, with_cookie: bool, calls: list[str],
                     cookie_issued: bool) -> None:
    app = make(store)
    value, _ = new_cookie(app.get("/set?a=1"))
    store.calls.clear()
    resp = app.get(path, headers=jar(value) if with_cookie else {})
    assert store.calls == calls
    issued = [c for c in resp.headers.getall("Set-Cookie") if c != EXPIRED]
    assert bool(issued) is cookie_issued


@pytest.mark.parametrize(("path", "calls", "cookies"), [
    pytest.param("/logout", ["getex"], [EXPIRED], id="logout: nothing to delete, the cookie expired"),
    pytest.param("/rotate", ["getex", "set"], ["new"], id="rotate: a new session, nothing to delete"),
])
def test_an_id_the_store_does_not_hold_is_not_deleted(store: CountingStore, path: str, calls: list[str],
                                                      cookies: list[str]) -> None:
    """A validly signed id whose session is gone (expired, ended elsewhere) costs no DELETE when retired."""
    app = make(store)
    resp = app.get(path, headers=jar(_signed("A" * 43)))
    assert store.calls == calls
    issued = resp.headers.getall("Set-Cookie")
    if cookies == ["new"]:
        _, sid = new_cookie(resp)
        assert stored(store, sid)["data"] == {}
    else:
        assert issued == cookies


@pytest.mark.parametrize("rotates", [False, True], ids=["the slow request writes", "the slow request rotates"])
@pytest.mark.parametrize("ended_by", ["/logout", "/login", "the idle timeout"])
def test_a_session_ended_while_a_request_used_it_stays_ended(store: CountingStore, ended_by: str,
                                                             rotates: bool) -> None:
    # A slow request read the session, then another request ended it: the slow one's save must
    # not write it back, or the cookie a logout (or a login's rotate) retired would work again;
    # nor, when it rotates (a privilege change), carry it to a new id with a new cookie.
    ended: dict[str, Any] = {}

    def slow(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        session: Session = environ[SESSION]
        if environ["PATH_INFO"] != "/cart":
            return probe(environ, start_response)
        cart = session.get("cart", [])
        if ended_by == "the idle timeout":
            store.inner.delete(KEY_PREFIX + ended["sid"])  # what the store's TTL does
        else:
            ended["response"] = app.get(ended_by, headers={"Cookie": f"sid={ended['cookie']}"})
        if rotates:
            session.rotate()
        session["cart"] = [*cart, "book"]
        start_response("200 OK", [("Content-Type", "application/json")])
        return [b"{}"]

    app = make(store, app=slow, cookie_name="sid", cookie_secure=False)
    response = app.get("/set?user=ada")
    ended["cookie"] = response.headers["Set-Cookie"].split(";")[0].split("=", 1)[1]
    ended["sid"] = ended["cookie"].split(".")[0]
    cart = app.get("/cart", headers={"Cookie": f"sid={ended['cookie']}"})
    assert stored(store, ended["sid"]) is None
    # ...and sets no cookie: one that expired the old would also wipe the one a login set meanwhile.
    assert cart.headers.getall("Set-Cookie") == []
    again = app.get("/get", headers={"Cookie": f"sid={ended['cookie']}"})
    assert again.json == {}  # the old cookie opens nothing
    kept = [stored(store, key.removeprefix(KEY_PREFIX)) for key in store.inner.scan(KEY_PREFIX)]
    assert all("cart" not in doc["data"] for doc in kept)  # nothing the slow request wrote, anywhere
    if ended_by == "/login":  # the session the login rotated to lives on, with what the login wrote
        new_value = ended["response"].headers["Set-Cookie"].split(";")[0].split("=", 1)[1]
        assert stored(store, new_value.split(".")[0])["data"]["user"] == {"sub": "ada", "roles": ["admin"]}
        assert len(kept) == 1
    else:
        assert kept == []


def logging_in(store: CountingStore, before: Callable[[Session, TestApp, str], None]) -> tuple[TestApp, str]:
    """A stack whose ``/login`` runs ``before(session, app, ada's cookie)`` and then starts a new session
    for bob with rotate(carry=False), as the core's login does; and the cookie of ada's session."""
    made: dict[str, Any] = {}

    def login(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        session: Session = environ[SESSION]
        if environ["PATH_INFO"] != "/login":
            return probe(environ, start_response)
        before(session, made["app"], made["old"])
        session.rotate(carry=False)
        session["user"] = "bob"
        start_response("200 OK", [("Content-Type", "application/json")])
        return [b"{}"]

    app = made["app"] = make(store, app=login, cookie_name="sid", cookie_secure=False)
    made["old"] = app.get("/set?user=ada").headers["Set-Cookie"].split(";")[0].split("=", 1)[1]
    return app, made["old"]


def test_a_login_that_races_a_logout_keeps_its_new_session(store: CountingStore) -> None:
    """rotate(carry=False), as the core's login calls it: what it writes stands on a password just
    checked, so a logout of the old session meanwhile does not drop it (rotate() would)."""
    def read_then_logged_out(session: Session, app: TestApp, old: str) -> None:
        session.get("user")  # something outside read it first (csrf does)
        app.get("/logout", headers={"Cookie": f"sid={old}"})  # another tab logs out meanwhile

    app, old = logging_in(store, read_then_logged_out)
    response = app.get("/login", headers={"Cookie": f"sid={old}"})
    new = response.headers["Set-Cookie"].split(";")[0].split("=", 1)[1]
    assert stored(store, new.split(".")[0])["data"] == {"user": "bob"}  # nothing of ada's session
    assert app.get("/get", headers={"Cookie": f"sid={old}"}).json == {}


@pytest.mark.parametrize("read_first", [False, True])
def test_a_session_started_by_rotate_carry_false_counts_as_created(store: CountingStore, read_first: bool) -> None:
    """Whether something read the old session first (csrf, auth) or not, a login makes a new session."""
    events: list[str] = []
    app, old = logging_in(store, lambda session, app, old: session.get("user") if read_first else None)
    app.layer.context.listeners.append(lambda event, fields: events.append(event))
    app.get("/login", headers={"Cookie": f"sid={old}"})
    assert events == ["session.created"]


def test_session_is_lazy_and_mapping_like(store: CountingStore) -> None:
    seen: dict[str, Any] = {}

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        session: Session = environ[SESSION]
        seen["before"] = (session.accessed, repr(session), list(store.calls))
        session["a"] = 1
        session["b"] = [1, {"c": None}]
        del session["a"]
        seen["after"] = (dict(session), len(session), "b" in session, "a" in session,
                         session.modified, session.new, session.accessed)
        assert session.id not in repr(session)
        start_response("204 No Content", [])
        return []

    make(store, app=app).get("/", status=204)
    assert seen["before"] == (False, "<Session unloaded new=True modified=False>", [])
    assert seen["after"] == ({"b": [1, {"c": None}]}, 1, True, False, True, True, True)


@pytest.mark.parametrize(("key", "value", "message"), [
    pytest.param("when", object(), "session values must be JSON-serialisable: session['when'] "
                                   "got a object", id="object"),
    pytest.param("ids", {1, 2}, "session values must be JSON-serialisable: session['ids'] got a set",
                 id="set"),
    pytest.param("x", float("nan"), "session values must be JSON-serialisable: session['x'] got a "
                                    "float (Out of range float values are not JSON compliant",
                 id="nan"),
    pytest.param(1, "v", "session keys must be strings, not int", id="int key"),
])
def test_values_must_be_json(key: Any, value: Any, message: str) -> None:
    session = Session(make(store_from_url("memory://")).layer, {})
    with pytest.raises(TypeError, match=re.escape(message)):
        session[key] = value
    assert not session.modified


# --------------------------------------------------------- ids and fixation


def test_new_session_is_stored_with_created_at(store: CountingStore,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(session_module, "_clock", lambda: 1_000_000.0)
    events: list[str] = []
    context = Context(stores={"shared": store}, listeners=[lambda e, f: events.append(e)])
    resp = make(store, context=context).get("/set?a=1")
    _, sid = new_cookie(resp)
    assert stored(store, sid) == {"created_at": 1_000_000.0, "data": {"a": "1"}}
    assert events == ["session.created"]
    assert resp.headers["Vary"] == "Cookie"
    assert resp.headers["Cache-Control"] == "private"


def _signed(sid: str, key: str = SECRET) -> str:
    signer = Signer(key, salt="wsgistack.session", digest_method=hashlib.sha256)
    return signer.sign(sid).decode()


@pytest.mark.parametrize(("cookie", "reads_store"), [
    pytest.param(_signed("A" * 43), True, id="validly signed but unknown id"),
    pytest.param(_signed("attacker-chosen"), True, id="attacker-chosen id"),
    pytest.param("A" * 43, False, id="unsigned id"),
    pytest.param(_signed("A" * 43)[:-2] + "xx", False, id="tampered signature"),
    pytest.param(_signed("A" * 43, key="z" * 40), False, id="signed with another key"),
    pytest.param("%%%", False, id="garbage"),
])
def test_client_ids_are_never_adopted(store: CountingStore, cookie: str, reads_store: bool) -> None:
    app = make(store)
    resp = app.get("/set?a=1", headers=jar(cookie))
    _, sid = new_cookie(resp)
    assert sid != cookie.split(".")[0]
    assert store.calls == (["getex", "set"] if reads_store else ["set"])
    assert stored(store, sid)["data"] == {"a": "1"}
    assert stored(store, cookie.split(".")[0]) is None
    assert resp.json == {"a": "1"}


def test_tampered_cookie_of_a_real_session_is_refused(store: CountingStore) -> None:
    app = make(store)
    value, sid = new_cookie(app.get("/set?secret=1"))
    for i in (0, 50):  # one character of the id, one of the signature (not the last: padding bits)
        tampered = value[:i] + ("A" if value[i] != "A" else "B") + value[i + 1:]
        assert app.get("/get", headers=jar(tampered)).json == {}
    assert stored(store, sid)["data"] == {"secret": "1"}


@pytest.mark.parametrize("respell", [
    pytest.param(lambda v: v[:60] + "~~~~" + v[60:], id="characters base64 decoding skips"),
    pytest.param(lambda v: v[:60] + "~" * 8000 + v[60:], id="thousands of them"),
    pytest.param(lambda v: v + "=", id="padding"),
    pytest.param(lambda v: v[:60] + "\n\n\n\n" + v[60:], id="line breaks"),
])
def test_a_cookie_spelled_otherwise_is_refused_and_not_remembered(store: CountingStore,
                                                                   respell: Callable[[str], str]) -> None:
    """One real cookie must not turn into endless (and endlessly long) spellings the layer verifies and keeps:
    the signature's decoder skips characters outside its alphabet."""
    app = make(store)
    value, sid = new_cookie(app.get("/set?secret=1"))
    assert app.get("/get", headers=jar(value)).json == {"secret": "1"}
    other = respell(value)
    assert app.get("/get", headers={"Cookie": f'__Host-session="{other}"'}).json == {}
    assert list(app.layer._verified) == [value]
    assert stored(store, sid)["data"] == {"secret": "1"}


def test_fallback_key_is_accepted_and_new_cookies_use_the_new_key(store: CountingStore) -> None:
    old = make(store, secret_key=OLD_SECRET)
    value, sid = new_cookie(old.get("/set?a=1"))
    rotated = make(store, secret_key=SECRET, secret_key_fallbacks=[OLD_SECRET])
    assert rotated.get("/get", headers=jar(value)).json == {"a": "1"}
    assert make(store).get("/get", headers=jar(value)).json == {}  # fallback removed
    fresh, _ = new_cookie(rotated.get("/rotate", headers=jar(value)))
    assert fresh.split(".")[1] == _signed(fresh.split(".")[0]).split(".")[1]
    assert stored(store, sid) is None


def test_a_cookie_whose_signature_fails_is_noted_for_explain_once(store: CountingStore) -> None:
    """The request notes it; the previews that reads ahead make for the same request do not."""
    app = make(store)
    app.get("/login")  # a user seen here: previews look the cookie up
    forged = _signed("A" * 43, key="z" * 40)
    environ: dict[str, Any] = {TRACE: [], "HTTP_COOKIE": f"__Host-session={forged}"}
    assert app.layer.preview_environ(environ) == {}
    assert app.layer._ahead(environ) is None
    assert environ[TRACE] == []
    trace: list[tuple[str, str]] = []
    app.get("/get", headers=jar(forged), extra_environ={TRACE: trace})
    assert [t for t in trace if t[0] == "session"] == [
        ("session", "cookie signature is invalid; starting a new session")]


def test_the_caches_of_verified_cookies_and_users_are_bounded(store: CountingStore,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Each holds at most VERIFIED_CACHE_SIZE entries, and starts over when full."""
    monkeypatch.setattr(session_module, "VERIFIED_CACHE_SIZE", 2)
    app = make(store)
    values = [new_cookie(app.get("/login"))[0] for _ in range(3)]
    assert len(app.layer._users) == 1  # the third save found two: started over
    for value in values:
        assert app.get("/get", headers=jar(value)).json["user"] == {"sub": "ada", "roles": ["admin"]}
    assert list(app.layer._verified) == [values[2]]
    assert len(app.layer._users) == 2


# ------------------------------------------------------------ rotate, destroy


def test_rotate_keeps_data_and_deletes_the_old_key(store: CountingStore) -> None:
    app = make(store)
    value, old_sid = new_cookie(app.get("/set?cart=3"))
    resp = app.get("/login", headers=jar(value))
    new_value, new_sid = new_cookie(resp)
    assert new_sid != old_sid
    assert stored(store, old_sid) is None
    assert stored(store, new_sid)["data"] == {"cart": "3", "user": {"sub": "ada", "roles": ["admin"]}}
    assert app.get("/get", headers=jar(value)).json == {}
    assert app.get("/get", headers=jar(new_value)).json["cart"] == "3"


@pytest.mark.parametrize(("path", "expected_cookie"), [
    pytest.param("/destroy", EXPIRED, id="logout expires the cookie"),
    pytest.param("/destroy?flash=bye", "new", id="write after destroy issues a new id"),
])
def test_destroy(store: CountingStore, path: str, expected_cookie: str) -> None:
    app = make(store)
    value, sid = new_cookie(app.get("/set?a=1"))
    resp = app.get(path, headers=jar(value))
    assert stored(store, sid) is None
    if expected_cookie == "new":
        _, new_sid = new_cookie(resp)
        assert new_sid != sid and stored(store, new_sid)["data"] == {"flash": "bye"}
    else:
        assert resp.headers.getall("Set-Cookie") == [expected_cookie]
    assert resp.headers["Vary"] == "Cookie"
    assert app.get("/get", headers=jar(value)).json == {}


@pytest.mark.parametrize(("path", "cookie"), [
    pytest.param("/destroy", None, id="no cookie (a cross-site form POST a SameSite=Lax cookie stays off)"),
    pytest.param("/logout", None, id="no cookie, the session read first"),
])
def test_destroy_without_a_session_expires_no_cookie(store: CountingStore, path: str, cookie: str | None) -> None:
    """Else any page could sign a browser out with a form POST to the logout URL (logout CSRF)."""
    app = make(store)
    resp = app.get(path, headers=jar(cookie) if cookie else {})
    assert resp.headers.getall("Set-Cookie") == []
    assert resp.headers["Vary"] == "Cookie"


@pytest.mark.parametrize(("path", "cookie"), [
    pytest.param("/destroy", "forged.signature", id="a cookie whose signature does not verify (a retired key)"),
    pytest.param("/destroy-twice", "signed", id="destroy called twice, with a session"),
])
def test_a_cookie_that_was_sent_is_expired_by_destroy(store: CountingStore, path: str, cookie: str | None) -> None:
    app = make(store)
    value, _ = new_cookie(app.get("/set?a=1"))
    sent = value if cookie == "signed" else cookie or value
    resp = app.get(path, headers=jar(sent))
    assert resp.headers.getall("Set-Cookie") == [EXPIRED]


def refusing(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    """An inner layer that reads the session, then refuses (a role rule, an unknown API version); on
    /plain with werkzeug's own exception, which carries no headers of the stack's."""
    environ[SESSION].get("user")
    if environ["PATH_INFO"] == "/plain":
        raise Forbidden()
    raise refuse(404, "No such version.")


@pytest.mark.parametrize(("path", "status"), [
    pytest.param("/api/v3/x", 404, id="refused by a layer"),
    pytest.param("/plain", 403, id="a werkzeug exception"),
])
@pytest.mark.parametrize(("logged_in", "cache_control"), [
    pytest.param(False, "no-store", id="a new session: varies on the cookie (no-store: the errors layer's)"),
    pytest.param(True, "private, no-store", id="a stored session: private as well (and no-store: an error)"),
])
def test_a_refusal_after_the_session_was_read_varies_on_the_cookie(store: CountingStore, logged_in: bool,
                                                                    cache_control: str, path: str,
                                                                    status: int) -> None:
    headers = {}
    if logged_in:
        value, _ = new_cookie(make(store).get("/set?a=1"))
        headers = jar(value)
    resp = make(store, app=refusing).get(path, headers=headers, status=status)
    assert resp.headers["Vary"] == "Cookie"
    assert resp.headers.get("Cache-Control") == cache_control
    assert resp.headers.getall("Set-Cookie") == []


# ----------------------------------------------------------------- timeouts


def test_idle_timeout_expires_and_use_refreshes_it(store: CountingStore) -> None:
    app = make(store, idle_timeout=0.9, absolute_timeout=60)
    value, _ = new_cookie(app.get("/set?a=1"))
    time.sleep(0.5)
    assert app.get("/get", headers=jar(value)).json == {"a": "1"}  # refreshes the TTL
    time.sleep(0.5)  # 1.0 s after creation, 0.5 s after last use
    assert app.get("/get", headers=jar(value)).json == {"a": "1"}
    time.sleep(1.0)
    assert app.get("/get", headers=jar(value)).json == {}


def test_absolute_timeout_is_checked_server_side(store: CountingStore, monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    now = [1_000_000.0]
    monkeypatch.setattr(session_module, "_clock", lambda: now[0])
    app = make(store, idle_timeout=60, absolute_timeout=100)
    value, sid = new_cookie(app.get("/set?a=1"))
    now[0] += 99
    assert app.get("/get", headers=jar(value)).json == {"a": "1"}
    now[0] += 1
    store.calls.clear()
    with caplog.at_level(logging.WARNING, logger="wsgistack"):
        resp = app.get("/set?b=2", headers=jar(value))
    assert caplog.text == ""  # a session that timed out is no fault to log
    assert resp.json == {"b": "2"}
    assert store.calls == ["getex", "delete", "set"]
    assert stored(store, sid) is None
    _, new_sid = new_cookie(resp)
    assert stored(store, new_sid) == {"created_at": now[0], "data": {"b": "2"}}


def test_rotate_restarts_the_absolute_timeout(store: CountingStore,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1_000_000.0]
    monkeypatch.setattr(session_module, "_clock", lambda: now[0])
    app = make(store, idle_timeout=60, absolute_timeout=100)
    value, _ = new_cookie(app.get("/set?a=1"))
    now[0] += 50
    _, sid = new_cookie(app.get("/login", headers=jar(value)))
    assert stored(store, sid)["created_at"] == now[0]


def test_a_write_near_the_absolute_timeout_is_stored_no_longer_than_it(store: CountingStore,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The stored key's TTL is the idle timeout, cut to what is left of the absolute one."""
    now = [1_000_000.0]
    monkeypatch.setattr(session_module, "_clock", lambda: now[0])
    app = make(store, idle_timeout=60, absolute_timeout=100)
    value, sid = new_cookie(app.get("/set?a=1"))
    now[0] += 99.5  # 0.5 s left
    store.calls.clear()
    assert app.get("/set?b=2", headers=jar(value)).json == {"a": "1", "b": "2"}
    assert store.calls == ["getex", "replace"]
    time.sleep(0.9)
    assert stored(store, sid) is None


def test_a_write_after_the_absolute_timeout_ran_out_during_the_request_ends_the_session(
        store: CountingStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing is left of the absolute timeout when the request ends: stored for 1 ms (the shortest TTL a store
    takes), not with a TTL of 0 or less, which every store refuses (a 500)."""
    now = [1_000_000.0]
    monkeypatch.setattr(session_module, "_clock", lambda: now[0])

    def slow(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        session = environ[SESSION]
        session.get("a")  # read while the session is still within its absolute timeout
        now[0] += 200
        session["b"] = "2"
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"done"]

    value, sid = new_cookie(make(store, idle_timeout=60, absolute_timeout=100).get("/set?a=1"))
    store.calls.clear()
    assert make(store, app=slow, idle_timeout=60, absolute_timeout=100).get("/", headers=jar(value)).text == "done"
    assert store.calls == ["getex", "replace"]
    time.sleep(0.05)
    assert stored(store, sid) is None


# -------------------------------------------------------- corrupt values


@pytest.mark.parametrize(("raw", "reason"), [
    pytest.param(b"\x80not json", "it is not valid JSON", id="not JSON"),
    pytest.param(b"[" * 5000 + b"]" * 5000, "it is not valid JSON", id="nested deeper than Python recurses"),
    pytest.param(b"[1, 2]", "it does not have the shape", id="a list"),
    pytest.param(b'{"data": {}}', "it does not have the shape", id="no created_at"),
    pytest.param(b'{"created_at": "now", "data": {}}', "it does not have the shape",
                 id="created_at is text"),
    pytest.param(b'{"created_at": true, "data": {}}', "it does not have the shape",
                 id="created_at is a boolean"),
    pytest.param(b'{"created_at": 1e12, "data": [1]}', "it does not have the shape",
                 id="data is a list"),
    pytest.param(b'{"created_at": 1e400, "data": {"a": "1"}}', "it does not have the shape",
                 id="created_at too large for a float (infinite: never absolutely expired, never saved)"),
    pytest.param(b'{"created_at": Infinity, "data": {"a": "1"}}', "it is not valid JSON",
                 id="created_at is Infinity"),
    pytest.param(b'{"created_at": -Infinity, "data": {"a": "1"}}', "it is not valid JSON",
                 id="created_at is -Infinity"),
    pytest.param(b'{"created_at": NaN, "data": {"a": "1"}}', "it is not valid JSON",
                 id="created_at is NaN"),
    pytest.param(b'{"created_at": 1' + b"0" * 400 + b', "data": {"a": "1"}}', "it does not have the shape",
                 id="created_at is an integer no float holds"),
])
def test_corrupt_stored_value_gives_an_empty_session(store: CountingStore, raw: bytes, reason: str,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    app = make(store)
    value, sid = new_cookie(app.get("/set?a=1"))
    store.inner.set(KEY_PREFIX + sid, raw, 60)
    with caplog.at_level(logging.WARNING, logger="wsgistack"):
        resp = app.get("/get", headers=jar(value))
    assert resp.status_int == 200 and resp.json == {}
    assert f"the stored session #{hashlib.sha256(sid.encode()).hexdigest()[:12]} was ignored " \
           f"because {reason}" in caplog.text
    assert sid not in caplog.text
    assert stored(store, sid) is None
    assert app.get("/set?b=2", headers=jar(value)).json == {"b": "2"}  # a new session, saved


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_a_stored_value_json_does_not_allow_is_not_adopted(store: CountingStore, constant: str,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    """Python's parser reads NaN and Infinity, which are not JSON (RFC 8259 6) and which a save refuses:
    adopted, such a session would fail every write to it with a 500 for good."""
    app = make(store)
    value, sid = new_cookie(app.get("/set?a=1"))
    raw = f'{{"created_at": {time.time()}, "data": {{"a": "1", "n": [{constant}]}}}}'.encode()
    store.inner.set(KEY_PREFIX + sid, raw, 60)
    with caplog.at_level(logging.WARNING, logger="wsgistack"):
        assert app.get("/get", headers=jar(value)).json == {}
    assert "was ignored because it is not valid JSON" in caplog.text
    assert stored(store, sid) is None
    resp = app.get("/set?b=2", headers=jar(value))
    assert resp.status_int == 200 and resp.json == {"b": "2"}


@pytest.mark.redis
def test_a_value_of_another_redis_type_gives_an_empty_session(redis_url: str) -> None:
    """A list at the session's key (something else wrote it): corrupt, so deleted, not a 503 for good."""
    real = store_from_url(redis_url)
    client = redis.Redis.from_url(redis_url)
    try:
        app = make(CountingStore(real))
        value, sid = new_cookie(app.get("/set?a=1"))
        [key] = [k for k in client.keys("*") if sid.encode() in k]
        client.delete(key)
        client.rpush(key, b"x")
        resp = app.get("/get", headers=jar(value))
        assert (resp.status_int, resp.json) == (200, {})
        assert client.exists(key) == 0
    finally:
        client.close()
        real.close()


# ------------------------------------------------------ caching headers


@pytest.mark.parametrize(("path", "request_headers", "expected"), [
    pytest.param("/", "none", {"Vary": None, "Cache-Control": None}, id="untouched, no cookie: no headers"),
    pytest.param("/", "cookie", {"Vary": "Cookie", "Cache-Control": None},
                 id="untouched, with the cookie: a streamed body may read it, so Vary"),
    pytest.param("/?Cache-Control=public,+max-age%3D60&Vary=Accept", "cookie",
                 {"Vary": "Accept, Cookie", "Cache-Control": "public, max-age=60"},
                 id="untouched, with the cookie: Vary merged, Cache-Control the app's"),
    pytest.param("/get", "cookie", {"Vary": "Cookie", "Cache-Control": "private"},
                 id="read a stored session"),
    pytest.param("/get", "none", {"Vary": "Cookie", "Cache-Control": None},
                 id="read without cookie: anonymous, shareable"),
    pytest.param("/get", "stale", {"Vary": "Cookie", "Cache-Control": None},
                 id="read with an unknown id: anonymous, shareable"),
    pytest.param("/set?a=2", "none", {"Vary": "Cookie", "Cache-Control": "private"},
                 id="new session: Set-Cookie is never shared"),
    pytest.param("/destroy", "cookie", {"Vary": "Cookie", "Cache-Control": "private"},
                 id="logout: the expiring cookie is never shared"),
    pytest.param("/get?Vary=Accept-Encoding", "cookie", {"Vary": "Accept-Encoding, Cookie",
                                                         "Cache-Control": "private"},
                 id="vary merged"),
    pytest.param("/get?Vary=cookie", "cookie", {"Vary": "cookie", "Cache-Control": "private"},
                 id="vary already there"),
    pytest.param("/get?Cache-Control=no-store", "cookie", {"Cache-Control": "no-store"},
                 id="no-store kept"),
    pytest.param("/get?Cache-Control=private,+max-age%3D5", "cookie",
                 {"Cache-Control": "private, max-age=5"}, id="private kept"),
    pytest.param("/get?Cache-Control=public,+max-age%3D60,+s-maxage%3D600", "cookie",
                 {"Cache-Control": "private, max-age=60"}, id="public made private"),
    pytest.param("/get?Cache-Control=max-age%3D60", "cookie",
                 {"Cache-Control": "private, max-age=60"}, id="max-age made private"),
    pytest.param("/get?Cache-Control=public,+max-age%3D60", "none",
                 {"Vary": "Cookie", "Cache-Control": "public, max-age=60"},
                 id="anonymous read keeps public"),
    pytest.param("/get?CDN-Cache-Control=max-age%3D600", "cookie",
                 {"Cache-Control": "private", "CDN-Cache-Control": None},
                 id="a CDN's own field dropped: the CDN obeys it instead of Cache-Control"),
    pytest.param("/get?Cache-Control=no-store&Surrogate-Control=max-age%3D600", "cookie",
                 {"Cache-Control": "no-store", "Surrogate-Control": None},
                 id="Surrogate-Control dropped, also beside no-store"),
    pytest.param("/set?a=2&CDN-Cache-Control=max-age%3D600", "none",
                 {"Cache-Control": "private", "CDN-Cache-Control": None},
                 id="new session: a CDN's own field dropped"),
    pytest.param("/get?CDN-Cache-Control=max-age%3D600", "none",
                 {"Cache-Control": None, "CDN-Cache-Control": "max-age=600"},
                 id="anonymous read keeps a CDN's own field"),
])
def test_caching_headers(path: str, request_headers: str, expected: dict[str, str | None]) -> None:
    app = make(store_from_url("memory://"))
    value, _ = new_cookie(app.get("/set?a=1"))
    cookie = {"cookie": jar(value), "stale": jar(_signed("B" * 43)), "none": {}}[request_headers]
    resp = app.get(path, headers=cookie)
    for name, want in expected.items():
        assert resp.headers.get(name) == want


@pytest.mark.parametrize(("headers", "expected"), [
    pytest.param([("Cache-Control", "max-age=60"), ("Cache-Control", "public")], ["private, max-age=60"],
                 id="public in a second field"),
    pytest.param([("cache-control", "s-maxage=600"), ("X-A", "1"), ("Cache-Control", "max-age=5")],
                 ["private, max-age=5"], id="s-maxage in the first field"),
    pytest.param([("Cache-Control", "max-age=5"), ("Cache-Control", "no-store")], ["max-age=5", "no-store"],
                 id="no-store in any field: kept as it is"),
    pytest.param([("Cache-Control", 'private="Set-Cookie", max-age=5')], ['private, private="Set-Cookie", max-age=5'],
                 id="private for some fields only is not private"),
    pytest.param([("Cache-Control", "Private, max-age=5"), ("Cache-Control", "public")], ["Private, max-age=5"],
                 id="private already"),
    pytest.param([("Cloudflare-CDN-Cache-Control", "max-age=600"), ("Akamai-Cache-Control", "max-age=600"),
                  ("cdn-cache-control", "public"), ("Edge-Control", "cache-maxage=600"), ("X-A", "1")], ["private"],
                 id="every field a CDN obeys instead of Cache-Control is dropped"),
])
def test_every_cache_control_field_is_made_private(headers: list[tuple[str, str]], expected: list[str]) -> None:
    others = [h for h in headers if h[0] == "X-A"]
    _make_private(headers)
    assert [v for n, v in headers if n.lower() == "cache-control"] == expected
    assert [h for h in headers if h[0].lower() != "cache-control"] == others


def test_saved_once_when_start_response_is_called_again(store: CountingStore) -> None:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        environ[SESSION]["a"] = 1
        start_response("200 OK", [("Content-Type", "text/plain")])
        try:
            raise RuntimeError("late failure")
        except RuntimeError:
            import sys
            start_response("500 Internal Server Error", [("Content-Type", "text/plain")],
                           sys.exc_info())
        return [b"oops"]

    calls: list[list[tuple[str, str]]] = []
    layer = make(store, app=app).layer
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/"}
    layer(environ, lambda status, headers, exc_info=None: calls.append(headers))
    assert store.calls == ["set"]
    assert [sum(n == "Set-Cookie" for n, _ in h) for h in calls] == [1, 1]


def test_change_after_the_response_started_is_not_saved_and_logged(
        store: CountingStore, caplog: pytest.LogCaptureFixture) -> None:
    def streaming(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterator[bytes]:
        session: Session = environ[SESSION]
        start_response("200 OK", [("Content-Type", "text/event-stream")])
        yield b"data: 1\n\n"
        session["late"] = 1
        session["later"] = 2
        yield b"data: 2\n\n"

    with caplog.at_level(logging.WARNING, logger="wsgistack"):
        resp = make(store, app=streaming).get("/")
    assert resp.body == b"data: 1\n\ndata: 2\n\n"
    assert "Set-Cookie" not in resp.headers and store.calls == []
    assert caplog.text.count("the session was changed after the response started, so the change "
                             "is not saved") == 1


def test_a_session_read_while_streaming_leaves_the_response_varied_on_the_cookie(store: CountingStore) -> None:
    """Flask's stream_with_context reads the session after start_response: too late for private."""
    def streaming(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterator[bytes]:
        session: Session = environ[SESSION]
        start_response("200 OK", [("Content-Type", "text/plain"), ("Cache-Control", "public, max-age=300")])
        yield f"hello {session.get('a')}".encode()

    app = make(store, app=streaming)
    value, _ = new_cookie(make(store).get("/set?a=ada"))
    resp = app.get("/", headers=jar(value))
    assert resp.body == b"hello ada"
    assert resp.headers["Vary"] == "Cookie" and "Set-Cookie" not in resp.headers


# ---------------------------------------------------------- store failures


@pytest.mark.redis
@pytest.mark.parametrize(("mode", "path", "expected"), [
    pytest.param("closed", "/get", (503, "the session could not be loaded because the session "
                                         "store is unavailable; try again shortly"), id="closed, load"),
    pytest.param("closed", "/set?a=1", (503, "the session could not be saved because the session "
                                              "store is unavailable; try again shortly"),
                 id="closed, save"),
    pytest.param("closed", "/", (200, None), id="closed, untouched"),
    pytest.param("open", "/get", (200, {}), id="open, load"),
    pytest.param("open", "/set?a=1", (200, {"a": "1"}), id="open, save"),
])
def test_store_down(redis_server: Any, redis_url: str, mode: str, path: str,
                    expected: tuple[int, Any]) -> None:
    if redis_server is None:
        pytest.skip("needs the private redis-server (REDIS_URL is set)")
    store = store_from_url(redis_url)
    events: list[tuple[str, dict[str, Any]]] = []
    context = Context(stores={"shared": store}, listeners=[lambda e, f: events.append((e, f))])
    app = make(store, context=context, on_store_error=mode)
    value, _ = new_cookie(app.get("/set?a=0"))
    events.clear()
    redis_server.stop()
    try:
        headers = jar(value) if path == "/get" else {}
        resp = app.get(path, headers=headers, expect_errors=True)
    finally:
        redis_server.start()
        store.close()
    status, body = expected
    assert resp.status_int == status
    assert "Set-Cookie" not in resp.headers
    if status == 503:
        assert resp.headers["Retry-After"] == "5"
        assert resp.json["error"]["message"] == body
    elif path != "/":
        assert resp.json == body
    touched = path != "/"
    assert events == ([("store.error", {"store": "shared", "layer": "session"})] if touched else [])


def test_a_store_that_stays_down_is_logged_once_per_ten_seconds(store: CountingStore,
                                                                monkeypatch: pytest.MonkeyPatch,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    now = [1000.0]
    monkeypatch.setattr(session_module, "time", SimpleNamespace(monotonic=lambda: now[0]))
    app = make(store, on_store_error="open")
    value, _ = new_cookie(app.get("/set?a=1"))
    store.failing = {"getex"}
    line = "session layer: the session could not be loaded: getex failed: connection refused"
    logged = []
    for step in (0, 5, 4.9, 0.2, 9.9):  # at 1000, 1005, 1009.9, 1010.1 (> 10 s after the first line), 1020
        now[0] += step
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="wsgistack"):
            assert app.get("/get", headers=jar(value)).json == {}
        logged.append(caplog.text.count(line))
    assert logged == [1, 0, 0, 1, 0]


@pytest.mark.parametrize(("path", "cache_control"), [
    pytest.param("/set?a=1", "private", id="a write the store could not save"),
    pytest.param("/set?a=1&Cache-Control=public,+max-age%3D60", "private, max-age=60",
                 id="a write the store could not save, public made private"),
    pytest.param("/get?Cache-Control=public,+max-age%3D60", "public, max-age=60",
                 id="a read of no session: anonymous, shareable"),
])
def test_a_page_made_from_a_write_the_store_could_not_save_is_private(store: CountingStore, path: str,
                                                                      cache_control: str) -> None:
    """With on_store_error: open the app answers with what it wrote to the new session, and no cookie is set:
    the page is still this visitor's, so a shared cache must not hand it to the next one without a cookie."""
    app = make(store, on_store_error="open")
    store.failing = {"set"}
    resp = app.get(path)
    assert "Set-Cookie" not in resp.headers
    assert (resp.headers["Vary"], resp.headers.get("Cache-Control")) == ("Cookie", cache_control)


ENDED = ("the session could not be ended because the session store is unavailable; "
         "try again shortly")
ROTATED = ("the session could not be rotated because the session store is unavailable; "
           "try again shortly")


@pytest.mark.parametrize(("mode", "path", "failing", "expected"), [
    pytest.param("open", "/destroy", {"delete"}, (503, ENDED, True), id="open, logout"),
    pytest.param("closed", "/destroy", {"delete"}, (503, ENDED, True), id="closed, logout"),
    pytest.param("open", "/logout", {"getex", "delete"}, (503, ENDED, True),
                 id="open, logout after a failed read"),
    pytest.param("open", "/logout", {"getex"}, (200, [EXPIRED], False),
                 id="open, logout after a failed read, delete works"),
    pytest.param("open", "/login", {"delete"}, (503, ROTATED, True), id="open, login"),
    pytest.param("closed", "/login", {"delete"}, (503, ROTATED, True), id="closed, login"),
    pytest.param("open", "/login", {"getex", "delete"}, (503, ROTATED, True),
                 id="open, login after a failed read"),
    pytest.param("open", "/login", {"getex"}, (200, [], False),
                 id="open, login after a failed read, delete works: nothing saved"),
])
def test_a_retired_id_that_cannot_be_deleted_is_a_503(store: CountingStore, mode: str, path: str,
                                                      failing: set[str], expected: tuple[int, Any, bool]) -> None:
    """An end of session that cannot be recorded is never reported as done, whatever on_store_error says."""
    events: list[tuple[str, dict[str, Any]]] = []
    context = Context(stores={"shared": store}, listeners=[lambda e, f: events.append((e, f))])
    app = make(store, context=context, on_store_error=mode)
    value, sid = new_cookie(app.get("/set?a=1"))
    events.clear()
    store.failing = failing
    resp = app.get(path, headers=jar(value), expect_errors=True)
    status, outcome, old_id_valid = expected
    assert resp.status_int == status
    if status == 503:
        assert resp.headers["Retry-After"] == "5"
        assert resp.json["error"]["message"] == outcome
        assert "Set-Cookie" not in resp.headers  # the client keeps its cookie to try again
    else:
        assert resp.headers.getall("Set-Cookie") == outcome
    assert [e for e, _ in events] == ["store.error"] * len(failing)
    store.failing = set()
    assert list(store.inner.scan(KEY_PREFIX)) == ([KEY_PREFIX + sid] if old_id_valid else [])
    assert (app.get("/get", headers=jar(value)).json == {"a": "1"}) is old_id_valid


def generating(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterator[bytes]:
    """A generator app (PEP 3333 allows it): the session is used and the response started on the body's
    first iteration, so the session is saved there, after the layers' calls returned."""
    session: Session = environ[SESSION]
    if environ["PATH_INFO"] == "/destroy":
        session.destroy()
    else:
        session["x"] = 1
    start_response("200 OK", [("Content-Type", "text/plain")])
    yield b"done"


SAVED = "the session could not be saved because the session store is unavailable; try again shortly"


@pytest.mark.parametrize(("path", "failing", "message", "cache_control"), [
    pytest.param("/destroy", {"delete"}, ENDED, "no-store", id="a logout (the session it holds is a new one)"),
    pytest.param("/set", {"replace"}, SAVED, "private, no-store", id="a write to a stored session"),
])
def test_a_generator_apps_session_that_cannot_be_saved_is_a_503(store: CountingStore, path: str, failing: set[str],
                                                                message: str, cache_control: str) -> None:
    value, _ = new_cookie(make(store).get("/set?a=1"))
    store.failing = failing
    resp = make(store, app=generating).get(path, headers=jar(value), status=503)
    assert (resp.headers["Retry-After"], resp.json["error"]["message"]) == ("5", message)
    assert (resp.headers["Vary"], resp.headers["Cache-Control"]) == ("Cookie", cache_control)
    assert "Set-Cookie" not in resp.headers


def test_a_logout_refused_with_503_can_be_retried(store: CountingStore) -> None:
    app = make(store, on_store_error="open")
    value, sid = new_cookie(app.get("/set?a=1"))
    store.failing = {"delete"}
    app.get("/destroy", headers=jar(value), status=503)
    store.failing = set()
    resp = app.get("/destroy", headers=jar(value), status=200)
    assert resp.headers.getall("Set-Cookie") == [EXPIRED]
    assert stored(store, sid) is None
    assert app.get("/get", headers=jar(value)).json == {}


# ------------------------------------------------------------- YAML level


# ------------------------------------------------------- hints for reads ahead


def hint_environ(value: str) -> dict[str, Any]:
    return {"HTTP_COOKIE": f"__Host-session={value}"}


ADA = {SESSION_USER_HINT: ("ada", frozenset({"admin"}))}


def test_a_session_read_here_gives_its_user_as_a_hint(store: CountingStore) -> None:
    """Saved by another process, read by this one: this one learns the user the session holds."""
    one, other = make(store), make(store)
    value, _ = new_cookie(one.get("/login"))
    assert one.layer.preview_environ(hint_environ(value)) == ADA
    assert other.layer.preview_environ(hint_environ(value)) == {}
    other.get("/get", headers=jar(value))
    assert other.layer.preview_environ(hint_environ(value)) == ADA


def test_a_session_ended_while_a_request_wrote_it_leaves_no_hint(store: CountingStore) -> None:
    made: dict[str, Any] = {}

    def slow(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        session: Session = environ[SESSION]
        if environ["PATH_INFO"] != "/cart":
            return probe(environ, start_response)
        session["cart"] = [*session.get("cart", []), "book"]
        made["other"].get("/logout", headers=jar(made["value"]))  # another process ends it meanwhile
        start_response("200 OK", [("Content-Type", "application/json")])
        return [b"{}"]

    app, made["other"] = make(store, app=slow), make(store)
    made["value"], sid = new_cookie(app.get("/login"))
    assert app.layer.preview_environ(hint_environ(made["value"])) == ADA
    app.get("/cart", headers=jar(made["value"]))
    assert stored(store, sid) is None
    assert app.layer.preview_environ(hint_environ(made["value"])) == {}


def test_built_from_yaml(make_stack: Callable[..., TestApp]) -> None:
    app = make_stack({
        "app": {"factory": "test_session:probe_factory"},
        "pipeline": [{"session": {"secret_key": SECRET, "idle_timeout": 600}}],
    })
    value, _ = new_cookie(app.get("/set?a=1"))
    assert app.get("/get", headers=jar(value)).json == {"a": "1"}


def test_yaml_refuses_insecure_cookie_on_public_listener(make_stack: Callable[..., TestApp]) -> None:
    from config import ConfigError

    with pytest.raises(ConfigError, match=re.escape("cookie_secure: false is only allowed when")):
        make_stack({
            "server": {"listen": "0.0.0.0:8080"},
            "app": {"factory": "test_session:probe_factory"},
            "pipeline": [{"session": {"secret_key": SECRET, "cookie_name": "dev",
                                      "cookie_secure": False}}],
        })


def probe_factory(options: dict[str, Any]) -> Any:
    """App factory for the YAML tests."""
    return probe


def flask_views() -> Any:
    """A Flask core with the stack's session interface, as app.create_app sets it up."""
    import datetime

    import flask

    from app.session_adapter import StackSession, StackSessionInterface

    app = flask.Flask("views")
    app.session_interface = StackSessionInterface()

    @app.get("/start")
    def start() -> Any:
        flask.session["cart"] = []
        return {"new": flask.session.new, "modified": flask.session.modified}

    @app.get("/add")
    def add() -> Any:
        flask.session["cart"].append("item")  # changed in place: only modified says so
        flask.session.modified = True
        return {"cart": flask.session["cart"], "new": flask.session.new}

    @app.get("/permanent")
    def permanent() -> Any:
        flask.session.permanent = True  # the usual Flask line: stores nothing here
        return {"permanent": flask.session.permanent}

    @app.get("/touch")
    def touch() -> Any:
        flask.session.modified = True  # a common Flask line, run for every request (before_request, say)
        return {}

    @app.get("/login-then-bad")
    def login_then_bad() -> Any:
        flask.session["cart"].append({1, 2})  # changed in place: JSON cannot hold a set
        cast(StackSession, flask.session).rotate()
        return {}

    @app.get("/nested-date")
    def nested_date() -> Any:
        flask.session["cart"].append(datetime.date(2026, 1, 1))
        flask.session.modified = True
        return {}

    @app.get("/discard")
    def discard() -> Any:
        flask.session["cart"].append("item")
        flask.session.modified = False  # the change is not to be saved
        return {}

    @app.get("/end")
    def end() -> Any:
        flask.session["a"] = 1
        how = flask.request.args["how"]
        if how == "destroy":
            cast(StackSession, flask.session).destroy()
        elif how == "rotate":
            cast(StackSession, flask.session).rotate()
        else:
            cast(StackSession, flask.session).rotate(carry=False)
        return dict(flask.session)

    @app.get("/drop")
    def drop() -> Any:
        del flask.session["cart"]
        return {"left": len(flask.session)}

    @app.get("/nested-nan")
    def nested_nan() -> Any:
        flask.session["cart"].append(float("nan"))  # Python's json would write NaN: no JSON reader takes it
        flask.session.modified = True
        return {}

    return app


def test_flask_session_modified_saves_a_value_changed_in_place(store: CountingStore) -> None:
    app = make(store, app=flask_views(), cookie_secure=False, cookie_name="sid")
    assert app.get("/start").json == {"new": True, "modified": True}
    assert app.get("/add").json == {"cart": ["item"], "new": False}
    sid = app.layer.signer.unsign(app.cookies["sid"]).decode()
    assert stored(store, sid)["data"] == {"cart": ["item"]}


def test_flask_session_del_removes_the_key_from_the_store(store: CountingStore) -> None:
    app = make(store, app=flask_views(), cookie_secure=False, cookie_name="sid")
    app.get("/start")
    sid = app.layer.signer.unsign(app.cookies["sid"]).decode()
    assert app.get("/drop").json == {"left": 0}
    assert stored(store, sid)["data"] == {}


def test_flask_session_modified_false_saves_nothing(store: CountingStore) -> None:
    app = make(store, app=flask_views(), cookie_secure=False, cookie_name="sid")
    app.get("/start")
    sid = app.layer.signer.unsign(app.cookies["sid"]).decode()
    store.calls.clear()
    app.get("/discard")
    assert store.calls == ["getex"]
    assert stored(store, sid)["data"] == {"cart": []}


@pytest.mark.parametrize(("how", "expected"), [
    pytest.param("rotate", {"a": 1}, id="rotate() keeps the data"),
    pytest.param("login", {}, id="rotate(carry=False) drops it"),
    pytest.param("destroy", {}, id="destroy() drops it"),
])
def test_flask_session_without_a_session_layer_lives_for_the_request(how: str, expected: dict[str, Any]) -> None:
    """No session layer: Flask gets a session for one request, and never a cookie."""
    response = TestApp(flask_views()).get(f"/end?how={how}")
    assert response.json == expected
    assert "Set-Cookie" not in response.headers


def test_flask_session_permanent_stores_nothing(store: CountingStore) -> None:
    app = make(store, app=flask_views(), cookie_secure=False, cookie_name="sid")
    response = app.get("/permanent")
    assert response.json == {"permanent": True}
    assert "Set-Cookie" not in response.headers and list(store.inner.scan(KEY_PREFIX)) == []


@pytest.mark.parametrize(("path", "reason"), [
    pytest.param("/nested-date", "Object of type date is not JSON serializable", id="a date"),
    pytest.param("/nested-nan", "Out of range float values are not JSON compliant", id="NaN"),
])
def test_a_value_changed_in_place_that_json_cannot_hold_fails_with_its_name(store: CountingStore, path: str,
                                                                           reason: str,
                                                                           caplog: pytest.LogCaptureFixture) -> None:
    app = make(store, app=flask_views(), cookie_secure=False, cookie_name="sid")
    app.get("/start")
    with caplog.at_level(logging.ERROR):
        app.get(path, status=500)
    assert "session values must be JSON-serialisable: session['cart'] holds a value changed in place that is " \
           f"not ({reason})" in caplog.text
    sid = app.layer.signer.unsign(app.cookies["sid"]).decode()
    assert stored(store, sid)["data"] == {"cart": []}  # nothing of it saved


def test_a_cached_page_made_from_the_session_keeps_vary_cookie_on_its_hits(store: CountingStore) -> None:
    """A public page built from an anonymous session: the hit, where nobody reads the session, varies too."""
    from middleware.cache import CacheMiddleware

    def page(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        user = environ[SESSION].get("user")
        body = json.dumps({"user": user}).encode()
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body))),
                                  ("Cache-Control", "public, max-age=60")])
        return [body]

    context = Context(stores={"shared": store})
    cache = CacheMiddleware(page, CacheMiddleware.Options(cookie_names=["sid"]), context)
    layer = SessionMiddleware(cache, SessionMiddleware.Options(secret_key=SECRET, cookie_name="sid",
                                                                cookie_secure=False), context)
    app = TestApp(ErrorsMiddleware(layer, ErrorsMiddleware.Options(), context))
    miss, hit = app.get("/read"), app.get("/read")
    assert [miss.headers["X-Cache"], hit.headers["X-Cache"]] == ["MISS", "HIT"]
    assert miss.headers["Vary"] == hit.headers["Vary"] == "Cookie"


def test_a_conditional_miss_of_a_page_made_from_the_session_is_a_304_too(store: CountingStore) -> None:
    """As in the shipped stack, where auth reads the session on every request."""
    from middleware.cache import CacheMiddleware

    def page(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        environ[SESSION].get("user")
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2"), ("ETag", '"v1"'),
                                  ("Cache-Control", "public, max-age=60")])
        return [b"ok"]

    context = Context(stores={"shared": store})
    cache = CacheMiddleware(page, CacheMiddleware.Options(cookie_names=["sid"]), context)
    layer = SessionMiddleware(cache, SessionMiddleware.Options(secret_key=SECRET, cookie_name="sid",
                                                                cookie_secure=False), context)
    app = TestApp(ErrorsMiddleware(layer, ErrorsMiddleware.Options(), context))
    miss = app.get("/page", headers={"If-None-Match": '"v1"'}, status=304)
    hit = app.get("/page", headers={"If-None-Match": '"v1"'}, status=304)
    assert [miss.headers["X-Cache"], hit.headers["X-Cache"]] == ["MISS", "HIT"]
    assert miss.headers["Vary"] == hit.headers["Vary"] == "Cookie"


def test_flask_session_modified_on_an_empty_new_session_stores_nothing(store: CountingStore) -> None:
    """As Flask's own sessions: a visitor without a cookie gets no stored session, no cookie, no private."""
    app = make(store, app=flask_views(), cookie_secure=False, cookie_name="sid")
    for _ in range(3):
        response = app.get("/touch")
        assert "Set-Cookie" not in response.headers and "private" not in response.headers.get("Cache-Control", "")
    assert list(store.inner.scan(KEY_PREFIX)) == []


def test_a_value_json_cannot_hold_fails_a_rotate_before_the_old_session_is_deleted(store: CountingStore) -> None:
    """The request fails (500) with the session as it was: the client is still logged in and may retry."""
    app = make(store, app=flask_views(), cookie_secure=False, cookie_name="sid")
    app.get("/start")
    sid = app.layer.signer.unsign(app.cookies["sid"]).decode()
    app.get("/login-then-bad", status=500)
    assert stored(store, sid)["data"] == {"cart": []}
