"""The metrics layer: exposition, who may scrape, labels, Server-Timing, events, store health."""

from __future__ import annotations

import json
import logging
import re
import signal
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, cast

import pytest
from conftest import RedisServer, free_port
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError
from webtest import TestApp
from werkzeug.exceptions import HTTPException, Unauthorized
from werkzeug.wrappers import Response

from middleware.base import CLIENT_IP, TIMINGS, Context, refuse
from middleware.errors import ErrorsMiddleware
from middleware.metrics import ROUTE, STORE_CHECK_SECONDS, MetricsMiddleware
from stores import MemoryStore, Store, store_from_url

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
SERVER_TIMING = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+;dur=\d+\.\d{3}$")


def samples(text: str) -> Samples:
    """Every sample of an exposition, keyed by name and labels."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sample(found: Samples, name: str, **labels: str) -> float | None:
    """One sample's value, or None when it is absent."""
    return found.get((name, frozenset(labels.items())))


def inner_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """Answers by path; ``/items/<id>`` sets a route template like the Flask core does."""
    path = environ["PATH_INFO"]
    if path == "/limited":
        raise refuse(429, "Slow down.", headers=[("Retry-After", "3")])
    if "HTTP_X_REFUSE" in environ:  # what an auth layer does with a bad token, before any route
        raise refuse(int(environ["HTTP_X_REFUSE"]))
    if path == "/crash":
        raise RuntimeError("inner failure")
    if path == "/teapot":  # abort(Response(...)): the errors layer sends that response, with its status
        raise HTTPException(response=Response("short and stout", status=418))
    if path == "/own-response":
        raise Unauthorized(response=Response("not you", status=403))
    if path.startswith("/items/"):
        environ[ROUTE] = "/items/<int:item_id>"
    if path == "/lazy":
        return lazy_body(start_response)
    if path == "/write":
        write = start_response("200 OK", [("Content-Type", "text/plain")])
        write(b"legacy ")
        return [b"write"]
    if path == "/write-then-fail":  # the headers went out with the first write: the failure cannot change them
        start_response("200 OK", [("Content-Type", "text/plain")])(b"half")
        raise RuntimeError("failed after writing")
    if path == "/replaced":
        start_response("200 OK", [("Content-Type", "text/plain")])
        try:
            raise ValueError("failed after starting the response")
        except ValueError:
            start_response("500 Internal Server Error", [("Content-Type", "text/plain")], sys.exc_info())
        return [b"replaced"]
    if path == "/missing":
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"missing"]
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]


def lazy_body(start_response: Callable[..., Any]) -> Iterator[bytes]:
    """A generator app body that calls start_response only once iterated."""
    start_response("201 Created", [("Content-Type", "text/plain")])
    yield b"lazy"


class Timed:
    """What the builder wraps every layer in when a layer wants layer timing."""

    def __init__(self, label: str, app: Any, delay: float = 0.0) -> None:
        self.label, self.app, self.delay = label, app, delay

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        start = time.perf_counter()
        try:
            time.sleep(self.delay)
            result: Iterable[bytes] = self.app(environ, start_response)
            return result
        finally:
            environ[TIMINGS].append((self.label, time.perf_counter() - start))


@pytest.fixture
def context() -> Context:
    """A context with one memory store."""
    return Context(stores={"shared": MemoryStore()})


@pytest.fixture
def make(context: Context) -> Callable[..., tuple[TestApp, MetricsMiddleware]]:
    """Build errors -> metrics -> (inner), returning the app and the metrics layer."""

    def build(inner: Any = inner_app, **options: Any) -> tuple[TestApp, MetricsMiddleware]:
        options.setdefault("process_metrics", False)
        metrics = MetricsMiddleware(inner, MetricsMiddleware.Options(**options), context)
        return TestApp(ErrorsMiddleware(metrics, ErrorsMiddleware.Options(), Context())), metrics

    return build


def scrape(app: TestApp, **kwargs: Any) -> Samples:
    """GET /metrics from loopback and parse it."""
    response = app.get("/metrics", extra_environ={"REMOTE_ADDR": "127.0.0.1"}, **kwargs)
    assert response.headers["Content-Type"].startswith("text/plain; version=")
    assert response.headers["Cache-Control"] == "no-store"
    return samples(response.text)


# --- requests ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "requests", "expected"),
    [
        pytest.param({}, [("GET", "/items/1"), ("GET", "/items/2"), ("POST", "/items/3")],
                     {("GET", "/items/<int:item_id>", "200"): 2, ("POST", "/items/<int:item_id>", "200"): 1},
                     id="route template from the app"),
        pytest.param({}, [("GET", "/users/42/orders/7"), ("GET", "/users/43/orders/8")],
                     {("GET", "/users/{id}/orders/{id}", "200"): 2}, id="numeric segments collapsed"),
        pytest.param({}, [("GET", "/t/3f2b8c1e-1d2a-4b5c-9e8f-0a1b2c3d4e5f"), ("GET", "/t/deadbeefdeadbeef00")],
                     {("GET", "/t/{id}", "200"): 2}, id="uuid and long hex collapsed"),
        pytest.param({}, [("GET", "/missing"), ("GET", "/missing")], {("GET", "other", "404"): 2},
                     id="unmatched 404 is one label"),
        pytest.param({}, [("GET", "/limited")], {("GET", "other", "429"): 1},
                     id="refusal counted with its code, without the app's routes under other"),
        pytest.param({}, [("GET", "/crash")], {("GET", "/crash", "500"): 1}, id="exception counted as 500"),
        pytest.param({}, [("GET", "/teapot"), ("GET", "/own-response")],
                     {("GET", "other", "418"): 1, ("GET", "other", "403"): 1},
                     id="a refusal with its own response counted with that response's status"),
        pytest.param({"server_timing": True}, [("GET", "/teapot"), ("GET", "/own-response")],
                     {("GET", "other", "418"): 1, ("GET", "other", "403"): 1},
                     id="a refusal with its own response, timed"),
        pytest.param({}, [("GET", "/lazy")], {("GET", "/lazy", "201"): 1}, id="lazy start_response"),
        pytest.param({}, [("GET", "/replaced")], {("GET", "/replaced", "500"): 1}, id="exc_info replaces status"),
        pytest.param({}, [("TRACE", "/pot")], {("other", "/pot", "200"): 1}, id="rare method bounded"),
        pytest.param({"max_routes": 2}, [("GET", "/a"), ("GET", "/b"), ("GET", "/c"), ("GET", "/a")],
                     {("GET", "/a", "200"): 2, ("GET", "/b", "200"): 1, ("GET", "other", "200"): 1},
                     id="route labels capped"),
        pytest.param({"max_routes": 2}, [("GET", "/a"), ("GET", "/b"), ("GET", "/c"), ("POST", "/a")],
                     {("GET", "/a", "200"): 1, ("GET", "/b", "200"): 1, ("GET", "other", "200"): 1,
                      ("POST", "/a", "200"): 1}, id="a route label seen before the cap keeps its name"),
        pytest.param({"server_timing": True}, [("GET", "/items/1"), ("GET", "/lazy"), ("GET", "/limited")],
                     {("GET", "/items/<int:item_id>", "200"): 1, ("GET", "/lazy", "201"): 1,
                      ("GET", "other", "429"): 1}, id="the same when timing"),
    ],
)
def test_requests_counted(make: Callable[..., Any], options: dict[str, Any], requests: list[tuple[str, str]],
                          expected: dict[tuple[str, str, str], int]) -> None:
    app, _ = make(**options)
    for method, path in requests:
        app.request(path, method=method, expect_errors=True)
    found = scrape(app)
    counted = {
        (dict(labels)["method"], dict(labels)["route"], dict(labels)["status"]): value
        for (name, labels), value in found.items() if name == "wsgistack_http_requests_total"
    }
    assert counted == expected
    for (method, route, _), _value in expected.items():
        total = sum(v for (m, r, _s), v in expected.items() if (m, r) == (method, route))
        assert sample(found, "wsgistack_http_request_duration_seconds_count", method=method, route=route) == total


@pytest.mark.parametrize("options", [{}, {"server_timing": True}, {"layer_timing": True}])
def test_a_failure_after_write_is_counted_once(make: Callable[..., Any], options: dict[str, Any]) -> None:
    """The headers went out with the first write(); the app then raised: one failed request, whatever the timing."""
    from werkzeug.test import EnvironBuilder

    app, _ = make(**options)
    sent: list[bytes] = []

    def server(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Callable[[bytes], None]:
        if exc_info is not None and sent:  # as a server does once bytes went out
            raise exc_info[1].with_traceback(exc_info[2])
        return sent.append

    with pytest.raises(RuntimeError, match="failed after writing"):
        app.app(EnvironBuilder(path="/write-then-fail").get_environ(), server)
    counted = {dict(labels)["status"]: value for (name, labels), value in scrape(app).items()
               if name == "wsgistack_http_requests_total" and dict(labels)["route"] == "/write-then-fail"}
    assert counted == {"500": 1.0}  # the outcome, as the access log has it: a 5xx alert sees it


@pytest.mark.parametrize("options", [{}, {"server_timing": True}, {"layer_timing": True}])
@pytest.mark.parametrize("path", ["/ok", "/lazy"])
def test_headers_the_server_refuses_are_counted(make: Callable[..., Any], options: dict[str, Any],
                                                path: str) -> None:
    """Waitress's start_response raises on a hop-by-hop header (and an outer layer's may refuse): one 500."""
    from werkzeug.test import EnvironBuilder

    app, _ = make(**options)

    def server(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Callable[[bytes], None]:
        raise AssertionError("Connection is a hop-by-hop header")

    with pytest.raises(AssertionError):
        body = app.app(EnvironBuilder(path=path).get_environ(), server)
        try:
            list(body)
        finally:
            getattr(body, "close", lambda: None)()
    counted = {dict(labels)["status"]: value for (name, labels), value in scrape(app).items()
               if name == "wsgistack_http_requests_total" and dict(labels)["route"] == path}
    assert counted == {"500": 1.0}


@pytest.mark.parametrize("options", [{}, {"server_timing": True}])
@pytest.mark.parametrize("body", [[], [b"body first"]])
def test_an_app_that_never_starts_its_response_is_counted_as_500(make: Callable[..., Any], options: dict[str, Any],
                                                                  body: list[bytes]) -> None:
    """A broken app (no start_response before or after its body): the server fails the request; it is one 500."""
    from werkzeug.test import EnvironBuilder

    def broken(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterator[bytes]:
        yield from body

    app, _ = make(broken, **options)
    result = app.app(EnvironBuilder(path="/broken").get_environ(), lambda *a: (lambda data: None))
    try:
        list(result)
    except AssertionError:  # (held headers: the layer says what the server would; never an IndexError)
        assert options
    counted = {dict(labels)["status"]: value for (name, labels), value in scrape(app).items()
               if name == "wsgistack_http_requests_total"}
    assert counted == {"500": 1.0}


def refusing_generator_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterator[bytes]:
    """A generator app refusing on its body's first iteration (before or after its lazy start_response)."""
    if environ["PATH_INFO"] == "/started":
        start_response("200 OK", [("Content-Type", "text/plain")])
    if environ["PATH_INFO"] == "/crash":
        raise RuntimeError("inner failure")
    raise refuse(429, "Slow down.", headers=[("Retry-After", "3")])
    yield b"never"


@pytest.mark.parametrize("options", [{}, {"server_timing": True}, {"layer_timing": True}])
@pytest.mark.parametrize(("path", "status", "route"), [("/refused", 429, "other"), ("/started", 429, "other"),
                                                        ("/crash", 500, "/crash")])
def test_a_generator_apps_refusal_is_counted_with_the_status_sent(
        make: Callable[..., Any], options: dict[str, Any], path: str, status: int, route: str) -> None:
    """errors renders what a generator app raises before its first chunk: that status is counted, with the header."""
    app, _ = make(timed_stack(refusing_generator_app) if options else refusing_generator_app, **options)
    response = app.get(path, status=status)
    if status == 429:
        assert response.headers["Retry-After"] == "3"
    if options.get("server_timing"):
        assert list(timing_entries(response.headers["Server-Timing"])) == ["outer", "inner", "total"]
    else:
        assert "Server-Timing" not in response.headers
    counted = {(dict(labels)["route"], dict(labels)["status"]): value for (name, labels), value in scrape(app).items()
               if name == "wsgistack_http_requests_total"}
    assert counted == {(route, str(status)): 1.0}


def test_unrouted_requests_take_the_app_route_or_other(make: Callable[..., Any], context: Context) -> None:
    """A client sending random paths that a layer refuses cannot fill the route label space."""
    context.services["route_template"] = lambda path, method: "/limited" if path == "/limited" else None
    app, _ = make(max_routes=3)
    for i in range(20):
        app.get(f"/limited-{i}", headers={"X-Refuse": "401"}, expect_errors=True)
    app.get("/limited", expect_errors=True)
    app.get("/limited", expect_errors=True)  # (the template the app matched, looked up once)
    app.get("/items/1")
    counted = {(dict(labels)["route"], dict(labels)["status"]): value
               for (name, labels), value in scrape(app).items() if name == "wsgistack_http_requests_total"}
    assert counted == {("other", "401"): 20, ("/limited", "429"): 2, ("/items/<int:item_id>", "200"): 1}



def test_a_refusal_before_versioning_takes_the_route_it_would_reach(make_stack: Callable[..., TestApp]) -> None:
    """auth refuses /api/config before versioning routes it to /api/v2/config: the label is that route, not
    other (where 404 noise goes), as for the same request with a token."""
    app = make_stack({
        "pipeline": [{"errors": {}}, {"metrics": {"process_metrics": False}},
                     {"auth": {"secret": "s" * 48, "default": "required"}},
                     {"versioning": {"supported": ["v1", "v2"], "default": "v2"}}],
    })
    app.get("/api/config", status=401)
    app.get("/api/config", headers={"X-API-Version": "1"}, status=401)
    app.get("/api/nowhere", status=401)
    found = samples(app.get("/metrics", extra_environ={"REMOTE_ADDR": "127.0.0.1"}).text)
    assert sample(found, "wsgistack_http_requests_total", method="GET", route="/api/v2/config", status="401") == 1
    assert sample(found, "wsgistack_http_requests_total", method="GET", route="/api/v1/config", status="401") == 1
    assert sample(found, "wsgistack_http_requests_total", method="GET", route="other", status="401") == 1


@pytest.mark.parametrize(("path", "route"), [
    pytest.param("/api/config", "/api/v2/config", id="a route that sorts after the path"),
    pytest.param("/api/zones", "/api/v2/zones", id="a route that sorts before the path"),
    pytest.param("/api/v2/zones", "/api/v2/zones", id="a path no layer rewrites"),
    pytest.param("/api/nowhere", "other", id="a rewritten path no route matches"),
])
def test_a_refusal_before_a_rewrite_takes_the_route_the_rewritten_path_reaches(
        make: Callable[..., Any], context: Context, path: str, route: str) -> None:
    routes = {"/api/v2/config", "/api/v2/zones"}
    context.services["route_template"] = lambda path, method: path if path in routes else None
    context.path_rewrites.append(
        lambda environ: None if environ["PATH_INFO"].startswith("/api/v2/") else
        {"PATH_INFO": "/api/v2/" + environ["PATH_INFO"].removeprefix("/api/")})
    app, _ = make()
    app.get(path, headers={"X-Refuse": "401"}, status=401)
    counted = {(dict(labels)["route"], dict(labels)["status"]): value
               for (name, labels), value in scrape(app).items() if name == "wsgistack_http_requests_total"}
    assert counted == {(route, "401"): 1}


@pytest.mark.parametrize("path", [
    pytest.param("/users/42", id="rooted"),
    pytest.param("users/42", id="without its leading slash (Waitress passes GET users/42 on as it came)"),
    pytest.param("//users/42", id="leading slashes (gunicorn passes them on)"),
    pytest.param("///users/42", id="more leading slashes"),
])
def test_an_apps_path_is_labelled_as_the_router_roots_it(make_stack: Callable[..., TestApp], path: str) -> None:
    """Without the route_template service the label is the path, rooted as the router roots it: the
    spellings of one URL are one series, and slashes a client adds cannot make new label values."""
    app = make_stack({"app": {"factory": "stack_support:echo_app"},
                      "pipeline": [{"errors": {}}, {"metrics": {"process_metrics": False}}]})
    app.lint = False  # (WebTest's lint refuses a PATH_INFO that does not start with '/')
    app.get("/users/42")
    app.get("/", extra_environ={"PATH_INFO": path})
    counted = {dict(labels)["route"]: value for (name, labels), value in
               samples(app.get("/metrics", extra_environ={"REMOTE_ADDR": "127.0.0.1"}).text).items()
               if name == "wsgistack_http_requests_total"}
    assert counted == {"/users/{id}": 2}


def test_the_cache_purge_endpoint_has_its_own_route_label(make: Callable[..., Any], context: Context) -> None:
    from middleware.cache import CacheMiddleware

    purger = CacheMiddleware(inner_app, CacheMiddleware.Options(purge_path="/_cache/purge"), context)
    app, _ = make(purger)
    app.post("/_cache/purge?pattern=/x", status=401)  # no identity: refused, but labelled
    assert sample(scrape(app), "wsgistack_http_requests_total", method="POST", route="/_cache/purge",
                  status="401") == 1.0


@pytest.mark.parametrize("options", [{}, {"layer_timing": True}])
@pytest.mark.parametrize("refused", [False, True])
def test_latency_lands_in_buckets(make: Callable[..., Any], options: dict[str, Any], refused: bool) -> None:
    """A refusal the app raises is timed as an answer it returns is."""
    def slow(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        time.sleep(0.02)
        if refused:
            raise refuse(503, "Later.")
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"slow"]

    app, _ = make(slow, buckets=[0.01, 1.0], **options)
    app.get("/slow", status=503 if refused else 200)
    found = scrape(app)
    labels = {"method": "GET", "route": "/slow"}
    assert sample(found, "wsgistack_http_request_duration_seconds_bucket", **labels, le="0.01") == 0
    assert sample(found, "wsgistack_http_request_duration_seconds_bucket", **labels, le="1.0") == 1
    assert (sample(found, "wsgistack_http_request_duration_seconds_sum", **labels) or 0) >= 0.02


def test_a_latency_equal_to_a_bound_is_counted_in_that_bound(make: Callable[..., Any],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A bucket is ``le``, less than or equal (as prometheus_client counts): 0.25 s lands in le="0.25"."""
    from types import SimpleNamespace

    from middleware import metrics as metrics_module

    clock = SimpleNamespace(now=100.0)
    monkeypatch.setattr(metrics_module, "time", SimpleNamespace(
        **{name: getattr(time, name) for name in dir(time) if not name.startswith("_")} | {
            "perf_counter": lambda: clock.now}))

    def quarter_second(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        clock.now += 0.25
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"done"]

    app, _ = make(quarter_second, buckets=[0.1, 0.25, 1.0])
    app.get("/timed")
    found = scrape(app)
    labels = {"method": "GET", "route": "/timed"}
    assert [sample(found, "wsgistack_http_request_duration_seconds_bucket", **labels, le=le)
            for le in ("0.1", "0.25", "1.0", "+Inf")] == [0, 1, 1, 1]
    assert sample(found, "wsgistack_http_request_duration_seconds_sum", **labels) == 0.25


def test_body_streams_and_close_is_forwarded(make: Callable[..., Any]) -> None:
    closed: list[bool] = []

    class Body:
        def __iter__(self) -> Iterator[bytes]:
            yield b"a"
            yield b"b"

        def close(self) -> None:
            closed.append(True)

    def streaming(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        start_response("200 OK", [("Content-Type", "text/event-stream")])
        return Body()

    for timing in (False, True):
        closed.clear()
        app, _ = make(streaming, server_timing=timing)
        assert app.get("/events").body == b"ab"
        assert closed == [True]


# --- the exposition endpoint ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "environ", "status"),
    [
        pytest.param({}, {"REMOTE_ADDR": "127.0.0.1"}, 200, id="loopback v4"),
        pytest.param({}, {"REMOTE_ADDR": "::1"}, 200, id="loopback v6"),
        pytest.param({}, {"REMOTE_ADDR": "::ffff:127.0.0.1"}, 200, id="v4-mapped loopback"),
        pytest.param({}, {"REMOTE_ADDR": "203.0.113.5"}, 403, id="public address refused"),
        pytest.param({}, {"REMOTE_ADDR": ""}, 403, id="no address refused"),
        pytest.param({}, {"REMOTE_ADDR": "fe80::1%eth0"}, 403, id="unparsable address refused"),
        pytest.param({}, {"REMOTE_ADDR": "127.0.0.1", CLIENT_IP: "203.0.113.5"}, 403,
                     id="client ip from the proxy layer wins"),
        pytest.param({"allow_from": ["10.0.0.0/8"]}, {"REMOTE_ADDR": "10.1.2.3"}, 200, id="allowed network"),
        pytest.param({"allow_from": ["::ffff:10.0.0.0/104"]}, {"REMOTE_ADDR": "10.1.2.3"}, 200,
                     id="an ipv4-mapped network: its ipv4 scraper"),
        pytest.param({"allow_from": ["::ffff:10.0.0.0/104"]}, {"REMOTE_ADDR": "::ffff:10.1.2.3"}, 200,
                     id="an ipv4-mapped network: its ipv4-mapped scraper"),
        pytest.param({"allow_from": ["10.0.0.0/8"]}, {"REMOTE_ADDR": "127.0.0.1"}, 403,
                     id="loopback not implied"),
        pytest.param({"allow_from": []}, {"REMOTE_ADDR": "127.0.0.1"}, 403, id="nobody"),
    ],
)
def test_who_may_scrape(make: Callable[..., Any], options: dict[str, Any], environ: dict[str, str],
                        status: int) -> None:
    app, _ = make(**options)
    response = app.get("/metrics", extra_environ=environ, status=status)
    if status == 403:
        assert response.json["error"]["message"] == "Metrics are not available to this client."
    else:
        assert "wsgistack_http_requests" in response.text


PROMETHEUS = {"User-Agent": "Prometheus/2.53.0", "Accept": "text/plain;version=0.0.4;q=0.3,*/*;q=0.2"}
FIREFOX = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"
CROSS_SITE = "Metrics may not be read from another site's page (Sec-Fetch-Site: cross-site)."


def unlisted(host: str) -> str:
    return (f"Host {host} is not one of metrics.hosts: add it there to open metrics by this name (IP addresses and "
            "localhost need no entry); other names are refused so that a DNS-rebinding site cannot read it.")


@pytest.mark.parametrize(
    ("options", "headers", "expected"),
    [
        # a scraper sends no browser header: any Host, until hosts lists the names
        pytest.param({}, {**PROMETHEUS, "Host": "app.internal:8000"}, (200, None), id="Prometheus by a DNS name"),
        pytest.param({}, {"User-Agent": "curl/8.5.0", "Host": "app.internal"}, (200, None), id="curl by a name"),
        pytest.param({}, {"Host": "app.internal"}, (200, None), id="no User-Agent at all"),
        pytest.param({"hosts": ["metrics.example.org"]}, {**PROMETHEUS, "Host": "app.internal:8000"},
                     (403, unlisted("app.internal")), id="hosts set: every request's Host is checked"),
        pytest.param({"hosts": ["metrics.example.org"]}, {**PROMETHEUS, "Host": "Metrics.Example.org.:8000"},
                     (200, None), id="hosts set: a listed name"),
        pytest.param({"hosts": ["metrics.example.org"]}, {**PROMETHEUS, "Host": "10.0.0.5:8000"}, (200, None),
                     id="hosts set: an IP literal"),
        pytest.param({"hosts": ["*.svc.cluster.local"]}, {**PROMETHEUS, "Host": "app.ns.svc.cluster.local:8000"},
                     (200, None), id="hosts set: a wildcard"),
        # a browser: its Host is checked (DNS rebinding)
        pytest.param({}, {"User-Agent": FIREFOX, "Host": "attacker.example:8000"}, (403, unlisted("attacker.example")),
                     id="DNS rebinding over http: only the browser's User-Agent shows"),
        pytest.param({}, {"Sec-Fetch-Site": "same-origin", "Host": "attacker.example"},
                     (403, unlisted("attacker.example")), id="DNS rebinding: fetch metadata"),
        pytest.param({}, {"Origin": "http://attacker.example", "Host": "attacker.example"},
                     (403, unlisted("attacker.example")), id="DNS rebinding: an Origin"),
        pytest.param({}, {"User-Agent": FIREFOX, "Host": "localhost:8000"}, (200, None), id="a browser on localhost"),
        pytest.param({}, {"User-Agent": FIREFOX, "Host": "[::1]:8000"}, (200, None), id="a browser on [::1]"),
        pytest.param({"hosts": ["app.internal"]}, {"User-Agent": FIREFOX, "Host": "app.internal"}, (200, None),
                     id="a browser by a listed name"),
        # another origin's page
        pytest.param({}, {"Sec-Fetch-Site": "cross-site"}, (403, CROSS_SITE), id="cross-site"),
        pytest.param({}, {"Sec-Fetch-Site": "same-site"},
                     (403, "Metrics may not be read from another site's page (Sec-Fetch-Site: same-site)."),
                     id="same-site"),
        pytest.param({}, {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "document"},
                     (200, None), id="a link on another site (the targets page of Prometheus)"),
        pytest.param({}, {"Origin": "https://grafana.example.org"},
                     (403, "Metrics may not be read from another origin's page (Origin https://grafana.example.org "
                           "is not this one, http://localhost)."), id="another origin"),
        pytest.param({}, {"Origin": "http://localhost", "Sec-Fetch-Site": "same-origin"}, (200, None),
                     id="own origin"),
    ],
)
def test_browsers_and_hosts(make: Callable[..., Any], options: dict[str, Any], headers: dict[str, str],
                            expected: tuple[int, str | None]) -> None:
    status, text = expected
    app, _ = make(**options)
    response = app.get("/metrics", headers=headers, extra_environ={"REMOTE_ADDR": "127.0.0.1"}, status=status)
    if text is None:
        assert "wsgistack_http_requests" in response.text
        return
    assert response.json["error"]["message"] == text
    found = scrape(app)  # the refusal is counted, as the address's is
    assert sample(found, "wsgistack_http_requests_total", method="GET", route="/metrics", status="403") == 1


def test_other_paths_are_not_checked(make: Callable[..., Any]) -> None:
    """Only the exposition is: the app behind the layer serves every host and origin as before."""
    app, _ = make(hosts=["metrics.example.org"])
    app.get("/ok", headers={"Host": "attacker.example", "User-Agent": FIREFOX, "Sec-Fetch-Site": "cross-site",
                            "Origin": "https://evil.example"}, status=200)


def test_exposition_never_enters_the_app(make: Callable[..., Any]) -> None:
    def app_that_must_not_run(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        raise AssertionError("the app was entered")

    app, _ = make(app_that_must_not_run, path="/internal/metrics")
    assert app.get("/internal/metrics", extra_environ={"REMOTE_ADDR": "127.0.0.1"}).status_int == 200
    assert app.get("/internal/metrics", extra_environ={"REMOTE_ADDR": "203.0.113.5"}, status=403)


@pytest.mark.parametrize("path_info", ["//metrics", "metrics"])
def test_leading_slashes_count_as_one_for_the_exposition(make: Callable[..., Any], path_info: str) -> None:
    """As the router counts them (gunicorn passes them on): //metrics is the exposition, and as guarded;
    so is metrics (GET metrics HTTP/1.1, which Waitress passes on as sent and the router roots)."""
    def app_that_must_not_run(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        raise AssertionError("the app was entered")

    app, _ = make(app_that_must_not_run)
    app.lint = False  # (WebTest's lint refuses a PATH_INFO without its slash, which Waitress gives)
    assert app.get("/", extra_environ={"PATH_INFO": path_info, "REMOTE_ADDR": "127.0.0.1"}).status_int == 200
    app.get("/", extra_environ={"PATH_INFO": path_info, "REMOTE_ADDR": "203.0.113.5"}, status=403)


def test_scrapes_are_not_counted_and_refused_ones_are(make: Callable[..., Any]) -> None:
    app, _ = make()
    loopback = {"REMOTE_ADDR": "127.0.0.1"}
    app.get("/metrics", extra_environ=loopback)
    app.get("/metrics", extra_environ={"REMOTE_ADDR": "203.0.113.5"}, status=403)
    app.delete("/metrics", extra_environ=loopback, status=405)
    found = scrape(app)
    counted = {dict(labels)["status"]: value for (name, labels), value in found.items()
               if name == "wsgistack_http_requests_total" and dict(labels).get("route") == "/metrics"}
    assert counted == {"403": 1.0, "405": 1.0}


def test_a_client_outside_allow_from_learns_nothing_of_the_methods(make: Callable[..., Any]) -> None:
    app, _ = make()
    for method in ("DELETE", "OPTIONS", "POST"):
        response = app.request("/metrics", method=method, environ={"REMOTE_ADDR": "203.0.113.5"},
                               expect_errors=True)
        assert (response.status_int, response.headers.get("Allow")) == (403, None), method


def test_exposition_methods_and_formats(make: Callable[..., Any]) -> None:
    app, _ = make()
    loopback = {"REMOTE_ADDR": "127.0.0.1"}
    response = app.post("/metrics", extra_environ=loopback, status=405)
    assert response.headers["Allow"] == "GET, HEAD"
    assert response.json["error"]["message"] == "/metrics answers GET and HEAD only."
    head = app.head("/metrics", extra_environ=loopback)
    assert head.body == b"" and int(head.headers["Content-Length"]) > 0
    open_metrics = app.get("/metrics", extra_environ=loopback,
                           headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert open_metrics.headers["Content-Type"].startswith("application/openmetrics-text")
    assert open_metrics.text.endswith("# EOF\n")


TEXT_004 = "text/plain; version=0.0.4; charset=utf-8"
OPEN_METRICS_1 = "application/openmetrics-text; version=1.0.0; charset=utf-8; escaping=underscores"


@pytest.mark.parametrize(
    ("accept", "content_type"),
    [
        pytest.param("", TEXT_004, id="none"),
        pytest.param("text/plain;version=0.0.4;q=0.3,*/*;q=0.2", TEXT_004, id="prometheus 2 without openmetrics"),
        pytest.param("application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
                     "text/plain;version=0.0.4;q=0.5,*/*;q=0.1", OPEN_METRICS_1, id="prometheus 2"),
        pytest.param("application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.6,"
                     "application/openmetrics-text;version=0.0.1;q=0.5,text/plain;version=1.0.0;escaping=allow-utf-8;"
                     "q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.2",
                     "application/openmetrics-text; version=1.0.0; charset=utf-8; escaping=allow-utf-8",
                     id="prometheus 3"),
        pytest.param("application/openmetrics-text", "application/openmetrics-text; version=1.0.0; charset=utf-8",
                     id="openmetrics without a version"),
        pytest.param("application/openmetrics-text; version=abc", TEXT_004, id="a version that is no number"),
        pytest.param("text/plain; version=1.x", TEXT_004, id="a text version that is no number"),
        pytest.param("application/openmetrics-text; version=abc, application/openmetrics-text; version=1.0.0",
                     OPEN_METRICS_1, id="an unreadable entry is passed over"),
        pytest.param('application/openmetrics-text; version="1.0.0', TEXT_004, id="a stray quote"),
        pytest.param("application/openmetrics-text; version=9.x", TEXT_004, id="not echoed in the Content-Type"),
        pytest.param("text/plain;version=0.0.4;q=0.6,application/openmetrics-text;version=1.0.0;q=0.5,*/*;q=0.4",
                     TEXT_004, id="prometheus with scrape_protocols [PrometheusText0.0.4, OpenMetricsText1.0.0]"),
        pytest.param("application/openmetrics-text;version=1.0.0;q=0.1, text/plain;version=0.0.4", TEXT_004,
                     id="text weighed above openmetrics, listed after it"),
        pytest.param("application/openmetrics-text;q=0, text/plain", TEXT_004, id="openmetrics refused by q=0"),
        pytest.param("application/openmetrics-text;version=1.0.0;q=0.000", TEXT_004, id="the only entry refused"),
        pytest.param("text/plain;q=0, application/openmetrics-text;version=1.0.0;q=0.5", OPEN_METRICS_1,
                     id="text refused by q=0"),
        # A range admits the formats it covers at its own weight, unless the client named the format itself.
        pytest.param("*/*;q=0.8, application/openmetrics-text;version=1.0.0;q=0.5", TEXT_004,
                     id="anything weighed above openmetrics: the text format"),
        pytest.param("text/*;q=0.9, application/openmetrics-text;version=1.0.0;q=0.5", TEXT_004,
                     id="any text weighed above openmetrics"),
        pytest.param("text/plain;q=0, */*;q=0.8, application/openmetrics-text;version=1.0.0;q=0.5", OPEN_METRICS_1,
                     id="text refused by name, anything else weighed above openmetrics"),
        pytest.param("*/*, application/openmetrics-text;version=1.0.0", OPEN_METRICS_1,
                     id="a range and openmetrics weighed alike: the format named"),
        pytest.param("text/plain;q=0.1, application/*;q=0.5",
                     "application/openmetrics-text; version=1.0.0; charset=utf-8",
                     id="any application type weighed above text: openmetrics, as without a version"),
        pytest.param("Application/OpenMetrics-Text;version=1.0.0", OPEN_METRICS_1, id="media type in any case"),
    ],
)
def test_exposition_formats_by_accept(make: Callable[..., Any], accept: str, content_type: str) -> None:
    """Whatever an allowed client sends in Accept, it gets an exposition in a format it can read, never a 500."""
    app, _ = make()
    response = app.get("/metrics", headers={"Accept": accept}, extra_environ={"REMOTE_ADDR": "127.0.0.1"}, status=200)
    assert response.headers["Content-Type"] == content_type
    assert "wsgistack_http_requests" in response.text


@pytest.mark.parametrize(
    ("accept_encoding", "gzipped"),
    [
        pytest.param("gzip", True, id="what Prometheus sends"),
        pytest.param("deflate, GZIP;q=0.5", True, id="among others, any case"),
        pytest.param("gzip;q=0", False, id="refused by q=0"),
        pytest.param("gzip; q=0.000", False, id="refused by q=0.000"),
        pytest.param("br", False, id="another coding"),
        pytest.param("br, *", True, id="any coding"),
        pytest.param("", False, id="none"),
    ],
)
@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_exposition_compressed_when_accepted(make: Callable[..., Any], accept_encoding: str, gzipped: bool,
                                             method: str) -> None:
    import gzip

    from werkzeug.test import Client

    app, _ = make()
    client = Client(app.app)  # (WebTest would undo the gzip)
    environ = {"REMOTE_ADDR": "127.0.0.1"}
    response = client.open("/metrics", method=method, headers={"Accept-Encoding": accept_encoding},
                           environ_overrides=environ)
    assert response.status_code == 200
    assert response.headers.get("Content-Encoding") == ("gzip" if gzipped else None)
    assert response.headers["Vary"] == "Accept, Accept-Encoding"
    full = client.get("/metrics", headers={"Accept-Encoding": accept_encoding}, environ_overrides=environ).data
    assert int(response.headers["Content-Length"]) == len(full)
    if method == "HEAD":
        assert response.data == b""
        return
    text = gzip.decompress(response.data) if gzipped else response.data
    assert b"wsgistack_http_requests" in text


def test_scrapes_are_not_counted_as_requests(make: Callable[..., Any]) -> None:
    app, _ = make()
    scrape(app)
    assert not [k for k in scrape(app) if k[0] == "wsgistack_http_requests_total"]


def test_each_instance_has_its_own_registry(context: Context) -> None:
    first = MetricsMiddleware(inner_app, MetricsMiddleware.Options(), context)
    second = MetricsMiddleware(inner_app, MetricsMiddleware.Options(), context)
    assert first.registry is not second.registry
    assert REGISTRY.get_sample_value("wsgistack_http_requests_total") is None
    TestApp(first).get("/x")
    assert first.registry.get_sample_value(
        "wsgistack_http_requests_total", {"method": "GET", "route": "/x", "status": "200"}) == 1
    assert second.registry.get_sample_value(
        "wsgistack_http_requests_total", {"method": "GET", "route": "/x", "status": "200"}) is None


@pytest.mark.parametrize("process_metrics", [True, False])
def test_process_metrics_option(make: Callable[..., Any], process_metrics: bool) -> None:
    app, _ = make(process_metrics=process_metrics)
    names = {name for name, _ in scrape(app)}
    assert ("python_info" in names) is process_metrics
    assert ("python_gc_collections_total" in names) is process_metrics


# --- per-layer timing and Server-Timing ----------------------------------------------------


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        pytest.param({}, False, id="off by default"),
        pytest.param({"layer_timing": True}, True, id="layer histogram"),
        pytest.param({"server_timing": True}, True, id="server timing"),
    ],
)
def test_wants_layer_timing(options: dict[str, Any], expected: bool) -> None:
    assert MetricsMiddleware.wants_layer_timing(MetricsMiddleware.Options(**options)) is expected
    assert MetricsMiddleware.wants_layer_timing(options) is expected


def timed_stack(inner: Any = inner_app) -> Any:
    """Two timed layers around the app, as the builder would fold them: outer, then inner."""
    return Timed("outer", Timed("inner", inner, delay=0.002), delay=0.001)


def timing_entries(header: str) -> dict[str, float]:
    entries = [part.strip() for part in header.split(",")]
    assert all(SERVER_TIMING.match(e) for e in entries), header
    return {e.split(";")[0]: float(e.split("=")[1]) for e in entries}


@pytest.mark.parametrize("path", ["/ok", "/lazy", "/replaced", "/items/9"])
def test_server_timing_header(make: Callable[..., Any], path: str) -> None:
    app, _ = make(timed_stack(), server_timing=True)
    response = app.get(path, expect_errors=True)
    entries = timing_entries(response.headers["Server-Timing"])
    assert list(entries) == ["outer", "inner", "total"]
    assert entries["inner"] >= 2.0 and entries["outer"] >= 1.0
    assert entries["total"] >= entries["inner"] + entries["outer"] - 0.01


def test_server_timing_with_legacy_write(make: Callable[..., Any]) -> None:
    # write() sends the headers while the layers are still running: only the total is known.
    app, _ = make(timed_stack(), server_timing=True)
    response = app.get("/write")
    assert response.body == b"legacy write"
    assert list(timing_entries(response.headers["Server-Timing"])) == ["total"]


def test_server_timing_on_refusals(make: Callable[..., Any]) -> None:
    app, _ = make(timed_stack(), server_timing=True)
    for path, status in (("/limited", 429), ("/crash", 500)):
        response = app.get(path, status=status)
        assert list(timing_entries(response.headers["Server-Timing"])) == ["outer", "inner", "total"]
    assert app.get("/limited", status=429).headers["Retry-After"] == "3"


@pytest.mark.parametrize("options", [{}, {"layer_timing": True}])
def test_no_server_timing_unless_enabled(make: Callable[..., Any], options: dict[str, Any]) -> None:
    app, _ = make(timed_stack() if options else inner_app, **options)
    assert "Server-Timing" not in app.get("/ok").headers
    assert "Server-Timing" not in app.get("/limited", status=429).headers


def test_layer_timing_histogram(make: Callable[..., Any]) -> None:
    app, _ = make(timed_stack(), layer_timing=True)
    app.get("/ok")
    app.get("/ok")
    found = scrape(app)
    assert sample(found, "wsgistack_layer_duration_seconds_count", layer="inner") == 2
    assert sample(found, "wsgistack_layer_duration_seconds_count", layer="outer") == 2
    inner_sum = sample(found, "wsgistack_layer_duration_seconds_sum", layer="inner") or 0
    outer_sum = sample(found, "wsgistack_layer_duration_seconds_sum", layer="outer") or 0
    assert inner_sum >= 0.004 and 0.002 <= outer_sum < inner_sum  # exclusive, not inclusive, times


def test_a_slow_layer_lands_below_the_request_histograms_top(make: Callable[..., Any]) -> None:
    """The app (timed as a layer) may take seconds: its time lands in a bucket histogram_quantile can read.

    Above the layer histogram's highest finite bound only +Inf is left, and a quantile there is that bound.
    """

    def slow_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        environ[TIMINGS].append(("app", 3.0))  # what the builder's timing would record of a 3 s answer
        return inner_app(environ, start_response)

    app, _ = make(slow_app, layer_timing=True)
    app.get("/ok")
    found = scrape(app)
    top = max(float(dict(labels)["le"]) for name, labels in found
              if name == "wsgistack_http_request_duration_seconds_bucket" and dict(labels)["le"] != "+Inf")
    finite = {float(dict(labels)["le"]): value for (name, labels), value in found.items()
              if name == "wsgistack_layer_duration_seconds_bucket" and dict(labels)["le"] != "+Inf"}
    assert max(finite) >= top == 10.0
    assert (finite[1.0], finite[5.0]) == (0, 1)


def test_server_timing_from_yaml(make_stack: Callable[..., TestApp]) -> None:
    app = make_stack({
        "app": {"factory": "stack_support:echo_app"},
        "pipeline": [{"errors": {}}, {"metrics": {"server_timing": True, "process_metrics": False}},
                     {"request_id": {}}, {"stack_support:Tag": {"name": "t"}}],
    })
    response = app.get("/api/x")
    entries = timing_entries(response.headers["Server-Timing"])
    assert list(entries) == ["request_id", "stack_support_Tag", "app", "total"]
    assert response.json["request_id"]
    found = samples(app.get("/metrics", extra_environ={"REMOTE_ADDR": "127.0.0.1"}).text)
    assert sample(found, "wsgistack_http_requests_total", method="GET", route="/api/x", status="200") == 1


# --- events from the other layers ----------------------------------------------------------


def test_events_are_counted(make: Callable[..., Any], context: Context) -> None:
    app, _ = make()
    for event in ("cache.hit", "cache.hit", "cache.miss", "cache.stale", "cache.bypass", "session.created"):
        context.emit(event)
    for event in ("ratelimit.pass", "ratelimit.pass", "ratelimit.reject", "ratelimit.shadow_reject"):
        context.emit(event, rule="100/minute", limit=100)
    context.emit("ratelimit.reject")
    context.emit("auth.failure", reason="expired")
    context.emit("auth.failure", reason="expired")
    context.emit("auth.failure")
    context.emit("store.error", store="shared", layer="ratelimit")
    context.emit("version.deprecated", version="v1", client="203.0.113.5")
    context.emit("csrf.reject")
    found = scrape(app)
    expected = {
        ("wsgistack_cache_events_total", "result", "hit"): 2,
        ("wsgistack_cache_events_total", "result", "miss"): 1,
        ("wsgistack_cache_events_total", "result", "stale"): 1,
        ("wsgistack_cache_events_total", "result", "bypass"): 1,
        ("wsgistack_auth_failures_total", "reason", "expired"): 2,
        ("wsgistack_auth_failures_total", "reason", "unknown"): 1,
        ("wsgistack_deprecated_version_requests_total", "version", "v1"): 1,
        ("wsgistack_events_total", "event", "csrf.reject"): 1,
    }
    for (name, label, value), count in expected.items():
        assert sample(found, name, **{label: value}) == count, (name, value)
    for result, count in (("pass", 2), ("reject", 1), ("shadow_reject", 1)):
        assert sample(found, "wsgistack_ratelimit_events_total", result=result, rule="100/minute") == count
    assert sample(found, "wsgistack_ratelimit_events_total", result="reject", rule="unknown") == 1
    assert sample(found, "wsgistack_store_errors_total", store="shared", layer="ratelimit") == 1
    assert sample(found, "wsgistack_sessions_created_total") == 1
    # each family holds its own events only
    assert {labels: value for (name, labels), value in found.items() if name == "wsgistack_events_total"} == {
        frozenset({("event", "csrf.reject")}): 1}


def test_event_label_values_are_capped(make: Callable[..., Any], context: Context) -> None:
    app, _ = make()
    for i in range(70):
        context.emit("auth.failure", reason=f"reason-{i}")
    reasons = {dict(labels)["reason"] for name, labels in scrape(app) if name == "wsgistack_auth_failures_total"}
    assert len(reasons) == 65 and "other" in reasons


def test_a_failing_count_never_fails_the_emitter(make: Callable[..., Any], context: Context,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    class Unprintable:
        def __str__(self) -> str:
            raise ValueError("cannot print")

    make()
    with caplog.at_level(logging.ERROR, logger="wsgistack"):
        context.emit("auth.failure", reason=Unprintable())
        context.emitter("auth.failure", reason=Unprintable())()
    assert [r.getMessage() for r in caplog.records] == ["metrics could not count event 'auth.failure'"] * 2


def test_an_emitter_counts_as_emit_does_and_reaches_listeners_added_later(make: Callable[..., Any],
                                                                         context: Context) -> None:
    """``Context.emitter`` (the per-request events: ratelimit.pass, cache.hit) counts what ``emit`` counts."""
    passed = context.emitter("ratelimit.pass", rule="r0")
    passed()  # no listener yet: nothing to count
    app, _ = make()
    seen: list[tuple[str, dict[str, Any]]] = []
    passed()
    context.listeners.append(lambda event, fields: seen.append((event, fields)))
    passed()
    context.emit("ratelimit.pass", rule="r0")
    assert sample(scrape(app), "wsgistack_ratelimit_events_total", result="pass", rule="r0") == 3
    assert seen == [("ratelimit.pass", {"rule": "r0"})] * 2
    seen[0][1]["mine"] = 1  # each call hands a listener a dict of its own, as emit does
    context.listeners[-1] = lambda event, fields: seen.append(("replaced", fields))  # same count, another one
    passed()
    assert seen[1:] == [("ratelimit.pass", {"rule": "r0"}), ("replaced", {"rule": "r0"})]


# --- store health at scrape time -----------------------------------------------------------


@pytest.fixture
def dead_store() -> Iterator[Store]:
    """A Redis store with nothing listening on its port."""
    store = store_from_url(f"redis://127.0.0.1:{free_port()}/0", socket_timeout=0.2, socket_connect_timeout=0.2)
    yield store
    store.close()


# --- several worker processes ---------------------------------------------------------------


def test_workers_share_their_counts(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    """Two layers stand for two worker processes: each scrape reports what both counted."""
    monkeypatch.setattr("middleware.metrics.SHARE_INTERVAL", 0.05)
    monkeypatch.setenv("WSGISTACK_METRICS_DIR", str(tmp_path / "shared"))
    workers = []
    for _ in range(2):
        context = Context(stores={"shared": MemoryStore()})
        layer = MetricsMiddleware(timed_stack(), MetricsMiddleware.Options(process_metrics=False,
                                                                          layer_timing=True), context)
        workers.append((TestApp(ErrorsMiddleware(layer, ErrorsMiddleware.Options(), Context())), layer, context))
    (one, layer_one, context_one), (two, _, context_two) = workers
    for _ in range(3):
        one.get("/ok")
    two.get("/ok")
    two.get("/missing", status=404)
    context_one.emit("cache.hit")
    context_two.emit("cache.hit")
    context_two.emit("ratelimit.reject", rule="default")
    time.sleep(0.3)  # both have written their counts since
    for app in (one, two):
        found = scrape(app)
        assert sample(found, "wsgistack_http_requests_total", method="GET", route="/ok", status="200") == 4
        assert sample(found, "wsgistack_http_requests_total", method="GET", route="other", status="404") == 1
        assert sample(found, "wsgistack_http_request_duration_seconds_count", method="GET", route="/ok") == 4
        assert sample(found, "wsgistack_layer_duration_seconds_count", layer="inner") == 5
        assert sample(found, "wsgistack_cache_events_total", result="hit") == 2
        assert sample(found, "wsgistack_ratelimit_events_total", result="reject", rule="default") == 1
        created = sample(found, "wsgistack_http_requests_created", method="GET", route="/ok", status="200")
        assert created is not None and created <= time.time()
    # A closed layer (a worker that stopped, a pipeline a reload replaced) leaves its last counts.
    one.get("/ok")
    layer_one.close()
    assert len(list((tmp_path / "shared").glob("*.json"))) == 2
    found = scrape(two)
    assert sample(found, "wsgistack_http_requests_total", method="GET", route="/ok", status="200") == 5


def test_scrapes_answered_by_either_worker_never_go_back(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    """A worker writes what it reports: the next scrape, whichever worker answers, counts at least that."""
    monkeypatch.setattr("middleware.metrics.SHARE_INTERVAL", 3600)  # no periodic writes during the test
    monkeypatch.setenv("WSGISTACK_METRICS_DIR", str(tmp_path))
    (one, one_layer), (two, two_layer) = _pipeline(), _pipeline()
    one.get("/items/1")
    two.get("/items/1")  # both share from now on
    totals: list[float] = []
    for worker in (one, one, two, one, two, two):
        for _ in range(3):
            worker.get("/items/1")
        totals.append(cast(float, sample(scrape(worker), "wsgistack_http_requests_total", **ITEMS)))
        totals.append(cast(float, sample(scrape(two if worker is one else one), "wsgistack_http_requests_total",
                                         **ITEMS)))
    assert totals == sorted(totals) and totals[-1] == 20
    one_layer.close()
    two_layer.close()


@pytest.mark.parametrize(("before", "after"), [
    pytest.param([0.001, 0.01, 0.1], [0.0001, 0.5, 3.0], id="other bounds"),
    pytest.param([0.1, 1.0], [0.1, 1.0, 5.0], id="a bound added"),
    pytest.param([0.1, 1.0, 5.0], [0.1, 1.0], id="a bound removed"),
])
def test_a_pipeline_with_other_buckets_is_counted_on_the_bounds_in_force(monkeypatch: pytest.MonkeyPatch,
                                                                         tmp_path: Any, before: list[float],
                                                                         after: list[float]) -> None:
    """A reload that changed ``buckets``: the old counts go into the new buckets, so _count and the buckets
    the two share never go back or jump, whichever pipeline (or worker) answers the scrape."""
    from prometheus_client.openmetrics.parser import text_string_to_metric_families

    monkeypatch.setattr("middleware.metrics.SHARE_INTERVAL", 0.05)
    monkeypatch.setenv("WSGISTACK_METRICS_DIR", str(tmp_path))
    apps = []
    for buckets in (before, after):  # before and after the reload
        layer = MetricsMiddleware(inner_app, MetricsMiddleware.Options(process_metrics=False, buckets=buckets),
                                  Context(stores={"shared": MemoryStore()}))
        apps.append(TestApp(ErrorsMiddleware(layer, ErrorsMiddleware.Options(), Context())))
    old, new = apps
    for _ in range(3):
        old.get("/items/1")
    old.get("/elsewhere", status="*")  # two series only the old pipeline counted: their lines must not interleave
    old.head("/elsewhere", status="*")
    new.get("/items/1")
    time.sleep(0.3)
    found = scrape(new)
    assert sample(found, "wsgistack_http_requests_total", method="GET", route="/items/<int:item_id>",
                  status="200") == 4  # counters still add up
    labels = {"method": "GET", "route": "/items/<int:item_id>"}
    for name in ("wsgistack_http_request_duration_seconds_count", "wsgistack_http_request_duration_seconds_sum"):
        assert cast(float, sample(found, name, **labels)) > 0
    assert sample(found, "wsgistack_http_request_duration_seconds_count", **labels) == 4  # both pipelines'
    assert {dict(labels).get("le") for (name, labels) in found if name.endswith("_bucket")} == {
        *(str(bound) for bound in after), "+Inf"}  # the bounds in force
    buckets = [cast(float, sample(found, "wsgistack_http_request_duration_seconds_bucket", **labels, le=str(bound)))
               for bound in after]
    assert buckets == sorted(buckets)  # cumulative
    # Every request took far less than the largest bound both have in common (or, after, 3 s): all four there.
    assert buckets[-1] == 4
    assert sample(found, "wsgistack_http_request_duration_seconds_bucket", **labels, le="+Inf") == 4
    # The old pipeline answers the next scrape: the same totals.
    again = scrape(old)
    assert sample(again, "wsgistack_http_request_duration_seconds_count", **labels) == 4
    text = new.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"},
                   extra_environ={"REMOTE_ADDR": "127.0.0.1"}).text
    parse: Callable[[str], Iterable[Any]] = text_string_to_metric_families  # (unannotated in prometheus_client)
    assert list(parse(text))  # parses: buckets cumulative and in order


def _pipeline(buckets: list[float] | None = None) -> tuple[TestApp, MetricsMiddleware]:
    options = MetricsMiddleware.Options(process_metrics=False, **({"buckets": buckets} if buckets else {}))
    layer = MetricsMiddleware(inner_app, options, Context(stores={"shared": MemoryStore()}))
    return TestApp(ErrorsMiddleware(layer, ErrorsMiddleware.Options(), Context())), layer


ITEMS = {"method": "GET", "route": "/items/<int:item_id>", "status": "200"}


def test_reloads_leave_one_file_of_past_counts(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    """Each replaced pipeline's file is merged into one when it closes: scrapes read two files, not one per reload."""
    monkeypatch.setenv("WSGISTACK_METRICS_DIR", str(tmp_path))
    total = 0
    for generation in range(1, 31):  # 30 reloads, each pipeline answering a few requests
        app, layer = _pipeline([0.001, 0.01, 0.1] if generation % 2 else [0.0001, 0.5, 3.0])
        for _ in range(generation % 4 + 1):
            app.get("/items/1")
            total += 1
        found = scrape(app)
        assert sample(found, "wsgistack_http_requests_total", **ITEMS) == total
        assert sample(found, "wsgistack_http_requests_created", **ITEMS) is not None
        layer.close()
        assert len(list(tmp_path.glob("*.json"))) <= 2
    app, layer = _pipeline([0.001, 0.01, 0.1])
    found = scrape(app)
    assert sample(found, "wsgistack_http_requests_total", **ITEMS) == total
    # Every pipeline's histogram adds up, those of the other bounds on the bounds in force.
    assert sample(found, "wsgistack_http_request_duration_seconds_count", method="GET",
                  route="/items/<int:item_id>") == total
    layer.close()


def test_a_scrape_never_sees_the_totals_go_back_while_files_are_merged(monkeypatch: pytest.MonkeyPatch,
                                                                      tmp_path: Any) -> None:
    import itertools
    import threading

    monkeypatch.setenv("WSGISTACK_METRICS_DIR", str(tmp_path))
    watcher, watched = _pipeline()
    watcher.get("/ok")  # starts sharing: its scrapes read the others' files
    seen: list[float] = []
    stop = threading.Event()

    def scrape_all_along() -> None:
        while not stop.is_set():
            seen.append(sample(scrape(watcher), "wsgistack_http_requests_total", **ITEMS) or 0.0)

    thread = threading.Thread(target=scrape_all_along)
    thread.start()
    try:
        for _ in range(40):
            app, layer = _pipeline()
            app.get("/items/1")
            layer.close()
    finally:
        stop.set()
        thread.join()
    assert len(seen) > 10
    assert all(a <= b for a, b in itertools.pairwise(seen)), seen
    assert sample(scrape(watcher), "wsgistack_http_requests_total", **ITEMS) == 40
    watched.close()


def test_a_pipeline_that_starts_while_files_are_merged_keeps_its_file(monkeypatch: pytest.MonkeyPatch,
                                                                      tmp_path: Any) -> None:
    """A reload's new pipeline can start while the old one's close merges files: only closed ones are merged."""
    import middleware.metrics as metrics

    monkeypatch.setenv("WSGISTACK_METRICS_DIR", str(tmp_path))
    for _ in range(2):
        app, layer = _pipeline()
        app.get("/items/1")
        layer.close()
    real = metrics._read_shared
    started: list[tuple[TestApp, MetricsMiddleware]] = []

    def a_pipeline_starts_meanwhile(directory: str, skip: str = "", prefix: str = "") -> Any:
        if prefix and not started:  # the merge is about to read its files
            new = _pipeline()
            new[0].get("/items/1")
            started.append(new)
        return real(directory, skip=skip, prefix=prefix)

    monkeypatch.setattr(metrics, "_read_shared", a_pipeline_starts_meanwhile)
    app, layer = _pipeline()
    app.get("/items/1")
    layer.close()
    [(new_app, new_layer)] = started
    new_app.get("/items/1")
    new_layer.shared.write()
    observer, _ = _pipeline()
    observer.get("/ok")
    assert sample(scrape(observer), "wsgistack_http_requests_total", **ITEMS) == 5
    assert sample(scrape(new_app), "wsgistack_http_requests_total", **ITEMS) == 5
    new_layer.close()
    assert sample(scrape(observer), "wsgistack_http_requests_total", **ITEMS) == 5


def test_the_files_of_exited_workers_are_merged_by_the_next(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    """gunicorn --max-requests replaces workers all day: each leaves its file, which the next one merges."""
    import os

    import middleware.metrics as metrics

    monkeypatch.setenv("WSGISTACK_METRICS_DIR", str(tmp_path))
    gone = 4194303  # the largest pid Linux hands out: no process runs with it here
    real_getpid = os.getpid
    for _ in range(3):  # three workers, each recycled after a request, without closing (as a kill does)
        monkeypatch.setattr(metrics, "_TAG", (0, ""))
        monkeypatch.setattr("middleware.metrics.os.getpid", lambda: gone)
        app, layer = _pipeline()
        app.get("/items/1")
        layer.shared.write()
        assert layer.shared._final is not None
        layer.shared._final.detach()  # it exited: it writes nothing more
    monkeypatch.setattr("middleware.metrics.os.getpid", real_getpid)
    monkeypatch.setattr(metrics, "_TAG", (0, ""))
    assert len(list(tmp_path.glob("*.json"))) >= 2
    app, layer = _pipeline()
    app.get("/ok")  # the next worker's first request
    assert len(list(tmp_path.glob("*.json"))) == 2  # its own, and the exited ones merged
    assert sample(scrape(app), "wsgistack_http_requests_total", **ITEMS) == 3
    layer.close()


def test_a_later_process_with_the_same_pid_is_counted(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    """A merged file names the files it replaced; a later worker given the same pid must not share their names."""
    import itertools

    import middleware.metrics as metrics

    monkeypatch.setenv("WSGISTACK_METRICS_DIR", str(tmp_path))
    monkeypatch.setattr("middleware.metrics.os.getpid", lambda: 4242)
    for _ in range(3):  # a worker that reloaded twice, then died
        app, layer = _pipeline()
        app.get("/items/1")
        layer.close()
    monkeypatch.setattr(metrics, "_TAG", (0, ""))  # a new process: its own sequence, the same pid
    monkeypatch.setattr(metrics, "_SEQUENCE", itertools.count())
    app, layer = _pipeline()
    for _ in range(10):
        app.get("/items/1")
    layer.shared.write()
    observer, _ = _pipeline()
    observer.get("/ok")
    assert sample(scrape(observer), "wsgistack_http_requests_total", **ITEMS) == 13
    layer.close()


def test_a_scrape_during_a_new_pipelines_first_request_sees_every_count(monkeypatch: pytest.MonkeyPatch,
                                                                         tmp_path: Any) -> None:
    """The first request of a reload's pipeline starts its sharing; a scrape meanwhile waits for it."""
    import os
    import threading

    monkeypatch.setenv("WSGISTACK_METRICS_DIR", str(tmp_path))
    old, new = (TestApp(MetricsMiddleware(inner_app, MetricsMiddleware.Options(process_metrics=False),
                                          Context(stores={"shared": MemoryStore()}))) for _ in range(2))
    for _ in range(5):
        old.get("/items/1")
    real_makedirs = os.makedirs

    def slow_makedirs(*args: Any, **kwargs: Any) -> None:  # widens the moment start() takes
        time.sleep(0.3)
        real_makedirs(*args, **kwargs)

    monkeypatch.setattr("middleware.metrics.os.makedirs", slow_makedirs)
    first = threading.Thread(target=lambda: new.get("/items/1"))
    first.start()
    time.sleep(0.1)
    total = sample(scrape(new), "wsgistack_http_requests_total", method="GET", route="/items/<int:item_id>",
                   status="200")
    first.join()
    assert total is not None and total >= 5  # never the new pipeline's own zero


def test_an_idle_worker_leaves_its_file_alone(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    monkeypatch.setattr("middleware.metrics.SHARE_INTERVAL", 0.05)
    monkeypatch.setenv("WSGISTACK_METRICS_DIR", str(tmp_path))
    layer = MetricsMiddleware(inner_app, MetricsMiddleware.Options(process_metrics=False), Context())
    app = TestApp(ErrorsMiddleware(layer, ErrorsMiddleware.Options(), Context()))
    app.get("/ok")
    time.sleep(0.3)  # written since, with the request counted
    [path] = list(tmp_path.glob("*.json"))
    written = path.stat().st_mtime_ns
    time.sleep(0.3)  # idle: six more ticks
    assert path.stat().st_mtime_ns == written
    app.get("/ok")
    time.sleep(0.3)
    assert path.stat().st_mtime_ns > written
    shared = {(name, tuple(sorted(labels.items()))): value for family in json.loads(path.read_text())
              for name, labels, value in family[4]}
    assert shared[("wsgistack_http_requests_total", (("method", "GET"), ("route", "/ok"), ("status", "200")))] == 2
    layer.close()


def test_without_the_directory_nothing_is_written(make: Callable[..., Any], monkeypatch: pytest.MonkeyPatch,
                                                  tmp_path: Any) -> None:
    monkeypatch.delenv("WSGISTACK_METRICS_DIR", raising=False)
    app, layer = make()
    app.get("/ok")
    assert layer.shared.directory is None and not layer.shared.pending
    assert sample(scrape(app), "wsgistack_http_requests_total", method="GET", route="/ok", status="200") == 1


def test_an_unusable_directory_is_logged_and_counting_goes_on(
        make: Callable[..., Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Any,
        caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "file").write_text("not a directory")
    monkeypatch.setenv("WSGISTACK_METRICS_DIR", str(tmp_path / "file"))
    app, _ = make()
    with caplog.at_level(logging.ERROR, logger="wsgistack.metrics"):
        app.get("/ok")
    assert [r.getMessage()[:31] for r in caplog.records] == ["metrics: cannot share counts in"]
    assert sample(scrape(app), "wsgistack_http_requests_total", method="GET", route="/ok", status="200") == 1


def test_store_health_at_scrape_time(make: Callable[..., Any], context: Context, dead_store: Store) -> None:
    context.stores["down"] = dead_store
    app, _ = make()
    found = scrape(app)
    assert sample(found, "wsgistack_store_up", store="shared", backend="MemoryStore") == 1
    assert sample(found, "wsgistack_store_up", store="down", backend="RedisStore") == 0
    assert {dict(labels)["store"] for name, labels in found if name == "wsgistack_store_circuit_state"} == {"down"}
    assert sample(found, "wsgistack_store_circuit_state", store="down", state="closed") == 1
    for _ in range(3):  # each scrape pings; enough failures open the circuit
        found = scrape(app)
    assert sample(found, "wsgistack_store_circuit_state", store="down", state="open") == 1
    assert sample(found, "wsgistack_store_circuit_state", store="down", state="closed") is None


def test_a_store_whose_health_check_fails_is_down(make: Callable[..., Any], context: Context) -> None:
    class Failing(MemoryStore):
        def health(self) -> dict[str, Any]:
            raise RuntimeError("health check failed")

    context.stores["failing"] = Failing()
    found = scrape(make()[0])
    assert sample(found, "wsgistack_store_up", store="failing", backend="Failing") == 0
    assert sample(found, "wsgistack_store_up", store="shared", backend="MemoryStore") == 1


@pytest.mark.redis
def test_store_health_with_a_real_redis(make: Callable[..., Any], context: Context, redis_url: str) -> None:
    store = store_from_url(redis_url)
    context.stores["redis"] = store
    try:
        found = scrape(make()[0])
    finally:
        store.close()
    assert sample(found, "wsgistack_store_up", store="redis", backend="RedisStore") == 1
    assert sample(found, "wsgistack_store_circuit_state", store="redis", state="closed") == 1


@pytest.mark.redis
def test_a_scrape_answers_in_bounded_time_when_redis_hangs(make: Callable[..., Any], context: Context,
                                                           own_redis: RedisServer) -> None:
    """Each store's ping waits up to its socket_timeout: one after the other, a scrape took their sum, and
    past Prometheus's scrape_timeout it loses every metric just when a store hangs."""
    hung = {f"db{db}": store_from_url(own_redis.url.removesuffix("/0") + f"/{db}", socket_timeout=1.0,
                                      socket_connect_timeout=1.0) for db in range(3)}  # three pools, three breakers
    context.stores.update(hung)
    app, _ = make()
    try:
        assert all(sample(scrape(app), "wsgistack_store_up", store=name, backend="RedisStore") == 1 for name in hung)
        assert own_redis.proc is not None
        own_redis.proc.send_signal(signal.SIGSTOP)
        try:
            started = time.monotonic()
            found = scrape(app)
            took = time.monotonic() - started
        finally:
            own_redis.proc.send_signal(signal.SIGCONT)
        assert took < STORE_CHECK_SECONDS + 0.8, took  # not 3 s (1 s per store)
        assert [sample(found, "wsgistack_store_up", store=name, backend="RedisStore") for name in hung] == [0, 0, 0]
        assert sample(found, "wsgistack_store_up", store="shared", backend="MemoryStore") == 1
        deadline = time.monotonic() + 5
        while not all(sample(scrape(app), "wsgistack_store_up", store=name, backend="RedisStore") == 1
                      for name in hung):
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        for store in hung.values():
            store.close()


# --- options -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        pytest.param({"allow_from": ["10.0.0.0/33"]},
                     "entry '10.0.0.0/33' is not an IP network (write 10.0.0.0/8 or 127.0.0.1)",
                     id="bad network"),
        pytest.param({"max_routes": 0}, "max_routes must be at least 1, got 0", id="no routes"),
        pytest.param({"path": "metrics"}, "path must start with '/', got 'metrics'", id="relative path"),
        pytest.param({"server_timings": True}, "Extra inputs are not permitted", id="unknown key"),
        *[pytest.param({"buckets": buckets},
                       "buckets must be increasing upper bounds in seconds, e.g. [0.01, 0.1, 1.0]",
                       id=f"buckets {buckets}")
          for buckets in ([float("nan")], [0.1, float("nan")], [float("nan"), 0.1], [float("-inf"), 0.1],
                          [0.1, float("inf"), 0.5], [0.5, 0.1], [float("inf")])],
        pytest.param({"hosts": ["http://metrics.example.org/"]}, "hosts entry 'http://metrics.example.org/' is not a "
                     "host name: write ops.example.org, *.example.org or '*' (no scheme, port or path)",
                     id="a URL in hosts"),
    ],
)
def test_options_refused(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(message)):
        MetricsMiddleware.Options(**options)


@pytest.mark.parametrize("buckets", [[0.1, 1.0], [0.1, 1.0, float("inf")], [-0.5, 0.0, 0.5]])
def test_buckets_accepted(buckets: list[float]) -> None:
    assert MetricsMiddleware.Options(buckets=buckets).buckets == tuple(buckets)


def test_what_a_client_makes_up_is_not_kept_whole(make: Callable[..., Any]) -> None:
    """Waitress passes any upper-case method and paths up to 256 KiB: tables keyed by them would hold gigabytes."""
    app, metrics = make()
    odd = TestApp(app.app, lint=False)  # (WebTest's checker knows no such methods)
    for i in range(50):
        odd.request("/items/1", method=f"M{i}" + "X" * 20_000, expect_errors=True)
        odd.get(f"/long/{i}/" + "p" * 20_000, expect_errors=True)
    held = sum(len(str(key)) for key in metrics._series) + sum(len(str(key)) for key in metrics._templates)
    assert held < 10_000, held
    found = scrape(app)
    assert sample(found, "wsgistack_http_requests_total", method="other", route="/items/<int:item_id>",
                  status="200") == 50  # still counted, under "other"
    assert sample(found, "wsgistack_http_requests_total", method="GET", route="other", status="200") == 50


def test_the_series_remembered_by_label_are_bounded(make: Callable[..., Any]) -> None:
    """Without the app's route templates, each path a client makes up is a label of its own: the table that
    finds a label's series again keeps 10,000 of them at most (the labels themselves are max_routes)."""
    def ok(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    _, metrics = make(ok)
    environ = {"REQUEST_METHOD": "GET", "REMOTE_ADDR": "192.0.2.7"}
    for i in range(10_050):
        metrics({**environ, "PATH_INFO": f"/made-up-{i}"}, lambda status, headers, exc_info=None: None)
    assert len(metrics._series) == 10_000
