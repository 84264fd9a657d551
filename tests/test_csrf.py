"""The csrf layer: Sec-Fetch-Site / Origin checks, bearer exemption, double-submit tokens."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
from pydantic import ValidationError
from stack_support import ignore_start
from webtest import TestApp

from middleware.base import SESSION_BOUND, Context
from middleware.csrf import CSRF_TOKEN, CSRFMiddleware
from middleware.errors import ErrorsMiddleware
from middleware.session import SessionMiddleware
from stores import Store, store_from_url

SECRET = "c" * 40
SESSION_SECRET = "s" * 40
COOKIE = {"Cookie": "__Host-session=abc.def"}
TRUSTED = ("https://partner.example.com", "https://*.example.org")


def ok(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    """Answer 200 with the double-submit token when the layer offers one."""
    getter = environ.get(CSRF_TOKEN)
    body = getter().encode() if getter else b"ok"  # before start_response: the session is saved there
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [body]


def make(options: dict[str, Any], store: Store | None = None) -> TestApp:
    """errors -> [session ->] csrf -> ok; the session layer only with a store."""
    context = Context(stores={"shared": store or store_from_url("memory://")})
    app: Any = CSRFMiddleware(ok, CSRFMiddleware.Options(**options), context)
    if store is not None:
        app = SessionMiddleware(app, SessionMiddleware.Options(secret_key=SESSION_SECRET), context)
    return TestApp(ErrorsMiddleware(app, ErrorsMiddleware.Options(), context))


def send(app: TestApp, request_headers: dict[str, str]) -> Any:
    """Send a request described by headers; ``:method`` and ``:scheme`` are pseudo-headers."""
    headers = dict(request_headers)
    method = headers.pop(":method", "POST")
    environ = {"wsgi.url_scheme": headers.pop(":scheme")} if ":scheme" in headers else {}
    return app.request("/things", method=method, headers=headers, environ=environ,
                       expect_errors=True)


def refused(message: str) -> tuple[int, str]:
    return 403, message


ALLOWED = (200, None)


@pytest.mark.parametrize(("options", "request_headers", "expected"), [
    # Sec-Fetch-Site present
    pytest.param({}, {**COOKIE, "Sec-Fetch-Site": "same-origin"}, ALLOWED, id="same-origin"),
    pytest.param({}, {**COOKIE, "Sec-Fetch-Site": "none"}, ALLOWED, id="user-initiated (none)"),
    pytest.param({}, {**COOKIE, "Sec-Fetch-Site": "cross-site", "Origin": "https://evil.example"},
                 refused("cross-site POST refused: Sec-Fetch-Site is cross-site and Origin "
                         "https://evil.example is not trusted"), id="cross-site"),
    pytest.param({}, {**COOKIE, "Sec-Fetch-Site": "same-site", "Origin": "https://a.example.org"},
                 refused("same-site POST refused: Sec-Fetch-Site is same-site and Origin "
                         "https://a.example.org is not trusted"), id="same-site (sibling)"),
    pytest.param({}, {**COOKIE, "Sec-Fetch-Site": "cross-site"},
                 refused("cross-site POST refused: Sec-Fetch-Site is cross-site and the request "
                         "has no Origin header"), id="cross-site without Origin"),
    pytest.param({}, {**COOKIE, "Sec-Fetch-Site": "sideways", "Origin": "https://evil.example"},
                 refused("cross-origin POST refused: Sec-Fetch-Site is sideways and Origin "
                         "https://evil.example is not trusted"), id="unknown Sec-Fetch-Site"),
    pytest.param({}, {**COOKIE, "Sec-Fetch-Site": "Same-Origin"}, ALLOWED, id="case-insensitive"),
    pytest.param({}, {**COOKIE, "Sec-Fetch-Site": " same-origin\t"}, ALLOWED, id="spaces around the value"),
    # trusted origins
    pytest.param({"trusted_origins": TRUSTED},
                 {**COOKIE, "Sec-Fetch-Site": "cross-site", "Origin": "https://partner.example.com"},
                 ALLOWED, id="trusted exact origin"),
    pytest.param({"trusted_origins": TRUSTED},
                 {**COOKIE, "Sec-Fetch-Site": "cross-site",
                  "Origin": "HTTPS://Partner.Example.com:443"},
                 ALLOWED, id="trusted origin, other spelling"),
    pytest.param({"trusted_origins": TRUSTED},
                 {**COOKIE, "Sec-Fetch-Site": "same-site", "Origin": "https://app.example.org"},
                 ALLOWED, id="wildcard subdomain"),
    pytest.param({"trusted_origins": TRUSTED},
                 {**COOKIE, "Sec-Fetch-Site": "same-site", "Origin": "https://a.b.example.org"},
                 ALLOWED, id="wildcard, deeper subdomain"),
    pytest.param({"trusted_origins": TRUSTED},
                 {**COOKIE, "Sec-Fetch-Site": "cross-site", "Origin": "https://example.org"},
                 refused("cross-site POST refused: Sec-Fetch-Site is cross-site and Origin "
                         "https://example.org is not trusted"), id="wildcard excludes the apex"),
    pytest.param({"trusted_origins": TRUSTED},
                 {**COOKIE, "Sec-Fetch-Site": "cross-site", "Origin": "https://example.org.evil.net"},
                 refused("cross-site POST refused: Sec-Fetch-Site is cross-site and Origin "
                         "https://example.org.evil.net is not trusted"),
                 id="wildcard is not a prefix match"),
    pytest.param({"trusted_origins": TRUSTED},
                 {**COOKIE, "Sec-Fetch-Site": "cross-site", "Origin": "https://evilexample.org"},
                 refused("cross-site POST refused: Sec-Fetch-Site is cross-site and Origin "
                         "https://evilexample.org is not trusted"), id="wildcard needs the dot"),
    pytest.param({"trusted_origins": TRUSTED},
                 {**COOKIE, "Sec-Fetch-Site": "cross-site", "Origin": "http://app.example.org"},
                 refused("cross-site POST refused: Sec-Fetch-Site is cross-site and Origin "
                         "http://app.example.org is not trusted"), id="wildcard, other scheme"),
    pytest.param({"trusted_origins": TRUSTED},
                 {**COOKIE, "Sec-Fetch-Site": "cross-site", "Origin": "https://app.example.org:8443"},
                 refused("cross-site POST refused: Sec-Fetch-Site is cross-site and Origin "
                         "https://app.example.org:8443 is not trusted"), id="wildcard, other port"),
    pytest.param({"trusted_origins": TRUSTED},
                 {**COOKIE, "Sec-Fetch-Site": "cross-site", "Origin": "null"},
                 refused("cross-site POST refused: Sec-Fetch-Site is cross-site and Origin null "
                         "is not trusted"), id="opaque origin"),
    # no Sec-Fetch-Site: compare Origin with the request's own origin
    pytest.param({}, {**COOKIE, "Origin": "http://localhost"}, ALLOWED, id="old browser, same origin"),
    pytest.param({}, {**COOKIE, "Origin": "http://LOCALHOST:80"}, ALLOWED,
                 id="old browser, same origin with default port"),
    pytest.param({}, {**COOKIE, "Origin": "https://shop.test", "Host": "shop.test",
                      ":scheme": "https"}, ALLOWED, id="old browser, https own origin"),
    pytest.param({}, {**COOKIE, "Origin": "https://localhost"},
                 refused("cross-origin POST refused: Origin https://localhost is not this site's "
                         "origin (http://localhost) and is not trusted"),
                 id="old browser, other scheme"),
    pytest.param({}, {**COOKIE, "Origin": "https://evil.example"},
                 refused("cross-origin POST refused: Origin https://evil.example is not this site's "
                         "origin (http://localhost) and is not trusted"), id="old browser, cross-site"),
    pytest.param({"trusted_origins": TRUSTED}, {**COOKIE, "Origin": "https://app.example.org"},
                 ALLOWED, id="old browser, trusted origin"),
    pytest.param({}, {**COOKIE, "Origin": "null"},
                 refused("cross-origin POST refused: Origin null is not this site's origin "
                         "(http://localhost) and is not trusted"), id="old browser, opaque origin"),
    pytest.param({}, {**COOKIE, "Origin": "https://evil.example\x01" + "x" * 200},
                 refused("cross-origin POST refused: Origin " +
                         ("https://evil.example?" + "x" * 200)[:97] +
                         "... is not this site's origin (http://localhost) and is not trusted"),
                 id="hostile Origin is cut and cleaned"),
    pytest.param({}, dict(COOKIE), ALLOWED, id="neither header: not a browser"),
    # neither header, but a Referer (a browser that sends no Origin on a form POST: Firefox before 70,
    # Internet Explorer): the page that sent it is named there
    pytest.param({}, {**COOKIE, "Referer": "https://evil.example/page?q=1#top"},
                 refused("cross-origin POST refused: no Origin header, and the Referer's origin "
                         "https://evil.example is not this site's origin (http://localhost) and is not "
                         "trusted"), id="no Origin, cross-site Referer"),
    pytest.param({}, {**COOKIE, "Referer": "http://localhost/form?next=/x"}, ALLOWED,
                 id="no Origin, same-origin Referer with a path and query"),
    pytest.param({}, {**COOKIE, "Referer": "HTTP://LocalHost:80/form"}, ALLOWED,
                 id="no Origin, same-origin Referer, other spelling"),
    pytest.param({}, {**COOKIE, "Referer": "http://localhost:8080/form"},
                 refused("cross-origin POST refused: no Origin header, and the Referer's origin "
                         "http://localhost:8080 is not this site's origin (http://localhost) and is not "
                         "trusted"), id="no Origin, Referer on another port"),
    pytest.param({}, {**COOKIE, "Referer": "http://shop.test/form", "Host": "shop.test", ":scheme": "https"},
                 refused("cross-origin POST refused: no Origin header, and the Referer's origin "
                         "http://shop.test is not this site's origin (https://shop.test) and is not "
                         "trusted"), id="no Origin, http page posting to the https site"),
    pytest.param({}, {**COOKIE, "Referer": "http://localhost@evil.example/"},
                 refused("cross-origin POST refused: no Origin header, and the Referer's origin "
                         "http://evil.example is not this site's origin (http://localhost) and is not "
                         "trusted"), id="no Origin, Referer with userinfo naming this host"),
    pytest.param({"trusted_origins": TRUSTED}, {**COOKIE, "Referer": "https://app.example.org/x"},
                 ALLOWED, id="no Origin, trusted Referer"),
    pytest.param({}, {**COOKIE, "Referer": "about:blank"},
                 refused("cross-origin POST refused: no Origin header, and the Referer names no "
                         "http(s) origin"), id="no Origin, Referer without an origin"),
    pytest.param({}, {**COOKIE, "Referer": ""}, ALLOWED, id="no Origin, empty Referer: none"),
    # methods
    pytest.param({}, {**COOKIE, ":method": "GET", "Sec-Fetch-Site": "cross-site"}, ALLOWED,
                 id="GET is safe"),
    pytest.param({}, {**COOKIE, ":method": "HEAD", "Sec-Fetch-Site": "cross-site"}, ALLOWED,
                 id="HEAD is safe"),
    pytest.param({}, {**COOKIE, ":method": "OPTIONS", "Sec-Fetch-Site": "cross-site"}, ALLOWED,
                 id="OPTIONS is safe"),
    pytest.param({}, {**COOKIE, ":method": "DELETE", "Sec-Fetch-Site": "cross-site",
                      "Origin": "https://evil.example"},
                 refused("cross-site DELETE refused: Sec-Fetch-Site is cross-site and Origin "
                         "https://evil.example is not trusted"), id="DELETE"),
    pytest.param({}, {**COOKIE, ":method": "PATCH", "Origin": "https://evil.example"},
                 refused("cross-origin PATCH refused: Origin https://evil.example is not this "
                         "site's origin (http://localhost) and is not trusted"), id="PATCH"),
    # who is protected
    pytest.param({}, {"Sec-Fetch-Site": "cross-site", "Origin": "https://evil.example"}, ALLOWED,
                 id="no session cookie"),
    pytest.param({}, {"Cookie": "theme=dark", "Sec-Fetch-Site": "cross-site"}, ALLOWED,
                 id="other cookies only"),
    pytest.param({}, {"Authorization": "Bearer abc", "Sec-Fetch-Site": "cross-site",
                      "Origin": "https://evil.example"}, ALLOWED, id="bearer token only"),
    pytest.param({}, {**COOKIE, "Authorization": "Bearer abc", "Sec-Fetch-Site": "cross-site",
                      "Origin": "https://evil.example"},
                 refused("cross-site POST refused: Sec-Fetch-Site is cross-site and Origin "
                         "https://evil.example is not trusted"), id="bearer token and cookie"),
    pytest.param({"cookie_name": "sid"}, {"Cookie": "sid=1", "Sec-Fetch-Site": "cross-site"},
                 refused("cross-site POST refused: Sec-Fetch-Site is cross-site and the request "
                         "has no Origin header"), id="custom cookie name"),
    pytest.param({"check_without_cookie": True},
                 {"Sec-Fetch-Site": "cross-site", "Origin": "https://evil.example"},
                 refused("cross-site POST refused: Sec-Fetch-Site is cross-site and Origin "
                         "https://evil.example is not trusted"), id="login form (no cookie) checked"),
    pytest.param({"check_without_cookie": True},
                 {"Authorization": "bearer abc", "Sec-Fetch-Site": "cross-site"}, ALLOWED,
                 id="check_without_cookie still exempts bearer"),
])
def test_origin_checks(options: dict[str, Any], request_headers: dict[str, str],
                       expected: tuple[int, str | None]) -> None:
    resp = send(make(options), request_headers)
    status, message = expected
    assert resp.status_int == status
    if message is None:
        assert resp.text == "ok"
    else:
        assert resp.content_type == "application/json"
        assert resp.json["error"]["message"] == message
        assert "Set-Cookie" not in resp.headers


@pytest.mark.filterwarnings("ignore::webtest.lint.WSGIWarning")  # WebTest's lint knows no extension methods
@pytest.mark.parametrize("method", ["PROPFIND", "MKCOL", "LOCK", "SEARCH", "TRACE", "post", "get", "Delete"])
def test_any_method_but_get_head_and_options_is_checked(method: str) -> None:
    """Extension methods change state too (WebDAV), and werkzeug reads a method in any case as its
    capitals (``get`` reaches a GET view): only the exact GET, HEAD and OPTIONS are let through."""
    resp = send(make({}), {**COOKIE, ":method": method, "Sec-Fetch-Site": "cross-site", "Origin": EVIL})
    assert resp.status_int == 403
    assert resp.json["error"]["message"] == (f"cross-site {method} refused: Sec-Fetch-Site is cross-site "
                                             f"and Origin {EVIL} is not trusted")


@pytest.mark.parametrize(("options", "message"), [
    pytest.param({"trusted_origins": ["*"]}, "trusted_origins may not contain '*': that would let "
                 "any page send writes with the user's cookie", id="star"),
    pytest.param({"trusted_origins": ["null"]}, "trusted_origins may not contain 'null'", id="null"),
    pytest.param({"trusted_origins": ["https://example.org/app"]},
                 "trusted_origins entry 'https://example.org/app' is not an origin: write "
                 "http(s)://host[:port] with no path, or https://*.example.org", id="with a path"),
    pytest.param({"trusted_origins": ["https://*.org"]},
                 "trusted_origins entry 'https://*.org' is not an origin", id="wildcard TLD"),
    pytest.param({"trusted_origins": ["https://*.co.uk"]},
                 "trusted_origins entry 'https://*.co.uk' matches origins nobody listed "
                 "(https://wsgistackprobe.co.uk too): any site under it could send writes with the user's "
                 "cookie; name your own domain (https://*.example.co.uk)", id="wildcard over a public suffix"),
    pytest.param({"trusted_origins": ["HTTP://*.CO.UK:8443"]},
                 "trusted_origins entry 'HTTP://*.CO.UK:8443' matches origins nobody listed "
                 "(http://wsgistackprobe.co.uk:8443 too)", id="wildcard over a public suffix, any spelling"),
    pytest.param({"trusted_origins": ["https://app.*.org"]},
                 "trusted_origins entry 'https://app.*.org' is not an origin", id="inner wildcard"),
    pytest.param({"trusted_origins": ["ftp://example.org"]},
                 "trusted_origins entry 'ftp://example.org' is not an origin", id="other scheme"),
    pytest.param({"double_submit": True},
                 "double_submit needs a secret_key of at least 32 characters", id="no secret_key"),
    pytest.param({"double_submit": True, "secret_key": "short"},
                 "double_submit needs a secret_key of at least 32 characters", id="short key"),
    pytest.param({"double_submit": True, "secret_key": "k" * 31},
                 "double_submit needs a secret_key of at least 32 characters", id="31 characters"),
    pytest.param({"header": "X CSRF"}, "header 'X CSRF' is not a header name (ASCII letters, digits "
                 "and '-')", id="bad header name"),
    pytest.param({"header": ""}, "header '' is not a header name (ASCII letters, digits and '-')",
                 id="empty header name"),
    pytest.param({"header": "X_CSRF"}, "header 'X_CSRF' is not a header name (ASCII letters, digits and '-')",
                 id="underscore: servers drop it or read it as X-CSRF"),
    pytest.param({"header": "X-CSRF-Tökén"}, "header 'X-CSRF-Tökén' is not a header name (ASCII letters, "
                 "digits and '-')", id="non-ASCII letters: no request can carry it"),
    pytest.param({"trusted": []}, "Extra inputs are not permitted", id="unknown option"),
    *(pytest.param({"cookie_name": name}, f"cookie_name {name!r} is not a valid cookie name: a token of ASCII "
                   "letters, digits and !#$%&'*+-.^_`|~ (RFC 6265)", id=f"cookie name {why}: never sent, never checked")
      for name, why in [("", "empty"), ("a b", "with a space"), ("sid=", "with '='"), ("s\x01id", "with a control"),
                        ("s\u00e9", "not ASCII")]),
])
def test_refused_options(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(message)):
        CSRFMiddleware.Options(**options)


@pytest.mark.parametrize(("entry", "origin"), [
    pytest.param("HTTPS://*.example.org", "https://app.example.org", id="wildcard, scheme in capitals"),
    pytest.param("Https://*.Example.ORG", "https://a.b.example.org", id="wildcard, mixed case"),
    pytest.param("HTTPS://Partner.Example.com:443", "https://partner.example.com", id="exact, capitals, default port"),
])
def test_trusted_origins_are_read_in_any_case(entry: str, origin: str) -> None:
    """As the cors layer reads its origins: a scheme is case-insensitive (RFC 3986 3.1), so is a host."""
    app = make({"trusted_origins": [entry]})
    assert send(app, {**COOKIE, "Sec-Fetch-Site": "cross-site", "Origin": origin}).status_int == 200
    assert send(app, {**COOKIE, "Sec-Fetch-Site": "cross-site", "Origin": EVIL}).status_int == 403


def test_a_wildcard_under_a_domain_of_ones_own_is_accepted() -> None:
    assert CSRFMiddleware.Options(trusted_origins=["https://*.example.co.uk"]).trusted_origins


def test_secret_key_of_32_characters_is_enough() -> None:
    assert CSRFMiddleware.Options(double_submit=True, secret_key="k" * 32).double_submit


def test_secret_key_is_hidden_in_repr() -> None:
    assert SECRET not in repr(CSRFMiddleware.Options(double_submit=True, secret_key=SECRET))


# ----------------------------------------------------------- double submit


def _session_and_token(app: TestApp) -> tuple[dict[str, str], str]:
    """GET a page that asks for the token; return the session cookie header and the token."""
    resp = app.get("/page")
    cookie = resp.headers["Set-Cookie"].split(";")[0]
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", resp.text)
    return {"Cookie": cookie}, resp.text


DS = {"double_submit": True, "secret_key": SECRET}


@pytest.mark.parametrize(("options", "request_headers", "expected"), [
    pytest.param(DS, {"X-CSRF-Token": "<token>"}, ALLOWED, id="matching token"),
    pytest.param(DS, {"X-CSRF-Token": "<token>", "Sec-Fetch-Site": "same-origin"}, ALLOWED,
                 id="matching token, same-origin"),
    pytest.param(DS, {}, refused("CSRF token missing: send the X-CSRF-Token header with this session's token "
                                 "(the Flask core gives it in the login answer's csrf_token and at GET /auth/csrf)"),
                 id="missing token"),
    pytest.param(DS, {"X-CSRF-Token": ""},
                 refused("CSRF token missing: send the X-CSRF-Token header with this session's token "
                         "(the Flask core gives it in the login answer's csrf_token and at GET /auth/csrf)"),
                 id="empty token: missing"),
    pytest.param(DS, {"X-CSRF-Token": "A" * 43},
                 refused("CSRF token in X-CSRF-Token does not match this session; reload the page "
                         "to get a fresh token"), id="wrong token"),
    pytest.param(DS, {"X-CSRF-Token": "<other>"},
                 refused("CSRF token in X-CSRF-Token does not match this session; reload the page "
                         "to get a fresh token"), id="token of another session"),
    pytest.param(DS, {"X-CSRF-Token": "<first>"},
                 refused("CSRF token in X-CSRF-Token does not match this session; reload the page "
                         "to get a fresh token"), id="the token's first character only"),
    pytest.param(DS, {"X-CSRF-Token": "<short>"},
                 refused("CSRF token in X-CSRF-Token does not match this session; reload the page "
                         "to get a fresh token"), id="the token less its last character"),
    pytest.param(DS, {"X-CSRF-Token": "<token>x"},
                 refused("CSRF token in X-CSRF-Token does not match this session; reload the page "
                         "to get a fresh token"), id="the token and one more character"),
    pytest.param(DS, {"X-CSRF-Token": "\u00e9"},
                 refused("CSRF token in X-CSRF-Token does not match this session; reload the page "
                         "to get a fresh token"), id="non-ASCII token"),
    pytest.param(DS, {"X-CSRF-Token": "<token>", "Sec-Fetch-Site": "cross-site",
                      "Origin": "https://evil.example"},
                 refused("cross-site POST refused: Sec-Fetch-Site is cross-site and Origin "
                         "https://evil.example is not trusted"), id="token does not excuse origin"),
    pytest.param({**DS, "header": "X-XSRF"}, {"X-XSRF": "<token>"}, ALLOWED, id="custom header"),
    pytest.param({**DS, "header": "X-XSRF"}, {"X-CSRF-Token": "<token>"},
                 refused("CSRF token missing: send the X-XSRF header with this session's token (the Flask core "
                         "gives it in the login answer's csrf_token and at GET /auth/csrf)"),
                 id="custom header, default one sent"),
])
def test_double_submit(store_url: str, options: dict[str, Any], request_headers: dict[str, str],
                       expected: tuple[int, str | None]) -> None:
    store = store_from_url(store_url)
    app = make(options, store)
    cookie, token = _session_and_token(app)
    _, other = _session_and_token(app)
    assert other != token
    headers = {k: v.replace("<token>", token).replace("<other>", other)
                   .replace("<first>", token[:1]).replace("<short>", token[:-1])
               for k, v in request_headers.items()}
    resp = send(app, {**cookie, **headers})
    status, message = expected
    assert resp.status_int == status
    if message is None:
        assert resp.text == token  # the token stays stable for the session
    else:
        assert resp.json["error"]["message"] == message
    store.close()


def test_double_submit_token_changes_at_rotate(store_url: str) -> None:
    store = store_from_url(store_url)
    context = Context(stores={"shared": store})

    def login(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        if environ["PATH_INFO"] == "/login":
            environ["wsgistack.session"].rotate()
        return ok(environ, start_response)

    csrf = CSRFMiddleware(login, CSRFMiddleware.Options(**DS), context)
    session = SessionMiddleware(csrf, SessionMiddleware.Options(secret_key=SESSION_SECRET), context)
    app = TestApp(ErrorsMiddleware(session, ErrorsMiddleware.Options(), context))
    cookie, token = _session_and_token(app)
    resp = app.post("/login", headers={**cookie, "X-CSRF-Token": token})
    new_cookie = {"Cookie": resp.headers["Set-Cookie"].split(";")[0]}
    assert resp.text != token
    assert send(app, {**new_cookie, "X-CSRF-Token": resp.text}).status_int == 200
    stale = send(app, {**new_cookie, "X-CSRF-Token": token})
    assert stale.status_int == 403
    assert stale.json["error"]["message"].startswith("CSRF token in X-CSRF-Token does not match")
    store.close()


EVIL = "https://evil.example"


@pytest.mark.parametrize(("request_headers", "status"), [
    pytest.param({"Authorization": "Bearer abc", "Origin": EVIL}, 200, id="a bearer token: no ambient credential"),
    pytest.param({"Authorization": "bearer abc", "Origin": EVIL}, 200, id="the scheme in any case"),
    pytest.param({"Authorization": "Basic YTpi", "Origin": EVIL}, 403, id="basic credentials: checked"),
    pytest.param({"Authorization": "Bearerabc", "Origin": EVIL}, 403, id="Bearer without its space: checked"),
    pytest.param({"Origin": EVIL}, 403, id="nothing: checked (a cross-site login form)"),
    pytest.param({}, 200, id="no cookie, no Origin: a client that is no browser (an API login) passes"),
])
def test_requests_without_the_cookie_get_the_origin_checks(request_headers: dict[str, str], status: int) -> None:
    # check_without_cookie: every unsafe request's origin is checked, except one that authenticates
    # with a bearer token (a browser never sends one by itself). The token is not: without the cookie
    # there is no session for it to match, and no token could pass.
    resp = send(make({**DS, "check_without_cookie": True}, store_from_url("memory://")), request_headers)
    assert resp.status_int == status
    if status == 403:
        assert resp.json["error"]["message"].startswith("cross-origin POST refused")


def test_without_the_cookie_no_token_is_asked_even_with_no_session_layer() -> None:
    """A request with no session cookie has no session for a token to match, whether or not a session layer
    made it a new one (one scoped to fewer paths leaves none): its origin alone is checked."""

    def plain(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    layer = CSRFMiddleware(plain, CSRFMiddleware.Options(**DS, check_without_cookie=True), Context())
    app = TestApp(ErrorsMiddleware(layer, ErrorsMiddleware.Options(), Context()))
    assert app.post("/x", headers={"Sec-Fetch-Site": "same-origin"}).text == "ok"
    assert app.post("/x", headers={"Sec-Fetch-Site": "cross-site", "Origin": EVIL}, status=403).json[
        "error"]["message"].startswith("cross-site POST refused")


def test_a_cookie_for_a_session_the_store_lacks_needs_no_token(store_url: str) -> None:
    """An ended or expired session holds nothing a forged request could use, and no page can know its token:
    the request goes on, and starts a new session with a token of its own."""
    store = store_from_url(store_url)
    resp = send(make(DS, store), {"Cookie": "__Host-session=gone.abc", "Sec-Fetch-Site": "same-origin"})
    assert resp.status_int == 200
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", resp.text)
    assert resp.headers["Set-Cookie"].startswith("__Host-session=")
    store.close()


def test_the_token_is_an_hmac_of_the_session_id_under_its_own_label() -> None:
    """HMAC-SHA256 of "wsgistack.csrf:" and the session id, unpadded URL-safe base64: tokens pages hold stay
    valid from one release to the next, and the label keeps the key's other uses from yielding a token."""

    class Session:
        id, new, modified = "session-id", False, False

    layer = CSRFMiddleware(ok, CSRFMiddleware.Options(**DS), Context())
    assert layer.token({"wsgistack.session": Session()}) == "3HzfHpjMVJhhDi3z0Sa_hy4mHECyRaIIPSMMDpwxpG8"


def test_handing_out_the_token_marks_the_response_as_this_sessions() -> None:
    """So that no cache (a per_user one) gives the page with it to the user's other sessions."""
    seen: dict[str, Any] = {}

    def page(environ: dict[str, Any], start_response: Any) -> Any:
        seen["before"] = environ.get(SESSION_BOUND)
        environ[CSRF_TOKEN]()
        seen["after"] = environ.get(SESSION_BOUND)
        return ok(environ, start_response)

    context = Context(stores={"shared": store_from_url("memory://")})
    csrf = CSRFMiddleware(page, CSRFMiddleware.Options(**DS), context)
    session = SessionMiddleware(csrf, SessionMiddleware.Options(secret_key=SESSION_SECRET), context)
    TestApp(ErrorsMiddleware(session, ErrorsMiddleware.Options(), context)).get("/page")
    assert seen == {"before": None, "after": True}


def test_without_a_session_object_the_token_is_still_checked() -> None:
    """No session in environ (a gap in the session layer's scope) is not a session the store lost: the cookie
    request still needs its token (here it cannot have one: refused, not let through)."""
    layer = CSRFMiddleware(ok, CSRFMiddleware.Options(**DS), Context())
    app = TestApp(ErrorsMiddleware(layer, ErrorsMiddleware.Options(), Context()))
    refused = app.post("/x", headers={"Cookie": "__Host-session=abc", "Sec-Fetch-Site": "same-origin"}, status=403)
    assert refused.json["error"]["message"].startswith("CSRF token missing")


@pytest.mark.parametrize("token", ["A" * 43, "x", "\u00e9"])
def test_without_a_session_object_a_sent_token_is_refused_not_a_crash(token: str) -> None:
    """A session layer scoped to fewer paths than csrf leaves its requests without a session: a token sent
    there matches nothing (403), it does not make the layer ask for a session it cannot have (500)."""
    layer = CSRFMiddleware(ok, CSRFMiddleware.Options(**DS), Context())
    app = TestApp(ErrorsMiddleware(layer, ErrorsMiddleware.Options(), Context()))
    resp = app.post("/x", headers={"Cookie": "__Host-session=abc", "Sec-Fetch-Site": "same-origin",
                                   "X-CSRF-Token": token}, status=403)
    assert resp.json["error"]["message"] == ("CSRF token in X-CSRF-Token does not match this session; "
                                             "reload the page to get a fresh token")
    assert "Set-Cookie" not in resp.headers


def test_token_without_session_layer_says_what_is_missing() -> None:
    environ: dict[str, Any] = {"REQUEST_METHOD": "GET"}
    CSRFMiddleware(lambda e, s: [], CSRFMiddleware.Options(**DS), Context())(environ, ignore_start)
    with pytest.raises(RuntimeError, match="csrf double_submit needs a session layer outside the "
                                           "csrf layer"):
        environ[CSRF_TOKEN]()


def test_no_token_getter_without_double_submit() -> None:
    environ: dict[str, Any] = {"REQUEST_METHOD": "GET"}
    CSRFMiddleware(lambda e, s: [], CSRFMiddleware.Options(), Context())(environ, ignore_start)
    assert CSRF_TOKEN not in environ


def test_built_from_yaml(make_stack: Callable[..., TestApp]) -> None:
    app = make_stack({
        "app": {"factory": "test_csrf:ok_factory"},
        "pipeline": [
            {"session": {"secret_key": SESSION_SECRET}},
            {"csrf": {"trusted_origins": ["https://*.example.org"]}},
        ],
    })
    headers = {**COOKIE, "Sec-Fetch-Site": "cross-site"}
    assert app.post("/", headers={**headers, "Origin": "https://a.example.org"}).text == "ok"
    resp = app.post("/", headers={**headers, "Origin": "https://evil.example"}, status=403)
    assert resp.json["error"]["message"] == ("cross-site POST refused: Sec-Fetch-Site is cross-site "
                                             "and Origin https://evil.example is not trusted")


def ok_factory(options: dict[str, Any]) -> Any:
    """App factory for the YAML test."""
    return ok


@pytest.mark.parametrize(("forwarded", "origin", "status"), [
    pytest.param({"X-Forwarded-Proto": "https", "X-Forwarded-Host": "shop.test"}, "https://shop.test", 200,
                 id="https behind the proxy: the page's origin is this site's"),
    pytest.param({"X-Forwarded-Proto": "https", "X-Forwarded-Host": "shop.test"}, "http://shop.test", 403,
                 id="behind the proxy, an http page is another origin"),
    pytest.param({}, "https://shop.test", 403, id="without the proxy's word the scheme is http"),
])
def test_old_browser_origin_check_uses_the_proxy_layers_scheme_and_host(
        make_stack: Callable[..., TestApp], forwarded: dict[str, str], origin: str, status: int) -> None:
    app = make_stack({
        "app": {"factory": "test_csrf:ok_factory"},
        "pipeline": [{"proxy": {"x_proto": 1, "x_host": 1}},
                     {"session": {"secret_key": SESSION_SECRET}}, {"csrf": {}}],
    })
    resp = app.post("/", headers={**COOKIE, "Host": "shop.test", "Origin": origin, **forwarded},
                    extra_environ={"REMOTE_ADDR": "127.0.0.1"}, status=status)
    if status == 403:
        assert resp.json["error"]["message"].startswith(f"cross-origin POST refused: Origin {origin} is not")


@pytest.mark.parametrize("path", ["/api/v2/things", "/api/things", "/api/V2/things", "//api/v2/things"])
def test_a_scoped_layer_protects_every_spelling_the_versioning_layer_routes_there(
        make_stack: Callable[..., TestApp], path: str) -> None:
    app = make_stack({
        "app": {"factory": "test_csrf:ok_factory"},
        "pipeline": [{"session": {"secret_key": SESSION_SECRET}},
                     {"csrf": {"paths": ["/api/v2/*"]}},
                     {"versioning": {"supported": ["v1", "v2"], "default": "v2"}}],
    })
    resp = app.post(path, headers={**COOKIE, "Sec-Fetch-Site": "cross-site", "Origin": EVIL}, status=403)
    assert resp.json["error"]["message"].startswith("cross-site POST refused")
