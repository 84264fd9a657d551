"""The cors layer: origin matching, preflights, error responses, per-path rules, lint."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import pytest
from pydantic import ValidationError
from webtest import TestApp
from werkzeug.exceptions import abort
from werkzeug.wrappers import Response

from middleware.base import Context, add_vary, parse_origin, refuse
from middleware.cors import CORSMiddleware, CORSOptions
from middleware.errors import ErrorsMiddleware

APP = "https://app.example.org"
OTHER = "https://other.example.net"


class Recorder:
    """A tiny inner app that records what reached it and answers by path."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ["PATH_INFO"]
        self.seen.append((environ["REQUEST_METHOD"], path))
        if path == "/unauthorized":
            raise refuse(401, "Sign in first.", headers=[("WWW-Authenticate", "Bearer")])
        if path == "/limited":
            raise refuse(429, "Slow down.", headers=[("Retry-After", "7")])
        if path == "/crash":
            raise RuntimeError("inner failure")
        if path == "/own-response":  # a response of its own, which errors sends as it is
            abort(Response(b"taken", status=409, headers={
                "Access-Control-Allow-Origin": "*", "Access-Control-Allow-Credentials": "true",
                "Access-Control-Expose-Headers": "X-Total", "Vary": "Accept-Encoding"}))
        headers = [("Content-Type", "text/plain"), ("X-Total", "3")]
        if path == "/vary":
            headers.append(("Vary", "Accept-Encoding"))
        if path == "/vary-first":
            headers.insert(0, ("Vary", "Accept-Encoding"))
        if path == "/vary-star":
            headers.append(("Vary", "*"))
        if path == "/own-cors":
            headers.append(("Access-Control-Allow-Origin", "*"))
        if path == "/own-credentials":
            headers += [("access-control-allow-origin", "https://other.example.net"),
                        ("Access-Control-Allow-Credentials", "true"), ("Access-Control-Expose-Headers", "X-Total")]
        status = "404 Not Found" if path == "/missing" else "200 OK"
        start_response(status, headers)
        return [b"body"]


@pytest.fixture
def inner() -> Recorder:
    """The recording inner app."""
    return Recorder()


@pytest.fixture
def make(inner: Recorder) -> Callable[..., TestApp]:
    """Build errors -> cors -> recorder from keyword options."""

    def build(**options: Any) -> TestApp:
        cors = CORSMiddleware(inner, CORSOptions(**options), Context())
        errors = ErrorsMiddleware(cors, ErrorsMiddleware.Options(format="envelope"), Context())
        return TestApp(errors)

    return build


def cors_headers(response: Any) -> dict[str, str]:
    """The Access-Control-* headers of a response, by lowercase name."""
    return {k.lower(): v for k, v in response.headerlist if k.lower().startswith("access-control-")}


def preflight(origin: str, method: str = "PUT", headers: str | None = None, **extra: str) -> dict[str, str]:
    """Request headers of a browser preflight."""
    out = {"Origin": origin, "Access-Control-Request-Method": method, **extra}
    if headers is not None:
        out["Access-Control-Request-Headers"] = headers
    return out


# --- configuration refused ---------------------------------------------------------------

@pytest.mark.parametrize(("options", "message"), [
    pytest.param({"origins": ["*"], "allow_credentials": True},
                 "allow_credentials may not be true when origins contains '*'", id="credentials with *"),
    pytest.param({"origin_regex": [".*"], "allow_credentials": True},
                 "origin_regex '.*' matches origins nobody listed (https://wsgistack-probe.invalid too) while "
                 "allow_credentials is true", id="credentials with a regex for any origin"),
    pytest.param({"origin_regex": [r"https://app\.example\.org", "https?://[a-z0-9.-]+(:[0-9]+)?"],
                  "allow_credentials": True},
                 "origin_regex 'https?://[a-z0-9.-]+(:[0-9]+)?' matches origins nobody listed",
                 id="credentials with a regex for any host"),
    pytest.param({"rules": [{"paths": ["/public/*"], "origin_regex": ["https://.*"]}], "allow_credentials": True},
                 "rules[0].origin_regex 'https://.*' matches origins nobody listed (https://wsgistack-probe.invalid "
                 "too) while rules[0].allow_credentials is true", id="in a rule"),
    pytest.param({"origins": ["null", APP], "allow_credentials": True},
                 "origins may not contain 'null' when allow_credentials is true", id="credentials with null"),
    pytest.param({"origins": [APP], "rules": [{"paths": ["/p/*"], "origins": ["*"]}],
                  "allow_credentials": True},
                 "rules[0].allow_credentials may not be true when rules[0].origins contains '*'",
                 id="inherited credentials with * in a rule"),
    pytest.param({"origins": ["https://app.example.org/"]},
                 "origins entry 'https://app.example.org/' is not an origin", id="trailing slash"),
    pytest.param({"origins": ["app.example.org"]},
                 "origins entry 'app.example.org' is not an origin", id="no scheme"),
    pytest.param({"origins": ["https://*example.org"]},
                 "origins entry 'https://*example.org' is not an origin", id="star without dot"),
    pytest.param({"origins": ["https://a.*.example.org"]},
                 "origins entry 'https://a.*.example.org' is not an origin", id="star inside"),
    pytest.param({"origins": ["https://*.org"]},
                 "origins entry 'https://*.org' is not an origin", id="star on a top-level domain"),
    pytest.param({"origins": ["https://app.example.org:99999"]},
                 "is not an origin", id="port out of range"),
    pytest.param({"origins": ["https://bücher.example"]},
                 "origins entry 'https://bücher.example' is not an origin: browsers send a host name in its ASCII "
                 "form (its IDNA A-label, xn--…); write that", id="an internationalised host name"),
    pytest.param({"rules": [{"paths": ["/a/*"], "origins": ["https://*.bücher.example"]}]},
                 "rules[0].origins entry 'https://*.bücher.example' is not an origin: browsers send a host name in "
                 "its ASCII form", id="an internationalised wildcard in a rule"),
    pytest.param({"origin_regex": ["https://(unclosed"]},
                 "origin_regex 'https://(unclosed' is not a valid regular expression", id="bad regex"),
    pytest.param({"allow_methods": ["GET POST"]},
                 "allow_methods entry 'GET POST' is not a method name", id="bad method"),
    pytest.param({"allow_headers": ["Authori zation"]},
                 "allow_headers entry 'Authori zation' is not a header name", id="a space in a header name"),
    pytest.param({"expose_headers": ["X-Request-ID,"]},
                 "expose_headers entry 'X-Request-ID,' is not a header name", id="a comma in a header name"),
    pytest.param({"rules": [{"paths": ["/a/*"], "allow_headers": ["Content-Type:"]}]},
                 "rules[0].allow_headers entry 'Content-Type:' is not a header name", id="a rule's header"),
    pytest.param({"origins": [APP], "allow_origin": [APP]},
                 "Extra inputs are not permitted", id="unknown key"),
    pytest.param({"origins": [APP], "max_age": -1},
                 "greater than or equal to 0", id="negative max_age"),
    pytest.param({"rules": [{"paths": []}]}, "at least 1 item", id="rule without paths"),
    pytest.param({"origins": ["https://*.co.uk"], "allow_credentials": True},
                 "origins entry 'https://*.co.uk' matches origins nobody listed (https://wsgistackprobe.co.uk too) "
                 "while allow_credentials is true", id="credentials with a wildcard for a public suffix"),
    pytest.param({"origins": [APP], "allow_credentials": True,
                  "rules": [{"paths": ["/p/*"], "origins": ["http://*.co.uk:8080"]}]},
                 "rules[0].origins entry 'http://*.co.uk:8080' matches origins nobody listed "
                 "(http://wsgistackprobe.co.uk:8080 too) while rules[0].allow_credentials is true",
                 id="inherited credentials with a wildcard for a public suffix, any port"),
])
def test_options_refused(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError) as info:
        CORSOptions(**options)
    assert message in str(info.value)


@pytest.mark.parametrize(("pattern", "stranger"), [
    pytest.param(r"https://.*\.com", "https://wsgistackprobe.com", id="any .com"),
    pytest.param(r"https://[a-z]+\.[a-z]+", "https://wsgistackprobe.com", id="any two labels"),
    pytest.param(r"https://[a-z0-9]+\.(com|net|org|io)", "https://wsgistackprobe.com", id="common top-level domains"),
    pytest.param(r"https://.*example\.org", "https://wsgistackprobeexample.org",
                 id="any domain ending in the same letters"),
    pytest.param(r"https://[A-Z]+\.COM", "https://wsgistackprobe.com", id="any .com, in capitals"),
])
def test_credentials_refuse_a_regex_for_other_peoples_sites(pattern: str, stranger: str) -> None:
    with pytest.raises(ValidationError) as info:
        CORSOptions(origin_regex=[pattern], allow_credentials=True)
    assert f"origin_regex {pattern!r} matches origins nobody listed ({stranger} too)" in str(info.value)
    CORSOptions(origin_regex=[pattern])  # without credentials, reading public answers: allowed


@pytest.mark.parametrize("pattern", [
    r"https://app\.example\.org", r"https://pr-[0-9]+\.review\.example\.org", r"https://.*\.example\.org",
    r"https://(.*\.)?example\.org", r"https://(www\.)?example\.org", r"http://localhost:[0-9]+",
])
def test_credentials_accept_a_regex_for_ones_own_hosts(pattern: str) -> None:
    assert CORSOptions(origin_regex=[pattern], allow_credentials=True).origin_regex == (pattern,)


def test_origin_regex_may_be_one_string_in_a_rule_as_at_the_top_level() -> None:
    pattern = r"https://pr-[0-9]+\.review\.example\.org"
    options = CORSOptions(origin_regex=pattern, rules=[{"paths": ["/api/*"], "origin_regex": pattern}])
    assert (options.origin_regex, options.rules[0].origin_regex) == ((pattern,), (pattern,))


@pytest.mark.parametrize("entry", ["https://*.co.uk", "https://*.example.org", "https://*.app.example.co.uk"])
def test_a_wildcard_without_credentials_is_accepted(entry: str) -> None:
    assert CORSOptions(origins=[entry]).origins == (entry,)


@pytest.mark.parametrize("entry", ["https://*.example.org", "https://*.app.example.co.uk", "http://*.example.org:8080"])
def test_credentials_accept_a_wildcard_for_ones_own_hosts(entry: str) -> None:
    assert CORSOptions(origins=[entry], allow_credentials=True).origins == (entry,)


def test_one_regex_may_be_a_string() -> None:
    assert CORSOptions(origin_regex=r"https://x\.org").origin_regex == (r"https://x\.org",)


@pytest.mark.parametrize(("origin", "expected"), [
    pytest.param("https://App.Example.ORG", ("https", "app.example.org", None), id="lowercased"),
    pytest.param("https://app.example.org:443", ("https", "app.example.org", None), id="default port"),
    pytest.param("http://app.example.org:80", ("http", "app.example.org", None), id="http default"),
    pytest.param("http://app.example.org:443", ("http", "app.example.org", 443), id="other port kept"),
    pytest.param("http://[::1]:8080", ("http", "[::1]", 8080), id="ipv6"),
    pytest.param("https://app.example.org/", None, id="path"),
    pytest.param("https://app.example.org.", None, id="trailing dot"),
    pytest.param("https://user@app.example.org", None, id="userinfo"),
    pytest.param("null", None, id="null"),
])
def test_parse_origin(origin: str, expected: Any) -> None:
    assert parse_origin(origin) == expected


# --- which origins are allowed -----------------------------------------------------------

EXACT = {"origins": [APP]}
WILD = {"origins": ["https://*.example.org"]}
WILD_PORT = {"origins": ["https://*.example.org:8443"]}
REGEX = {"origin_regex": [r"https://pr-[0-9]+\.preview\.example\.org"]}


@pytest.mark.parametrize(("options", "origin", "allowed"), [
    pytest.param(EXACT, APP, True, id="exact"),
    pytest.param(EXACT, "https://APP.example.org", True, id="exact, host case"),
    pytest.param(EXACT, "HTTPS://app.example.org:443", True, id="exact, scheme case and default port"),
    pytest.param(EXACT, "https://app.example.org:8443", False, id="exact, other port"),
    pytest.param(EXACT, "http://app.example.org", False, id="exact, other scheme"),
    pytest.param(EXACT, "https://app.example.org.evil.net", False, id="exact, suffix trick"),
    pytest.param(EXACT, "https://evilapp.example.org", False, id="exact, prefix trick"),
    pytest.param(EXACT, "https://app.example.org/", False, id="exact, with path"),
    pytest.param(EXACT, "https://app.example.org.", False, id="exact, trailing dot"),
    pytest.param(EXACT, "null", False, id="exact, null not listed"),
    pytest.param(WILD, "https://a.example.org", True, id="wildcard, subdomain"),
    pytest.param(WILD, "https://a.b.example.org", True, id="wildcard, deeper subdomain"),
    pytest.param(WILD, "https://example.org", False, id="wildcard, bare domain"),
    pytest.param(WILD, "https://evilexample.org", False, id="wildcard, glued prefix"),
    pytest.param(WILD, "https://example.org.evil.net", False, id="wildcard, suffix trick"),
    pytest.param(WILD, "https://a.example.org.evil.net", False, id="wildcard, subdomain suffix trick"),
    pytest.param(WILD, "http://a.example.org", False, id="wildcard, other scheme"),
    pytest.param(WILD, "https://a.example.org:8443", False, id="wildcard, other port"),
    pytest.param(WILD, "https://.example.org", False, id="wildcard, empty label"),
    pytest.param(WILD_PORT, "https://a.example.org:8443", True, id="wildcard with port"),
    pytest.param(WILD_PORT, "https://a.example.org", False, id="wildcard with port, default port"),
    pytest.param({"origins": ["https://*.example.org", "https://example.org"]},
                 "https://example.org", True, id="wildcard plus bare domain listed"),
    pytest.param(REGEX, "https://pr-12.preview.example.org", True, id="regex"),
    pytest.param(REGEX, "https://pr-12.preview.example.org.evil.net", False, id="regex is a full match"),
    pytest.param(REGEX, "https://xpr-12.preview.example.org", False, id="regex, prefix"),
    pytest.param(REGEX, "https://PR-12.preview.example.org:443", True, id="regex sees the normalised origin"),
    pytest.param({"origin_regex": [r"https://App\.Example\.ORG"]}, APP, True,
                 id="regex letters match either case, as hosts and schemes have none"),
    pytest.param({"origin_regex": [r"HTTPS://PR-[0-9]+\.preview\.example\.org"]}, "https://pr-7.preview.example.org",
                 True, id="regex in capitals"),
    pytest.param({"origin_regex": [r"https://App\.Example\.ORG"]}, "https://app.example.org.evil.net", False,
                 id="regex in capitals is still a full match"),
    pytest.param({"origin_regex": [".*"]}, "null", False, id="regex never matches null"),
    pytest.param({"origins": ["null"]}, "null", True, id="null listed"),
    pytest.param({"origins": ["https://xn--bcher-kva.example"]}, "https://xn--bcher-kva.example", True,
                 id="an internationalised host name, as browsers send it"),
])
def test_origin_matching(make: Callable[..., TestApp], options: dict[str, Any], origin: str,
                         allowed: bool) -> None:
    response = make(**options).get("/", headers={"Origin": origin})
    assert response.status_int == 200
    expected = {"access-control-allow-origin": origin} if allowed else {}
    assert cors_headers(response) == expected
    assert response.headers["Vary"] == "Origin"


# --- simple and actual requests ----------------------------------------------------------

FULL = {"origins": [APP], "allow_credentials": True, "expose_headers": ["X-Total", "ETag"]}


@pytest.mark.parametrize(("options", "request_headers", "expected"), [
    pytest.param(FULL, {"Origin": APP}, {
        "access-control-allow-origin": APP, "access-control-allow-credentials": "true",
        "access-control-expose-headers": "X-Total, ETag"}, id="allowed, credentials, expose"),
    pytest.param(FULL, {"Origin": OTHER}, {}, id="disallowed origin gets nothing"),
    pytest.param(FULL, {}, {}, id="no Origin"),
    pytest.param({"origins": ["*"]}, {"Origin": OTHER}, {"access-control-allow-origin": "*"},
                 id="any origin"),
    pytest.param({"origins": ["*"], "expose_headers": ["X-Total"]}, {"Origin": OTHER, "Cookie": "a=1"},
                 {"access-control-allow-origin": "*", "access-control-expose-headers": "X-Total"},
                 id="any origin with a cookie stays *"),
])
def test_actual_request(make: Callable[..., TestApp], inner: Recorder, options: dict[str, Any],
                        request_headers: dict[str, str], expected: dict[str, str]) -> None:
    response = make(**options).post("/", headers=request_headers)
    assert response.status_int == 200
    assert response.body == b"body"
    assert cors_headers(response) == expected
    assert response.headers["Vary"] == "Origin"
    assert inner.seen == [("POST", "/")]


@pytest.mark.parametrize(("path", "vary"), [
    pytest.param("/vary", "Accept-Encoding, Origin", id="merged with the app's Vary"),
    pytest.param("/vary-first", "Accept-Encoding, Origin", id="merged with the app's Vary, its first header"),
    pytest.param("/vary-star", "*", id="Vary * kept"),
    pytest.param("/", "Origin", id="added"),
])
def test_vary_merging(make: Callable[..., TestApp], path: str, vary: str) -> None:
    app = make(**EXACT)
    for headers in ({"Origin": APP}, {"Origin": OTHER}, {}):
        response = app.get(path, headers=headers)
        assert response.headers.getall("Vary") == [vary]


@pytest.mark.parametrize(("headers", "fields", "expected"), [
    pytest.param([("X-A", "1")], ("Origin",), [("X-A", "1"), ("Vary", "Origin")], id="none: added"),
    pytest.param([("vary", "accept")], ("Origin",), [("vary", "accept, Origin")], id="merged, any case"),
    pytest.param([("Vary", "Origin")], ("origin",), [("Vary", "Origin")], id="there already, any case"),
    pytest.param([("Vary", "X-Origin-Id")], ("Origin",), [("Vary", "X-Origin-Id, Origin")],
                 id="a substring is not the name"),
    pytest.param([("Vary", " ")], ("Cookie",), [("Vary", "Cookie")], id="an empty Vary"),
    pytest.param([("Vary", "*")], ("Cookie",), [("Vary", "*")], id="star kept"),
    pytest.param([("Vary", "Accept"), ("VARY", "Cookie")], ("Cookie", "Origin"),
                 [("Vary", "Accept, Cookie, Origin"), ("VARY", "Cookie")], id="the first of several, two names"),
])
def test_add_vary(headers: list[tuple[str, str]], fields: tuple[str, ...], expected: list[tuple[str, str]]) -> None:
    add_vary(headers, *fields)
    assert headers == expected


def test_layer_replaces_app_cors_headers_for_allowed_origins(make: Callable[..., TestApp]) -> None:
    response = make(**EXACT).get("/own-cors", headers={"Origin": APP})
    assert response.headers.getall("Access-Control-Allow-Origin") == [APP]


@pytest.mark.parametrize(("path", "request_headers", "expected"), [
    pytest.param("/own-cors", {"Origin": OTHER}, {}, id="the app's * to another origin"),
    pytest.param("/own-cors", {}, {}, id="the app's * without Origin"),
    pytest.param("/own-credentials", {"Origin": APP}, {"access-control-allow-origin": APP},
                 id="the app's credentials and exposed headers where the layer grants neither"),
    pytest.param("/own-credentials", {"Origin": OTHER}, {}, id="the app's grant to another origin"),
])
def test_the_layer_alone_grants_on_its_paths(make: Callable[..., TestApp], path: str,
                                             request_headers: dict[str, str], expected: dict[str, str]) -> None:
    response = make(**EXACT).get(path, headers=request_headers)
    assert cors_headers(response) == expected
    assert response.headers.getall("Vary") == ["Origin"]


@pytest.mark.parametrize(("options", "request_headers", "expected"), [
    pytest.param(EXACT, {"Origin": OTHER}, {}, id="the response's * to another origin"),
    pytest.param(EXACT, {}, {}, id="the response's * without Origin"),
    pytest.param(EXACT, {"Origin": APP}, {"access-control-allow-origin": APP},
                 id="the response's credentials and exposed headers where the layer grants neither"),
    pytest.param(FULL, {"Origin": APP}, {"access-control-allow-origin": APP, "access-control-allow-credentials": "true",
                                         "access-control-expose-headers": "X-Total, ETag"},
                 id="the layer's grant, not the response's *"),
])
def test_the_layer_alone_grants_on_a_response_an_exception_carries(
        make: Callable[..., TestApp], options: dict[str, Any], request_headers: dict[str, str],
        expected: dict[str, str]) -> None:
    response = make(**options).get("/own-response", headers=request_headers, status=409)
    assert response.body == b"taken"
    assert cors_headers(response) == expected
    assert response.headers.getall("Vary") == ["Accept-Encoding, Origin"]


def test_app_rendered_error_carries_cors(make: Callable[..., TestApp]) -> None:
    response = make(**FULL).get("/missing", headers={"Origin": APP}, status=404)
    assert cors_headers(response)["access-control-allow-origin"] == APP


# --- error responses ---------------------------------------------------------------------

@pytest.mark.parametrize(("path", "status", "kept"), [
    pytest.param("/unauthorized", 401, ("WWW-Authenticate", "Bearer"), id="401 from an inner layer"),
    pytest.param("/limited", 429, ("Retry-After", "7"), id="429 keeps Retry-After"),
    pytest.param("/crash", 500, None, id="500 from an unhandled exception"),
])
def test_error_responses_carry_cors(make: Callable[..., TestApp], path: str, status: int,
                                    kept: tuple[str, str] | None) -> None:
    app = make(**FULL)
    response = app.get(path, headers={"Origin": APP}, status=status)
    assert cors_headers(response) == {
        "access-control-allow-origin": APP, "access-control-allow-credentials": "true",
        "access-control-expose-headers": "X-Total, ETag"}
    assert response.headers["Vary"] == "Origin"
    assert response.json["error"]["code"] == status
    if kept:
        assert response.headers[kept[0]] == kept[1]
    refused = app.get(path, headers={"Origin": OTHER}, status=status)
    assert cors_headers(refused) == {}
    assert refused.headers["Vary"] == "Origin"
    plain = app.get(path, status=status)
    assert cors_headers(plain) == {}
    assert plain.headers.getall("Vary") == ["Origin"], "a cached error must not be served to an allowed origin"


class GeneratorApp:
    """A generator app (PEP 3333 allows it): it starts its response on the body's first iteration."""

    def __init__(self) -> None:
        self.closed = 0

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        try:
            if environ["PATH_INFO"] == "/unauthorized":
                raise refuse(401, "Sign in first.", headers=[("WWW-Authenticate", "Bearer")])
            if environ["PATH_INFO"] == "/crash":
                raise RuntimeError("inner failure")
            start_response("200 OK", [("Content-Type", "text/plain")])
            yield b"streamed"
        finally:
            self.closed += 1


@pytest.mark.parametrize(("path", "status"), [
    pytest.param("/unauthorized", 401, id="a refusal on the first chunk"),
    pytest.param("/crash", 500, id="an exception on the first chunk"),
    pytest.param("/ok", 200, id="a response started on the first chunk"),
])
def test_generator_app_responses_carry_cors(path: str, status: int) -> None:
    inner = GeneratorApp()
    cors = CORSMiddleware(inner, CORSOptions(**FULL), Context())
    app = TestApp(ErrorsMiddleware(cors, ErrorsMiddleware.Options(format="envelope"), Context()))
    allowed = app.get(path, headers={"Origin": APP}, status=status)
    assert cors_headers(allowed) == {
        "access-control-allow-origin": APP, "access-control-allow-credentials": "true",
        "access-control-expose-headers": "X-Total, ETag"}
    assert allowed.headers.getall("Vary") == ["Origin"]
    refused = app.get(path, headers={"Origin": OTHER}, status=status)
    assert cors_headers(refused) == {}
    assert refused.headers.getall("Vary") == ["Origin"]
    plain = app.get(path, status=status)
    assert cors_headers(plain) == {}
    assert plain.headers.getall("Vary") == ["Origin"]
    assert inner.closed == 3


# --- preflight ---------------------------------------------------------------------------

PUT_JSON = {"origins": [APP], "allow_methods": ["GET", "PUT"], "allow_headers": ["X-Custom"],
            "max_age": 120}
PUT_DELETE = {"origins": [APP], "allow_methods": ["PUT", "DELETE"], "allow_headers": ["X-Custom"]}


@pytest.mark.parametrize(("options", "request_headers", "expected"), [
    pytest.param(PUT_JSON, preflight(APP, "PUT", "x-custom, content-type"), {
        "access-control-allow-origin": APP, "access-control-allow-methods": "GET, PUT",
        "access-control-allow-headers": "accept, accept-language, content-language, content-type, x-custom",
        "access-control-max-age": "120"}, id="allowed, listed header"),
    pytest.param(PUT_JSON, preflight(APP, "GET"), {
        "access-control-allow-origin": APP, "access-control-allow-methods": "GET, PUT",
        "access-control-max-age": "120"}, id="allowed, no headers asked"),
    pytest.param({**PUT_JSON, "allow_credentials": True}, preflight(APP, "PUT", "X-Custom"), {
        "access-control-allow-origin": APP, "access-control-allow-credentials": "true",
        "access-control-allow-methods": "GET, PUT",
        "access-control-allow-headers": "accept, accept-language, content-language, content-type, x-custom",
        "access-control-max-age": "120"}, id="credentials"),
    pytest.param({"origins": ["*"], "allow_methods": ["*"], "allow_headers": ["*"]},
                 preflight(OTHER, "PURGE", "X-One,X-Two"), {
        "access-control-allow-origin": "*", "access-control-allow-methods": "PURGE",
        "access-control-allow-headers": "x-one, x-two", "access-control-max-age": "600"},
                 id="any origin, method and header are echoed"),
    pytest.param({"origins": [APP], "allow_methods": ["*"], "allow_credentials": True},
                 preflight(APP, "DELETE"), {
        "access-control-allow-origin": APP, "access-control-allow-credentials": "true",
        "access-control-allow-methods": "DELETE", "access-control-max-age": "600"},
                 id="any method with credentials is echoed, never *"),
    pytest.param({"origins": [APP]}, preflight(APP, "POST", "Content-Type"), {
        "access-control-allow-origin": APP, "access-control-allow-methods": "GET, HEAD, POST",
        "access-control-allow-headers": "accept, accept-language, content-language, content-type",
        "access-control-max-age": "600"}, id="safelisted header needs no listing"),
    *[pytest.param(PUT_DELETE, preflight(APP, method, "X-Custom"), {
        "access-control-allow-origin": APP, "access-control-allow-methods": "PUT, DELETE",
        "access-control-allow-headers": "accept, accept-language, content-language, content-type, x-custom",
        "access-control-max-age": "600"}, id=f"safelisted method {method} needs no listing")
      for method in ("GET", "HEAD", "POST")],
    pytest.param({"origins": [APP], "allow_methods": []}, preflight(APP, "GET", "Accept"), {
        "access-control-allow-origin": APP,
        "access-control-allow-headers": "accept, accept-language, content-language, content-type",
        "access-control-max-age": "600"}, id="no methods listed, no Allow-Methods"),
    pytest.param({"origins": [APP], "allow_methods": ["patch", "Delete", "PATCH"]}, preflight(APP, "PATCH"), {
        "access-control-allow-origin": APP, "access-control-allow-methods": "PATCH, DELETE",
        "access-control-max-age": "600"}, id="configured methods are upper-cased, once each"),
])
def test_preflight_allowed(make: Callable[..., TestApp], inner: Recorder, options: dict[str, Any],
                           request_headers: dict[str, str], expected: dict[str, str]) -> None:
    response = make(**options).options("/api/thing", headers=request_headers)
    assert response.status_int == 204
    assert response.body == b""
    assert cors_headers(response) == expected
    assert response.headers["Vary"] == "Origin, Access-Control-Request-Method, Access-Control-Request-Headers"
    assert inner.seen == [], "an allowed preflight must not reach inner layers or the app"


@pytest.mark.parametrize(("options", "request_headers", "message"), [
    pytest.param(PUT_JSON, preflight(OTHER, "PUT"),
                 "CORS preflight refused: the origin is not allowed.", id="disallowed origin"),
    pytest.param(PUT_JSON, preflight("https://app.example.org.evil.net", "PUT"),
                 "CORS preflight refused: the origin is not allowed.", id="origin suffix trick"),
    pytest.param(PUT_JSON, preflight(APP, "DELETE"),
                 "CORS preflight refused: the requested method is not allowed (allowed: GET, HEAD, POST, PUT).",
                 id="disallowed method"),
    pytest.param(PUT_JSON, preflight(APP, "put"),
                 "CORS preflight refused: the requested method is not allowed (allowed: GET, HEAD, POST, PUT); "
                 "method names are case-sensitive, so the page must send 'PUT'.",
                 id="method names are case-sensitive"),
    pytest.param(PUT_DELETE, preflight(APP, "PATCH", "X-Custom"),
                 "CORS preflight refused: the requested method is not allowed "
                 "(allowed: GET, HEAD, POST, PUT, DELETE).", id="disallowed method, safelisted ones named"),
    pytest.param({"origins": [APP], "allow_methods": ["patch"]}, preflight(APP, "patch"),
                 "CORS preflight refused: the requested method is not allowed (allowed: GET, HEAD, POST, PATCH); "
                 "method names are case-sensitive, so the page must send 'PATCH'.",
                 id="a page's lower-case patch is not PATCH"),
    pytest.param(PUT_DELETE, preflight(APP, "get"),
                 "CORS preflight refused: the requested method is not allowed (allowed: GET, HEAD, POST, PUT, "
                 "DELETE); method names are case-sensitive, so the page must send 'GET'.",
                 id="safelisted methods are case-sensitive too"),
    pytest.param(PUT_JSON, preflight(APP, "PUT", "X-Custom, X-Secret"),
                 "CORS preflight refused: the requested header x-secret is not allowed "
                 "(allowed: accept, accept-language, content-language, content-type, x-custom).",
                 id="disallowed header"),
    pytest.param({"origins": [APP], "allow_headers": ["*"]}, preflight(APP, "POST", "x a"),
                 "CORS preflight refused: the requested header (not a token) is not allowed",
                 id="header that is not a token"),
    pytest.param({"origins": [APP]},
                 preflight(APP, "GET", **{"Access-Control-Request-Private-Network": "true"}),
                 "CORS preflight refused: private network access is not allowed "
                 "(allow_private_network is false).", id="private network off by default"),
    pytest.param({"origins": [APP], "allow_private_network": True},
                 preflight(OTHER, "GET", **{"Access-Control-Request-Private-Network": "true"}),
                 "CORS preflight refused: the origin is not allowed.",
                 id="private network on, disallowed origin"),
])
def test_preflight_refused(make: Callable[..., TestApp], inner: Recorder, options: dict[str, Any],
                           request_headers: dict[str, str], message: str) -> None:
    response = make(**options).options("/api/thing", headers=request_headers, status=403)
    assert cors_headers(response) == {}
    assert response.headers["Vary"] == "Origin"
    assert response.json["error"]["code"] == 403
    assert response.json["error"]["message"].startswith(message)
    assert inner.seen == []


def test_private_network_allowed_only_when_asked(make: Callable[..., TestApp]) -> None:
    app = make(origins=[APP], allow_private_network=True)
    asked = app.options("/", headers=preflight(APP, "GET", **{
        "Access-Control-Request-Private-Network": "true"}))
    assert asked.status_int == 204
    assert asked.headers["Access-Control-Allow-Private-Network"] == "true"
    plain = app.options("/", headers=preflight(APP, "GET"))
    assert "Access-Control-Allow-Private-Network" not in plain.headers


def test_options_without_request_method_reaches_the_app(make: Callable[..., TestApp],
                                                        inner: Recorder) -> None:
    response = make(**EXACT).options("/", headers={"Origin": APP})
    assert response.status_int == 200
    assert cors_headers(response) == {"access-control-allow-origin": APP}
    assert inner.seen == [("OPTIONS", "/")]


# --- per-path rules ----------------------------------------------------------------------

ADMIN = "https://admin.example.org"


@pytest.mark.parametrize(("options", "path", "origin", "allowed"), [
    pytest.param({"rules": [{"paths": ["/api/*"], "origins": [APP]},
                            {"paths": ["/api/admin/*"], "origins": [ADMIN]}]},
                 "/api/admin/users", ADMIN, False, id="first rule wins, not the longest pattern"),
    pytest.param({"rules": [{"paths": ["/api/*"], "origins": [APP]},
                            {"paths": ["/api/admin/*"], "origins": [ADMIN]}]},
                 "/api/admin/users", APP, True, id="first rule applies"),
    pytest.param({"rules": [{"paths": ["/api/admin/*"], "origins": [ADMIN]},
                            {"paths": ["/api/*"], "origins": [APP]}]},
                 "/api/admin/users", ADMIN, True, id="more specific rule first"),
    pytest.param({"origins": [APP], "rules": [{"paths": ["/public/*"], "origins": ["*"]}]},
                 "/other", OTHER, False, id="no rule matches, top level applies"),
    pytest.param({"origins": [APP], "rules": [{"paths": ["/public/*"], "origins": ["*"]}]},
                 "/public/x", OTHER, True, id="rule replaces origins"),
    pytest.param({"origins": [APP], **REGEX, "rules": [{"paths": ["/internal/*"], "origins": []}]},
                 "/internal/x", "https://pr-7.preview.example.org", False,
                 id="a rule's origins replace the top level's origin_regex too"),
    pytest.param({"origins": [APP], "rules": [{"paths": ["/pr/*"], **REGEX}]},
                 "/pr/x", APP, False, id="a rule's origin_regex replaces the top level's origins too"),
    pytest.param({"origins": [APP], "rules": [{"paths": ["/pr/*"], **REGEX}]},
                 "/pr/x", "https://pr-7.preview.example.org", True, id="a rule's origin_regex applies"),
    pytest.param({"origins": [APP], **REGEX, "rules": [{"paths": ["/pr/*"], "max_age": 5}]},
                 "/pr/x", "https://pr-7.preview.example.org", True,
                 id="a rule that names no origins keeps both of the top level's lists"),
    pytest.param({"rules": [{"paths": ["/api/*"], "origins": [APP]}]},
                 "/API/x", APP, False, id="paths are case-sensitive"),
    pytest.param({"rules": [{"paths": ["/files/a b"], "origins": [APP]}]},
                 "/files/a%20b", APP, True, id="percent-decoded path"),
    pytest.param({"rules": [{"paths": ["/files/a b"], "origins": [APP]}]},
                 "/files/a+b", APP, False, id="plus is not a space"),
    pytest.param({"rules": [{"paths": ["/files/a+b"], "origins": [APP]}]},
                 "/files/a+b", APP, True, id="plus matches plus"),
    pytest.param({"rules": [{"paths": ["/café/*"], "origins": [APP]}]},
                 "/caf%C3%A9/menu", APP, True, id="utf-8 path"),
])
def test_rules(make: Callable[..., TestApp], options: dict[str, Any], path: str, origin: str,
               allowed: bool) -> None:
    response = make(**options).get(path, headers={"Origin": origin})
    assert ("access-control-allow-origin" in cors_headers(response)) is allowed


def test_rule_inherits_unset_keys(make: Callable[..., TestApp]) -> None:
    app = make(origins=[APP], allow_credentials=True, expose_headers=["X-Total"],
               rules=[{"paths": ["/partner/*"], "origins": [ADMIN]}])
    response = app.get("/partner/x", headers={"Origin": ADMIN})
    assert cors_headers(response) == {
        "access-control-allow-origin": ADMIN, "access-control-allow-credentials": "true",
        "access-control-expose-headers": "X-Total"}


def test_rule_without_origins_leaves_the_path_alone(make: Callable[..., TestApp],
                                                    inner: Recorder) -> None:
    app = make(origins=[APP], rules=[{"paths": ["/internal/*"], "origins": []}])
    response = app.options("/internal/x", headers=preflight(APP, "PUT"))
    assert response.status_int == 200
    assert cors_headers(response) == {}
    assert "Vary" not in response.headers
    assert inner.seen == [("OPTIONS", "/internal/x")]


# --- logging -----------------------------------------------------------------------------

def test_refusal_log_cannot_be_forged(make: Callable[..., TestApp],
                                      caplog: pytest.LogCaptureFixture) -> None:
    app = make(**EXACT)
    with caplog.at_level(logging.INFO, logger="wsgistack.cors"):
        app.options("/x%0d%0a2024-01-01 INFO forged%1b[31m", headers=preflight(OTHER, "PUT"), status=403)
    (record,) = [r for r in caplog.records if r.name == "wsgistack.cors"]
    text = record.getMessage()
    assert "\n" not in text and "\r" not in text and "\x1b" not in text
    assert "path /x\\x0d\\x0a2024-01-01 INFO forged\\x1b[31m" in text
    assert f"origin {OTHER}" in text


# --- lint --------------------------------------------------------------------------------

@pytest.mark.parametrize(("options", "warnings"), [
    pytest.param({"origin_regex": ["https://app.example.org"]},
                 ["origin_regex 'https://app.example.org' has an unescaped '.', which matches any "
                  "character (https://appXexample.org too); write '\\.' for a dot"], id="unescaped dot"),
    pytest.param({"origin_regex": [r"https://.*\.example\.org", r"https://[a-z.]+\.example\.org"]}, [],
                 id="escaped dots, quantified dot and dot in a class"),
    pytest.param({"origin_regex": [r"https://app\\.example\.org"]},
                 [r"origin_regex 'https://app\\\\.example\\.org' has an unescaped '.'"],
                 id="escaped backslash then dot"),
    pytest.param({"rules": [{"paths": ["/a/*"], "origin_regex": ["https://x.y"]}]},
                 ["rules[0].origin_regex 'https://x.y' has an unescaped '.'"], id="regex in a rule"),
    pytest.param({"origins": ["http://app.example.org", "http://localhost:3000"],
                  "allow_credentials": True},
                 ["origins entry 'http://app.example.org' is plain http while allow_credentials is true"],
                 id="cleartext origin with credentials"),
    pytest.param({"rules": [{"paths": ["/api/*"], "origins": [APP]},
                            {"paths": ["/api/admin/*"], "origins": [ADMIN]}]},
                 ["rules[1].paths '/api/admin/*' is already matched by rules[0] ('/api/*'); "
                  "the first matching rule wins, so it never applies"], id="shadowed rule"),
    pytest.param({"origins": [APP], "allow_credentials": True, "expose_headers": ["*"]},
                 ["expose_headers '*' is read as a header named '*' on requests with credentials (Fetch): "
                  "browsers expose nothing by it here; list the header names"], id="expose * with credentials"),
    pytest.param({"origins": [APP], "expose_headers": ["*"]}, [], id="expose * without credentials"),
    pytest.param({"origins": [APP], "allow_credentials": True}, [], id="clean"),
])
def test_lint(options: dict[str, Any], warnings: list[str]) -> None:
    found = CORSMiddleware.lint(CORSOptions(**options))
    assert len(found) == len(warnings)
    for text, start in zip(found, warnings, strict=True):
        assert text.startswith(start)


# --- through stack.yaml ------------------------------------------------------------------

def test_yaml_stack(make_stack: Callable[..., Any]) -> None:
    stack = make_stack(
        "pipeline:\n"
        "  - errors: {format: envelope}\n"
        "  - cors:\n"
        "      origins: [https://app.example.org, 'https://*.example.org']\n"
        "      allow_credentials: true\n"
        "      allow_methods: [GET, PUT]\n"
        "      rules:\n"
        "        - paths: ['/public/*']\n"
        "          origins: ['*']\n"
        "          allow_credentials: false\n"
    )
    answered = stack.options("/api/v1/search", headers=preflight("https://a.example.org", "PUT"))
    assert answered.status_int == 204
    assert answered.headers["Access-Control-Allow-Origin"] == "https://a.example.org"
    stack.options("/api/v1/search", headers=preflight("https://example.org.evil.net", "PUT"), status=403)


@pytest.mark.parametrize(("layer", "path", "spend", "status"), [
    pytest.param({"versioning": {"supported": ["v1", "v2"]}}, "/api/v9/x", 0, 404, id="versioning 404"),
    pytest.param({"ratelimit": {"limits": ["1/minute"]}}, "/x", 1, 429, id="ratelimit 429"),
    pytest.param({"auth": {"secret": "s" * 40}}, "/x", 0, 401, id="auth 401"),
])
def test_inner_layer_refusals_vary_on_origin(make_stack: Callable[..., Any], layer: dict[str, Any], path: str,
                                             spend: int, status: int) -> None:
    stack = make_stack({"app": {"factory": "stack_support:echo_app"},
                        "pipeline": [{"errors": {"format": "envelope"}}, {"cors": {"origins": [APP]}}, layer]})
    for _ in range(spend):
        stack.get(path)
    plain = stack.get(path, status=status)
    assert cors_headers(plain) == {}
    assert plain.headers.getall("Vary") == ["Origin"]
    allowed = stack.get(path, headers={"Origin": APP}, status=status)
    assert cors_headers(allowed) == {"access-control-allow-origin": APP}
    assert allowed.headers.getall("Vary") == ["Origin"]


BOTH_TOP = {"origins": [APP], "allow_methods": ["PUT", "DELETE"], "allow_headers": ["X-A", "X-B"],
            "allow_private_network": True}
BOTH_RULE = {"paths": ["/api/v2/*"], "allow_methods": ["PUT", "PATCH"], "allow_headers": ["x-b", "X-C"],
             "max_age": 60}


@pytest.mark.parametrize(("options", "request_headers", "status", "expected"), [
    pytest.param({**BOTH_TOP, "rules": [BOTH_RULE]}, preflight(APP, "PUT", "X-B"), 204, {
        "access-control-allow-origin": APP, "access-control-allow-methods": "PUT",
        "access-control-allow-headers": "accept, accept-language, content-language, content-type, x-b",
        "access-control-max-age": "60"}, id="the methods and headers both allow, the shorter max_age"),
    pytest.param({**BOTH_TOP, "rules": [BOTH_RULE]}, preflight(APP, "DELETE"), 403, {},
                 id="a method the routed path's rule does not allow"),
    pytest.param({**BOTH_TOP, "rules": [BOTH_RULE]}, preflight(APP, "PUT", "X-A"), 403, {},
                 id="a header the routed path's rule does not allow"),
    pytest.param({**BOTH_TOP, "rules": [{**BOTH_RULE, "allow_private_network": False}]},
                 preflight(APP, "PUT", **{"Access-Control-Request-Private-Network": "true"}), 403, {},
                 id="private network access the routed path's rule does not allow"),
    pytest.param({**BOTH_TOP, "allow_methods": ["*"], "rules": [BOTH_RULE]}, preflight(APP, "PATCH"), 204, {
        "access-control-allow-origin": APP, "access-control-allow-methods": "PUT, PATCH",
        "access-control-max-age": "60"}, id="any method at the top level: the rule's methods"),
    pytest.param({**BOTH_TOP, "rules": [{**BOTH_RULE, "allow_methods": ["*"]}]}, preflight(APP, "DELETE"), 204, {
        "access-control-allow-origin": APP, "access-control-allow-methods": "PUT, DELETE",
        "access-control-max-age": "60"}, id="any method in the rule: the top level's methods"),
    pytest.param({"origins": ["*"], "rules": [{"paths": ["/api/v2/*"], "origins": ["*"], "max_age": 5}]},
                 {"Origin": OTHER}, 200, {"access-control-allow-origin": "*"}, id="any origin in both: *"),
    pytest.param({"origins": ["*"], "rules": [{"paths": ["/api/v2/*"], "origins": [APP]}]},
                 {"Origin": OTHER}, 200, {}, id="any origin at the top level only"),
])
def test_a_path_routed_elsewhere_gets_what_both_policies_grant(
        make_stack: Callable[..., Any], options: dict[str, Any], request_headers: dict[str, str], status: int,
        expected: dict[str, str]) -> None:
    """/api/config (the top level's) is routed to /api/v2/config (the rule's): a request to it is granted
    only what both policies grant."""
    stack = make_stack({"app": {"factory": "stack_support:echo_app"},
                        "pipeline": [{"errors": {"format": "envelope"}}, {"cors": options},
                                     {"versioning": {"supported": ["v1", "v2"], "default": "v2"}}]})
    method = "OPTIONS" if "Access-Control-Request-Method" in request_headers else "GET"
    response = stack.request("/api/config", method=method, headers=request_headers, status=status)
    assert cors_headers(response) == expected
    if status == 200:
        assert response.json["path"] == "/api/v2/config"


def test_yaml_refuses_credentials_with_star(make_stack: Callable[..., Any]) -> None:
    from config import ConfigError

    with pytest.raises(ConfigError) as info:
        make_stack("pipeline:\n  - cors: {origins: ['*'], allow_credentials: true}\n")
    assert "allow_credentials may not be true when origins contains '*'" in str(info.value)


def test_options_star_is_not_a_preflight(make: Callable[..., TestApp], inner: Recorder) -> None:
    """OPTIONS * asks about the server, not a resource: no preflight answer grants a method for it."""
    app = make(origins=[APP], allow_methods=["GET", "PUT"])
    response = TestApp(app.app, lint=False).request(
        "/", method="OPTIONS", environ={"PATH_INFO": "*"},
        headers={"Origin": APP, "Access-Control-Request-Method": "PUT"})
    assert inner.seen == [("OPTIONS", "*")]  # passed on, to the layers that answer for the server
    assert "Access-Control-Allow-Methods" not in response.headers


def test_a_preflight_to_the_root_of_a_url_prefix_is_answered(make: Callable[..., TestApp], inner: Recorder) -> None:
    """Requested as exactly the prefix (/svc), the path is empty (PEP 3333): a resource like any other."""
    app = make(origins=[APP], allow_methods=["GET", "PUT"])
    response = app.options("/", headers={"Origin": APP, "Access-Control-Request-Method": "PUT"},
                           extra_environ={"SCRIPT_NAME": "/svc", "PATH_INFO": ""}, status=204)
    assert "PUT" in response.headers["Access-Control-Allow-Methods"]
    assert inner.seen == []


def inner_app_never_called(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    raise AssertionError("not called")


def test_the_origins_a_policy_remembers_are_bounded() -> None:
    """Random Origin values, as a flood may send, only ever cost a fresh match."""
    policy = CORSMiddleware(inner_app_never_called, CORSOptions(origins=["https://*.example.org"]), Context()).default
    for i in range(3000):
        policy.allows(f"https://host{i}.example.net")
    assert len(policy.seen) <= 1024
    assert policy.allows("https://app.example.org") and not policy.allows("https://app.example.net")


def test_origins_no_site_could_send_are_not_remembered() -> None:
    """The layer remembers the origins it judged (1024 at most); one of 256 KiB, a thousand times, would be
    a quarter of a gigabyte: past the length of any origin, it is judged again each time."""
    layer = CORSMiddleware(lambda e, s: [], CORSOptions(origins=("https://*.example.org",)), Context())
    for i in range(20):
        assert not layer.default.allows(f"https://{i}" + "a" * 20_000 + ".example.net")
    assert layer.default.allows("https://" + "b" * 250 + ".example.org")
    assert layer.default.allows("https://" + "c" * 20_000 + ".example.org")  # judged all the same, not kept
    assert len(layer.default.seen) == 1
