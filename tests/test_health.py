"""The health layer: liveness, readiness from store health, the drain file, refusals."""

from __future__ import annotations

import datetime
import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import RedisServer, free_port
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError
from stack_support import RaisingStore, Recorder, ignore_start
from webtest import TestApp
from werkzeug.exceptions import HTTPException

from middleware.base import ROUTE_TEMPLATE, Context
from middleware.errors import ErrorsMiddleware
from middleware.health import HealthMiddleware
from middleware.metrics import MetricsMiddleware
from stores import MemoryStore, Store, store_from_url

MEMORY = {"ok": True, "backend": "MemoryStore", "breaker": None}


def facts(body: dict[str, Any]) -> dict[str, Any]:
    """The readiness body without the measured ping latencies."""
    stores = {name: {k: v for k, v in detail.items() if k != "latency_ms"}
              for name, detail in body.get("stores", {}).items()}
    return {**body, "stores": stores} if "stores" in body else body




@pytest.fixture
def inner() -> Recorder:
    """The recording inner app."""
    return Recorder()


@pytest.fixture
def dead_store() -> Iterator[Store]:
    """A Redis store whose server is not running: connections are refused."""
    store = store_from_url(f"redis://127.0.0.1:{free_port()}/0", socket_timeout=0.2,
                           socket_connect_timeout=0.2)
    yield store
    store.close()


@pytest.fixture
def make(inner: Recorder) -> Callable[..., TestApp]:
    """Build errors -> health -> recorder from options and stores."""

    def build(options: dict[str, Any] | None = None, stores: dict[str, Store] | None = None) -> TestApp:
        context = Context(stores=stores if stores is not None else {"shared": MemoryStore()})
        health = HealthMiddleware(inner, HealthMiddleware.Options(**(options or {})), context)
        return TestApp(ErrorsMiddleware(health, ErrorsMiddleware.Options(), Context()))

    return build


@pytest.mark.parametrize(
    ("options", "request_path", "expected"),
    [
        pytest.param({}, "/healthz", (200, {"status": "ok"}), id="liveness"),
        pytest.param({}, "/readyz", (200, {"status": "ok", "stores": {"shared": MEMORY}}),
                     id="readiness, memory store, no url"),
        pytest.param({"liveness_path": "/live"}, "/live", (200, {"status": "ok"}), id="custom liveness"),
        pytest.param({"readiness_path": "/ready"}, "/ready",
                     (200, {"status": "ok", "stores": {"shared": MEMORY}}), id="custom readiness"),
        pytest.param({"liveness_path": "/live"}, "/healthz", (200, "app"), id="old path goes to the app"),
        pytest.param({}, "/healthz/", (200, "app"), id="exact match only"),
        pytest.param({}, "/healthz?from=kubelet", (200, {"status": "ok"}), id="a query string: still the probe"),
        pytest.param({}, "/readyz?verbose=1", (200, {"status": "ok", "stores": {"shared": MEMORY}}),
                     id="a query string on readiness"),
        pytest.param({}, "/api/x", (200, "app"), id="other paths go to the app"),
        pytest.param({}, "/", (200, "app"), id="the root goes to the app"),
        pytest.param({"stores": []}, "/readyz", (200, {"status": "ok", "stores": {}}), id="no stores checked"),
    ],
)
def test_probe_table(make: Callable[..., TestApp], inner: Recorder, options: dict[str, Any],
                     request_path: str, expected: tuple[int, Any]) -> None:
    status, body = expected
    response = make(options).get(request_path, status=status)
    if body == "app":
        assert response.text == "app"
        assert inner.seen == [request_path]
    else:
        assert facts(response.json) == body
        assert response.headers["Content-Type"] == "application/json"
        assert response.headers["Cache-Control"] == "no-store"
        assert inner.seen == []


def test_probe_paths_are_below_the_mount_point(make: Callable[..., TestApp], inner: Recorder) -> None:
    """Under a prefix (Waitress's url_prefix, a proxy's SCRIPT_NAME) the paths are PATH_INFO's, after it."""
    app = make()
    assert app.get("/healthz", extra_environ={"SCRIPT_NAME": "/svc"}).json == {"status": "ok"}
    assert app.get("/readyz", extra_environ={"SCRIPT_NAME": "/svc"}).json["status"] == "ok"
    assert inner.seen == []


@pytest.mark.parametrize("path_info", ["//healthz", "///readyz", "healthz"])
def test_leading_slashes_count_as_one(make: Callable[..., TestApp], inner: Recorder, path_info: str) -> None:
    """As the router counts them: Waitress merges them itself, gunicorn passes them on; and a path
    without its slash (GET healthz HTTP/1.1, which Waitress passes on as sent) is rooted, as the router roots it."""
    app = make()
    app.lint = False  # (WebTest's lint refuses a PATH_INFO without its slash, which Waitress gives)
    assert app.get("/", extra_environ={"PATH_INFO": path_info}).json["status"] == "ok"
    assert inner.seen == []


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
def test_head_has_headers_and_no_body(make: Callable[..., TestApp], path: str) -> None:
    app = make()
    get = app.get(path)
    head = app.head(path)
    assert head.status_int == 200
    assert head.body == b""
    assert get.headers["Content-Length"] == str(len(get.body))
    if path == "/healthz":
        assert head.headers["Content-Length"] == get.headers["Content-Length"]
    else:  # the readiness body carries measured ping latencies: its length varies a little
        assert int(head.headers["Content-Length"]) > len('{"status":"ok"}')


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "OPTIONS"])
def test_other_methods_are_refused_with_allow(make: Callable[..., TestApp], inner: Recorder,
                                               method: str) -> None:
    response = make().request("/readyz", method=method, status=405)
    assert response.headers["Allow"] == "GET, HEAD"
    assert response.headers["Cache-Control"] == "no-store"  # a 405 is cacheable by default
    assert response.json["error"]["message"] == "/readyz answers GET and HEAD only."
    assert inner.seen == []


@pytest.mark.parametrize("method", ["POST", "OPTIONS"])
def test_the_405_itself_carries_allow_and_no_store(inner: Recorder, method: str) -> None:
    """The layer's own refusal says no-store, not only the errors layer that renders it."""
    health = HealthMiddleware(inner, HealthMiddleware.Options(), Context(stores={"shared": MemoryStore()}))
    environ = {"PATH_INFO": "/healthz", "REQUEST_METHOD": method}
    with pytest.raises(HTTPException) as info:
        health(environ, ignore_start)
    assert info.value.code == 405
    assert info.value.wsgistack_headers == [  # type: ignore[attr-defined]
        ("Allow", "GET, HEAD"), ("Cache-Control", "no-store")]
    assert info.value.description == "/healthz answers GET and HEAD only."
    assert inner.seen == []


@pytest.mark.parametrize("services", [
    pytest.param({}, id="no route lookup: a refusal would be other"),
    pytest.param({ROUTE_TEMPLATE: lambda path, method: None}, id="the app's route lookup, which has no probe route"),
])
def test_metrics_label_probes_with_their_path(inner: Recorder, services: dict[str, Any]) -> None:
    """docs/layers/metrics.md: the route of a layer that answers itself is its path."""
    context = Context(stores={"shared": MemoryStore()}, services=services)
    health = HealthMiddleware(inner, HealthMiddleware.Options(), context)
    metrics = MetricsMiddleware(health, MetricsMiddleware.Options(process_metrics=False), context)
    app = TestApp(ErrorsMiddleware(metrics, ErrorsMiddleware.Options(), Context()))
    app.get("/healthz")
    app.get("/readyz")
    app.get("/readyz")
    app.post("/readyz", status=405)
    text = app.get("/metrics", extra_environ={"REMOTE_ADDR": "127.0.0.1"}).text
    counted = {(s.labels["method"], s.labels["route"], s.labels["status"]): s.value
               for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == "wsgistack_http_requests_total"}
    assert counted == {("GET", "/healthz", "200"): 1, ("GET", "/readyz", "200"): 2,
                       ("POST", "/readyz", "405"): 1}
    assert inner.seen == []


def test_degraded_store_gives_503_with_detail(make: Callable[..., TestApp], dead_store: Store) -> None:
    response = make(stores={"shared": MemoryStore(), "redis": dead_store}).get("/readyz", status=503)
    assert response.json["status"] == "degraded"
    assert facts(response.json)["stores"]["shared"] == MEMORY
    assert response.json["stores"]["redis"]["ok"] is False
    assert response.json["stores"]["redis"]["backend"] == "RedisStore"
    assert response.json["stores"]["redis"]["breaker"] in ("closed", "open")
    assert "url" not in response.json["stores"]["redis"]


@pytest.mark.parametrize(("code", "line"), [(599, "599 Server Error"), (520, "520 Server Error"),
                                            (299, "299 Successful"), (503, "503 Service Unavailable")])
def test_any_status_from_200_to_599_may_say_degraded(make: Callable[..., TestApp], dead_store: Store,
                                                      code: int, line: str) -> None:
    """A load balancer's own "drain me" code need not be one Python names."""
    response = make({"degraded_status": code}, stores={"redis": dead_store}).get("/readyz", status=code)
    assert response.status == line
    assert response.json["status"] == "degraded"


def test_degraded_status_is_configurable(make: Callable[..., TestApp], dead_store: Store) -> None:
    response = make({"degraded_status": 200}, stores={"redis": dead_store}).get("/readyz", status=200)
    assert response.json["status"] == "degraded"


def test_liveness_ignores_stores(make: Callable[..., TestApp], dead_store: Store) -> None:
    assert make(stores={"redis": dead_store}).get("/healthz").json == {"status": "ok"}


def test_stores_option_limits_the_check(make: Callable[..., TestApp], dead_store: Store) -> None:
    app = make({"stores": ["shared"]}, stores={"shared": MemoryStore(), "redis": dead_store})
    assert facts(app.get("/readyz").json) == {"status": "ok", "stores": {"shared": MEMORY}}


class FactsStore(MemoryStore):
    """A store whose health check answers what it is given."""

    def __init__(self, facts: dict[str, object]) -> None:
        super().__init__()
        self.facts = facts

    def health(self) -> dict[str, object]:
        return dict(self.facts)


class HangingStore(MemoryStore):
    """A store whose health check answers only when ``release`` is set."""

    def __init__(self, release: threading.Event) -> None:
        super().__init__()
        self.release = release

    def health(self) -> dict[str, object]:
        self.release.wait(10)
        return {"ok": True, "backend": "HangingStore"}


def test_the_probe_bodies_are_compact_and_list_the_stores_in_name_order(make: Callable[..., TestApp]) -> None:
    app = make(stores={"b": FactsStore({"ok": True}), "a": FactsStore({"ok": True})})
    live = app.get("/healthz")
    assert live.body == b'{"status":"ok"}'
    assert live.headers["Content-Length"] == "15"
    assert app.get("/readyz").body == b'{"status":"ok","stores":{"a":{"ok":true},"b":{"ok":true}}}'


def test_a_health_fact_json_cannot_hold_is_given_as_text(make: Callable[..., TestApp]) -> None:
    since = datetime.datetime(2024, 5, 1, 12, 0, tzinfo=datetime.UTC)
    response = make(stores={"odd": FactsStore({"ok": True, "since": since})}).get("/readyz")
    assert response.json == {"status": "ok", "stores": {"odd": {"ok": True, "since": "2024-05-01 12:00:00+00:00"}}}


@pytest.mark.parametrize("answer", [{"backend": "X"}, {"ok": None}, {"ok": 0}])
def test_a_health_check_that_does_not_say_ok_counts_as_failed(make: Callable[..., TestApp],
                                                             answer: dict[str, object]) -> None:
    response = make(stores={"odd": FactsStore(answer)}).get("/readyz", status=503)
    assert response.json == {"status": "degraded", "stores": {"odd": answer}}


def test_the_timeout_covers_all_the_stores_together(make: Callable[..., TestApp]) -> None:
    release = threading.Event()
    app = make({"timeout": 0.3}, stores={name: HangingStore(release) for name in "abc"})
    try:
        started = time.monotonic()
        response = app.get("/readyz", status=503)
        took = time.monotonic() - started
    finally:
        release.set()
    assert took < 0.75, took  # not 0.9 s, the timeout once per store
    no_answer = {"ok": False, "backend": "HangingStore", "error": "no answer in time"}
    assert response.json == {"status": "degraded", "stores": {"a": no_answer, "b": no_answer, "c": no_answer}}


def test_without_a_thread_to_be_had_the_store_is_asked_in_the_probes_own(make: Callable[..., TestApp],
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    def no_thread(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", no_thread)
    assert facts(make().get("/readyz").json) == {"status": "ok", "stores": {"shared": MEMORY}}


def test_a_relative_drain_file_is_found_beside_the_stack_file(inner: Recorder, tmp_path: Path) -> None:
    context = Context(stores={}, settings={"base_dir": str(tmp_path)})
    app = TestApp(HealthMiddleware(inner, HealthMiddleware.Options(drain_file="drain"), context))
    assert app.get("/readyz").json["status"] == "ok"
    (tmp_path / "drain").touch()
    assert app.get("/readyz", status=503).json == {"status": "draining"}


def test_a_raising_health_check_counts_as_failed(make: Callable[..., TestApp]) -> None:
    response = make(stores={"odd": RaisingStore()}).get("/readyz", status=503)
    assert response.json["stores"]["odd"] == {"ok": False, "backend": "RaisingStore", "error": "RuntimeError"}


def test_drain_file(make: Callable[..., TestApp], tmp_path: Path) -> None:
    drain = tmp_path / "drain"
    app = make({"drain_file": str(drain)})
    assert app.get("/readyz").json["status"] == "ok"
    drain.touch()
    assert app.get("/readyz", status=503).json == {"status": "draining"}
    assert app.get("/healthz").json == {"status": "ok"}  # alive while draining
    drain.unlink()
    assert app.get("/readyz").json["status"] == "ok"


def test_a_drain_file_that_cannot_be_looked_at_counts_as_there(make: Callable[..., TestApp], tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    # os.stat fails with something other than "no such file" (here a symlink loop; in production
    # a directory the process may not search): the operator most likely drained it.
    drain = tmp_path / "drain"
    drain.symlink_to(drain)
    with caplog.at_level(logging.WARNING, logger="wsgistack.health"):
        assert make({"drain_file": str(drain)}).get("/readyz", status=503).json == {"status": "draining"}
    assert f"cannot look at drain_file {drain}" in caplog.text


def test_a_drain_file_that_cannot_be_looked_at_is_warned_of_once_a_minute(
    make: Callable[..., TestApp], tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = [1000.0]
    monkeypatch.setattr("middleware.health.time", type("Clock", (), {"monotonic": staticmethod(lambda: clock[0])}))
    monkeypatch.setattr("middleware.health._STAT_FAILED", [-math.inf])
    drain = tmp_path / "drain"
    drain.symlink_to(drain)
    app = make({"drain_file": str(drain)})

    def warnings_after_probe_at(now: float) -> int:
        clock[0] = now
        app.get("/readyz", status=503)
        return sum("cannot look at drain_file" in record.getMessage() for record in caplog.records)

    with caplog.at_level(logging.WARNING, logger="wsgistack.health"):
        assert warnings_after_probe_at(1000.0) == 1
        assert warnings_after_probe_at(1000.0) == 1
        assert warnings_after_probe_at(1059.9) == 1
        assert warnings_after_probe_at(1060.0) == 2  # a minute on: said again
        assert warnings_after_probe_at(1060.0) == 2


def test_a_drain_file_under_a_plain_file_is_absent(make: Callable[..., TestApp], tmp_path: Path) -> None:
    (tmp_path / "run").touch()
    assert make({"drain_file": str(tmp_path / "run" / "drain")}).get("/readyz").json["status"] == "ok"


def test_drain_wins_over_a_degraded_store(make: Callable[..., TestApp], dead_store: Store,
                                          tmp_path: Path) -> None:
    drain = tmp_path / "drain"
    drain.touch()
    app = make({"drain_file": str(drain), "degraded_status": 500}, stores={"redis": dead_store})
    assert app.get("/readyz", status=503).json == {"status": "draining"}


@pytest.mark.redis
def test_readiness_follows_a_real_redis_going_away_and_back(
    make: Callable[..., TestApp], redis_server: RedisServer | None, redis_url: str
) -> None:
    if redis_server is None:
        pytest.skip("needs the private redis-server that the test may stop")
    store = store_from_url(redis_url, reset_timeout=0.2, socket_timeout=0.2, socket_connect_timeout=0.2)
    app = make(stores={"shared": store})
    try:
        assert facts(app.get("/readyz").json)["stores"]["shared"] == {
            "ok": True, "backend": "RedisStore", "breaker": "closed"}
        redis_server.stop()
        body = app.get("/readyz", status=503).json
        assert body["status"] == "degraded"
        assert body["stores"]["shared"]["ok"] is False
        for _ in range(3):  # enough failed pings open the circuit, and readiness says so
            body = app.get("/readyz", status=503).json
        assert body["stores"]["shared"]["breaker"] == "open"
    finally:
        redis_server.start()
    deadline = time.monotonic() + 5
    while (response := app.get("/readyz", expect_errors=True)).status_int != 200:
        assert time.monotonic() < deadline, response.text
        time.sleep(0.05)
    assert facts(response.json) == {"status": "ok", "stores": {"shared": {
        "ok": True, "backend": "RedisStore", "breaker": "closed"}}}
    store.close()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        pytest.param({"degraded_status": 99}, "degraded_status must be an HTTP status from 200 to 599, got 99",
                     id="status too small"),
        pytest.param({"degraded_status": 199}, "degraded_status must be an HTTP status from 200 to 599, got 199",
                     id="an informational status"),
        pytest.param({"degraded_status": 600}, "degraded_status must be an HTTP status from 200 to 599, got 600",
                     id="status too large"),
        *[pytest.param({"degraded_status": code}, f"degraded_status {code} is an answer without a body (RFC 9110), "
                       "and readiness's body says what is degraded: use another status (503, or 200 to stay in "
                       "rotation)", id=f"{code}, which has no body") for code in (204, 205, 304)],
        pytest.param({"liveness_path": "healthz"}, "probe paths must start with '/', got 'healthz'",
                     id="relative path"),
        pytest.param({"readiness_path": "/healthz"}, "liveness_path and readiness_path must differ",
                     id="same paths"),
        pytest.param({"drain_file": ""}, "drain_file must be a path, or left out", id="empty drain file"),
        pytest.param({"drain_file": "/run/app\0drain"}, "drain_file cannot hold a NUL character",
                     id="a NUL, which no path holds: every probe was a 500"),
        pytest.param({"store": ["x"]}, "Extra inputs are not permitted", id="unknown key"),
        pytest.param({"timeout": 0}, "Input should be greater than 0", id="no time for the stores"),
        pytest.param({"timeout": 61}, "Input should be less than or equal to 60", id="a timeout past any probe's"),
        pytest.param({"timeout": math.inf}, "Input should be a finite number", id="no timeout"),
    ],
)
def test_options_refused(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        HealthMiddleware.Options(**options)


def test_unknown_store_name_is_refused(inner: Recorder) -> None:
    with pytest.raises(LookupError, match=r"unknown store 'cache' \(known: shared\)"):
        HealthMiddleware(inner, HealthMiddleware.Options(stores=["cache"]),
                         Context(stores={"shared": MemoryStore()}))


def test_from_yaml(make_stack: Callable[..., TestApp], tmp_path: Path) -> None:
    app = make_stack({
        "app": {"factory": "stack_support:echo_app"},
        "stores": {"shared": "memory://"},
        "pipeline": [{"health": {"readiness_path": "/ready", "drain_file": str(tmp_path / "drain")}},
                     {"stack_support:Tag": {"name": "after"}}],
    })
    assert facts(app.get("/ready").json) == {"status": "ok", "stores": {"shared": MEMORY}}
    assert app.get("/anything").json["layers"] == ["after"]
    (tmp_path / "drain").touch()
    assert app.get("/ready", status=503).json == {"status": "draining"}


def slow_stores(server: RedisServer) -> dict[str, Store]:
    """Two stores on two databases of ``server`` (two pools, two breakers), each waiting up to 1 s for a reply."""
    return {name: store_from_url(server.url.removesuffix("/0") + f"/{db}", socket_timeout=1.0,
                                 socket_connect_timeout=1.0)
            for name, db in (("a", 0), ("b", 1))}


def connections_received(server: RedisServer) -> int:
    client = redis.Redis.from_url(server.url, socket_timeout=5)
    try:
        return int(client.info("stats")["total_connections_received"])
    finally:
        client.close()


NO_ANSWER = {"ok": False, "backend": "RedisStore", "error": "no answer in time"}


@pytest.mark.redis
def test_readiness_answers_within_its_timeout_when_redis_hangs(make: Callable[..., TestApp],
                                                                own_redis: RedisServer) -> None:
    """Each store's ping waits up to its socket_timeout: one after the other, a probe took their sum."""
    stores = slow_stores(own_redis)
    app = make({"timeout": 0.3}, stores=stores)
    try:
        assert app.get("/readyz").json["status"] == "ok"
        assert own_redis.proc is not None
        own_redis.proc.send_signal(signal.SIGSTOP)
        try:
            started = time.monotonic()
            response = app.get("/readyz", status=503)
            took = time.monotonic() - started
        finally:
            own_redis.proc.send_signal(signal.SIGCONT)
        assert took < 0.8, took  # not 2 s (1 s per store)
        assert response.headers["Cache-Control"] == "no-store"
        assert response.json == {"status": "degraded", "stores": {"a": NO_ANSWER, "b": NO_ANSWER}}
        deadline = time.monotonic() + 5
        while (response := app.get("/readyz", expect_errors=True)).status_int != 200:
            assert time.monotonic() < deadline, response.text
            time.sleep(0.05)
    finally:
        for store in stores.values():
            store.close()


@pytest.mark.redis
def test_concurrent_probes_share_one_ping_per_store(make: Callable[..., TestApp], own_redis: RedisServer) -> None:
    """Probes arriving while a store's ping is still out wait for that one: no new connection, no new thread
    stuck on Redis, per probe."""
    stores = slow_stores(own_redis)
    app = make({"timeout": 0.3}, stores=stores)
    try:
        assert app.get("/readyz").json["status"] == "ok"
        before = connections_received(own_redis)
        answers: list[tuple[int, float]] = []

        def probe() -> None:
            started = time.monotonic()
            status = app.get("/readyz", expect_errors=True).status_int
            answers.append((status, time.monotonic() - started))

        assert own_redis.proc is not None
        own_redis.proc.send_signal(signal.SIGSTOP)
        try:
            threads = [threading.Thread(target=probe) for _ in range(6)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        finally:
            own_redis.proc.send_signal(signal.SIGCONT)
        assert [status for status, _ in answers] == [503] * 6
        assert max(took for _, took in answers) < 0.8, answers
        assert connections_received(own_redis) - before <= 2  # one ping per store (each pool had one idle)
    finally:
        for store in stores.values():
            store.close()
