"""The operator page and metrics in a real browser: another origin's page and a DNS-rebinding page read neither.

Chromium resolves ``attacker.test`` and ``other.test`` to 127.0.0.1
(``--host-resolver-rules``), as a DNS-rebinding site's name resolves to the
server once the attack starts.  The app behind the layers serves the
attacker's page at ``/evil``; its script fetches the page's data and the
metrics and writes what it could read into the document's title.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

import pytest
from browser import chromium, serve

from middleware.base import Context
from middleware.cors import CORSMiddleware
from middleware.errors import ErrorsMiddleware
from middleware.metrics import MetricsMiddleware
from middleware.operator_page import OperatorPageMiddleware
from stores import MemoryStore

RESOLVE = "--host-resolver-rules=MAP attacker.test 127.0.0.1, MAP other.test 127.0.0.1"
READ = """
const read = (url) => fetch(url, {credentials: "include"})
  .then((r) => r.text().then((body) => r.status + (body.includes("wsgistack") ? " read" : "")))
  .catch(() => "blocked");
Promise.all([read(PAGE + "/_stack/data.json"), read(PAGE + "/metrics")])
  .then((found) => { document.title = found.join(", "); });
"""


def evil_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """The attacker's page: ``?page=`` is where it reads from ("" for its own origin, as after a rebinding)."""
    page = environ.get("QUERY_STRING", "").partition("page=")[2]
    body = f'<!doctype html><title>waiting</title><script>const PAGE = "{page}";{READ}</script>'.encode()
    start_response("200 OK", [("Content-Type", "text/html; charset=utf-8"), ("Content-Length", str(len(body)))])
    return [body]


def stack(page_options: dict[str, Any], metrics_options: dict[str, Any], cors_origins: tuple[str, ...] = ()) -> Any:
    """errors -> cors (when origins are given) -> metrics -> operator_page -> the attacker's page."""
    context = Context(stores={"shared": MemoryStore()})
    app: Any = OperatorPageMiddleware(evil_app, OperatorPageMiddleware.Options(**page_options), context)
    app = MetricsMiddleware(app, MetricsMiddleware.Options(process_metrics=False, **metrics_options), context)
    if cors_origins:
        app = CORSMiddleware(app, CORSMiddleware.Options(origins=cors_origins, allow_credentials=True), context)
    return ErrorsMiddleware(app, ErrorsMiddleware.Options(), context)


def title_after(driver: Any, url: str) -> str:
    driver.get(url)
    deadline = time.monotonic() + 10
    while (title := str(driver.title)) == "waiting":
        if time.monotonic() > deadline:
            raise AssertionError(f"the page at {url} never finished reading")
        time.sleep(0.05)
    return title


@pytest.mark.browser
@pytest.mark.parametrize(
    ("host", "hosts", "expected"),
    [
        pytest.param("attacker.test", [], "403, 403", id="DNS rebinding: refused"),
        pytest.param("attacker.test", ["attacker.test"], "200 read, 200 read",
                     id="a name listed in hosts is the operator's own"),
        pytest.param("127.0.0.1", [], "200 read, 200 read", id="the page's own origin, by address"),
        pytest.param("localhost", [], "200 read, 200 read", id="the page's own origin, localhost"),
    ],
)
def test_a_dns_rebinding_page_reads_neither(host: str, hosts: list[str], expected: str) -> None:
    holder: dict[str, Any] = {}
    with chromium(RESOLVE) as driver, serve(lambda environ, start: holder["app"](environ, start)) as server:
        listed = {"hosts": hosts} if hosts else {}
        holder["app"] = stack(listed, listed)
        assert title_after(driver, f"http://{host}:{server.port}/evil") == expected


@pytest.mark.browser
@pytest.mark.parametrize(
    ("cors", "expected"),
    [
        pytest.param(True, "403, 403", id="inside cors that allows the other origin, with credentials"),
        pytest.param(False, "blocked, blocked", id="without cors the browser blocks the read itself"),
    ],
)
def test_another_origins_page_reads_neither(cors: bool, expected: str) -> None:
    holder: dict[str, Any] = {}
    with chromium(RESOLVE) as driver, serve(lambda environ, start: holder["app"](environ, start)) as server:
        other = f"http://other.test:{server.port}"
        holder["app"] = stack({}, {}, (other,) if cors else ())
        assert title_after(driver, f"{other}/evil?page=http://127.0.0.1:{server.port}") == expected
