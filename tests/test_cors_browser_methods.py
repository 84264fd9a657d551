"""Preflight methods as headless Chromium asks for them: safelisted methods and method case.

A page on ``http://127.0.0.1:P1`` calls an API stack (errors -> cors -> a tiny
app) on ``http://127.0.0.1:P2`` that lists only ``PUT``, ``DELETE`` and
``patch`` in ``allow_methods``.  A custom request header makes every call
preflighted, whatever its method.  The browser's own CORS check decides what
the page may read, so these tests show that the layer's answers are ones
Chromium accepts.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pytest
from browser import Server, chromium, serve

from middleware.base import Context
from middleware.cors import CORSMiddleware
from middleware.errors import ErrorsMiddleware

pytestmark = pytest.mark.browser

PAGE = b"<!doctype html><html><head><title>client</title></head><body>client page</body></html>"
FETCH = """
const [url, init, done] = arguments;
fetch(url, init).then(async (r) => done({ok: true, status: r.status, body: await r.text()}))
  .catch((e) => done({ok: false, error: `${e.name}: ${e.message}`}));
"""
FAILED = {"ok": False, "error": "TypeError: Failed to fetch"}


def page_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """The client page, on another origin than the API."""
    start_response("200 OK", [("Content-Type", "text/html; charset=utf-8"),
                              ("Content-Length", str(len(PAGE)))])
    return [PAGE]


class Wire:
    """The API: errors -> cors -> an app that answers its method; records every answer sent."""

    def __init__(self, origin: str) -> None:
        context = Context()
        cors = CORSMiddleware(self.app, CORSMiddleware.Options(
            origins=(origin,), allow_methods=("PUT", "DELETE", "patch"), allow_headers=("X-Custom",),
            max_age=0), context)
        self.stack = ErrorsMiddleware(cors, ErrorsMiddleware.Options(), context)
        self.seen: list[tuple[str, int]] = []

    @staticmethod
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        body = json.dumps({"method": environ["REQUEST_METHOD"]}).encode()
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        def record(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            self.seen.append((environ["REQUEST_METHOD"], int(status[:3])))
            return start_response(status, headers, exc_info)

        return self.stack(environ, record)


@pytest.fixture(scope="module")
def driver() -> Iterator[Any]:
    """One headless Chromium for the module."""
    with chromium() as d:
        yield d


@pytest.fixture(scope="module")
def page() -> Iterator[Server]:
    """The page server."""
    with serve(page_app) as server:
        yield server


@pytest.fixture(scope="module")
def api_parts(page: Server) -> Iterator[tuple[Server, Wire]]:
    """The API stack on another port, allowing the page's origin."""
    wire = Wire(page.url)
    with serve(wire) as server:
        yield server, wire


@pytest.fixture
def api(api_parts: tuple[Server, Wire]) -> tuple[Server, Wire]:
    """The API stack with an empty record."""
    api_parts[1].seen.clear()
    return api_parts


def run_fetch(driver: Any, page: Server, url: str, init: dict[str, Any]) -> dict[str, Any]:
    """Open the page and return what its ``fetch(url, init)`` could read."""
    if driver.current_url.rstrip("/") != page.url:
        driver.get(page.url + "/")
    result: dict[str, Any] = driver.execute_async_script(FETCH, url, init)
    return result


@pytest.mark.parametrize(("method", "sent"), [
    pytest.param("GET", "GET", id="GET, not listed"),
    pytest.param("POST", "POST", id="POST, not listed"),
    pytest.param("DELETE", "DELETE", id="DELETE, listed"),
    pytest.param("put", "PUT", id="put, upper-cased by the browser"),
    pytest.param("PATCH", "PATCH", id="PATCH, listed as patch"),
])
def test_preflighted_method_allowed(driver: Any, page: Server, api: tuple[Server, Wire], method: str,
                                    sent: str) -> None:
    server, wire = api
    result = run_fetch(driver, page, f"{server.url}/items/1", {"method": method, "headers": {"X-Custom": "1"}})
    assert result["ok"], result
    assert (result["status"], json.loads(result["body"])) == (200, {"method": sent})
    assert wire.seen == [("OPTIONS", 204), (sent, 200)]


def test_lower_case_patch_is_refused_at_the_preflight(driver: Any, page: Server,
                                                      api: tuple[Server, Wire]) -> None:
    server, wire = api
    result = run_fetch(driver, page, f"{server.url}/items/1", {"method": "patch", "headers": {"X-Custom": "1"}})
    assert result == FAILED
    assert wire.seen == [("OPTIONS", 403)], "the browser sends 'patch' as written and never sends the request"


def test_waitress_refuses_lower_case_methods(api: tuple[Server, Wire]) -> None:
    """Why ``allow_methods`` is upper-cased: a ``patch`` request could never reach the app."""
    server, wire = api
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        conn.request("patch", "/items/1")
        assert conn.getresponse().status == 400
    finally:
        conn.close()
    assert wire.seen == []
