"""The cors layer as a real browser sees it: headless Chromium, two real Waitress servers.

A page served from ``http://127.0.0.1:P1`` calls an API stack on
``http://127.0.0.1:P2`` (errors -> cors -> session -> a tiny app) with
``fetch()``.  The two origins differ only by port, so they are cross-origin
but same-site: a ``SameSite=Lax`` session cookie is sent on credentialed
requests.  The same page loaded as ``http://localhost:P1`` is an origin the
API does not allow.  Each test asserts what the page's JavaScript could read,
and what reached the server and the app.

A second API on ``http://127.0.0.1:P3`` (errors -> cors -> an app that answers
its method) lists only ``PUT``, ``DELETE`` and ``patch`` in ``allow_methods``,
and a custom request header makes every call preflighted: Chromium accepts the
layer's answers for the safelisted methods and for method case.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import pytest
from browser import Server, chromium, serve

from middleware.base import SESSION, Context, refuse
from middleware.cors import CORSMiddleware
from middleware.errors import ErrorsMiddleware
from middleware.session import SessionMiddleware
from stores.memory import MemoryStore

if TYPE_CHECKING:
    from _typeshed.wsgi import WSGIApplication

pytestmark = pytest.mark.browser

PAGE = b"<!doctype html><html><head><title>client</title></head><body>client page</body></html>"
FETCH = """
const [url, init, done] = arguments;
fetch(url, init).then(async (r) => done({
    ok: true, status: r.status, body: await r.text(),
    total: r.headers.get("X-Total"), hidden: r.headers.get("X-Hidden")}))
  .catch((e) => done({ok: false, error: `${e.name}: ${e.message}`}));
"""


def page_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """The client page, on another origin than the API."""
    start_response("200 OK", [("Content-Type", "text/html; charset=utf-8"),
                              ("Content-Length", str(len(PAGE)))])
    return [PAGE]


class Api:
    """The API's innermost app; it records every request that reaches it."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        method, path = environ["REQUEST_METHOD"], environ["PATH_INFO"]
        self.seen.append((method, path))
        session = environ[SESSION]
        if path == "/unauthorized":
            raise refuse(401, "Sign in first.", headers=[("WWW-Authenticate", "Bearer")])
        if path == "/login":
            session.rotate()
            session["user"] = "ada"
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = {"method": method, "path": path, "custom": environ.get("HTTP_X_CUSTOM"),
                "sent": environ["wsgi.input"].read(length).decode() if length else None,
                "user": session.get("user") if path in ("/login", "/whoami") else None}
        data = json.dumps(body).encode()
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(data))),
                                  ("X-Total", "42"), ("X-Hidden", "secret")])
        return [data]


class Wire:
    """The outermost wrapper: what the server answered, whether or not the app saw it."""

    def __init__(self, app: WSGIApplication) -> None:
        self.app = app
        self.seen: list[tuple[str, str, int]] = []

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        def record(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            self.seen.append((environ["REQUEST_METHOD"], environ["PATH_INFO"], int(status[:3])))
            return start_response(status, headers, exc_info)

        return self.app(environ, record)


@pytest.fixture(scope="module")
def driver() -> Iterator[Any]:
    """One headless Chromium for the module."""
    with chromium() as d:
        yield d


@pytest.fixture(scope="module")
def page() -> Iterator[Server]:
    """The page server on 127.0.0.1 (also reachable as localhost)."""
    with serve(page_app) as server:
        yield server


@pytest.fixture(scope="module")
def api_parts(page: Server) -> Iterator[tuple[Server, Wire, Api]]:
    """The API stack on another port, allowing only the page's 127.0.0.1 origin."""
    api = Api()
    context = Context(stores={"shared": MemoryStore()}, loopback_only=True)
    session = SessionMiddleware(api, SessionMiddleware.Options(
        secret_key="k" * 40, cookie_name="sid", cookie_secure=False, cookie_samesite="Lax"), context)
    cors = CORSMiddleware(session, CORSMiddleware.Options(
        origins=(page.url,), allow_methods=("GET", "POST", "PUT"), allow_headers=("X-Custom",),
        expose_headers=("X-Total",), allow_credentials=True, max_age=0), context)
    wire = Wire(ErrorsMiddleware(cors, ErrorsMiddleware.Options(), context))
    with serve(wire) as server:
        yield server, wire, api


@pytest.fixture
def api(api_parts: tuple[Server, Wire, Api]) -> tuple[Server, Wire, Api]:
    """The API stack with empty request records."""
    api_parts[1].seen.clear()
    api_parts[2].seen.clear()
    return api_parts


def run_fetch(driver: Any, page_url: str, url: str, init: dict[str, Any] | None = None) -> dict[str, Any]:
    """Open the page at ``page_url`` and return what its ``fetch(url, init)`` could read."""
    if driver.current_url.rstrip("/") != page_url:
        driver.get(page_url + "/")
    result: dict[str, Any] = driver.execute_async_script(FETCH, url, init or {})
    return result


def test_simple_get(driver: Any, page: Server, api: tuple[Server, Wire, Api]) -> None:
    server, wire, app = api
    result = run_fetch(driver, page.url, f"{server.url}/hello?x=1")
    assert result["ok"], result
    assert result["status"] == 200
    assert json.loads(result["body"])["path"] == "/hello"
    assert result["total"] == "42", "an exposed header is readable"
    assert result["hidden"] is None, "a header not in expose_headers is not"
    assert app.seen == [("GET", "/hello")]
    assert wire.seen == [("GET", "/hello", 200)]


def test_preflighted_put_with_custom_header(driver: Any, page: Server,
                                            api: tuple[Server, Wire, Api]) -> None:
    server, wire, app = api
    result = run_fetch(driver, page.url, f"{server.url}/items/7", {
        "method": "PUT", "headers": {"X-Custom": "hello", "Content-Type": "application/json"},
        "body": json.dumps({"name": "seven"})})
    assert result["ok"], result
    assert result["status"] == 200
    body = json.loads(result["body"])
    assert (body["method"], body["custom"], json.loads(body["sent"])) == ("PUT", "hello", {"name": "seven"})
    assert wire.seen == [("OPTIONS", "/items/7", 204), ("PUT", "/items/7", 200)]
    assert app.seen == [("PUT", "/items/7")], "the preflight must not reach the app"


def test_credentialed_requests_carry_the_session_cookie(driver: Any, page: Server,
                                                        api: tuple[Server, Wire, Api]) -> None:
    server, _wire, app = api
    login = run_fetch(driver, page.url, f"{server.url}/login", {"method": "POST", "credentials": "include"})
    assert login["ok"], login
    assert json.loads(login["body"])["user"] == "ada"
    with_cookie = run_fetch(driver, page.url, f"{server.url}/whoami", {"credentials": "include"})
    assert with_cookie["ok"], with_cookie
    assert json.loads(with_cookie["body"])["user"] == "ada", "the Lax cookie is sent same-site"
    without = run_fetch(driver, page.url, f"{server.url}/whoami")
    assert without["ok"], without
    assert json.loads(without["body"])["user"] is None, "no cookie without credentials: include"
    assert app.seen == [("POST", "/login"), ("GET", "/whoami"), ("GET", "/whoami")]
    assert "sid=" not in driver.execute_script("return document.cookie"), "the cookie is HttpOnly"


def test_error_response_is_readable(driver: Any, page: Server, api: tuple[Server, Wire, Api]) -> None:
    server, _wire, _app = api
    result = run_fetch(driver, page.url, f"{server.url}/unauthorized", {"credentials": "include"})
    assert result["ok"], result
    assert result["status"] == 401
    assert json.loads(result["body"])["error"]["message"] == "Sign in first."


def test_disallowed_origin(driver: Any, page: Server, api: tuple[Server, Wire, Api]) -> None:
    server, wire, app = api
    other = f"http://localhost:{page.port}"
    simple = run_fetch(driver, other, f"{server.url}/hello")
    assert simple == {"ok": False, "error": "TypeError: Failed to fetch"}
    assert app.seen == [("GET", "/hello")], "a simple request reaches the app; the browser hides the answer"
    app.seen.clear()
    put = run_fetch(driver, other, f"{server.url}/items/8", {"method": "PUT", "headers": {"X-Custom": "x"}})
    assert put == {"ok": False, "error": "TypeError: Failed to fetch"}
    assert ("OPTIONS", "/items/8", 403) in wire.seen
    assert app.seen == [], "a refused preflight stops the PUT before it is sent"


# ---------------------------------------------------------------- preflight methods

FAILED = {"ok": False, "error": "TypeError: Failed to fetch"}


def method_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """Answers with the method it was called with."""
    body = json.dumps({"method": environ["REQUEST_METHOD"]}).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]


@pytest.fixture(scope="module")
def methods_parts(page: Server) -> Iterator[tuple[Server, Wire]]:
    """errors -> cors (``allow_methods: [PUT, DELETE, patch]``) -> method_app, allowing the page's origin."""
    context = Context()
    cors = CORSMiddleware(method_app, CORSMiddleware.Options(
        origins=(page.url,), allow_methods=("PUT", "DELETE", "patch"), allow_headers=("X-Custom",), max_age=0),
        context)
    wire = Wire(ErrorsMiddleware(cors, ErrorsMiddleware.Options(), context))
    with serve(wire) as server:
        yield server, wire


@pytest.fixture
def methods_api(methods_parts: tuple[Server, Wire]) -> tuple[Server, Wire]:
    """That API with an empty record."""
    methods_parts[1].seen.clear()
    return methods_parts


@pytest.mark.parametrize(("method", "sent"), [
    pytest.param("GET", "GET", id="GET, not listed"),
    pytest.param("POST", "POST", id="POST, not listed"),
    pytest.param("DELETE", "DELETE", id="DELETE, listed"),
    pytest.param("put", "PUT", id="put, upper-cased by the browser"),
    pytest.param("PATCH", "PATCH", id="PATCH, listed as patch"),
])
def test_preflighted_method_allowed(driver: Any, page: Server, methods_api: tuple[Server, Wire], method: str,
                                    sent: str) -> None:
    server, wire = methods_api
    result = run_fetch(driver, page.url, f"{server.url}/items/1", {"method": method, "headers": {"X-Custom": "1"}})
    assert result["ok"], result
    assert (result["status"], json.loads(result["body"])) == (200, {"method": sent})
    assert wire.seen == [("OPTIONS", "/items/1", 204), (sent, "/items/1", 200)]


def test_lower_case_patch_is_refused_at_the_preflight(driver: Any, page: Server,
                                                      methods_api: tuple[Server, Wire]) -> None:
    server, wire = methods_api
    result = run_fetch(driver, page.url, f"{server.url}/items/1", {"method": "patch", "headers": {"X-Custom": "1"}})
    assert result == FAILED
    assert wire.seen == [("OPTIONS", "/items/1", 403)], "the browser sends 'patch' as written, never the request"


def test_waitress_refuses_lower_case_methods(methods_api: tuple[Server, Wire]) -> None:
    """Why ``allow_methods`` is upper-cased: a ``patch`` request could never reach the app."""
    server, wire = methods_api
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        conn.request("patch", "/items/1")
        assert conn.getresponse().status == 400
    finally:
        conn.close()
    assert wire.seen == []
