"""The operator page: who may see it, what it answers, masking, counting, and a real browser."""

from __future__ import annotations

import collections
import copy
import json
import signal
import sys
import time
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from datetime import date
from html import escape
from pathlib import Path
from typing import Any

import pytest
from browser import chromium, screenshot, serve
from conftest import RedisServer, free_port
from pydantic import ValidationError
from stack_support import RaisingStore, Recorder
from webtest import TestApp
from werkzeug.exceptions import HTTPException, Unauthorized
from werkzeug.wrappers import Response

from config import build_from_dict
from config.build import describe
from config.errors import Problem
from config.live import ReloadResult
from middleware import operator_page
from middleware.base import CLIENT_IP, IDENTITY, TIMINGS, Context, Identity, refuse
from middleware.errors import ErrorsMiddleware
from middleware.health import STORE_CHECK_SECONDS
from middleware.operator_page import MASK, OperatorPageMiddleware, mask
from stores import MemoryStore, Store, store_from_url

LAYER = "middleware.operator_page:OperatorPageMiddleware"
CHALLENGE = ("WWW-Authenticate", 'Bearer realm="wsgistack"')
SESSION_SECRET = "session-secret-value-" + "s" * 24
JWT_SECRET = "jwt-signing-secret-value-" + "j" * 24
SECRETS = (SESSION_SECRET, JWT_SECRET, "hunter2", "tok-abc123", "k-123", "pw-999", "pem-body")




def message(response: Any) -> str:
    return str(response.json["error"]["message"])


@pytest.fixture
def inner() -> Recorder:
    """The recording inner app."""
    return Recorder()


@pytest.fixture
def make(inner: Recorder) -> Callable[..., tuple[TestApp, OperatorPageMiddleware]]:
    """Build errors -> operator_page -> recorder from options (and optionally an inner app, stores)."""

    def build(options: dict[str, Any] | None = None, app: Any = None,
              stores: dict[str, Store] | None = None) -> tuple[TestApp, OperatorPageMiddleware]:
        context = Context(stores=stores if stores is not None else {"shared": MemoryStore()})
        page = OperatorPageMiddleware(app or inner, OperatorPageMiddleware.Options(**(options or {})), context)
        test_app = TestApp(ErrorsMiddleware(page, ErrorsMiddleware.Options(), context),
                           extra_environ={"REMOTE_ADDR": "127.0.0.1"})
        return test_app, page

    return build


# ---------------------------------------------------------------- who may see it

ADMIN = Identity("alice", frozenset({"admin"}))
VIEWER = Identity("bob", frozenset({"viewer"}))
DENIED_ADDRESS = "The operator page is not available to this client address."


@pytest.mark.parametrize(
    ("options", "request_environ", "expected"),
    [
        pytest.param({}, {"REMOTE_ADDR": "127.0.0.1"}, (200, [], None), id="loopback v4"),
        pytest.param({}, {"REMOTE_ADDR": "127.9.9.9"}, (200, [], None), id="loopback v4 range"),
        pytest.param({}, {"REMOTE_ADDR": "::1"}, (200, [], None), id="loopback v6"),
        pytest.param({}, {"REMOTE_ADDR": "::ffff:127.0.0.1"}, (200, [], None), id="v4-mapped loopback"),
        pytest.param({}, {"REMOTE_ADDR": "10.0.0.5"}, (403, [], DENIED_ADDRESS), id="private address"),
        pytest.param({}, {"REMOTE_ADDR": "203.0.113.9"}, (403, [], DENIED_ADDRESS), id="public address"),
        pytest.param({}, {"REMOTE_ADDR": ""}, (403, [], DENIED_ADDRESS), id="no address (unix socket)"),
        pytest.param({}, {"REMOTE_ADDR": "127.0.0.1", CLIENT_IP: "10.0.0.5"}, (403, [], DENIED_ADDRESS),
                     id="the proxy layer's client address wins over REMOTE_ADDR"),
        pytest.param({"allow_from": ["10.0.0.0/8"]}, {"REMOTE_ADDR": "10.1.2.3"}, (200, [], None),
                     id="allowed network"),
        pytest.param({"allow_from": ["10.0.0.0/8"]}, {"REMOTE_ADDR": "127.0.0.1"}, (403, [], DENIED_ADDRESS),
                     id="loopback not listed"),
        pytest.param({"roles": ["admin"]}, {"REMOTE_ADDR": "127.0.0.1"},
                     (401, [CHALLENGE], "The operator page needs a signed-in user."), id="role, no identity"),
        pytest.param({"roles": ["admin"]}, {"REMOTE_ADDR": "127.0.0.1", IDENTITY: VIEWER},
                     (403, [], "The operator page needs one of the roles admin."), id="role missing"),
        pytest.param({"roles": ["ops", "admin"]}, {"REMOTE_ADDR": "127.0.0.1", IDENTITY: VIEWER},
                     (403, [], "The operator page needs one of the roles admin, ops."), id="none of two roles"),
        pytest.param({"roles": ["admin"]}, {"REMOTE_ADDR": "127.0.0.1", IDENTITY: ADMIN}, (200, [], None),
                     id="role present"),
        pytest.param({"roles": ["ops", "admin"]}, {"REMOTE_ADDR": "127.0.0.1", IDENTITY: ADMIN}, (200, [], None),
                     id="one of the roles is enough"),
        pytest.param({"roles": ["admin"]}, {"REMOTE_ADDR": "127.0.0.1", IDENTITY: Identity("carol", ["admin"])},  # type: ignore[arg-type]
                     (200, [], None), id="roles as a list (an identity a layer of one's own set)"),
        pytest.param({"roles": ["admin"]}, {"REMOTE_ADDR": "127.0.0.1", IDENTITY: Identity("dan", ("viewer",))},  # type: ignore[arg-type]
                     (403, [], "The operator page needs one of the roles admin."), id="roles as a tuple, not held"),
        pytest.param({"roles": ["admin"]}, {"REMOTE_ADDR": "10.0.0.5", IDENTITY: ADMIN},
                     (403, [], DENIED_ADDRESS), id="role present but address refused"),
        pytest.param({"roles": ["admin"], "allow_from": []}, {"REMOTE_ADDR": "203.0.113.9", IDENTITY: ADMIN},
                     (200, [], None), id="any address with the role"),
        pytest.param({"roles": ["admin"], "allow_from": []}, {"REMOTE_ADDR": "203.0.113.9"},
                     (401, [CHALLENGE], "The operator page needs a signed-in user."), id="any address, no identity"),
    ],
)
def test_access(make: Callable[..., tuple[TestApp, OperatorPageMiddleware]], inner: Recorder,
                options: dict[str, Any], request_environ: dict[str, Any],
                expected: tuple[int, list[tuple[str, str]], str | None]) -> None:
    status, headers, text = expected
    app, _ = make(options)
    for path in ("/_stack", "/_stack/data.json"):
        response = app.get(path, extra_environ=request_environ, status=status)
        for name, value in headers:
            assert response.headers[name] == value
        if text is not None:
            assert message(response) == text
    assert inner.seen == []


# ---------------------------------------------------------------- other origins, other hosts

CROSS_SITE = "The operator page may not be read from another site's page (Sec-Fetch-Site: cross-site)."
SAME_SITE = "The operator page may not be read from another site's page (Sec-Fetch-Site: same-site)."
NAVIGATE = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "document"}


def foreign(origin: str, own: str = "http://localhost") -> str:
    return f"The operator page may not be read from another origin's page (Origin {origin} is not this one, {own})."


def unlisted(host: str) -> str:
    return (f"Host {host} is not one of operator_page.hosts: add it there to open the operator page by this name (IP "
            "addresses and localhost need no entry); other names are refused so that a DNS-rebinding site cannot "
            "read it.")


@pytest.mark.parametrize(
    ("options", "request_path", "headers", "expected"),
    [
        # Host (DNS rebinding: a page from attacker.example whose name now resolves here)
        pytest.param({}, "/_stack/data.json", {"Host": "localhost:8000"}, (200, None), id="localhost"),
        pytest.param({}, "/_stack/data.json", {"Host": "LocalHost."}, (200, None), id="localhost, any case, dot"),
        pytest.param({}, "/_stack/data.json", {"Host": "127.0.0.1:8000"}, (200, None), id="IPv4 literal"),
        pytest.param({}, "/_stack/data.json", {"Host": "[::1]:8000"}, (200, None), id="IPv6 literal"),
        pytest.param({}, "/_stack/data.json", {"Host": "attacker.example:8000"}, (403, unlisted("attacker.example")),
                     id="DNS rebinding: another name"),
        pytest.param({}, "/_stack", {"Host": "attacker.example"}, (403, unlisted("attacker.example")),
                     id="DNS rebinding: the page itself too"),
        pytest.param({}, "/_stack/app.js", {"Host": "attacker.example"}, (403, unlisted("attacker.example")),
                     id="DNS rebinding: its script too"),
        pytest.param({}, "/_stack/data.json", {"Host": "127.0.0.1.attacker.example"},
                     (403, unlisted("127.0.0.1.attacker.example")), id="a name that starts like an address"),
        pytest.param({}, "/_stack/data.json", {"Host": "localhost.attacker.example"},
                     (403, unlisted("localhost.attacker.example")), id="a name that starts with localhost"),
        pytest.param({}, "/_stack/data.json", {"Host": "a@b"}, (403, "The Host header a@b is not a host name."),
                     id="not a host name"),
        pytest.param({"hosts": ["ops.example.org"]}, "/_stack/data.json", {"Host": "OPS.example.org.:443"},
                     (200, None), id="listed name, any case, trailing dot, port"),
        pytest.param({"hosts": ["ops.example.org."]}, "/_stack/data.json", {"Host": "ops.example.org"},
                     (200, None), id="a listed name written with its trailing dot"),
        pytest.param({}, "/_stack/data.json", {"Host": ""}, (200, None), id="an empty Host (no browser sends one)"),
        pytest.param({"hosts": ["ops.example.org"]}, "/_stack/data.json", {"Host": "www.example.org"},
                     (403, unlisted("www.example.org")), id="another name than the listed one"),
        pytest.param({"hosts": ["ops.example.org"]}, "/_stack/data.json", {"Host": "127.0.0.1"}, (200, None),
                     id="an IP literal needs no entry"),
        pytest.param({"hosts": ["*.example.org"]}, "/_stack/data.json", {"Host": "ops.eu.example.org"},
                     (200, None), id="wildcard: a subdomain"),
        pytest.param({"hosts": ["*.example.org"]}, "/_stack/data.json", {"Host": "example.org"},
                     (403, unlisted("example.org")), id="wildcard: not the domain itself"),
        pytest.param({"hosts": ["*.example.org"]}, "/_stack/data.json", {"Host": "badexample.org"},
                     (403, unlisted("badexample.org")), id="wildcard: not a name that only ends alike"),
        pytest.param({"hosts": ["*"]}, "/_stack/data.json", {"Host": "attacker.example"}, (200, None),
                     id="'*': any name (the proxy in front checks it)"),
        # Sec-Fetch-Site and Origin (a page of another origin, through cors or not)
        pytest.param({}, "/_stack/data.json", {"Sec-Fetch-Site": "same-origin"}, (200, None), id="same-origin"),
        pytest.param({}, "/_stack", {"Sec-Fetch-Site": "none"}, (200, None), id="typed or bookmarked"),
        pytest.param({}, "/_stack/data.json", {"Sec-Fetch-Site": "cross-site"}, (403, CROSS_SITE), id="cross-site"),
        pytest.param({}, "/_stack/data.json", {"Sec-Fetch-Site": "Same-Site "}, (403, SAME_SITE), id="same-site"),
        pytest.param({}, "/_stack", NAVIGATE, (200, None), id="a link on another site opens the page"),
        pytest.param({}, "/_stack/data.json", NAVIGATE, (403, CROSS_SITE), id="but not its data"),
        pytest.param({}, "/_stack", {**NAVIGATE, "Sec-Fetch-Dest": "iframe"}, (403, CROSS_SITE),
                     id="nor the page in another site's frame"),
        pytest.param({}, "/_stack", {**NAVIGATE, "Sec-Fetch-Mode": "cors"}, (403, CROSS_SITE),
                     id="nor the page by fetch"),
        pytest.param({}, "/_stack/data.json", {"Origin": "http://localhost"}, (200, None), id="own origin"),
        pytest.param({}, "/_stack/data.json", {"Origin": "HTTP://LOCALHOST:80"}, (200, None),
                     id="own origin, default port written"),
        pytest.param({}, "/_stack/data.json", {"Origin": "https://evil.example"},
                     (403, foreign("https://evil.example")), id="another origin"),
        pytest.param({}, "/_stack/data.json", {"Origin": "https://localhost"}, (403, foreign("https://localhost")),
                     id="another scheme"),
        pytest.param({}, "/_stack/data.json", {"Origin": "http://localhost:8080"},
                     (403, foreign("http://localhost:8080")), id="another port"),
        pytest.param({}, "/_stack/data.json", {"Origin": "null"}, (403, foreign("null")), id="opaque origin"),
        pytest.param({}, "/_stack/data.json", {"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"},
                     (403, CROSS_SITE), id="both: fetch metadata named"),
        pytest.param({}, "/_stack/data.json", {"Origin": "http://evil.example", "Host": "evil.example"},
                     (403, unlisted("evil.example")), id="rebinding with an origin: the host is named"),
        pytest.param({"hosts": ["evil.example"]}, "/_stack/data.json",
                     {"Origin": "http://evil.example", "Host": "evil.example"}, (200, None),
                     id="a listed host's own origin"),
    ],
)
def test_other_origins_and_hosts(make: Callable[..., tuple[TestApp, OperatorPageMiddleware]], inner: Recorder,
                                 options: dict[str, Any], request_path: str, headers: dict[str, str],
                                 expected: tuple[int, str | None]) -> None:
    status, text = expected
    app, _ = make(options)
    response = app.get(request_path, headers=headers, status=status)
    if text is not None:
        assert message(response) == text
    else:
        assert response.headers["Cache-Control"] == "no-store"
    assert inner.seen == []


def test_a_request_without_host_is_no_browsers(make: Callable[..., tuple[TestApp, OperatorPageMiddleware]]) -> None:
    """HTTP/1.0 may leave Host out; no rebinding page can: the page answers it."""
    app, _ = make({})
    bare = TestApp(app.app, lint=False)  # (WebTest's lint wants a Host)
    response = bare.get("/_stack/data.json", extra_environ={"HTTP_HOST": None, "SERVER_PROTOCOL": "HTTP/1.0",
                                                            "REMOTE_ADDR": "127.0.0.1"})
    assert response.status_int == 200


def test_other_origins_are_refused_before_roles(make: Callable[..., tuple[TestApp, OperatorPageMiddleware]]) -> None:
    """The admin's cookie does not help another origin: the page refuses before it looks at the identity."""
    app, _ = make({"roles": ["admin"]})
    response = app.get("/_stack/data.json", headers={"Origin": "https://evil.example"},
                       extra_environ={IDENTITY: ADMIN}, status=403)
    assert message(response) == foreign("https://evil.example")
    assert app.get("/_stack/data.json", extra_environ={IDENTITY: ADMIN}, status=200).json["title"] == "wsgistack"


def test_other_paths_below_the_page_are_not_checked(make: Callable[..., tuple[TestApp, OperatorPageMiddleware]],
                                                    inner: Recorder) -> None:
    """Only the page's own answers are: the app behind it serves every host and origin as before."""
    app, _ = make()
    for path in ("/_stack/cache/purge", "/other"):
        app.get(path, headers={"Host": "attacker.example", "Origin": "https://evil.example",
                               "Sec-Fetch-Site": "cross-site"}, status=200)
    assert inner.seen == ["/_stack/cache/purge", "/other"]


# ---------------------------------------------------------------- what it answers

@pytest.mark.parametrize(
    ("method", "request_path", "expected"),
    [
        pytest.param("GET", "/_stack", (200, "text/html; charset=utf-8", b"<!doctype html>"), id="page"),
        pytest.param("GET", "/_stack/", (200, "text/html; charset=utf-8", b"<!doctype html>"), id="page, slash"),
        pytest.param("GET", "/_stack/data.json", (200, "application/json", b'{"title":'), id="data"),
        pytest.param("GET", "/_stack/app.js", (200, "text/javascript; charset=utf-8", b'"use strict";'), id="js"),
        pytest.param("GET", "/_stack/app.css", (200, "text/css; charset=utf-8", b"body{"), id="css"),
        pytest.param("HEAD", "/_stack", (200, "text/html; charset=utf-8", b""), id="head"),
        pytest.param("POST", "/_stack", (405, "application/json", b""), id="post"),
        pytest.param("DELETE", "/_stack/data.json", (405, "application/json", b""), id="delete"),
    ],
)
def test_routes(make: Callable[..., tuple[TestApp, OperatorPageMiddleware]], inner: Recorder,
                method: str, request_path: str, expected: tuple[int, str, bytes]) -> None:
    status, content_type, start = expected
    app, _ = make()
    response = app.request(request_path, method=method, status=status)
    assert response.headers["Content-Type"] == content_type
    assert response.body.startswith(start)
    if method == "HEAD":
        assert response.body == b""
    if status == 200:
        assert response.headers["Cache-Control"] == "no-store"
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert response.headers["Referrer-Policy"] == "no-referrer"
        csp = response.headers["Content-Security-Policy"]
        assert "default-src 'none'" in csp and "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    elif status == 405:
        assert response.headers["Allow"] == "GET, HEAD"
        assert message(response) == "/_stack answers GET and HEAD only."
    assert inner.seen == []


@pytest.mark.parametrize(
    ("options", "request_path", "reaches_app"),
    [
        pytest.param({}, "/", True, id="root"),
        pytest.param({}, "/_stackish", True, id="longer name is not the page"),
        pytest.param({}, "/api/_stack", True, id="not a prefix"),
        pytest.param({"path": "/ops/"}, "/ops", False, id="custom path, slash trimmed"),
        pytest.param({"path": "/ops"}, "/_stack", True, id="default path free when moved"),
        pytest.param({}, "/_stack/cache/purge", True, id="another layer's path below the page"),
        pytest.param({}, "/_stack/secrets", True, id="a path the page does not have: the app's 404"),
        pytest.param({}, "/_stack/data.json/", True, id="not one of the page's resources"),
    ],
)
def test_steps_aside(make: Callable[..., tuple[TestApp, OperatorPageMiddleware]], inner: Recorder,
                     options: dict[str, Any], request_path: str, reaches_app: bool) -> None:
    app, _ = make(options)
    response = app.get(request_path)
    assert (response.body == b"app") is reaches_app
    assert inner.seen == ([request_path] if reaches_app else [])


def test_page_under_script_name_links_its_assets(make: Callable[..., tuple[TestApp, OperatorPageMiddleware]]) -> None:
    app, _ = make()
    page = app.get("/_stack", extra_environ={"SCRIPT_NAME": "/prefix"}).text
    for url in ("/prefix/_stack/app.css", "/prefix/_stack/app.js", "/prefix/_stack/data.json"):
        assert f'"{url}"' in page


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        pytest.param({"path": "ops"}, "path must start with '/', got 'ops'", id="relative path"),
        pytest.param({"path": "/"}, "path may not be '/': the page would hide the whole app", id="root path"),
        pytest.param({"allow_from": ["localhost"]}, "entry 'localhost' is not an IP network",
                     id="host name"),
        pytest.param({"allow_from": []}, "allow_from may be empty only when roles is set", id="open to all"),
        pytest.param({"roles": [""]}, "roles may not contain an empty string", id="empty role"),
        pytest.param({"refresh_seconds": 0}, "greater than or equal to 0.25", id="refresh too fast"),
        pytest.param({"title": ""}, "at least 1 character", id="empty title"),
        pytest.param({"colour": "red"}, "Extra inputs are not permitted", id="unknown option"),
        pytest.param({"hosts": ["https://ops.example.org"]}, "hosts entry 'https://ops.example.org' is not a host "
                     "name: write ops.example.org, *.example.org or '*' (no scheme, port or path)", id="hosts: a URL"),
        pytest.param({"hosts": ["ops.example.org:8443"]}, "hosts entry 'ops.example.org:8443' is not a host name",
                     id="hosts: a port"),
        pytest.param({"hosts": ["*.*.example.org"]}, "hosts entry '*.*.example.org' is not a host name",
                     id="hosts: a wildcard inside"),
    ],
)
def test_options_refused(options: dict[str, Any], expected: str) -> None:
    with pytest.raises(ValidationError) as info:
        OperatorPageMiddleware.Options(**options)
    assert expected in str(info.value)


def test_wants_layer_timing() -> None:
    assert OperatorPageMiddleware.wants_layer_timing(OperatorPageMiddleware.Options()) is True
    assert OperatorPageMiddleware.wants_layer_timing({}) is True


def test_everything_rendered_is_escaped(make: Callable[..., tuple[TestApp, OperatorPageMiddleware]]) -> None:
    app, page = make({"title": "<script>alert('t')</script>"})
    page.context.settings["pipeline"] = [
        {"name": "<img src=x onerror=alert(1)>", "index": 0, "implicit": False, "scope": "paths=['/<b>']",
         "options": {"<i>k</i>": "<svg onload=alert(2)>"}},
    ]
    page.context.stores["<s>"] = MemoryStore(url="memory://<u>")
    html = app.get("/_stack").text
    for raw in ("<script>alert", "<img src=x", "<svg onload", "<i>k</i>", "<b>", "<s>", "<u>"):
        assert raw not in html
    for escaped in ("&lt;script&gt;alert(&#x27;t&#x27;)", "&lt;img src=x onerror=alert(1)&gt;",
                    "&lt;svg onload=alert(2)&gt;", "&lt;i&gt;k&lt;/i&gt;", "memory://&lt;u&gt;"):
        assert escaped in html


# ---------------------------------------------------------------- masking

@pytest.mark.parametrize(
    ("value", "name", "expected"),
    [
        pytest.param("abc", "secret_key", MASK, id="secret_key"),
        pytest.param("abc", "secret", MASK, id="secret"),
        pytest.param("abc", "db_password", MASK, id="password"),
        pytest.param("abc", "API_TOKEN", MASK, id="token, upper case"),
        pytest.param("abc", "apikey", MASK, id="key inside a word"),
        pytest.param("abc", "signingKey", MASK, id="key, camel case"),
        pytest.param("abc", "jwt_key_file", MASK, id="key in the middle"),
        pytest.param("client_ip", "key", "client_ip", id="ratelimit's key is not a secret"),
        pytest.param(["user", "header:X-Api-Key"], "key", ["user", "header:X-Api-Key"], id="nor a list of key parts"),
        pytest.param("hunter2-signing-secret", "key", MASK, id="any other key is"),
        pytest.param(1234, "pin_password", MASK, id="a number under a secret name"),
        pytest.param(["a", "b"], "secret_key_fallbacks", MASK, id="a list under a secret name"),
        pytest.param("", "secret", "", id="empty secret shows as unset"),
        pytest.param(None, "private_key", None, id="null shows as unset"),
        pytest.param(True, "tokens_enabled", True, id="booleans are not secrets"),
        pytest.param("shared", "store", "shared", id="plain option"),
        pytest.param({"X-Api-Key": "k-1", "Accept": "json"}, "headers", {"X-Api-Key": MASK, "Accept": "json"},
                     id="nested key names"),
        pytest.param([{"password": "p"}, "x"], "users", [{"password": MASK}, "x"], id="inside lists"),
        pytest.param("redis://:hunter2@redis:6379/0", "url", f"redis://:{MASK}@redis:6379/0", id="url password"),
        pytest.param("redis://bob:hunter2@redis/0", "url", f"redis://bob:{MASK}@redis/0", id="url user and password"),
        pytest.param("redis://redis:6379/0", "url", "redis://redis:6379/0", id="url without password"),
        pytest.param("https://h.example/hook?token=abc&x=1", "hook", f"https://h.example/hook?token={MASK}&x=1",
                     id="secret query parameter"),
        pytest.param("{'password': 'pw', 'n': 1}", "options_repr", {"password": MASK, "n": 1},
                     id="repr of a dict from a factory layer"),
        pytest.param("{broken: password=pw", "odd", MASK, id="unparsable repr naming a secret"),
        pytest.param("[not, python", "odd", "[not, python", id="unparsable repr without secrets"),
        pytest.param("{'url': 'https://svc:Pw99@api.example.org/v1', 'since': datetime.date(2024, 1, 1)}", "upstream",
                     f"{{'url': 'https://svc:{MASK}@api.example.org/v1', 'since': datetime.date(2024, 1, 1)}}",
                     id="unparsable repr with a URL password"),
        # header lines and environment entries: "Name: value", "NAME=value"
        pytest.param(["Authorization: Bearer abc", "X-Api-Key: k-1"], "headers",
                     [f"Authorization: {MASK}", f"X-Api-Key: {MASK}"], id="two header lines are no (name, value) pair"),
        pytest.param(["Accept: application/json", "Authorization: Bearer abc", "X-Trace: 1"], "headers",
                     ["Accept: application/json", f"Authorization: {MASK}", "X-Trace: 1"], id="header lines"),
        pytest.param("X-Auth:abc", "header", f"X-Auth:{MASK}", id="one header line"),
        pytest.param(["DB_PASS=hunter2", "DEBUG=1", "SMTP_TOKEN = t-1"], "env",
                     [f"DB_PASS={MASK}", "DEBUG=1", f"SMTP_TOKEN = {MASK}"], id="environment entries"),
        pytest.param(["--password", "hunter2"], "args", ["--password", MASK], id="a (name, value) pair"),
        # a DSN shows what is not a credential (tests/test_secrets_masked.py), and a credential written as a URL's user
        pytest.param("https://abc123@o1.ingest.sentry.io/2", "dsn", f"https://{MASK}@o1.ingest.sentry.io/2", id="dsn"),
        pytest.param("host=db user=app password=pw", "sentryDsn", f"host=db user=app password={MASK}",
                     id="dsn, camel case"),
        pytest.param(["SENTRY_DSN=https://k@s.example/1"], "env", [f"SENTRY_DSN=https://{MASK}@s.example/1"],
                     id="dsn in an entry"),
        pytest.param("https://ghp_abc123@github.com/org/repo.git", "upstream",
                     f"https://{MASK}@github.com/org/repo.git", id="a token as a URL's user"),
        pytest.param("see https://tok-1@h.example/x and redis://bob:pw@r/0", "note",
                     f"see https://{MASK}@h.example/x and redis://bob:{MASK}@r/0", id="users in free text"),
        # every secret name as a URL's query parameter, as for option names
        pytest.param("https://acct.blob.core.windows.net/c?sv=2022-11-02&sig=AbC%2Bd&se=2030", "container",
                     f"https://acct.blob.core.windows.net/c?sv=2022-11-02&sig={MASK}&se=2030", id="an Azure SAS sig"),
        pytest.param("https://h.example/x?auth=a1&pass=p1&otp=1&bearer=b&salt=s&page=2", "hook",
                     f"https://h.example/x?auth={MASK}&pass={MASK}&otp={MASK}&bearer={MASK}&salt={MASK}&page=2",
                     id="query parameters by word"),
        pytest.param("https://h.example/x?key_prefix=a&author=me&passage=3", "hook",
                     "https://h.example/x?key_prefix=a&author=me&passage=3", id="query parameters that are no secret"),
        pytest.param("see https://h.example/x?sig=s1 and https://g.example/?pin=42#top", "note",
                     f"see https://h.example/x?sig={MASK} and https://g.example/?pin={MASK}",
                     id="query parameters in free text (to the next &: a # may be the secret's)"),
        pytest.param("https://h.example/u?mail=a@b.example", "hook", "https://h.example/u?mail=a@b.example",
                     id="an @ after the host is no user"),
        pytest.param(["header:X-Api-Key", "https://a.example"], "origins", ["header:X-Api-Key", "https://a.example"],
                     id="a name before a colon that is no secret's"),
    ],
)
def test_mask(value: Any, name: str, expected: Any) -> None:
    assert mask({name: value}) == {name: expected}


def pipeline_with_secrets() -> list[dict[str, Any]]:
    """A pipeline description as the builder gives it, with secrets in many shapes."""
    return [
        {"name": "errors", "index": -1, "implicit": True, "scope": "", "options": {"format": "envelope"}},
        {"name": "session", "index": 0, "implicit": False, "scope": "",
         "options": {"store": "shared", "secret_key": SESSION_SECRET, "secret_key_fallbacks": ["pw-999"]}},
        {"name": "auth", "index": 1, "implicit": False, "scope": "paths=['/api/*']",
         "options": {"secret": JWT_SECRET, "public_keys": {"a": "-----BEGIN pem-body"}, "realm": "wsgistack"}},
        {"name": "mycompany.layers:Forward", "index": 2, "implicit": False, "scope": "",
         "options": {"upstream": "redis://:hunter2@cache.internal:6379/0",
                     "hook": "https://hooks.example/x?token=tok-abc123",
                     "headers": "{'X-Api-Key': 'k-123'}"}},
    ]


def test_secrets_never_leave(make: Callable[..., tuple[TestApp, OperatorPageMiddleware]]) -> None:
    app, page = make()
    page.context.settings["pipeline"] = pipeline_with_secrets()
    html = app.get("/_stack").text
    data = app.get("/_stack/data.json")
    for secret in SECRETS:
        assert secret not in html
        assert secret not in data.text
    options = {layer["name"]: layer["options"] for layer in data.json["pipeline"]}
    assert options["session"] == {"store": "shared", "secret_key": MASK, "secret_key_fallbacks": MASK}
    assert options["auth"] == {"secret": MASK, "public_keys": MASK, "realm": "wsgistack"}
    assert options["mycompany.layers:Forward"] == {
        "upstream": f"redis://:{MASK}@cache.internal:6379/0",
        "hook": f"https://hooks.example/x?token={MASK}",
        "headers": {"X-Api-Key": MASK},
    }
    assert html.count(MASK) >= 7


def test_secrets_masked_in_a_built_stack(make_stack: Callable[..., TestApp]) -> None:
    stack = make_stack({
        "app": {"factory": "stack_support:echo_app"},
        "stores": {"shared": "memory://"},
        "pipeline": [
            {LAYER: {}},
            {"session": {"store": "shared", "secret_key": SESSION_SECRET, "cookie_name": "sid",
                         "cookie_secure": False}},
            {"auth": {"secret": JWT_SECRET, "default": "optional"}},
        ],
    }, extra_environ={"REMOTE_ADDR": "127.0.0.1"})
    html = stack.get("/_stack").text
    data = stack.get("/_stack/data.json").text
    for secret in (SESSION_SECRET, JWT_SECRET):
        assert secret not in html and secret not in data
    names = [layer["name"] for layer in json.loads(data)["pipeline"]]
    assert names == ["errors", LAYER, "session", "auth"]


def strict_json(text: str) -> Any:
    """``text`` parsed as JSON is (a browser's ``response.json()``): ``NaN`` and ``Infinity`` are refused."""
    def refuse_constant(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse_constant)


@pytest.mark.parametrize(("layer", "expected"), [
    pytest.param({"metrics": {"buckets": [0.1, 1.0, ".inf"], "process_metrics": False}},
                 {"buckets": [0.1, 1.0, "inf"]}, id="metrics buckets ending in .inf"),
    pytest.param({"stack_support:AllowList": {"allowed": ["/a", ".inf", "-.inf", ".nan"]}},
                 {"allowed": ["/a", "inf", "-inf", "nan"]}, id="a factory layer's options"),
])
def test_an_option_json_has_no_number_for_is_given_as_text(make_stack: Callable[..., TestApp],
                                                           layer: dict[str, Any], expected: dict[str, Any]) -> None:
    """YAML's ``.inf`` and ``.nan`` are no JSON numbers: ``data.json`` stays JSON the page's script can read."""
    name = next(iter(layer))
    options = "".join(f"\n      {key}: {_yaml(value)}" for key, value in layer[name].items())
    stack = make_stack(f"app: {{factory: 'stack_support:echo_app'}}\npipeline:\n  - {LAYER}: {{}}\n"
                       f"  - {name}:{options}\n", extra_environ={"REMOTE_ADDR": "127.0.0.1"})
    data = strict_json(stack.get("/_stack/data.json").text)
    shown = next(spec["options"] for spec in data["pipeline"] if spec["name"] == name)
    assert {key: shown[key] for key in expected} == expected
    html = stack.get("/_stack").text
    assert "Infinity" not in html and "NaN" not in html


def _yaml(value: Any) -> str:
    """A value of the table above in YAML flow style (``.inf`` unquoted, so YAML reads a float)."""
    return "[" + ", ".join(_yaml(v) for v in value) + "]" if isinstance(value, list) else str(value)


# ---------------------------------------------------------------- the numbers

def test_json_shape(make: Callable[..., tuple[TestApp, OperatorPageMiddleware]]) -> None:
    app, page = make()
    page.context.settings["pipeline"] = pipeline_with_secrets()[:2]
    data = app.get("/_stack/data.json").json
    assert set(data) == {"title", "pid", "started_at", "generation", "last_reload", "signature", "requests",
                         "pipeline", "app", "cache", "ratelimit", "auth", "store_errors", "deprecated", "events",
                         "stores"}
    assert data["signature"].startswith("errors|session#")
    assert data["requests"] == {"total": 0, "by_status": {}}
    assert data["pipeline"][0] == {"name": "errors", "label": "errors", "index": -1, "implicit": True, "scope": "",
                                   "inside": True,
                                   "this": False, "options": {"format": "envelope"},
                                   "count": 0, "total_ms": 0.0, "avg_ms": None}
    assert data["app"] == {"name": "app", "count": 0, "total_ms": 0.0, "avg_ms": None}
    assert data["cache"] == {"hit": 0, "stale": 0, "miss": 0, "bypass": 0, "hit_ratio": None}
    assert data["ratelimit"] == {"pass": 0, "reject": 0, "shadow_reject": 0}
    assert data["auth"] == {"failures": 0, "by_reason": {}}
    assert data["store_errors"] == {"total": 0, "by_store": {}}
    assert data["deprecated"] == {"total": 0, "by_version": {}}
    assert (data["generation"], data["last_reload"]) == (None, None)
    store = data["stores"][0]
    assert {k: v for k, v in store.items() if k != "latency_ms"} == {
        "name": "shared", "ok": True, "backend": "MemoryStore", "url": "memory://", "breaker": None, "error": None}


def test_events_are_counted(make: Callable[..., tuple[TestApp, OperatorPageMiddleware]]) -> None:
    app, page = make()
    emit = page.context.emit
    for event in ("cache.hit", "cache.hit", "cache.stale", "cache.miss", "cache.bypass"):
        emit(event)
    for event in ("ratelimit.pass", "ratelimit.reject", "ratelimit.reject", "ratelimit.shadow_reject"):
        emit(event, rule="100/minute")
    emit("auth.failure", reason="expired")
    emit("auth.failure", reason="expired")
    emit("auth.failure", reason="missing")
    emit("store.error", store="shared", layer="cache")
    emit("version.deprecated", version="v1", client="1.2.3.4")
    emit("session.created")
    data = app.get("/_stack/data.json").json
    assert data["cache"] == {"hit": 2, "stale": 1, "miss": 1, "bypass": 1, "hit_ratio": 0.75}
    assert data["ratelimit"] == {"pass": 1, "reject": 2, "shadow_reject": 1}
    assert data["auth"] == {"failures": 3, "by_reason": {"expired": 2, "missing": 1}}
    assert data["store_errors"] == {"total": 1, "by_store": {"shared": 1}}
    assert data["deprecated"] == {"total": 1, "by_version": {"v1": 1}}
    assert data["events"]["session.created"] == 1
    html = app.get("/_stack").text
    assert '<b id="cache-ratio">75.0%</b>' in html
    assert '<b id="ratelimit-reject">2</b>' in html
    assert '<b id="auth-failures">3</b>' in html


def test_layer_times_are_exclusive(make: Callable[..., tuple[TestApp, OperatorPageMiddleware]]) -> None:
    def timed(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        # what the builder's shims leave behind, innermost first: app 1 ms, cache 3 ms, auth 10 ms
        environ[TIMINGS].extend([("app", 0.001), ("cache", 0.003), ("auth", 0.010)])
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    app, _ = make(app=timed)
    app.get("/a")
    app.get("/b")
    data = app.get("/_stack/data.json").json
    layers = {layer["name"]: (layer["count"], layer["total_ms"], layer["avg_ms"]) for layer in data["pipeline"]}
    assert layers == {"auth": (2, 14.0, 7.0), "cache": (2, 4.0, 2.0)}  # no builder: names from the timings
    assert (data["app"]["count"], data["app"]["total_ms"], data["app"]["avg_ms"]) == (2, 2.0, 1.0)


def test_an_inner_timing_list_is_merged(make: Callable[..., tuple[TestApp, OperatorPageMiddleware]]) -> None:
    def replacing(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        # an inner layer (metrics) starts its own list; the shims outside it still append to ours
        ours = environ[TIMINGS]
        environ[TIMINGS] = [("app", 0.002)]
        ours.append(("metrics", 0.005))
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    app, _ = make(app=replacing)
    app.get("/")
    data = app.get("/_stack/data.json").json
    assert [(layer["name"], layer["total_ms"]) for layer in data["pipeline"]] == [("metrics", 3.0)]
    assert data["app"]["total_ms"] == 2.0


def test_statuses_are_counted(make: Callable[..., tuple[TestApp, OperatorPageMiddleware]]) -> None:
    def varied(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ["PATH_INFO"]
        if path == "/limited":
            raise refuse(429, "Slow down.")
        if path == "/crash":
            raise RuntimeError("boom")
        if path == "/lazy":
            def body() -> Iterator[bytes]:
                start_response("304 Not Modified", [])
                yield b""
            return body()
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"no"]

    app, _ = make(app=varied)
    app.get("/limited", status=429)
    app.get("/crash", status=500)
    app.get("/lazy", status=304)
    app.get("/missing", status=404)
    app.get("/missing", status=404)
    data = app.get("/_stack/data.json").json
    assert data["requests"] == {"total": 5, "by_status": {"3xx": 1, "4xx": 3, "5xx": 1}}


@pytest.mark.parametrize("path_info", ["//_stack/data.json", "_stack/data.json"])
def test_leading_slashes_count_as_one(make: Callable[..., tuple[TestApp, OperatorPageMiddleware]],
                                     inner: Recorder, path_info: str) -> None:
    """As the router counts them (gunicorn passes them on): //_stack/data.json is the page's, and as guarded;
    so is _stack/data.json (a target without its slash, which Waitress passes on as sent and the router roots)."""
    app, _ = make()
    app.lint = False  # (WebTest's lint refuses a PATH_INFO without its slash, which Waitress gives)
    assert "requests" in app.get("/", extra_environ={"PATH_INFO": path_info}).json
    app.get("/", extra_environ={"PATH_INFO": path_info, "REMOTE_ADDR": "203.0.113.5"}, status=403)
    assert inner.seen == []


def test_a_status_replaced_before_the_body_is_counted_as_the_one_sent(
        make: Callable[..., tuple[TestApp, OperatorPageMiddleware]]) -> None:
    """PEP 3333: an app may call start_response again with exc_info until the headers go out."""
    def second_thoughts(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        try:
            raise RuntimeError("the body could not be made")
        except RuntimeError:
            start_response("503 Service Unavailable", [("Content-Type", "text/plain")], sys.exc_info())
        return [b"later"]

    app, _ = make(app=second_thoughts)
    app.get("/twice", status=503)
    data = app.get("/_stack/data.json").json
    assert data["requests"] == {"total": 1, "by_status": {"5xx": 1}}


def test_a_backlog_emptied_under_a_request_does_not_fail_it(make: Callable[..., tuple[TestApp, OperatorPageMiddleware]],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A page's snapshot folds the backlog of timings while requests add to it: one may find it emptied
    between its length check and its pop (another thread took the last entry)."""
    class Emptied(collections.deque[Any]):
        def __len__(self) -> int:
            return operator_page._PENDING + 1  # what the request saw before the snapshot took the rest

        def popleft(self) -> Any:
            raise IndexError("pop from an empty deque")

    app, page = make()
    monkeypatch.setattr(page, "_pending", Emptied())
    assert app.get("/hello", status=200).body == b"app"


def _raises_in_first_chunk(exc: Exception) -> Callable[..., Iterable[bytes]]:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterator[bytes]:
        raise exc
        yield b""  # a generator app: it starts its response on its first chunk

    return app


def _raises(exc: Exception) -> Callable[..., Iterable[bytes]]:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        raise exc

    return app


@pytest.mark.parametrize(
    ("app", "status", "by_status"),
    [
        pytest.param(_raises(HTTPException(response=Response("short and stout", status=418))), 418, {"4xx": 1},
                     id="abort(Response(...)): the status of the response it carries"),
        pytest.param(_raises(Unauthorized(response=Response("not you", status=503))), 503, {"5xx": 1},
                     id="an HTTPException carrying a response of another class"),
        pytest.param(_raises_in_first_chunk(refuse(429, "Slow down.")), 429, {"4xx": 1},
                     id="a refusal a generator app raises before it starts its response"),
        pytest.param(_raises_in_first_chunk(HTTPException(response=Response("stout", status=418))), 418, {"4xx": 1},
                     id="abort(Response(...)) in a generator app's first chunk"),
        pytest.param(_raises_in_first_chunk(RuntimeError("boom")), 500, {"5xx": 1},
                     id="a failure in a generator app's first chunk"),
    ],
)
def test_refusals_are_counted_with_the_status_sent(make: Callable[..., tuple[TestApp, OperatorPageMiddleware]],
                                                  app: Any, status: int, by_status: dict[str, int]) -> None:
    page, _ = make(app=app)
    assert page.get("/", status=status, expect_errors=True).status_int == status
    assert page.get("/_stack/data.json").json["requests"] == {"total": 1, "by_status": by_status}


def test_store_health(make: Callable[..., tuple[TestApp, OperatorPageMiddleware]]) -> None:
    dead = store_from_url(f"redis://:hunter2@127.0.0.1:{free_port()}/0", socket_timeout=0.2,
                          socket_connect_timeout=0.2)
    try:
        app, _ = make(stores={"a-broken": RaisingStore(), "b-dead": dead, "c-fine": MemoryStore()})
        response = app.get("/_stack/data.json")
        html = app.get("/_stack").text
    finally:
        dead.close()
    stores = {s["name"]: s for s in response.json["stores"]}
    assert list(stores) == ["a-broken", "b-dead", "c-fine"]
    assert (stores["a-broken"]["ok"], stores["a-broken"]["error"]) == (False, "RuntimeError")
    assert (stores["b-dead"]["ok"], stores["b-dead"]["backend"]) == (False, "RedisStore")
    assert stores["c-fine"]["ok"] is True
    assert "hunter2" not in response.text and "hunter2" not in html
    assert '<td id="store-1-ok" class="bad">down</td>' in html
    assert '<td id="store-2-ok" class="ok">ok</td>' in html
    assert stores["b-dead"]["error"] == "not reachable"  # why, as /readyz says it
    assert '<td id="store-1-error">not reachable</td>' in html and '<td id="store-2-error">—</td>' in html


class OddHealthStore(MemoryStore):
    """A store of one's own whose health() answers with objects, not JSON: an exception, a Decimal, a NaN."""

    def health(self) -> dict[str, object]:
        from decimal import Decimal
        return {"ok": False, "backend": "Odd", "url": "odd://", "error": OSError("cannot reach redis://:hunter2@h:1"),
                "latency_ms": Decimal("1.5"), "breaker": float("nan")}


@pytest.mark.parametrize("stores", [
    pytest.param({"odd": OddHealthStore()}, id="facts that are no JSON"),
    pytest.param({"odd": RaisingStore()}, id="a health check that raises: no ping time"),
])
def test_store_health_of_any_shape(make: Callable[..., tuple[TestApp, OperatorPageMiddleware]],
                                   stores: dict[str, Store]) -> None:
    """What a store's health() says is shown as text and numbers, passwords masked; never a 500."""
    app, _ = make(stores=stores)
    [facts] = strict_json(app.get("/_stack/data.json", status=200).text)["stores"]
    html = app.get("/_stack", status=200).text
    assert "hunter2" not in json.dumps(facts) and "hunter2" not in html
    if isinstance(stores["odd"], OddHealthStore):
        assert (facts["error"], facts["latency_ms"], facts["breaker"]) == (f"cannot reach redis://:{MASK}@h:1", 1.5,
                                                                           "nan")
        assert '<td id="store-0-latency">1.5</td>' in html
    else:
        assert (facts["error"], facts["latency_ms"]) == ("RuntimeError", None)
        assert '<td id="store-0-latency">—</td>' in html  # not "None" (nor the script's "null")


@pytest.mark.redis
def test_the_page_answers_in_bounded_time_when_redis_hangs(
        make: Callable[..., tuple[TestApp, OperatorPageMiddleware]], own_redis: RedisServer) -> None:
    """Each store's ping waits up to its socket_timeout: one after the other, every poll of the page took their sum."""
    hung = {f"db{db}": store_from_url(own_redis.url.removesuffix("/0") + f"/{db}", socket_timeout=1.0,
                                      socket_connect_timeout=1.0) for db in range(3)}  # three pools, three breakers
    app, _ = make(stores=hung)
    try:
        assert [s["ok"] for s in app.get("/_stack/data.json").json["stores"]] == [True] * 3
        assert own_redis.proc is not None
        own_redis.proc.send_signal(signal.SIGSTOP)
        try:
            started = time.monotonic()
            stores = app.get("/_stack/data.json").json["stores"]
            took = time.monotonic() - started
        finally:
            own_redis.proc.send_signal(signal.SIGCONT)
        assert took < STORE_CHECK_SECONDS + 0.8, took  # not 3 s (1 s per store)
        assert [(s["name"], s["ok"], s["error"]) for s in stores] == [
            (name, False, "no answer in time") for name in sorted(hung)]
        assert all(s["url"] == store.url for s, store in zip(stores, hung.values(), strict=True))
    finally:
        for store in hung.values():
            store.close()


def test_store_health_on_each_backend(make: Callable[..., tuple[TestApp, OperatorPageMiddleware]],
                                      store_url: str) -> None:
    store = store_from_url(store_url)
    try:
        app, _ = make(stores={"shared": store})
        [facts] = app.get("/_stack/data.json").json["stores"]
    finally:
        store.close()
    assert facts["ok"] is True
    assert facts["backend"] == ("MemoryStore" if store_url == "memory://" else "RedisStore")


@pytest.mark.parametrize("change", [
    pytest.param(lambda spec: spec["options"].update(cookie_name="other"), id="an option"),
    pytest.param(lambda spec: spec.update(scope="paths: /api/*"), id="the scope"),
    pytest.param(lambda spec: spec.update(name="cache"), id="a layer"),
])
def test_the_signature_changes_with_what_the_page_shows(make: Callable[..., tuple[TestApp, OperatorPageMiddleware]],
                                                        change: Callable[[dict[str, Any]], None]) -> None:
    """The page offers a reload when the signature differs: a reload that changed only an option counts."""
    app, page = make()
    page.context.settings["pipeline"] = pipeline_with_secrets()[:2]
    before = app.get("/_stack/data.json").json["signature"]
    assert app.get("/_stack/data.json").json["signature"] == before
    changed = copy.deepcopy(pipeline_with_secrets()[:2])
    change(changed[1])
    page.context.settings["pipeline"] = changed
    assert app.get("/_stack/data.json").json["signature"] != before


FAILED = [Problem("pipeline[0]: bad <b>"), Problem("unknown layer 'corz'", ("pipeline", 2), "stack.yaml", 7, 5)]


@pytest.mark.parametrize(
    ("result", "expected"),
    [
        pytest.param(ReloadResult(True, 3, at=1700000000.0),
                     (3, True, "generation 3 serving", "generation 3 serving", []), id="ok"),
        pytest.param(ReloadResult(True, 3, at=1700000000.0, needs_restart=["server.workers"]),
                     (3, True, "generation 3 serving; needs restart to apply: server.workers",
                      "generation 3 serving; needs restart to apply: server.workers", []), id="ok, needs restart"),
        pytest.param(ReloadResult(False, 2, at=1700000000.0, problems=FAILED),
                     (2, False, "reload failed, generation 2 keeps serving: <config> (top level): pipeline[0]: bad "
                                "<b>; stack.yaml:7:5 pipeline[2]: unknown layer 'corz'",
                      "reload failed, generation 2 keeps serving",
                      ["<config> (top level): pipeline[0]: bad <b>",
                       "stack.yaml:7:5 pipeline[2]: unknown layer 'corz'"]),
                     id="failed"),
        pytest.param(ReloadResult(False, 2, at=1700000000.0),
                     (2, False, "reload failed, generation 2 keeps serving: ",
                      "reload failed, generation 2 keeps serving", []), id="failed, no problem named"),
    ],
)
def test_generation_and_last_reload(make: Callable[..., tuple[TestApp, OperatorPageMiddleware]],
                                    result: ReloadResult, expected: tuple[int, bool, str, str, list[str]]) -> None:
    generation, ok, summary, headline, problems = expected
    app, page = make()
    page.context.settings.update(generation=generation, last_reload=result)
    data = app.get("/_stack/data.json").json
    assert data["generation"] == generation
    assert data["last_reload"] == {"ok": ok, "generation": generation, "at": 1700000000.0, "summary": summary,
                                   "headline": headline, "problems": problems}
    html = app.get("/_stack").text
    assert f'<b id="generation">{generation}</b>' in html
    # a failed reload: a wide card in the error colour, its problems a list (escaped)
    items = "".join(f"<li>{escape(p)}</li>" for p in problems)
    assert (f'<div id="reload-card" class="{"card" if ok else "card wide bad"}"><span>last reload</span>'
            f'<b id="reload">{escape(headline)}</b>'
            f'<ul id="reload-problems"{"" if problems else " hidden"}>{items}</ul></div>') in html


def stack_data(extra: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A stack.yaml dict: operator_page, cache on the shared store, the echo app."""
    return {
        "app": {"factory": "stack_support:echo_app"},
        "stores": {"shared": "memory://"},
        "pipeline": [{LAYER: {"refresh_seconds": 0.25}}, *(extra or []),
                     {"cache": {"store": "shared", "ttl": 60}}],
    }


def test_the_cache_purge_below_the_page_is_reached(tmp_path: Path) -> None:
    """The shipped examples put the cache's purge_path at /_stack/cache/purge, below the page."""
    data = stack_data([{"auth": {"secret": "s" * 40, "default": "optional"}}])
    data["pipeline"][-1]["cache"]["purge_path"] = "/_stack/cache/purge"
    built = build_from_dict(data, base_dir=tmp_path)
    try:
        token = built.context.services["tokens"].issue("ann", ["admin"])["access_token"]
        stack = TestApp(built.app, extra_environ={"REMOTE_ADDR": "127.0.0.1"})
        assert [stack.get("/a").headers["X-Cache"] for _ in range(2)] == ["MISS", "HIT"]
        purged = stack.post("/_stack/cache/purge?pattern=/a", headers={"Authorization": f"Bearer {token}"})
        assert purged.json == {"purged": 1, "pattern": "/a"}
        assert stack.get("/a").headers["X-Cache"] == "MISS"
    finally:
        built.close()


def test_counts_grow_in_a_built_stack(make_stack: Callable[..., TestApp]) -> None:
    stack = make_stack(stack_data(), extra_environ={"REMOTE_ADDR": "127.0.0.1"})
    before = stack.get("/_stack/data.json").json
    assert [(layer["name"], layer["implicit"], layer["this"], layer["inside"]) for layer in before["pipeline"]] == [
        ("errors", True, False, False), (LAYER, False, True, False), ("cache", False, False, True)]
    assert before["requests"]["total"] == 0
    for path in ("/a", "/a", "/a", "/b"):
        stack.get(path)
    after = stack.get("/_stack/data.json").json
    cache = after["pipeline"][2]
    assert after["requests"] == {"total": 4, "by_status": {"2xx": 4}}  # the page's own requests do not count
    assert after["cache"]["hit"] == 2 and after["cache"]["miss"] == 2 and after["cache"]["hit_ratio"] == 0.5
    assert cache["count"] == 4 and cache["total_ms"] > 0
    assert after["app"]["count"] == 2  # the two misses reached the app
    assert after["pipeline"][0]["count"] == 0  # errors is outside the page: not timed
    html = stack.get("/_stack").text
    assert '<b id="layer-2-count">4</b>' in html and '<b id="requests">4</b>' in html


PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src data:; "
            "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def test_the_headers_layer_outside_leaves_the_pages_policy(make_stack: Callable[..., TestApp]) -> None:
    """One policy on each answer, the page's own, without 'unsafe-inline'; the app's pages keep the stack's."""
    data = stack_data()
    data["pipeline"].insert(0, {"headers": {"content_security_policy": "default-src 'self'; script-src 'none'"}})
    stack = make_stack(data, extra_environ={"REMOTE_ADDR": "127.0.0.1"})
    for path in ("/_stack", "/_stack/data.json", "/_stack/app.js", "/_stack/app.css"):
        response = stack.get(path, status=200)
        assert response.headers.getall("Content-Security-Policy") == [PAGE_CSP]
        assert "unsafe-inline" not in PAGE_CSP
        assert (response.headers["Cache-Control"], response.headers["X-Frame-Options"]) == ("no-store", "DENY")
    assert stack.get("/x").headers.getall("Content-Security-Policy") == [
        "default-src 'self'; script-src 'none'; frame-ancestors 'none'"]


def test_layers_of_one_name_are_counted_apart(make_stack: Callable[..., TestApp]) -> None:
    """Two ratelimit layers, one scoped: each box shows its own requests, and Server-Timing names both."""
    data = stack_data([{"metrics": {"server_timing": True, "layer_timing": True}},
                       {"ratelimit": {"store": "shared", "limits": ["1000/minute"], "namespace": "all"}},
                       {"ratelimit": {"store": "shared", "limits": ["1000/minute"], "namespace": "api",
                                      "paths": ["/api/*"]}}])
    stack = make_stack(data, extra_environ={"REMOTE_ADDR": "127.0.0.1"})
    for path in ("/a", "/b", "/c", "/api/x", "/api/y"):
        timing = stack.get(path).headers["Server-Timing"]
    assert "ratelimit#1;dur=" in timing and "ratelimit#2;dur=" in timing
    counts = {layer["label"]: layer["count"] for layer in stack.get("/_stack/data.json").json["pipeline"]}
    assert (counts["ratelimit#1"], counts["ratelimit#2"]) == (5, 2)


def test_roles_with_the_auth_layer(make_stack: Callable[..., TestApp]) -> None:
    data = stack_data([{"auth": {"secret": JWT_SECRET, "default": "optional", "accept_session": False}}])
    data["pipeline"].insert(0, data["pipeline"].pop(1))  # auth outside the page, which reads its identity
    data["pipeline"][1] = {LAYER: {"roles": ["admin"]}}
    stack = make_stack(data, extra_environ={"REMOTE_ADDR": "127.0.0.1"})
    tokens = stack.built.context.services["tokens"]
    admin = tokens.issue("alice", ["admin"])["access_token"]
    viewer = tokens.issue("bob", ["viewer"])["access_token"]
    response = stack.get("/_stack", status=401)
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="wsgistack"'
    assert message(response) == "The operator page needs a signed-in user."
    response = stack.get("/_stack", headers={"Authorization": f"Bearer {viewer}"}, status=403)
    assert message(response) == "The operator page needs one of the roles admin."
    page = stack.get("/_stack", headers={"Authorization": f"Bearer {admin}"}, status=200)
    assert JWT_SECRET not in page.text


# ---------------------------------------------------------------- a real browser

def text_of(driver: Any, element_id: str) -> str:
    return str(driver.execute_script("return document.getElementById(arguments[0]).textContent;", element_id))


def wait_for(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.mark.browser
def test_page_updates_in_a_real_browser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    built = build_from_dict({**stack_data(), "app": {"factory": "stack_support:echo_app",
                                                      "options": {"greeting": "hi"}}}, base_dir=tmp_path)
    with chromium() as driver, serve(built.app) as server:
        page = f"{server.url}/_stack"
        driver.get(page)
        names = "return [...document.querySelectorAll('#pipeline h3')].map(h => h.firstChild.textContent.trim());"
        wait_for(lambda: driver.execute_script(names) == ["errors", LAYER, "cache", "app"], "the diagram")
        # the stylesheet loaded under the page's own CSP
        colour = "return getComputedStyle(document.querySelector('.layer')).borderLeftColor;"
        assert driver.execute_script(colour) == "rgb(59, 130, 246)"
        assert text_of(driver, "requests") == "0"
        driver.execute_script("window.__kept = 'no reload happened';")

        for path in ("/x", "/x", "/x", "/y", "/x"):
            with urllib.request.urlopen(server.url + path, timeout=5) as response:
                assert response.status == 200

        wait_for(lambda: text_of(driver, "requests") == "5", "the request counter to update")
        wait_for(lambda: text_of(driver, "layer-2-count") == "5", "the cache layer's counter")
        assert text_of(driver, "cache-ratio") == "60.0%"
        assert text_of(driver, "app-count") == "2"
        assert text_of(driver, "updated") != "at load"
        assert driver.execute_script("return window.__kept;") == "no reload happened"
        assert text_of(driver, "statuses") == "2xx 5"
        assert driver.execute_script("return document.getElementById('changed').hidden;") is True

        shot = screenshot(driver, page, tmp_path / "operator-page.png")  # loads the page again
        assert text_of(driver, "requests") == "5"  # rendered on the server this time

        # a new pipeline description (as after a config reload) is noticed without reloading
        driver.execute_script("window.__kept = 'no reload happened';")
        built.context.settings["pipeline"] = built.context.settings["pipeline"][:2]
        wait_for(lambda: driver.execute_script("return document.getElementById('changed').hidden;") is False,
                 "the pipeline-changed notice")
        assert driver.execute_script("return window.__kept;") == "no reload happened"

        # a failed reload: the card spans the row in the error colour, one list item per problem
        card = "return document.getElementById('reload-card').className;"
        problems = "return [...document.querySelectorAll('#reload-problems li')].map(li => li.textContent);"
        assert driver.execute_script(card) == "card"
        built.context.settings["last_reload"] = ReloadResult(False, 2, problems=RELOAD_PROBLEMS)
        wait_for(lambda: driver.execute_script(card) == "card wide bad", "the failed reload's card")
        assert text_of(driver, "reload") == "reload failed, generation 2 keeps serving"
        assert driver.execute_script(problems) == [str(p) for p in RELOAD_PROBLEMS]
        assert driver.execute_script("return document.querySelector('#reload-problems li b');") is None  # text only
        assert driver.execute_script("return getComputedStyle(document.getElementById('reload')).color;") \
            == "rgb(185, 28, 28)"  # .bad, as a store that is down
        widths = ("return [document.getElementById('reload-card'), document.getElementById('requests').parentNode]"
                  ".map(el => el.getBoundingClientRect().width);")
        wide, narrow = driver.execute_script(widths)
        assert wide > 2 * narrow

        # another worker process answers a poll: the pid shown follows, and the page says so
        shown_pid = text_of(driver, "pid")
        original = OperatorPageMiddleware.snapshot
        monkeypatch.setattr(OperatorPageMiddleware, "snapshot",
                            lambda self: {**original(self), "pid": int(shown_pid) + 1})
        wait_for(lambda: text_of(driver, "pid") == str(int(shown_pid) + 1), "the new process id")
        assert text_of(driver, "pid-changed") == f" (was {shown_pid}: numbers are per process)"
        assert driver.execute_script("return document.getElementById('pid-changed').hidden;") is False
        failed_shot = tmp_path / "operator-page-failed-reload.png"
        driver.save_screenshot(str(failed_shot))

        # the next reload works: the card is a plain one again
        built.context.settings["last_reload"] = ReloadResult(True, 3)
        wait_for(lambda: driver.execute_script(card) == "card", "the reload card back to normal")
        assert text_of(driver, "reload") == "generation 3 serving"
        assert driver.execute_script(problems) == []
        assert driver.execute_script("return document.getElementById('reload-problems').hidden;") is True
    built.close()
    for picture in (shot, failed_shot):
        data = picture.read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n")
        assert len(data) > 20_000


RELOAD_PROBLEMS = [
    Problem("unknown layer 'corz' (known: access_log, auth, cache, cors, csrf, errors, headers, health, metrics, "
            "operator_page, proxy, ratelimit, request_id, session, validation, versioning); did you mean 'cors'?",
            ("pipeline", 2), "stack.yaml", 12, 5),
    Problem("cache at pipeline[4] is outside auth at pipeline[5]: a cached response would be served before auth "
            "runs; move cache inside auth", ("pipeline", 4), "stack.yaml", 18, 5),
    Problem("<script>alert(1)</script> is not a store", ("stores", "shared"), "stack.yaml", 3, 11),
]


def test_factory_layer_options_are_described_as_data() -> None:
    """A date beside a URL in a plain factory's options must not stop the URL's password from being masked."""
    data = stack_data([{"werkzeug.middleware.proxy_fix:ProxyFix": {"x_for": 1}}])
    page, proxy, cache = data["pipeline"]
    data["pipeline"] = [proxy, page, cache]  # ProxyFix sets the client address the page's allow_from checks
    built = build_from_dict(data, base_dir=".")
    spec = next(s for s in built.config.pipeline if s.name.endswith("ProxyFix"))
    spec.options = {"upstream": {"url": "https://svc:Pw99@api.example.org/v1", "since": date(2024, 1, 1)}}
    assert describe(spec)["options"] == {"upstream": {"url": "https://svc:Pw99@api.example.org/v1",
                                                      "since": "2024-01-01"}}
    assert mask(describe(spec)["options"]) == {"upstream": {"url": f"https://svc:{MASK}@api.example.org/v1",
                                                            "since": "2024-01-01"}}


def test_layers_outside_the_page_are_timed_when_metrics_starts_the_timings(tmp_path: Path) -> None:
    """Their entries arrive after the page returned: it folds them later (at a look at the page, at the latest)."""
    built = build_from_dict({
        "app": {"factory": "stack_support:echo_app"}, "stores": {"shared": "memory://"},
        "pipeline": [{"metrics": {"layer_timing": True}}, {"headers": {}},
                     {"ratelimit": {"limits": ["1000/minute"]}}, {LAYER: {}}, {"stack_support:Tag": {}}],
    }, base_dir=tmp_path)
    try:
        app = TestApp(built.app, extra_environ={"REMOTE_ADDR": "127.0.0.1"})
        for _ in range(5):
            app.get("/x")
        counts = {layer["name"]: layer["count"] for layer in app.get("/_stack/data.json").json["pipeline"]}
        assert (counts["headers"], counts["ratelimit"], counts["stack_support:Tag"]) == (5, 5, 5)
    finally:
        built.close()
