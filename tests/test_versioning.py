"""The versioning layer: sources, precedence, conflicts, refusals, default rewriting, deprecation."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import pytest
from pydantic import ValidationError
from webtest import TestApp
from werkzeug.exceptions import abort
from werkzeug.wrappers import Response

from middleware.base import API_VERSION, IDENTITY, Context, Identity, decoded_path, refuse
from middleware.cache import CacheMiddleware
from middleware.errors import ErrorsMiddleware
from middleware.versioning import ORIG_PATH, SOURCE, VersioningMiddleware
from stores.memory import MemoryStore

V1_V2 = {"supported": ["v1", "v2"]}
WRITTEN_LOOSELY = {"supported": ["1", " V2 "]}
ACCEPT_FIRST = {**V1_V2, "precedence": ["accept", "url", "header"]}
VND = "application/vnd.wsgistack."


class Seen:
    """An inner app that records the environ facts versioning sets, and answers 200."""

    def __init__(self) -> None:
        self.environ: dict[str, Any] = {}
        self.calls = 0

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        self.calls += 1
        self.environ = dict(environ)
        if environ["PATH_INFO"].endswith("/forbidden"):
            raise refuse(403, "Not yours.")
        body = f"{environ['PATH_INFO']} {environ.get(API_VERSION)}".encode()
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
        return [body]


@pytest.fixture
def seen() -> Seen:
    """The recording inner app."""
    return Seen()


@pytest.fixture
def make(seen: Seen) -> Callable[..., tuple[TestApp, Context]]:
    """Build errors -> versioning -> seen from keyword options."""

    def build(**options: Any) -> tuple[TestApp, Context]:
        context = Context()
        layer = VersioningMiddleware(seen, VersioningMiddleware.Options(**options), context)
        return TestApp(ErrorsMiddleware(layer, ErrorsMiddleware.Options(), context)), context

    return build


@pytest.mark.parametrize(("options", "path", "request_headers", "expected"), [
    pytest.param(V1_V2, "/api/v1/search", {}, ("/api/v1/search", "v1", "url"), id="url v1"),
    pytest.param(V1_V2, "/api/v2/search", {}, ("/api/v2/search", "v2", "url"), id="url v2"),
    pytest.param(V1_V2, "/api/search", {"X-API-Version": "v2"}, ("/api/v2/search", "v2", "header"),
                 id="header rewrites the path"),
    pytest.param(V1_V2, "/api/search", {"X-API-Version": " V2 "}, ("/api/v2/search", "v2", "header"),
                 id="header trimmed and lowercased"),
    pytest.param(V1_V2, "/api/search", {"X-API-Version": "2"}, ("/api/v2/search", "v2", "header"),
                 id="header bare number"),
    pytest.param({**V1_V2, "header": "Api-Version"}, "/api/search", {"Api-Version": "v2"},
                 ("/api/v2/search", "v2", "header"), id="custom header name"),
    pytest.param(V1_V2, "/api/search", {"Accept": f"{VND}v2+json"}, ("/api/v2/search", "v2", "accept"),
                 id="accept vendor type"),
    pytest.param(V1_V2, "/api/search", {"Accept": f"{VND}v2"}, ("/api/v2/search", "v2", "accept"),
                 id="accept vendor type without suffix"),
    pytest.param(V1_V2, "/api/search", {"Accept": f"{VND}v1+json;q=0.5, {VND}v2+json"},
                 ("/api/v2/search", "v2", "accept"), id="accept highest quality wins"),
    pytest.param(V1_V2, "/api/search", {"Accept": f"{VND}v9+json, {VND}v1+json;q=0.1"},
                 ("/api/v1/search", "v1", "accept"), id="accept skips unsupported for a supported one"),
    pytest.param(V1_V2, "/api/search", {"Accept": f"{VND}v2+json;q=0, application/json"},
                 ("/api/v1/search", "v1", "default"), id="accept q=0 ignored"),
    pytest.param(V1_V2, "/api/search", {"Accept": f"{VND}v1+json;q=0.5, {VND}v2+json;q=1."},
                 ("/api/v2/search", "v2", "accept"), id="accept q=1. (RFC 9110: digits after the dot optional)"),
    pytest.param(V1_V2, "/api/search", {"Accept": f"{VND}v2+json;q=0., {VND}v1+json;q=0.1"},
                 ("/api/v1/search", "v1", "accept"), id="accept q=0. is q=0"),
    pytest.param(V1_V2, "/api/search", {"Accept": f"{VND}v2+json;charset=utf-8; Q=0., application/json"},
                 ("/api/v1/search", "v1", "default"), id="accept Q=0. after a parameter"),
    pytest.param(V1_V2, "/api/search", {"Accept": "application/json"}, ("/api/v1/search", "v1", "default"),
                 id="plain json accept falls back"),
    pytest.param({**V1_V2, "media_type_prefix": "application/vnd.acme."}, "/api/search",
                 {"Accept": "application/vnd.acme.v2+json"}, ("/api/v2/search", "v2", "accept"),
                 id="custom media type prefix"),
    pytest.param(V1_V2, "/api/search", {}, ("/api/v1/search", "v1", "default"), id="default is first supported"),
    pytest.param({**V1_V2, "default": "v2"}, "/api/search", {}, ("/api/v2/search", "v2", "default"),
                 id="default option"),
    pytest.param(V1_V2, "/api", {}, ("/api/v1", "v1", "default"), id="bare prefix"),
    pytest.param(V1_V2, "/api/", {}, ("/api/v1/", "v1", "default"), id="prefix with slash"),
    pytest.param(V1_V2, "/api/v1", {}, ("/api/v1", "v1", "url"), id="url version only"),
    pytest.param({**V1_V2, "prefix": "/service/api"}, "/service/api/x", {"X-API-Version": "v2"},
                 ("/service/api/v2/x", "v2", "header"), id="custom prefix"),
    pytest.param(V1_V2, "/api/v1/search", {"X-API-Version": "v1"}, ("/api/v1/search", "v1", "url"),
                 id="url and header agree"),
    pytest.param(V1_V2, "/api/v1/search", {"Accept": f"{VND}v2+json"}, ("/api/v1/search", "v1", "url"),
                 id="url outranks accept by default"),
    pytest.param({**V1_V2, "precedence": ["accept", "url", "header"]}, "/api/v1/search",
                 {"Accept": f"{VND}v2+json"}, ("/api/v2/search", "v2", "accept"), id="accept first rewrites url"),
    pytest.param(V1_V2, "/api/search", {"X-API-Version": "v1", "Accept": f"{VND}v2+json"},
                 ("/api/v1/search", "v1", "header"), id="header outranks accept by default"),
    pytest.param({**V1_V2, "precedence": ["url", "accept", "header"]}, "/api/search",
                 {"X-API-Version": "v1", "Accept": f"{VND}v2+json"}, ("/api/v2/search", "v2", "accept"),
                 id="accept outranks header when first"),
    pytest.param({**V1_V2, "precedence": ["url"]}, "/api/search",
                 {"X-API-Version": "v9", "Accept": f"{VND}v9+json"}, ("/api/v1/search", "v1", "default"),
                 id="sources left out are ignored"),
    pytest.param(V1_V2, "/api/V2/search", {}, ("/api/v2/search", "v2", "url"),
                 id="url version case ignored, path rewritten"),
    pytest.param(V1_V2, "/api/V1", {"X-API-Version": "v1"}, ("/api/v1", "v1", "url"),
                 id="url version case ignored, agrees with the header"),
    pytest.param(WRITTEN_LOOSELY, "/api/search", {"X-API-Version": "1"}, ("/api/v1/search", "v1", "header"),
                 id="supported written as a number, header as a number"),
    pytest.param(WRITTEN_LOOSELY, "/api/search", {"X-API-Version": "v2"}, ("/api/v2/search", "v2", "header"),
                 id="supported written in upper case, header in lower case"),
    pytest.param(WRITTEN_LOOSELY, "/api/search", {"Accept": f"{VND}2+json"}, ("/api/v2/search", "v2", "accept"),
                 id="supported written loosely, accept as a number"),
    pytest.param(WRITTEN_LOOSELY, "/api/v2/search", {}, ("/api/v2/search", "v2", "url"),
                 id="supported written loosely, url"),
    pytest.param(WRITTEN_LOOSELY, "/api/V2/search", {}, ("/api/v2/search", "v2", "url"),
                 id="supported written loosely, url in upper case"),
])
def test_version_sources(make: Callable[..., tuple[TestApp, Context]], seen: Seen, options: dict[str, Any],
                         path: str, request_headers: dict[str, str], expected: tuple[str, str, str]) -> None:
    web, _ = make(**options)
    web.get(path, headers=request_headers)
    assert (seen.environ["PATH_INFO"], seen.environ[API_VERSION], seen.environ[SOURCE]) == expected
    if expected[0] != path:
        assert seen.environ[ORIG_PATH] == path
    else:
        assert ORIG_PATH not in seen.environ


@pytest.mark.parametrize(("accept", "expected"), [
    pytest.param(f"{VND}v9+json, application/json;q=0.5", ("/api/v1/search", "v1", "default"),
                 id="plain JSON accepted too: the default"),
    pytest.param(f"{VND}v9+json, */*;q=0.1", ("/api/v1/search", "v1", "default"), id="anything accepted too"),
    pytest.param(f'application/json;profile="{VND}v2+json"', ("/api/v1/search", "v1", "default"),
                 id="the vendor type named in a parameter asks for nothing"),
    pytest.param(f"{VND}v9+json, application/*", ("/api/v1/search", "v1", "default"),
                 id="any application type accepted too"),
    pytest.param(f"{VND}v9+json, {VND}v2+json;q=0.2, */*", ("/api/v2/search", "v2", "accept"),
                 id="a supported vendor type still decides"),
])
def test_accept_with_plain_json_falls_back(make: Callable[..., tuple[TestApp, Context]], seen: Seen, accept: str,
                                           expected: tuple[str, str, str]) -> None:
    web, _ = make(**V1_V2)
    web.get("/api/search", headers={"Accept": accept})
    assert (seen.environ["PATH_INFO"], seen.environ[API_VERSION], seen.environ[SOURCE]) == expected


@pytest.mark.parametrize(("path_info", "headers", "status", "expected"), [
    pytest.param("//api/search", {}, 200, ("/api/v1/search", "v1", "default"), id="no version: the default"),
    pytest.param("//api/v2/search", {}, 200, ("//api/v2/search", "v2", "url"), id="the URL's version"),
    pytest.param("///api/V2/search", {}, 200, ("/api/v2/search", "v2", "url"), id="upper case, rewritten"),
    pytest.param("//api/v1/search", {"X-API-Version": "v2"}, 400, None, id="disagreeing header refused"),
    pytest.param("//api/v9/search", {}, 404, None, id="unsupported version refused"),
])
def test_leading_slashes_count_as_one(make: Callable[..., tuple[TestApp, Context]], seen: Seen, path_info: str,
                                      headers: dict[str, str], status: int,
                                      expected: tuple[str, str, str] | None) -> None:
    # Waitress merges them; gunicorn passes them on, and werkzeug routes //api/v1/x as /api/v1/x.
    web, _ = make(**V1_V2)
    web.get("/", headers=headers, extra_environ={"PATH_INFO": path_info}, status=status)
    if expected is None:
        assert seen.calls == 0
    else:
        assert (seen.environ["PATH_INFO"], seen.environ[API_VERSION], seen.environ[SOURCE]) == expected


@pytest.mark.parametrize("path", ["/health", "/apis/v1", "/", "/static/api/v1"])
def test_outside_the_prefix_nothing_happens(make: Callable[..., tuple[TestApp, Context]], seen: Seen,
                                            path: str) -> None:
    web, _ = make(**V1_V2)
    response = web.get(path, headers={"X-API-Version": "v9"})
    assert seen.environ["PATH_INFO"] == path
    assert API_VERSION not in seen.environ
    assert "Vary" not in response.headers


SUPPORTED = ["v1", "v2"]
UNREADABLE_ACCEPT = (f"The Accept header names the media type {VND}… but cannot be read (a q value must be a "
                     f"number from 0 to 1, and quotes must pair); send, for example, {VND}v2+json.")


@pytest.mark.parametrize(("options", "path", "request_headers", "status", "message", "details"), [
    pytest.param(V1_V2, "/api/v1/search", {"X-API-Version": "v2"}, 400,
                 "The URL asks for API version v1 but the X-API-Version header asks for v2; "
                 "send one, or make them agree.", {"url": "v1", "header": "v2", "supported": SUPPORTED},
                 id="url and header disagree"),
    pytest.param({**V1_V2, "precedence": ["header", "url", "accept"]}, "/api/v2/search",
                 {"X-API-Version": "v1"}, 400,
                 "The URL asks for API version v2 but the X-API-Version header asks for v1; "
                 "send one, or make them agree.", {"url": "v2", "header": "v1", "supported": SUPPORTED},
                 id="url and header disagree whatever the precedence"),
    pytest.param(V1_V2, "/api/search", {"X-API-Version": "v9"}, 400,
                 "API version 'v9' from the X-API-Version header is not supported (supported: v1, v2).",
                 {"version": "v9", "source": "header", "supported": SUPPORTED}, id="unsupported header"),
    pytest.param(V1_V2, "/api/search", {"X-API-Version": " V9 "}, 400,
                 "API version 'v9' from the X-API-Version header is not supported (supported: v1, v2).",
                 {"version": "v9", "source": "header", "supported": SUPPORTED}, id="unsupported header, normal form"),
    pytest.param(V1_V2, "/api/search", {"X-API-Version": "9"}, 400,
                 "API version 'v9' from the X-API-Version header is not supported (supported: v1, v2).",
                 {"version": "v9", "source": "header", "supported": SUPPORTED}, id="a bare number is vN there too"),
    pytest.param(V1_V2, "/api/v1/search", {"X-API-Version": "banana"}, 400,
                 "API version 'banana' from the X-API-Version header is not supported (supported: v1, v2).",
                 {"version": "banana", "source": "header", "supported": SUPPORTED},
                 id="garbage header even with url"),
    pytest.param(V1_V2, "/api/search", {"Accept": f"{VND}v9+json"}, 406,
                 "API version 'v9' in the Accept header is not supported (supported: v1, v2).",
                 {"version": "v9", "source": "accept", "supported": SUPPORTED}, id="unsupported accept"),
    pytest.param(V1_V2, "/api/v1/search", {"Accept": f"{VND}v3+json, {VND}v4+json;q=0.5"}, 406,
                 "API version 'v3, v4' in the Accept header is not supported (supported: v1, v2).",
                 {"version": "v3, v4", "source": "accept", "supported": SUPPORTED},
                 id="only unsupported vendor types, even with url"),
    pytest.param(V1_V2, "/api/search", {"Accept": f"{VND}v9+json, application/json;q=0, */*;q=0"}, 406,
                 "API version 'v9' in the Accept header is not supported (supported: v1, v2).",
                 {"version": "v9", "source": "accept", "supported": SUPPORTED},
                 id="plain JSON and anything refused with q=0: no fallback to the default"),
    pytest.param(V1_V2, "/api/search", {"Accept": f"{VND}v2+json;q=2"}, 400, UNREADABLE_ACCEPT,
                 {"source": "accept", "supported": SUPPORTED}, id="accept with q above 1 is not the default"),
    pytest.param(V1_V2, "/api/search", {"Accept": f"{VND}v2+json;q=abc, application/json"}, 400, UNREADABLE_ACCEPT,
                 {"source": "accept", "supported": SUPPORTED}, id="accept with q not a number, plain json beside"),
    pytest.param(V1_V2, "/api/v1/search", {"Accept": f'{VND}v2+json"'}, 400, UNREADABLE_ACCEPT,
                 {"source": "accept", "supported": SUPPORTED}, id="accept that cannot be split"),
    pytest.param(V1_V2, "/api/search", {"Accept": f"{VND}v2+json;q=2, {VND}v1+json;q=0.1"}, 400, UNREADABLE_ACCEPT,
                 {"source": "accept", "supported": SUPPORTED},
                 id="an unreadable vendor type beside a readable one is not skipped for it"),
    pytest.param(V1_V2, "/api/search", {"Accept": f"{VND}v9+json, {VND}v2+json;q=2"}, 400, UNREADABLE_ACCEPT,
                 {"source": "accept", "supported": SUPPORTED},
                 id="an unreadable vendor type beside an unsupported one is not a 406"),
    pytest.param(V1_V2, "/api/search", {"Accept": f"{VND}v2+json;q=2, {VND}v9+json;q=0"}, 400, UNREADABLE_ACCEPT,
                 {"source": "accept", "supported": SUPPORTED},
                 id="an unreadable vendor type beside a refused one is not the default"),
    pytest.param(V1_V2, "/api/v9/search", {}, 404,
                 "API version 'v9' in the URL is not supported (supported: v1, v2).",
                 {"version": "v9", "source": "url", "supported": SUPPORTED}, id="unsupported url"),
    pytest.param(V1_V2, "/api/V9/search", {}, 404,
                 "API version 'V9' in the URL is not supported (supported: v1, v2).",
                 {"version": "V9", "source": "url", "supported": SUPPORTED}, id="unsupported url in upper case"),
    pytest.param(V1_V2, "/api/V1/search", {"X-API-Version": "v2"}, 400,
                 "The URL asks for API version v1 but the X-API-Version header asks for v2; "
                 "send one, or make them agree.", {"url": "v1", "header": "v2", "supported": SUPPORTED},
                 id="url in upper case and header disagree"),
    pytest.param(WRITTEN_LOOSELY, "/api/search", {"X-API-Version": "v3"}, 400,
                 "API version 'v3' from the X-API-Version header is not supported (supported: v1, v2).",
                 {"version": "v3", "source": "header", "supported": SUPPORTED},
                 id="supported written loosely is listed normalised"),
])
def test_refusals(make: Callable[..., tuple[TestApp, Context]], seen: Seen, options: dict[str, Any], path: str,
                  request_headers: dict[str, str], status: int, message: str, details: dict[str, Any]) -> None:
    web, _ = make(**options)
    response = web.get(path, headers=request_headers, status=status)
    assert response.json["error"]["message"] == message
    assert response.json["error"]["details"] == details
    assert seen.calls == 0
    # A refusal a request header decided varies on the headers the layer reads; a URL's does not.
    assert response.headers.get("Vary") == (None if details.get("source") == "url" else "X-API-Version, Accept")


DEPRECATED = {
    "supported": ["v1", "v2"],
    "deprecated": {"v1": {"deprecation": "2024-01-01", "sunset": "2025-06-30",
                          "link": "https://docs.example.org/api/v1-deprecation",
                          "successor": "https://api.example.org/api/v2/"}},
}
V1_HEADERS = [
    ("Deprecation", "@1704067200"),
    ("Sunset", "Mon, 30 Jun 2025 00:00:00 GMT"),
    ("Link", '<https://docs.example.org/api/v1-deprecation>; rel="deprecation"'),
    ("Link", '<https://api.example.org/api/v2/>; rel="successor-version"'),
]


def _notice(response: Any) -> list[tuple[str, str]]:
    return [(k, v) for k, v in response.headerlist if k in ("Deprecation", "Sunset", "Link")]


@pytest.mark.parametrize(("options", "path", "request_headers", "expected"), [
    pytest.param(DEPRECATED, "/api/v1/search", {}, V1_HEADERS, id="deprecated version, all headers"),
    pytest.param(DEPRECATED, "/api/search", {}, V1_HEADERS, id="deprecated default"),
    pytest.param(DEPRECATED, "/api/v2/search", {}, [], id="current version, none"),
    pytest.param(DEPRECATED, "/health", {}, [], id="outside the prefix, none"),
    pytest.param({"supported": ["v1"], "deprecated": {"v1": {"deprecation": "2024-01-01T12:00:00Z"}}},
                 "/api/v1/x", {}, [("Deprecation", "@1704110400")], id="datetime, no sunset, no links"),
    pytest.param({"supported": ["v1"], "deprecated": {"v1": {"deprecation": "2024-01-01",
                                                             "link": "https://d.example/v1"}}},
                 "/api/v1/x", {},
                 [("Deprecation", "@1704067200"), ("Link", '<https://d.example/v1>; rel="deprecation"')],
                 id="deprecation link only"),
])
def test_deprecation_headers(make: Callable[..., tuple[TestApp, Context]], options: dict[str, Any], path: str,
                             request_headers: dict[str, str], expected: list[tuple[str, str]]) -> None:
    web, _ = make(**options)
    assert _notice(web.get(path, headers=request_headers)) == expected


def test_deprecation_headers_on_error_responses(make: Callable[..., tuple[TestApp, Context]]) -> None:
    web, _ = make(**DEPRECATED)
    response = web.get("/api/v1/forbidden", status=403)
    assert response.json["error"]["message"] == "Not yours."
    assert _notice(response) == V1_HEADERS


class OwnHeaders:
    """An inner app that answers with the deprecation headers named in the request's ``X-Own`` header."""

    OWN = {
        "deprecation": ("Deprecation", "@1600000000"),
        "sunset": ("Sunset", "Tue, 01 Jan 2030 00:00:00 GMT"),
        "link-deprecation": ("Link", '<https://own.example/dep>; rel="deprecation"'),
        "link-bare": ("link", "<https://own.example/dep>; rel=Deprecation"),
        "link-help": ("Link", '<https://own.example/help>; rel="help"'),
        "sunset-lower": ("sunset", "Wed, 01 Jan 2031 00:00:00 GMT"),
        "link-upper": ("Link", '<https://own.example/dep>; REL="Deprecation"'),
        "link-both": ("Link", '<https://own.example/next>; rel="successor-version alternate"'),
        "vary": ("Vary", "Cookie"),
    }

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        own = [self.OWN[name] for name in environ.get("HTTP_X_OWN", "").split(",") if name]
        if environ["PATH_INFO"].endswith("/raise"):
            raise refuse(409, "Taken.", headers=own)
        if environ["PATH_INFO"].endswith("/abort"):  # an exception with its own response
            abort(Response("Gone.", 410, headers=[("Cache-Control", "max-age=60"), *own]))
        if environ["PATH_INFO"].endswith("/crash"):
            raise RuntimeError("a bug below the layer")
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2"), *own])
        return [b"ok"]


def _own_headers_stack() -> TestApp:
    context = Context()
    layer = VersioningMiddleware(OwnHeaders(), VersioningMiddleware.Options(**DEPRECATED), context)
    return TestApp(ErrorsMiddleware(layer, ErrorsMiddleware.Options(), context))


DEP, SUN, LINK_DEP, LINK_NEXT = V1_HEADERS


@pytest.mark.parametrize(("path", "own", "status", "expected"), [
    pytest.param("/api/v1/x", "deprecation,sunset", 200,
                 [("Deprecation", "@1600000000"), ("Sunset", "Tue, 01 Jan 2030 00:00:00 GMT"), LINK_DEP, LINK_NEXT],
                 id="the app's own dates win, never a second line"),
    pytest.param("/api/v1/x", "link-deprecation", 200,
                 [("Link", '<https://own.example/dep>; rel="deprecation"'), DEP, SUN, LINK_NEXT],
                 id="the app's deprecation link wins"),
    pytest.param("/api/v1/x", "link-bare", 200,
                 [("Link", "<https://own.example/dep>; rel=Deprecation"), DEP, SUN, LINK_NEXT],
                 id="a bare relation in any case counts"),
    pytest.param("/api/v1/x", "link-both", 200,
                 [("Link", '<https://own.example/next>; rel="successor-version alternate"'), DEP, SUN, LINK_DEP],
                 id="one of several relations counts"),
    pytest.param("/api/v1/x", "link-help", 200,
                 [("Link", '<https://own.example/help>; rel="help"'), *V1_HEADERS], id="other links are kept beside"),
    pytest.param("/api/v1/x", "sunset-lower", 200,
                 [DEP, ("sunset", "Wed, 01 Jan 2031 00:00:00 GMT"), LINK_DEP, LINK_NEXT],
                 id="the app's header in lower case counts"),
    pytest.param("/api/v1/x", "link-upper", 200,
                 [("Link", '<https://own.example/dep>; REL="Deprecation"'), DEP, SUN, LINK_NEXT],
                 id="a relation parameter in upper case counts"),
    pytest.param("/api/v1/raise", "link-help", 409,
                 [("Link", '<https://own.example/help>; rel="help"'), *V1_HEADERS],
                 id="an error's own link does not hide the layer's"),
    pytest.param("/api/v1/raise", "deprecation", 409, [("Deprecation", "@1600000000"), SUN, LINK_DEP, LINK_NEXT],
                 id="an error's own date wins"),
    pytest.param("/api/v1/crash", "", 500, V1_HEADERS, id="an unhandled exception's 500 says it too"),
    pytest.param("/api/v1/abort", "", 410, V1_HEADERS, id="an exception's own response says it too"),
    pytest.param("/api/v1/abort", "link-help", 410,
                 [("Link", '<https://own.example/help>; rel="help"'), *V1_HEADERS],
                 id="an exception's own response keeps its link beside the layer's"),
    pytest.param("/api/v1/abort", "sunset,link-deprecation", 410,
                 [DEP, ("Sunset", "Tue, 01 Jan 2030 00:00:00 GMT"),
                  ("Link", '<https://own.example/dep>; rel="deprecation"'), LINK_NEXT],
                 id="an exception's own response keeps its date and link"),
])
def test_deprecation_headers_beside_the_apps(path: str, own: str, status: int, expected: list[tuple[str, str]]) -> None:
    response = _own_headers_stack().get(path, headers={"X-Own": own}, status=status, expect_errors=True)
    assert sorted(_notice_any_case(response.headerlist)) == sorted(_notice_any_case(expected))


def _notice_any_case(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(k.lower(), v) for k, v in headers if k.lower() in ("deprecation", "sunset", "link")]


@pytest.mark.parametrize(("path", "own", "status", "vary"), [
    pytest.param("/api/abort", "", 410, "X-API-Version, Accept", id="an exception's own response"),
    pytest.param("/api/abort", "vary", 410, "Cookie, X-API-Version, Accept",
                 id="an exception's own response with a Vary of its own"),
    pytest.param("/api/raise", "vary", 409, "Cookie, X-API-Version, Accept", id="a refusal with a Vary of its own"),
    pytest.param("/api/v1/abort", "vary", 410, "Cookie", id="the URL's version adds nothing"),
])
def test_an_exception_keeps_vary(path: str, own: str, status: int, vary: str) -> None:
    context = Context()
    layer = VersioningMiddleware(OwnHeaders(), VersioningMiddleware.Options(supported=["v1", "v2"]), context)
    response = TestApp(ErrorsMiddleware(layer, ErrorsMiddleware.Options(), context)).get(
        path, headers={"X-Own": own}, status=status, expect_errors=True)
    assert response.headers.getall("Vary") == [vary]


def test_an_unhandled_exception_keeps_vary() -> None:
    context = Context()
    layer = VersioningMiddleware(OwnHeaders(), VersioningMiddleware.Options(supported=["v1", "v2"]), context)
    response = TestApp(ErrorsMiddleware(layer, ErrorsMiddleware.Options(), context)).get(
        "/api/crash", status=500, expect_errors=True)
    assert response.headers["Vary"] == "X-API-Version, Accept"


@pytest.mark.parametrize(("options", "path", "request_headers", "vary"), [
    pytest.param(V1_V2, "/api/search", {}, "X-API-Version, Accept", id="default: varies on both sources"),
    pytest.param(V1_V2, "/api/search", {"X-API-Version": "v2"}, "X-API-Version",
                 id="header: Accept ranks below it"),
    pytest.param(V1_V2, "/api/search", {"Accept": f"{VND}v2+json"}, "X-API-Version, Accept",
                 id="accept: the header ranks above it"),
    pytest.param(V1_V2, "/api/v1/search", {}, None, id="url first: no Vary"),
    pytest.param(V1_V2, "/api/V1/search", {}, None, id="url first, case rewritten: no Vary"),
    pytest.param(ACCEPT_FIRST, "/api/v1/search", {}, "Accept", id="url under accept, no Accept"),
    pytest.param(ACCEPT_FIRST, "/api/v1/search", {"Accept": "application/json"}, "Accept",
                 id="url under accept, no vendor type"),
    pytest.param(ACCEPT_FIRST, "/api/v1/search", {"Accept": f"{VND}v2+json"}, "Accept",
                 id="accept first decides"),
    pytest.param({**V1_V2, "precedence": ["header", "url", "accept"]}, "/api/v1/search", {}, "X-API-Version",
                 id="url under header"),
    pytest.param({**V1_V2, "precedence": ["url", "accept", "header"]}, "/api/search", {"X-API-Version": "v1"},
                 "Accept, X-API-Version", id="header under accept"),
    pytest.param({**V1_V2, "precedence": ["url"]}, "/api/search", {}, None, id="url the only source"),
    pytest.param({**DEPRECATED, "precedence": ["accept", "url"]}, "/api/v1/search", {}, "Accept",
                 id="deprecated version from the url under accept"),
    pytest.param(V1_V2, "/api/forbidden", {"X-API-Version": "v2"}, "X-API-Version",
                 id="error response, header"),
    pytest.param(ACCEPT_FIRST, "/api/v1/forbidden", {}, "Accept", id="error response, url under accept"),
    pytest.param(V1_V2, "/api/v1/forbidden", {}, None, id="error response, url first"),
])
def test_vary_on_negotiated_versions(make: Callable[..., tuple[TestApp, Context]], options: dict[str, Any],
                                     path: str, request_headers: dict[str, str], vary: str | None) -> None:
    web, _ = make(**options)
    response = web.get(path, headers=request_headers, status=403 if path.endswith("/forbidden") else 200)
    assert response.headers.getall("Vary") == ([vary] if vary else [])


def test_deprecated_use_is_counted_and_logged_once_per_interval(
        make: Callable[..., tuple[TestApp, Context]], caplog: pytest.LogCaptureFixture) -> None:
    web, context = make(**DEPRECATED)
    events: list[tuple[str, dict[str, Any]]] = []
    context.listeners.append(lambda event, fields: events.append((event, fields)))
    with caplog.at_level(logging.WARNING, logger="wsgistack.versioning"):
        for _ in range(3):
            web.get("/api/v1/search", extra_environ={"REMOTE_ADDR": "192.0.2.1"})
        web.get("/api/v1/search", extra_environ={"REMOTE_ADDR": "192.0.2.2"})
        web.get("/api/v2/search", extra_environ={"REMOTE_ADDR": "192.0.2.3"})
    assert events == [("version.deprecated", {"version": "v1", "client": "192.0.2.1"})] * 3 + [
        ("version.deprecated", {"version": "v1", "client": "192.0.2.2"})]
    assert [r.getMessage() for r in caplog.records] == [
        "client 192.0.2.1 used deprecated API version v1 (1 requests since the last report)",
        "client 192.0.2.2 used deprecated API version v1 (1 requests since the last report)",
    ]


def test_an_ipv6_client_is_its_network(make: Callable[..., tuple[TestApp, Context]],
                                       caplog: pytest.LogCaptureFixture) -> None:
    """A host picks any address of its /64: one client, one report, as the rate limiter counts it."""
    web, _ = make(**DEPRECATED)
    with caplog.at_level(logging.WARNING, logger="wsgistack.versioning"):
        for host in range(1, 21):
            web.get("/api/v1/search", extra_environ={"REMOTE_ADDR": f"2001:db8::{host:x}"})
        web.get("/api/v1/search", extra_environ={"REMOTE_ADDR": "2001:db8:0:1::1"})
        web.get("/api/v1/search", extra_environ={"REMOTE_ADDR": "::ffff:192.0.2.9"})
    assert [r.getMessage() for r in caplog.records] == [
        "client 2001:db8::/64 used deprecated API version v1 (1 requests since the last report)",
        "client 2001:db8:0:1::/64 used deprecated API version v1 (1 requests since the last report)",
        "client 192.0.2.9 used deprecated API version v1 (1 requests since the last report)",
    ]


def test_next_report_carries_the_count(seen: Seen, caplog: pytest.LogCaptureFixture,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [5_000.0]
    monkeypatch.setattr("middleware.versioning.time.monotonic", lambda: clock[0])
    layer = VersioningMiddleware(seen, VersioningMiddleware.Options(**DEPRECATED, report_interval=60), Context())
    web = TestApp(layer)
    alice = {"wsgistack.identity": Identity("alice")}
    with caplog.at_level(logging.WARNING, logger="wsgistack.versioning"):
        web.get("/api/v1/a", extra_environ=alice)  # the first use is reported at once
        for _ in range(3):  # then counted quietly for report_interval
            clock[0] += 10
            web.get("/api/v1/a", extra_environ=alice)
        clock[0] += 31  # 61 s after the report: the next use reports the ones since
        web.get("/api/v1/a", extra_environ=alice)
    assert [r.getMessage() for r in caplog.records] == [
        "client alice used deprecated API version v1 (1 requests since the last report)",
        "client alice used deprecated API version v1 (4 requests since the last report)"]


def test_client_counter_is_bounded(seen: Seen) -> None:
    layer = VersioningMiddleware(seen, VersioningMiddleware.Options(**DEPRECATED, max_clients=2), Context())
    web = TestApp(layer)
    for i in range(5):
        web.get("/api/v1/a", extra_environ={"REMOTE_ADDR": f"192.0.2.{i}"})
    assert list(layer._counts) == [("192.0.2.3", "v1"), ("192.0.2.4", "v1")]


@pytest.mark.parametrize(("path", "environ", "expected"), [
    pytest.param("/health", {}, {}, id="outside the prefix: nothing"),
    pytest.param("/api/v2/search", {}, {API_VERSION: "v2"}, id="the URL's version: the path stays"),
    pytest.param("/api/search", {"HTTP_X_API_VERSION": "v2"}, {API_VERSION: "v2", "PATH_INFO": "/api/v2/search"},
                 id="the header's version: the path rewritten"),
    pytest.param("/api/search", {}, {API_VERSION: "v1", "PATH_INFO": "/api/v1/search"}, id="the default"),
    pytest.param("/api/v9/search", {}, None, id="a refusal: None"),
    pytest.param("/api/search", {"HTTP_ACCEPT": f"{VND}v9+json"}, None, id="an Accept refused: None"),
])
def test_preview_shows_what_the_layer_will_set(seen: Seen, path: str, environ: dict[str, str],
                                               expected: dict[str, str] | None) -> None:
    layer = VersioningMiddleware(seen, VersioningMiddleware.Options(**V1_V2), Context())
    request = {"PATH_INFO": path, **environ}
    assert layer.preview_environ(request) == expected
    assert layer.preview_environ(request) == expected  # asked again, by another layer outside
    assert seen.calls == 0


@pytest.mark.parametrize(("name", "value"), [
    pytest.param("PATH_INFO", "/api/v9/search", id="path"),
    pytest.param("HTTP_X_API_VERSION", "v9", id="header"),
    pytest.param("HTTP_ACCEPT", f"{VND}v9+json", id="accept"),
])
def test_a_preview_follows_a_request_changed_since_the_last(seen: Seen, name: str, value: str) -> None:
    layer = VersioningMiddleware(seen, VersioningMiddleware.Options(**V1_V2), Context())
    request = {"PATH_INFO": "/api/search"}
    assert layer.preview_environ(request) == {API_VERSION: "v1", "PATH_INFO": "/api/v1/search"}
    request[name] = value
    assert layer.preview_environ(request) is None


@pytest.mark.parametrize(("changes", "expected"), [
    pytest.param({}, ("/api/v2/search", "v2", "accept"), id="the same request: the previewed choice"),
    pytest.param({"HTTP_ACCEPT": f"{VND}v1+json"}, ("/api/v1/search", "v1", "accept"), id="Accept changed since"),
    pytest.param({"HTTP_X_API_VERSION": "v1"}, ("/api/v1/search", "v1", "header"), id="header added since"),
    pytest.param({"PATH_INFO": "/api/items"}, ("/api/v2/items", "v2", "accept"), id="path changed since"),
])
def test_the_call_after_a_preview_routes_the_request_as_it_is_then(seen: Seen, changes: dict[str, str],
                                                                    expected: tuple[str, str, str]) -> None:
    layer = VersioningMiddleware(seen, VersioningMiddleware.Options(**V1_V2), Context())

    def outer(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        layer.preview_environ(environ)  # a layer outside reads ahead, then the request changes
        environ.update(changes)
        return layer(environ, start_response)

    TestApp(outer).get("/api/search", headers={"Accept": f"{VND}v2+json"})
    assert (seen.environ["PATH_INFO"], seen.environ[API_VERSION], seen.environ[SOURCE]) == expected


def test_rewrite_refreshes_the_decoded_path(seen: Seen) -> None:
    layer = VersioningMiddleware(seen, VersioningMiddleware.Options(**V1_V2), Context())

    def outer(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        assert decoded_path(environ) == "/api/caf\u00e9"  # an outer layer parsed the path first
        return layer(environ, start_response)

    TestApp(outer).get("/api/caf%C3%A9", headers={"X-API-Version": "v2"})
    assert decoded_path(seen.environ) == "/api/v2/caf\u00e9"


def test_cache_inside_versioning_keys_on_the_version(seen: Seen) -> None:
    context = Context(stores={"shared": MemoryStore()})
    cache = CacheMiddleware(seen, CacheMiddleware.Options(), context)
    web = TestApp(VersioningMiddleware(cache, VersioningMiddleware.Options(**V1_V2), context))
    v2 = web.get("/api/search", headers={"X-API-Version": "v2"})
    v1 = web.get("/api/search")
    again = web.get("/api/search", headers={"X-API-Version": "2"})
    assert (v2.text, v1.text) == ("/api/v2/search v2", "/api/v1/search v1")
    assert (v1.headers["X-Cache"], again.headers["X-Cache"], again.text) == ("MISS", "HIT", "/api/v2/search v2")
    assert again.headers["Vary"] == "X-API-Version"
    assert seen.calls == 2


@pytest.mark.parametrize(("written", "per_user", "after"), [
    pytest.param("/api/search", False, ("MISS", "MISS"), id="the URI the header versions: every version's answer goes"),
    pytest.param("/api/search", True, ("MISS", "MISS"), id="per user: every version's answer of the writer goes"),
    pytest.param("/api/v2/search", False, ("MISS", "HIT"), id="a URI that names its version: that version's answer"),
])
def test_a_write_drops_every_version_of_the_uri(seen: Seen, written: str, per_user: bool,
                                                after: tuple[str, str]) -> None:
    """RFC 9111 §4.4: a write invalidates the target URI, whose answers vary on the version header."""
    context = Context(stores={"shared": MemoryStore()})
    cache = CacheMiddleware(seen, CacheMiddleware.Options(per_user=per_user), context)
    versioning = VersioningMiddleware(cache, VersioningMiddleware.Options(**V1_V2), context)

    def alice(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if per_user:
            environ[IDENTITY] = Identity("alice", frozenset())
        return versioning(environ, start_response)

    web = TestApp(alice)
    asks = [("/api/search", {}), ("/api/search", {"X-API-Version": "v2"}), ("/api/v2/search", {})]
    # (the cache keys on the version: /api/v2/search is the answer of /api/search asked for as v2)
    assert [web.get(path, headers=h).headers["X-Cache"] for path, h in asks] == ["MISS", "MISS", "HIT"]
    assert [web.get(path, headers=h).headers["X-Cache"] for path, h in asks] == ["HIT", "HIT", "HIT"]
    web.put(written)
    assert tuple(web.get(path).headers["X-Cache"] for path in ("/api/v2/search", "/api/v1/search")) == after


def test_a_write_makes_other_users_entries_of_every_version_stale(seen: Seen) -> None:
    """bob writes /api/search (as v1, the default): alice's v2 and v3 answers of it are stale too."""
    context = Context(stores={"shared": MemoryStore()})
    cache = CacheMiddleware(seen, CacheMiddleware.Options(per_user=True), context)
    versioning = VersioningMiddleware(cache, VersioningMiddleware.Options(supported=["v1", "v2", "v3"]), context)

    def who(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        environ[IDENTITY] = Identity(environ["HTTP_X_USER"], frozenset())
        return versioning(environ, start_response)

    web = TestApp(who)
    alice = [{"X-User": "alice", "X-API-Version": version} for version in ("v2", "v3")]
    for headers in alice:
        web.get("/api/search", headers=headers)
    assert [web.get("/api/search", headers=h).headers["X-Cache"] for h in alice] == ["HIT", "HIT"]
    web.put("/api/search", headers={"X-User": "bob"})
    assert [web.get("/api/search", headers=h).headers["X-Cache"] for h in alice] == ["MISS", "MISS"]


def test_identity_names_the_client(seen: Seen) -> None:
    context = Context()
    events: list[dict[str, Any]] = []
    context.listeners.append(lambda event, fields: events.append(fields))
    web = TestApp(VersioningMiddleware(seen, VersioningMiddleware.Options(**DEPRECATED), context))
    web.get("/api/v1/a", extra_environ={IDENTITY: Identity("alice")})
    assert events == [{"version": "v1", "client": "alice"}]


@pytest.mark.parametrize(("options", "message"), [
    pytest.param({"supported": []}, "supported must name at least one version, such as [v1, v2]", id="empty"),
    pytest.param({"supported": ["v1", "a/b"]}, "supported versions must be single path segments (got 'a/b')",
                 id="slash in version"),
    pytest.param({"supported": ["v1", " "]}, "supported versions must be single path segments (got '')",
                 id="blank version"),
    pytest.param({"supported": ["v1", "V1"]},
                 "supported names 'v1' twice ('v1' and 'V1'); case, surrounding spaces and a bare number "
                 "(2 for v2) do not make versions differ", id="same version twice"),
    pytest.param({"supported": [2, "v2"]}, "supported names 'v2' twice (2 and 'v2')",
                 id="same version as a number and as text"),
    pytest.param({"supported": ["v1"], "deprecated": {"v1": {"deprecation": "2024-01-01"},
                                                      "V1": {"deprecation": "2024-01-01"}}},
                 "deprecated names a version twice ('v1', 'V1'); case, surrounding spaces and a bare "
                 "number (2 for v2) do not make versions differ", id="deprecated twice"),
    pytest.param({"supported": ["v1"], "default": "V3"}, "default 'v3' is not in supported (v1)",
                 id="default normalised, not supported"),
    pytest.param({"supported": ["v1"], "default": "v2"}, "default 'v2' is not in supported (v1)",
                 id="default not supported"),
    pytest.param({"supported": ["v1"], "deprecated": {"v0": {"deprecation": "2024-01-01"}}},
                 "deprecated names 'v0', which is not in supported (v1)", id="deprecated unknown"),
    pytest.param({"precedence": ["header", "accept"]},
                 "precedence must name url once, and header and accept at most once each", id="no url"),
    pytest.param({"precedence": ["url", "header", "header"]},
                 "precedence must name url once, and header and accept at most once each", id="twice"),
    pytest.param({"precedence": ["url", "cookie"]}, "Input should be 'url', 'header' or 'accept'",
                 id="unknown source"),
    pytest.param({"prefix": "/api/"}, "prefix must start with '/' and not end with one (got '/api/')",
                 id="trailing slash prefix"),
    pytest.param({"header": "X_API_Version"}, "header 'X_API_Version' has an '_': Waitress drops such header "
                 "fields (WSGI cannot tell them from '-'); write 'X-API-Version'", id="header with an underscore"),
    pytest.param({"header": "X-API Version"}, "header 'X-API Version' is not a valid HTTP header name",
                 id="header with a space"),
    pytest.param({"header": "X-API-Version:"}, "header 'X-API-Version:' is not a valid HTTP header name",
                 id="header with a colon"),
    pytest.param({"header": ""}, "header '' is not a valid HTTP header name", id="empty header"),
    pytest.param({"supported": ["v1"], "deprecated": {"v1": {"deprecation": "2025-01-01", "sunset": "2024-01-01"}}},
                 "sunset must not be earlier than deprecation", id="sunset before deprecation"),
    pytest.param({"supported": ["v1"], "deprecated": {"v1": {"sunset": "2024-01-01"}}}, "Field required",
                 id="deprecation date required"),
    pytest.param({"supported": ["v1"], "deprecated": {"v1": {"deprecation": "2024-01-01",
                                                             "link": "https://docs.example.org/v1 \u2013 migration"}}},
                 "link is sent in a Link header as <link>: write a URL of visible ASCII characters",
                 id="a link with a space and a dash outside latin-1"),
    pytest.param({"supported": ["v1"], "deprecated": {"v1": {"deprecation": "2024-01-01",
                                                             "successor": "https://a.example/x>; rel=evil"}}},
                 "successor is sent in a Link header as <successor>", id="a successor that closes the bracket"),
])
def test_options_refused(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError) as info:
        VersioningMiddleware.Options(**options)
    assert message in str(info.value)


@pytest.mark.parametrize(("entry", "shown"), [
    ("{deprecation: 2025-01-01, sunset: 2024-01-01}",
     "5:47 pipeline[0].versioning.deprecated.v1.sunset: sunset must not be earlier than deprecation "
     "(got 2024-01-01)"),
    ("{deprecation: 2025-01-01, sunset: 2024-01-01T12:30:00Z}",
     "5:47 pipeline[0].versioning.deprecated.v1.sunset: sunset must not be earlier than deprecation "
     "(got 2024-01-01T12:30:00+00:00)"),
    ("{deprecation: 2024-01-01, link: 2024-02-01}",
     "5:45 pipeline[0].versioning.deprecated.v1.link: Input should be a valid string; YAML reads 2024-02-01 as a "
     "date: quote it ('2024-02-01') to keep it as text (got 2024-02-01)"),
])
def test_a_yaml_date_in_an_error_is_shown_as_written(entry: str, shown: str) -> None:
    from config import ConfigError, build_from_text

    with pytest.raises(ConfigError) as info:
        build_from_text("app: {factory: 'stack_support:echo_app'}\npipeline:\n  - versioning:\n"
                        f"      deprecated:\n        v1: {entry}\n")
    assert [str(p).partition(":")[2] for p in info.value.problems] == [shown]  # after the file name


def test_versions_in_options_are_normalised() -> None:
    options = VersioningMiddleware.Options(
        supported=["1", " V2 ", "Beta"], default="2",
        deprecated={"V1": {"deprecation": "2024-01-01"}})
    assert (options.supported, options.default, list(options.deprecated)) == (("v1", "v2", "beta"), "v2", ["v1"])


def test_built_from_yaml(make_stack: Callable[..., TestApp]) -> None:
    stack = make_stack(
        "app: {factory: 'stack_support:echo_app'}\n"
        "pipeline:\n"
        "  - versioning:\n"
        "      supported: [v1, v2]\n"
        "      default: v2\n"
        "      deprecated:\n"
        "        v1: {deprecation: 2024-01-01, sunset: 2025-06-30}\n"
    )
    assert stack.get("/api/search").json == {**stack.get("/api/search").json, "path": "/api/v2/search",
                                             "api_version": "v2"}
    old = stack.get("/api/v1/search")
    assert (old.headers["Deprecation"], old.headers["Sunset"]) == ("@1704067200", "Mon, 30 Jun 2025 00:00:00 GMT")
    refused = stack.get("/api/search", headers={"X-API-Version": "v3"}, status=400)
    assert refused.json["error"]["details"]["supported"] == ["v1", "v2"]


def test_yaml_numbers_are_versions(make_stack: Callable[..., TestApp]) -> None:
    stack = make_stack(
        "app: {factory: 'stack_support:echo_app'}\n"
        "pipeline:\n"
        "  - versioning:\n"
        "      supported: [1, V2]\n"
        "      default: 2\n"
        "      deprecated:\n"
        "        1: {deprecation: 2024-01-01}\n"
    )
    assert stack.get("/api/search").json["path"] == "/api/v2/search"
    old = stack.get("/api/search", headers={"X-API-Version": "1"})
    assert (old.json["path"], old.headers["Deprecation"]) == ("/api/v1/search", "@1704067200")


def test_a_stray_quote_is_unread_whatever_werkzeug_keeps_of_it(make: Callable[..., tuple[TestApp, Context]],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """werkzeug before 3.1.7 keeps the quote in the media type (3.1.7 drops the header): a 400 either way."""
    monkeypatch.setattr("middleware.versioning.parse_accept_header",
                        lambda value: [(f'{VND}v2+json"', 1.0)])
    web, _ = make(**V1_V2)
    response = web.get("/api/search", headers={"Accept": f'{VND}v2+json"'}, status=400)
    assert response.json["error"]["message"] == UNREADABLE_ACCEPT
