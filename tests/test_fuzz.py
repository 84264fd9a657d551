"""Fuzz the full stack in-process: whatever arrives, the answer is well-formed and never a 500.

Hypothesis builds requests as Waitress would hand them over (methods, paths
with percent-encoding and invalid UTF-8, absolute-form targets, odd and huge
header values, header values about the validation limits, broken JSON, JSON
nested about ``json_max_depth``, integers about the digit limit, repeated keys,
multipart bodies and wrong content types, real, forged and near-valid tokens,
cookies) and runs each through every built-in layer and the Flask core, wrapped in
``wsgiref.validate`` (PEP 3333 conformance of both sides).  Each answer must
be below 500; every refusal must be rendered by the ``errors`` layer
(``application/problem+json`` carrying the same status); HEAD answers have no
body; the header fields are ones Waitress can send (token names, latin-1 values,
no field that must be single repeated), a ``Content-Length`` is the body's, 204
and 304 carry no body, a 401 carries ``WWW-Authenticate`` and a 405 ``Allow``;
and nothing may log at ERROR (an unhandled exception does).

CI runs ``$WSGISTACK_FUZZ_EXAMPLES`` examples (default 150); ``make fuzz`` runs 20000.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import json
import logging
import os
import re
import warnings
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote_from_bytes
from wsgiref.validate import validator

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from webtest import TestApp

from app.users import UserStore
from config import BuiltStack, build_from_text, read_text
from config.build import parse
from config.lint import kind
from config.registry import LAYERS

EXAMPLES = int(os.environ.get("WSGISTACK_FUZZ_EXAMPLES", "150"))
#: Short runs (CI) draw the same examples every time; long runs (make fuzz) explore afresh.
DERANDOMIZE_UP_TO = 1000
SESSION_SECRET = "s" * 43
JWT_SECRET = "j" * 43

STACK = f"""
server:
  listen: 127.0.0.1:8889
stores:
  shared: "memory://?max_entries=100000"
app:
  factory: app:create_app
  options:
    var_dir: var
    search: {{engine: local, index_sources: [json]}}
pipeline:
  - errors: {{format: problem}}
  - proxy: {{x_for: 1, x_proto: 1, trusted_proxies: ["127.0.0.1/32"]}}
  - request_id: {{}}
  - health: {{}}
  - metrics: {{layer_timing: true, server_timing: true}}
  - access_log: {{}}
  - operator_page: {{}}
  - headers: {{}}
  - validation: {{max_body_bytes: 65536, max_query_length: 2048}}
  - cors:
      origins: ["https://app.example.org", "https://*.example.net"]
      allow_methods: [GET, POST, PUT, DELETE]
      allow_headers: [Authorization, Content-Type, X-Request-ID, X-API-Version]
      expose_headers: [X-Request-ID, Retry-After]
      allow_credentials: true
  - ratelimit:
      store: shared
      limits: ["100000/minute"]
      rules:
        - paths: ["/auth/login"]
          methods: [POST]
          limits: ["5/minute"]
      paths: ["/api/*", "/auth/*"]
  - session:
      store: shared
      secret_key: "{SESSION_SECRET}"
      cookie_name: wsgistack_session
      cookie_secure: true
  - csrf:
      cookie_name: wsgistack_session
      trusted_origins: ["https://app.example.org"]
  - auth:
      store: shared
      secret: "{JWT_SECRET}"
      default: optional
      rules:
        - paths: ["/auth/login", "/auth/refresh", "/auth/logout"]
          auth: none
  - versioning: {{supported: [v1, v2], default: v1}}
  - cache:
      store: shared
      ttl: 60
      cookie_names: [wsgistack_session]
      paths: ["/api/*/search"]
"""

#: Statuses the stack answers without a problem document: nothing to render.
NO_BODY = {204, 304}
#: Replaced by a freshly issued access token in each example (a logout may revoke any earlier one).
TOKEN_MARK = "<fresh-token>"


class Fuzzed:
    """The built stack and real credentials for it (a valid token, a revoked one, a session cookie)."""

    def __init__(self, built: BuiltStack, token: str, revoked: str, refresh: str, cookie: str) -> None:
        self.built, self.token, self.revoked, self.refresh, self.cookie = built, token, revoked, refresh, cookie
        self.tokens = built.context.services["tokens"]


class ErrorRecords(logging.Handler):
    """Keeps every record at ERROR or above."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzzed]:
    """The full stack on memory stores, with a user, her tokens and a session cookie."""
    base = tmp_path_factory.mktemp("fuzz")
    (base / "var").mkdir()
    UserStore(str(base / "var" / "users.sqlite3")).add("alice", "correct horse battery", ["admin"])
    built = build_from_text(STACK, base_dir=base)
    client = TestApp(built.app, extra_environ={"REMOTE_ADDR": "127.0.0.1"})
    credentials = {"username": "alice", "password": "correct horse battery"}
    revoked = client.post_json("/auth/login", credentials).json["access_token"]
    client.post("/auth/logout", headers={"Authorization": f"Bearer {revoked}"}, status=204)
    issued = client.post_json("/auth/login", credentials).json
    cookie = client.cookies["wsgistack_session"]
    client.get("/api/v1/search?q=json")  # build the index once
    yield Fuzzed(built, issued["access_token"], revoked, issued["refresh_token"], cookie)
    built.close()


@pytest.fixture(scope="module")
def error_records() -> Iterator[ErrorRecords]:
    """Every ERROR record logged anywhere while the fuzz runs."""
    handler = ErrorRecords()
    root = logging.getLogger()
    root.addHandler(handler)
    yield handler
    root.removeHandler(handler)


# ---------------------------------------------------------------- strategies

METHODS = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT"]
PATHS = [
    "/", "/api/v1/search", "/api/v2/search", "/api/search", "/api/v1/search/stream", "/api/v2/search/stream",
    "/api/v1/health", "/api/v2/config", "/api/v3/health", "/api/v1/", "/auth/login", "/auth/refresh",
    "/auth/logout", "/healthz", "/readyz", "/metrics", "/_stack", "/_stack/data.json", "/_stack/app.js",
    "/_stack/app.css", "/favicon.ico",
]
HEADER_NAMES = [
    "Authorization", "Cookie", "Origin", "Content-Type", "Accept", "Accept-Encoding", "X-API-Version",
    "X-Request-ID", "X-Forwarded-For", "X-Forwarded-Proto", "Forwarded", "Sec-Fetch-Site", "Sec-Fetch-Mode",
    "If-None-Match", "If-Modified-Since", "Range", "Cache-Control", "Pragma", "Access-Control-Request-Method",
    "Access-Control-Request-Headers", "Host", "User-Agent", "Referer", "X-CSRF-Token", "Expect",
    "Transfer-Encoding",
]
#: What Waitress lets through in a header value: visible ASCII, obs-text, inner spaces and tabs.
FIELD_CHARS = st.sampled_from([chr(c) for c in [9, *range(0x20, 0x7F), *range(0x80, 0x100)]])
FIELD_NAME = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+")
TOKEN = st.from_regex(r"[A-Za-z0-9!#$%&'*+.^_`|~-]{1,24}", fullmatch=True)


def field_text(max_size: int = 120) -> st.SearchStrategy[str]:
    return st.text(FIELD_CHARS, max_size=max_size)


def huge(chars: str) -> st.SearchStrategy[str]:
    return st.builds(lambda c, n: c * n, st.sampled_from(list(chars)), st.integers(1_000, 70_000))


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def signed(claims: Any) -> str:
    """A token signed with the stack's key (HS256) whatever its claims hold (PyJWT's encode checks some)."""
    text = b64url(b'{"alg":"HS256","typ":"JWT"}') + "." + b64url(json.dumps(claims).encode())
    return text + "." + b64url(hmac.new(JWT_SECRET.encode(), text.encode(), hashlib.sha256).digest())


def near_jwt(fuzzed: Fuzzed) -> st.SearchStrategy[str]:
    """Tokens one step from valid: a real one with a part swapped or cut, or signed right with odd contents."""
    head, payload, signature = fuzzed.token.split(".")
    part = st.one_of(JSON_VALUES, st.fixed_dictionaries({}, optional={
        "alg": st.sampled_from(["HS256", "none", "HS512", "RS256", ""]) | JSON_VALUES, "kid": JSON_VALUES,
        "crit": JSON_VALUES, "typ": JSON_VALUES})).map(lambda v: b64url(json.dumps(v).encode()))
    claims = st.fixed_dictionaries({}, optional={
        name: JSON_VALUES | st.integers(-(10**20), 10**20) | st.floats(allow_nan=False)
        for name in ["sub", "roles", "exp", "iat", "nbf", "fam", "typ", "auth_time", "aud", "iss", "jti", "type"]})
    return st.one_of(
        st.builds(lambda h: f"{h}.{payload}.{signature}", part),
        st.builds(lambda p: f"{head}.{p}.{signature}", part),
        st.builds(lambda n: fuzzed.token[:n], st.integers(0, len(fuzzed.token))),
        st.builds(lambda c: f"{head}.{payload}.{signature[:-2]}{c}", st.sampled_from(["AA", "A", "==", "."])),
        st.just(f"{head}.{payload}."), st.just(f"{head}.{payload}"), st.just(fuzzed.refresh),
        st.builds(signed, claims),
    )


def header_value(fuzzed: Fuzzed) -> st.SearchStrategy[str]:
    jwtish = st.builds(lambda a, b, c: f"{a}.{b}.{c}", *[st.from_regex(r"[A-Za-z0-9_=-]{0,40}", fullmatch=True)] * 3)
    cookie_part = st.sampled_from([f"wsgistack_session={fuzzed.cookie}", "wsgistack_session=x", "$Version=1",
                                   'wsgistack_session="a b"', "=", "a", ";", " ", "wsgistack_session",
                                   "wsgistack_session=\\"])
    return st.one_of(
        field_text(),
        huge("a,;= \xff"),
        st.sampled_from([
            f"Bearer {TOKEN_MARK}", f"Bearer {fuzzed.revoked}", f"bearer {fuzzed.token[:-3]}xyz",
            f"Bearer {TOKEN_MARK} extra", "Bearer", "Bearer ", "Basic YWxpY2U6c2VjcmV0", "Digest x",
            f"wsgistack_session={fuzzed.cookie}", f"wsgistack_session={fuzzed.cookie[:-2]}", "wsgistack_session=",
            f"a=1; wsgistack_session={fuzzed.cookie}; b=2", 'wsgistack_session="\\"x', "=;=;;",
            "https://app.example.org", "https://x.example.net", "null", "http://evil.example", "file://",
            "application/json", "application/json; charset=latin-1", "text/plain", "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x", "multipart/form-data", "application/problem+json", "*/*",
            "v1", "v2", "v3", "V1", "1.0", "same-origin", "cross-site", "same-site", "none",
            "127.0.0.1", "203.0.113.9, 10.0.0.1", "::1", "unknown", "for=192.0.2.60;proto=https;by=203.0.113.43",
            'for="[2001:db8::1]:4711"', "gzip, br", "bytes=0-10", "100-continue", "chunked", "W/\"x\"", "*",
        ]),
        st.builds(lambda j: f"Bearer {j}", jwtish),
        st.builds(lambda s, j: f"{s} {j}", st.sampled_from(["Bearer", "bearer", "BEARER", "Bearer ", "Bearer\t"]),
                  near_jwt(fuzzed)),
        st.lists(cookie_part, min_size=2, max_size=4).map("; ".join),
        st.builds(lambda c, n: c * n, st.sampled_from(list("a,;=")), st.integers(8_150, 8_250)),
        st.builds(lambda v: f"wsgistack_session={v}", field_text(60)),
    )


#: JSON text may carry what Python strings cannot encode: lone surrogates (json.dumps escapes them).
JSON_TEXT = st.text(st.characters(codec=None, categories=None), max_size=20)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | JSON_TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=10,
)


def body() -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.just(b""),
        st.binary(max_size=300),
        JSON_VALUES.map(lambda v: json.dumps(v).encode()),
        st.sampled_from([
            b"{", b'{"username": ', b'{"username": "alice", "password": "x"', b"[]", b"null", b'"x"', b"1e999",
            b'{"username": "alice", "password": "correct horse battery"}', b'{"refresh_token": 5}',
            b'{"username": null, "password": []}', b"\xff\xfe{}", b'{"a": "\\ud800"}', b"{}" * 5000,
            b'{"refresh_token": "a.b.c"}', b"username=alice&password=x",
        ]),
        st.builds(lambda b, n: b * n, st.sampled_from([b"x", b"{", b"\x00"]), st.integers(10_000, 70_000)),
        st.builds(lambda o, c, n, v: o * n + v + c * n, st.sampled_from([b"[", b'{"a":']),
                  st.sampled_from([b"]", b"}"]), st.integers(28, 36), st.sampled_from([b"1", b"{}", b"[]", b""])),
        st.builds(lambda n, d: b'{"username": ' + b"-" * (n % 2) + b"9" * d + b', "password": "x"}',
                  st.integers(0, 1), st.integers(4_295, 4_305)),
        st.builds(lambda k, v: b'{"%s": %s, "%s": %s}' % (k, v, k, v), st.sampled_from([b"username", b"refresh_token",
                                                                                     b"", b"\\u0000"]),
                  st.sampled_from([b'"alice"', b"1", b"null"])),
        st.builds(lambda b, parts: b"".join(b"--" + b + b"\r\nContent-Disposition: form-data; name=\"" + n
                                            + b"\"\r\n\r\n" + v + b"\r\n" for n, v in parts) + b"--" + b + b"--\r\n",
                  st.just(b"x"), st.lists(st.tuples(st.sampled_from([b"username", b"refresh_token", b"a"]),
                                                    st.binary(max_size=20)), max_size=3)),
    )


def path_bytes() -> st.SearchStrategy[bytes]:
    known = st.sampled_from(PATHS).map(str.encode)
    extra = st.lists(st.binary(max_size=10), max_size=3).map(lambda parts: b"/".join(parts))
    return st.one_of(
        known,
        st.builds(lambda k, e: k.rstrip(b"/") + b"/" + e, known, extra),
        st.builds(lambda e: b"/" + e, st.binary(max_size=40)),
        st.sampled_from([b"//api/v1/health", b"/api/v1/../v2/search", b"/api/v1/search%2f", b"/\x00",
                         b"/api/v1/search\xff", b"/\xc3\x28", b"/api/v1/health/", b"/API/V1/HEALTH"]),
    )


def query_bytes() -> st.SearchStrategy[bytes]:
    key = st.sampled_from([b"q", b"page", b"per_page", b"api-version", b"version", b"format"]) | st.binary(max_size=8)
    value = st.binary(max_size=40) | st.sampled_from([b"json", b"1", b"0", b"-1", b"1001", b"99999999999", b""])
    encoded = st.lists(st.tuples(key, value), max_size=4).map(
        lambda pairs: b"&".join(quote_from_bytes(k).encode() + b"=" + quote_from_bytes(v).encode() for k, v in pairs))
    raw = st.binary(max_size=60).map(lambda b: bytes(c for c in b if c >= 0x21 and c != 0x23))
    return st.one_of(encoded, raw, st.sampled_from([b"q=%", b"q=%zz", b"q=%ff%fe", b"q=" + b"a" * 3000,
                                                      b"q=json&q=xml", b"&&&", b"q",
                                                      b"q=json&q=", b"=&=", b"q=%00", b"q=json&page=2&page=",
                                                      b"q=json;page=2", b"q=json&" * 300]))


WORDS = st.sampled_from(["json", "decode", "dumps", "ünïcode", "a b", "x" * 50, "'; DROP TABLE x; --",
                         "<script>alert(1)</script>", "%", "*", "\u202e"])


def plausible(fuzzed: Fuzzed) -> st.SearchStrategy[dict[str, Any]]:
    """Requests a real client sends: a known route with sensible parts (before mutation)."""
    search = st.builds(lambda w, p: b"q=" + quote_from_bytes(w.encode()).encode() + (b"&page=%d" % p if p else b""),
                       WORDS, st.integers(0, 3))
    login = st.fixed_dictionaries({"username": st.sampled_from(["alice", "bob", ""]),
                                   "password": st.sampled_from(["correct horse battery", "wrong", ""])})
    bearer = ("Authorization", f"Bearer {TOKEN_MARK}")
    session = ("Cookie", f"wsgistack_session={fuzzed.cookie}")
    origin = st.sampled_from([("Origin", "https://app.example.org"), ("Origin", "https://evil.example"),
                              ("Sec-Fetch-Site", "same-origin"), ("Sec-Fetch-Site", "cross-site")])
    credentials = st.lists(st.sampled_from([bearer, session]) | origin, max_size=3)
    json_type = ("Content-Type", "application/json")

    def req(method: str, path: str, query: bytes = b"", headers: list[tuple[str, str]] | None = None,
            data: bytes = b"") -> dict[str, Any]:
        return {"method": method, "path": path.encode(), "query": query, "headers": headers or [], "body": data}

    return st.one_of(
        st.builds(lambda v, q, h, m: req(m, f"/api/{v}/search", q, h), st.sampled_from(["v1", "v2"]), search,
                  credentials, st.sampled_from(["GET", "HEAD"])),
        st.builds(lambda q, v, h: req("GET", "/api/search", q, [("X-API-Version", v), *h]), search,
                  st.sampled_from(["v1", "v2", "v3", ""]), credentials),
        st.builds(lambda v, q: req("GET", f"/api/{v}/search/stream", q), st.sampled_from(["v1", "v2"]), search),
        st.builds(lambda p, h: req("GET", p, b"", h), st.sampled_from(
            ["/api/v1/health", "/api/v2/config", "/healthz", "/readyz", "/metrics", "/_stack", "/_stack/data.json",
             "/_stack/app.js"]), credentials),
        # From many addresses: the login rule's 5 a minute would otherwise keep nearly all of them from the app.
        st.builds(lambda b, h, n: req("POST", "/auth/login", b"", [json_type, ("X-Forwarded-For", f"198.51.100.{n}"),
                                                                   *h], json.dumps(b).encode()),
                  login, st.lists(origin, max_size=1), st.integers(0, 255)),
        st.builds(lambda t, h: req("POST", "/auth/refresh", b"", [json_type, *h],
                                   json.dumps({"refresh_token": t}).encode()),
                  st.sampled_from([fuzzed.refresh, "x", "a.b.c", "\ud800", "é.\u2028.x"]),
                  st.lists(origin, max_size=1)),
        st.builds(lambda h: req("POST", "/auth/logout", b"", h), credentials),
        st.builds(lambda o, m: req("OPTIONS", "/api/v1/search", b"", [o, ("Access-Control-Request-Method", m),
                                                                      ("Access-Control-Request-Headers",
                                                                       "authorization, content-type")]),
                  origin, st.sampled_from(["GET", "POST", "PATCH", ""])),
    )


@st.composite
def mutated(draw: st.DrawFn, fuzzed: Fuzzed) -> dict[str, Any]:
    """A plausible request with up to three things made strange."""
    req = dict(draw(plausible(fuzzed)))
    changes = ["header", "path", "query", "method", "body", "huge", "target"]
    for change in draw(st.lists(st.sampled_from(changes), max_size=3)):
        if change == "header":
            name = draw(st.sampled_from(HEADER_NAMES) | TOKEN)
            req["headers"] = [*req["headers"], (name, draw(header_value(fuzzed)))]
        elif change == "path":
            req["path"] = draw(path_bytes())
        elif change == "query":
            req["query"] = draw(query_bytes())
        elif change == "method":
            req["method"] = draw(st.sampled_from(METHODS) | TOKEN.map(str.upper) | TOKEN)
        elif change == "body":
            req["body"] = draw(body())
            req["headers"] = [*req["headers"], ("Content-Type", draw(header_value(fuzzed)))]
        elif change == "target":
            req["target"] = draw(TARGET_PREFIX)
        else:
            req["headers"] = [*req["headers"], (draw(st.sampled_from(HEADER_NAMES)), draw(huge("a,; \xff")))]
    return req


@st.composite
def wild(draw: st.DrawFn, fuzzed: Fuzzed) -> dict[str, Any]:
    """Anything at all that Waitress would still hand to the app."""
    method = draw(st.sampled_from(METHODS) | TOKEN.map(str.upper))
    headers = draw(st.lists(st.tuples(st.sampled_from(HEADER_NAMES) | TOKEN, header_value(fuzzed)), max_size=6))
    return {"method": method, "path": draw(path_bytes()), "query": draw(query_bytes()), "headers": headers,
            "body": draw(body()), "target": draw(st.none() | TARGET_PREFIX)}


#: The absolute form of a request target (RFC 9112 §3.2.2), which Waitress passes on in REQUEST_URI.
TARGET_PREFIX = st.sampled_from(["http://127.0.0.1:8889", "https://app.example.org", "HTTP://x", "http://", "ftp://x",
                                 "http://a@b", "http://[::1", "http://x:99999999999999999999", "http://\xff",
                                 "http://x%00y", "//x"])


def requests(fuzzed: Fuzzed) -> st.SearchStrategy[dict[str, Any]]:
    return st.one_of(plausible(fuzzed), mutated(fuzzed), mutated(fuzzed), wild(fuzzed))


# ---------------------------------------------------------------- running one request


def environ_for(method: str, path: bytes, query: bytes, headers: list[tuple[str, str]], data: bytes,
                target: str | None = None) -> dict[str, Any]:
    """The environ Waitress would build for this request (from 127.0.0.1); ``target``: an absolute form's start."""
    path_info = "/" + path.decode("latin-1").lstrip("/")  # Waitress collapses leading slashes
    uri = (target or "") + quote_from_bytes(path, safe="/%") + ("?" + query.decode("latin-1") if query else "")
    environ: dict[str, Any] = {
        "REQUEST_METHOD": method, "SCRIPT_NAME": "", "PATH_INFO": path_info, "QUERY_STRING": query.decode("latin-1"),
        "REQUEST_URI": uri, "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "8889", "SERVER_PROTOCOL": "HTTP/1.1",
        "HTTP_HOST": "127.0.0.1:8889",
        "SERVER_SOFTWARE": "wsgistack", "REMOTE_ADDR": "127.0.0.1", "REMOTE_HOST": "127.0.0.1", "REMOTE_PORT": "50000",
        "wsgi.version": (1, 0), "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(data),
        "wsgi.errors": io.StringIO(), "wsgi.multithread": True, "wsgi.multiprocess": False, "wsgi.run_once": False,
    }
    if data:
        environ["CONTENT_LENGTH"] = str(len(data))
    for name, value in headers:
        key = name.upper().replace("-", "_")
        value = value.strip(" \t")
        if key in ("CONTENT_LENGTH", "TRANSFER_ENCODING", "EXPECT"):
            continue  # Waitress answers or strips these itself before any app runs
        key = key if key == "CONTENT_TYPE" else "HTTP_" + key
        environ[key] = environ[key] + ", " + value if key in environ else value
    return environ


def run(app: Any, environ: dict[str, Any]) -> tuple[int, list[tuple[str, str]], bytes]:
    captured: list[Any] = []

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        captured[:] = [status, headers]
        return lambda chunk: None

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # Our own environ may carry methods wsgiref does not know; that is the client's business.
        warnings.filterwarnings("ignore", message="Unknown REQUEST_METHOD")
        result = validator(app)(environ, start_response)
        try:
            chunks = list(result)
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()
    status, headers = captured
    return int(status.split()[0]), headers, b"".join(chunks)


def check(fuzzed: Fuzzed, error_records: ErrorRecords, req: dict[str, Any]) -> int:
    """Run one request and assert every promise of this module; return its status."""
    error_records.records.clear()
    headers = req["headers"]
    if any(TOKEN_MARK in value for _, value in headers):  # a token (and its record) only where one is sent
        token = fuzzed.tokens.issue("alice", ["admin"])["access_token"]
        headers = [(name, value.replace(TOKEN_MARK, token)) for name, value in headers]
    environ = environ_for(req["method"], req["path"], req["query"], headers, req["body"], req.get("target"))
    status, response_headers, body = run(fuzzed.built.app, environ)
    errors = [r.getMessage() for r in error_records.records]
    assert not errors, errors
    assert status < 500, (status, body[:500])
    for name, value in response_headers:  # what Waitress can write (RFC 9110 §5.1, §5.5; PEP 3333: latin-1)
        assert FIELD_NAME.fullmatch(name), name
        value.encode("latin-1")
    names = [k.lower() for k, _ in response_headers]
    for single in ("content-type", "content-length", "location", "etag", "retry-after"):
        assert names.count(single) <= 1, (single, response_headers)
    assert status != 401 or "www-authenticate" in names, response_headers  # RFC 9110 §15.5.2
    assert status != 405 or "allow" in names, response_headers  # RFC 9110 §15.5.6
    length = next((v for k, v in response_headers if k.lower() == "content-length"), None)
    if status in NO_BODY:
        assert body == b"" and length in (None, "0"), (status, length, body[:100])
    elif length is not None and req["method"] != "HEAD":
        assert int(length) == len(body), (status, length, len(body))
    content_type = next((v for k, v in response_headers if k.lower() == "content-type"), "")
    if req["method"] == "HEAD":
        assert body == b""
    elif status >= 400 and status not in NO_BODY:
        assert content_type == "application/problem+json", (status, content_type, body[:300])
        assert json.loads(body)["status"] == status
    return status


@settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=EXAMPLES <= DERANDOMIZE_UP_TO,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
@given(data=st.data())
def test_fuzz_full_stack(fuzzed: Fuzzed, error_records: ErrorRecords, data: st.DataObject) -> None:
    status = check(fuzzed, error_records, data.draw(requests(fuzzed), label="request"))
    event(f"status {status}")


def _req(method: str = "GET", path: bytes = b"/api/v1/health", query: bytes = b"",
         headers: list[tuple[str, str]] | None = None, data: bytes = b"") -> dict[str, Any]:
    return {"method": method, "path": path, "query": query, "headers": headers or [], "body": data}


@pytest.mark.parametrize(
    ("req", "expected"),
    [
        pytest.param(_req(headers=[("Cookie", "wsgistack_session=\x80\xff")]), 200,
                     id="cookie header with bytes that are not UTF-8"),
        pytest.param(_req(path=b"/api/v1/search\xff", query=b"q=json"), 400, id="path not UTF-8"),
        pytest.param(_req(path=b"/api/v1/search", query=b"q=%ff%fe"), 400, id="query not UTF-8"),
        pytest.param(_req(path=b"/api/v1/search", query=b"q=%zz"), 400, id="broken percent-escape"),
        pytest.param(_req(headers=[("Authorization", "Bearer " + "a" * 70_000)]), 431, id="huge bearer token"),
        pytest.param(_req(headers=[("Authorization", "Bearer a.b.c")]), 401, id="token that is not a JWT"),
        pytest.param(_req("POST", b"/auth/refresh", headers=[("Content-Type", "application/json")],
                          data=b'{"refresh_token": "\\ud800"}'), 400, id="refresh token with a lone surrogate"),
        pytest.param(_req("POST", b"/auth/refresh", headers=[("Content-Type", "application/json")],
                          data=b'{"refresh_token": "a.b.c", "x": 1e999}'), 400, id="infinity in the body"),
        pytest.param(_req("POST", b"/auth/refresh", headers=[("Content-Type", "application/xml")], data=b"{}"), 415,
                     id="content type not allowed"),
        pytest.param(_req("POST", b"/auth/refresh", headers=[("Content-Type", "application/json")], data=b"{"), 400,
                     id="broken JSON"),
        pytest.param(_req("POST", b"/auth/refresh", headers=[("Content-Type", "application/json")],
                          data=b"x" * 70_000), 413, id="body over max_body_bytes"),
        pytest.param(_req("BREW", b"/api/v1/health"), 405, id="unknown method"),
        pytest.param(_req(path=b"/api/v1/search", query=b"q=json",
                          headers=[("X-Forwarded-For", "not an address, \xff")]), 200, id="junk X-Forwarded-For"),
    ],
)
def test_known_hostile_requests(fuzzed: Fuzzed, error_records: ErrorRecords, req: dict[str, Any],
                                expected: int) -> None:
    assert check(fuzzed, error_records, req) == expected


def test_the_stack_holds_every_built_in_layer() -> None:
    """The fuzzer's claim (every built-in layer) holds for a layer added to the registry too."""
    pipeline = parse(read_text(STACK)).pipeline
    assert sorted(kind(spec) or spec.name for spec in pipeline) == sorted(LAYERS), \
        "every built-in layer belongs in STACK, so that whatever arrives is shown to pass it"
