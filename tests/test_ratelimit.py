"""The ratelimit layer: headers, rules, keys, shadow mode, exactness across threads and processes, store failure.

Stateful behaviour runs against both backends (``store_url``: memory:// and a
real redis-server).  Windows are a minute long unless a test needs one to
roll, so nothing here sleeps.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from pydantic import ValidationError
from stack_support import recording_start
from webtest import TestApp

from middleware.base import CLIENT_IP, IDENTITY, Context, Identity, refuse
from middleware.errors import ErrorsMiddleware
from middleware.ratelimit import RateLimitMiddleware
from stores import MemoryStore, Store, store_from_url
from stores.breaker import CircuitBreaker

ROOT = Path(__file__).resolve().parent.parent
STRATEGIES = ["fixed-window", "moving-window", "sliding-window-counter"]
RATE_HEADERS = ("RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset", "Retry-After")


def inner(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """The app under the layer: 404 for /missing, otherwise 200 ok."""
    if environ["PATH_INFO"] == "/missing":
        raise refuse(404, "No such thing.")
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
    return [b"ok"]


class Stack:
    """errors → ratelimit → inner, with the events the layer emitted."""

    def __init__(self, backend: Store, **options: Any) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.context = Context(stores={"shared": backend}, listeners=[lambda e, f: self.events.append((e, f))])
        self.layer = RateLimitMiddleware(inner, RateLimitMiddleware.Options(**options), self.context)
        self.wsgi = ErrorsMiddleware(self.layer, ErrorsMiddleware.Options(), self.context)
        self.app = TestApp(self.wsgi)

    def get(self, path: str = "/", ip: str = "10.0.0.1", method: str = "GET",
            headers: dict[str, str] | None = None, body: bytes | None = None, **environ: Any) -> Any:
        return self.app.request(path, method=method, headers=headers or {}, expect_errors=True,
                                environ={"REMOTE_ADDR": ip, **environ}, **({} if body is None else {"body": body}))


def rate(response: Any) -> dict[str, str]:
    return {k: response.headers[k] for k in RATE_HEADERS if k in response.headers}


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    """A store of each backend, closed afterwards (so no pool or breaker outlives the test)."""
    made = store_from_url(store_url)
    yield made
    made.close()


@pytest.fixture
def redis_store(redis_url: str) -> Iterator[Store]:
    """A Redis store with a breaker of its own."""
    from stores.redis import RedisStore

    made = RedisStore(redis_url, breaker=CircuitBreaker(50, 0.2, name="test"))
    yield made
    made.close()


# ------------------------------------------------------------------ options


@pytest.mark.parametrize(("options", "message"), [
    pytest.param({"limits": ["10 per fortnight"]},
                 "'10 per fortnight' is not a rate limit; write it like '10/second' or '100 per minute' "
                 "(units: second, minute, hour, day, month, year)", id="bad limit string"),
    pytest.param({"limits": ["100/hour", "0/minute"]},
                 "'0/minute' allows no request at all; to refuse every request, do not route it here",
                 id="a limit of 0"),
    pytest.param({"limits": ["1/second"], "key": "cookie"},
                 "unknown key function (known: client_ip, user, header:NAME)", id="unknown key, not repeated"),
    pytest.param({"limits": ["1/second"], "key": "client-ip"},
                 "unknown key function 'client-ip'; did you mean 'client_ip'?", id="a misspelt key"),
    pytest.param({"limits": ["1/second"], "key": ["client_ip", "header:"]},
                 "'header:' names no header field: write header:NAME, like 'header:X-API-Key'",
                 id="empty header name"),
    pytest.param({"limits": ["1/second"], "key": []},
                 "key must name at least one of client_ip, user, header:NAME", id="empty key list"),
    pytest.param({}, "ratelimit needs limits (e.g. ['100/minute']) or rules with limits", id="nothing to limit"),
    pytest.param({"rules": [{"paths": ["/health"], "limits": []}]},
                 "ratelimit needs limits (e.g. ['100/minute']) or rules with limits", id="only exemptions"),
    pytest.param({"rules": [{"paths": ["api/*"], "limits": ["1/second"]}]},
                 "path pattern 'api/*' must start with '/' (or be '*')", id="relative path"),
    pytest.param({"limits": ["1/second"], "rules": [{"paths": [], "limits": []}]},
                 "paths is empty: a rule must name at least one path pattern; leave paths out for every path ('*')",
                 id="a rule for no path: its pattern would match every path"),
    pytest.param({"rules": [{"methods": ["FETCH"], "limits": ["1/second"]}]},
                 "unknown HTTP method 'FETCH' (known: CONNECT, DELETE, GET, HEAD, OPTIONS, PATCH, POST, PUT, "
                 "TRACE)", id="unknown method"),
    pytest.param({"rules": [{"limits": ["1/second"], "burst": 3}]}, "Extra inputs are not permitted",
                 id="unknown rule key"),
    pytest.param({"limits": ["1/second"], "strategy": "token-bucket"},
                 "Input should be 'fixed-window', 'moving-window' or 'sliding-window-counter'",
                 id="unknown strategy"),
    pytest.param({"limits": ["1/second"], "ipv6_prefix": 0}, "greater than or equal to 1", id="ipv6 prefix"),
    pytest.param({"limits": ["1/second"], "namespace": "a/b"}, "String should match pattern", id="namespace"),
])
def test_options_refused(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError) as info:
        RateLimitMiddleware.Options(**options)
    assert message in str(info.value)


def test_limits_may_be_one_string() -> None:
    assert RateLimitMiddleware.Options(limits="10/second; 100/minute").limits == ["10/second; 100/minute"]


def test_unknown_store_name_is_a_lookup_error() -> None:
    with pytest.raises(LookupError, match=r"unknown store 'limits' \(known: shared\)"):
        Stack(store_from_url("memory://"), store="limits", limits=["1/second"])


def test_store_without_counters_is_refused() -> None:
    class Plain(Store):
        def get(self, key: str) -> bytes | None: return None
        def set(self, key: str, value: bytes, ttl: float | None = None) -> None: pass
        def delete(self, key: str) -> bool: return False
        def incr(self, key: str, ttl: float | None = None, amount: int = 1) -> int: return 0
        def expire(self, key: str, ttl: float) -> bool: return False
        def add(self, key: str, value: bytes, ttl: float | None = None) -> bool: return False
        def scan(self, prefix: str) -> Iterator[str]: return iter(())
        def ping(self) -> bool: return True

    with pytest.raises(ValueError, match="store 'shared' is a Plain; the ratelimit layer counts in "
                                         r"memory:// or Redis stores only"):
        Stack(Plain(), limits=["1/second"])


# ------------------------------------------------------------------ headers


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_exact_headers_on_passes_and_429(store: Store, strategy: str) -> None:
    stack = Stack(store, limits=["3/minute"], strategy=strategy)
    seen = [stack.get() for _ in range(4)]
    assert [r.status_int for r in seen] == [200, 200, 200, 429]
    assert [r.headers["RateLimit-Remaining"] for r in seen] == ["2", "1", "0", "0"]
    assert all(r.headers["RateLimit-Limit"] == "3" for r in seen)
    refused = seen[-1]
    reset = refused.headers["RateLimit-Reset"]
    if strategy == "sliding-window-counter" and store.url.startswith("memory"):
        # limits' in-memory sliding windows are aligned to the clock: reset is what is left of it.
        assert 1 <= int(reset) <= 60
        assert all(1 <= int(r.headers["RateLimit-Reset"]) <= 60 for r in seen)
    else:
        assert reset == "60"
        assert [r.headers["RateLimit-Reset"] for r in seen] == ["60"] * 4
    assert rate(refused) == {"RateLimit-Limit": "3", "RateLimit-Remaining": "0",
                             "RateLimit-Reset": reset, "Retry-After": reset}
    assert list(refused.headers.keys())[:4] == ["Retry-After", "RateLimit-Limit", "RateLimit-Remaining",
                                                "RateLimit-Reset"]
    assert refused.json["error"]["message"] == (
        f"Too many requests: the limit is 3 per 1 minute; retry in {reset} seconds.")
    assert stack.get(ip="10.0.0.2").status_int == 200  # another client has its own count


def test_several_limits_report_the_tightest(store: Store) -> None:
    stack = Stack(store, limits=["2/second", "5/minute"])
    first, second, third = (stack.get() for _ in range(3))
    assert rate(first) == {"RateLimit-Limit": "2", "RateLimit-Remaining": "1", "RateLimit-Reset": "1"}
    assert rate(second) == {"RateLimit-Limit": "2", "RateLimit-Remaining": "0", "RateLimit-Reset": "1"}
    assert third.status_int == 429
    assert rate(third) == {"RateLimit-Limit": "2", "RateLimit-Remaining": "0", "RateLimit-Reset": "1",
                           "Retry-After": "1"}
    assert third.json["error"]["message"] == "Too many requests: the limit is 2 per 1 second; retry in 1 seconds."


def test_minute_limit_reported_when_it_is_closer_to_running_out(store: Store) -> None:
    stack = Stack(store, limits=["10/second", "2/minute"])
    assert rate(stack.get()) == {"RateLimit-Limit": "2", "RateLimit-Remaining": "1", "RateLimit-Reset": "60"}
    stack.get()
    refused = stack.get()
    assert (refused.status_int, refused.headers["Retry-After"], refused.headers["RateLimit-Limit"]) == (429, "60", "2")


@pytest.mark.parametrize(("limits", "requests", "last"), [
    pytest.param(["1/second", "2/minute"], 2, {"status": 429, "Retry-After": "60"},
                 id="the refusal used up the minute too: wait for the minute"),
    pytest.param(["3/minute", "3/hour"], 3, {"status": 200, "RateLimit-Remaining": "0", "RateLimit-Reset": "3600"},
                 id="both used up: the later reset"),
    pytest.param(["3/minute", "3/hour"], 4, {"status": 429, "Retry-After": "3600"}, id="then the hour's wait"),
])
def test_a_client_that_waits_as_told_is_not_refused_again(store: Store, limits: list[str], requests: int,
                                                          last: dict[str, Any]) -> None:
    """Retry-After (RFC 9110 §10.2.3) and RateLimit-Reset name the wait until every limit has room."""
    stack = Stack(store, limits=limits)
    for _ in range(requests - 1):
        stack.get()
    response = stack.get()
    assert {"status": response.status_int, **{k: response.headers[k] for k in last if k != "status"}} == last


def test_two_limiters_send_one_set_of_headers(store: Store) -> None:
    """By address outside, by user inside: the fields are single-valued, so the tighter set speaks."""
    context = Context(stores={"shared": store})
    by_user = RateLimitMiddleware(inner, RateLimitMiddleware.Options(limits=["2/minute"], namespace="u"), context)
    by_address = RateLimitMiddleware(by_user, RateLimitMiddleware.Options(limits=["5/minute"]), context)
    app = TestApp(by_address)
    first = app.get("/", extra_environ={"REMOTE_ADDR": "10.0.0.1"})
    assert first.headers.getall("RateLimit-Remaining") == ["1"]  # the inner limiter's: tighter
    assert first.headers.getall("RateLimit-Limit") == ["2"]
    wide = TestApp(RateLimitMiddleware(RateLimitMiddleware(inner, RateLimitMiddleware.Options(
        limits=["50/minute"], namespace="w"), context), RateLimitMiddleware.Options(limits=["3/minute"],
                                                                                      namespace="n"), context))
    assert wide.get("/").headers.getall("RateLimit-Limit") == ["3"]  # the outer one's: tighter


def _two(store: Store, outer: str, inner_limit: str, app: Any = inner) -> TestApp:
    context = Context(stores={"shared": store})
    by_user = RateLimitMiddleware(app, RateLimitMiddleware.Options(limits=[inner_limit], namespace="i"), context)
    return TestApp(ErrorsMiddleware(RateLimitMiddleware(by_user, RateLimitMiddleware.Options(
        limits=[outer], namespace="o"), context), ErrorsMiddleware.Options(), context))


def test_an_inner_refusal_waits_for_the_outer_limit_too(store: Store) -> None:
    app = _two(store, "2/minute", "1/second")
    app.get("/")
    refused = app.get("/", status=429)
    assert (refused.headers["Retry-After"], refused.headers["RateLimit-Limit"]) == ("60", "2")
    assert refused.json["error"]["message"].endswith("; retry in 60 seconds.")  # as the header says
    assert refused.headers.getall("RateLimit-Remaining") == ["0"]


@pytest.mark.parametrize(("outer", "inner_limit", "requests", "expected"), [
    pytest.param("3/minute", "2/5 seconds", 3,
                 ("3", "60", "Too many requests: the limit is 3 per 1 minute; retry in 60 seconds."),
                 id="the outer limit is used up: it is named"),
    pytest.param("2/minute", "1/second", 2,
                 ("2", "60", "Too many requests: the limit is 2 per 1 minute; retry in 60 seconds."),
                 id="the outer limit is used up, the inner resets sooner"),
    pytest.param("50/minute", "1/minute", 2,
                 ("1", "60", "Too many requests: the limit is 1 per 1 minute; retry in 60 seconds."),
                 id="the outer limit has room: the inner one is named"),
    pytest.param("3/hour", "1/minute", 2,
                 ("1", "60", "Too many requests: the limit is 1 per 1 minute; retry in 60 seconds."),
                 id="the outer limit has room and a longer window"),
])
def test_an_inner_refusal_names_the_limit_its_headers_describe(store: Store, outer: str, inner_limit: str,
                                                               requests: int, expected: tuple[str, ...]) -> None:
    app = _two(store, outer, inner_limit)
    for _ in range(requests - 1):
        app.get("/")
    refused = app.get("/", status=429)
    assert (refused.headers["RateLimit-Limit"], refused.headers["Retry-After"],
            refused.json["error"]["message"]) == expected
    assert (refused.headers["RateLimit-Remaining"], refused.headers["RateLimit-Reset"]) == ("0", expected[1])


def _failing(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """An app with a bug: every request raises."""
    raise RuntimeError("a bug in the app")


@pytest.mark.parametrize(("app", "path", "status"), [
    pytest.param(inner, "/missing", 404, id="an HTTP error"),
    pytest.param(_failing, "/", 500, id="an unexpected exception, without a description"),
])
def test_an_inner_error_carries_the_tighter_fields(store: Store, caplog: pytest.LogCaptureFixture, app: Any,
                                                    path: str, status: int) -> None:
    with caplog.at_level(logging.ERROR, logger="wsgistack.errors"):
        response = _two(store, "3/minute", "50/minute", app).get(path, status=status)
    assert [(k, response.headers.getall(k)) for k in RATE_HEADERS] == [
        ("RateLimit-Limit", ["3"]), ("RateLimit-Remaining", ["2"]), ("RateLimit-Reset", ["60"]), ("Retry-After", [])]
    failures = [r.exc_info[0] for r in caplog.records if r.name == "wsgistack.errors" and r.exc_info]
    assert failures == ([RuntimeError] if status == 500 else [])  # the app's own exception, as it was raised


@pytest.mark.parametrize("fields", [
    pytest.param([("ratelimit-limit", "5000")], id="an incomplete set"),
    pytest.param([("RateLimit-Limit", "9"), ("RateLimit-Remaining", "-1"), ("RateLimit-Reset", "5")], id="negative"),
    pytest.param([("RateLimit-Limit", "9"), ("RateLimit-Remaining", "0"),
                  ("RateLimit-Reset", "Thu, 26 Nov 2026 22:00:00 GMT")], id="a date"),
])
def test_an_apps_own_fields_that_do_not_parse_give_way(store: Store, fields: list[tuple[str, str]]) -> None:
    """Ours replace a set that is not three whole numbers: one set, and one that parses."""
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain"), *fields])
        return [b"ok"]

    response = TestApp(RateLimitMiddleware(app, RateLimitMiddleware.Options(limits=["10/minute"]),
                                           Context(stores={"shared": store}))).get("/")
    assert [(k, response.headers.getall(k)) for k in ("RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset")] \
        == [("RateLimit-Limit", ["10"]), ("RateLimit-Remaining", ["9"]), ("RateLimit-Reset", ["60"])]


def test_inner_errors_carry_the_headers(store: Store) -> None:
    stack = Stack(store, limits=["5/minute"])
    response = stack.get("/missing")
    assert response.status_int == 404
    assert rate(response) == {"RateLimit-Limit": "5", "RateLimit-Remaining": "4", "RateLimit-Reset": "60"}


def test_429_passes_through_cors_with_its_headers(store: Store) -> None:
    from middleware.cors import CORSMiddleware

    context = Context(stores={"shared": store})
    layer = RateLimitMiddleware(inner, RateLimitMiddleware.Options(limits=["1/minute"]), context)
    cors = CORSMiddleware(layer, CORSMiddleware.Options(origins=("https://app.example.org",)), context)
    app = TestApp(ErrorsMiddleware(cors, ErrorsMiddleware.Options(), context))
    headers = {"Origin": "https://app.example.org"}
    app.get("/", headers=headers)
    refused = app.get("/", headers=headers, status=429)
    assert refused.headers["Access-Control-Allow-Origin"] == "https://app.example.org"
    assert rate(refused) == {"RateLimit-Limit": "1", "RateLimit-Remaining": "0", "RateLimit-Reset": "60",
                             "Retry-After": "60"}


def test_events(store: Store) -> None:
    stack = Stack(store, limits=["1/minute"])
    stack.get()
    stack.get()
    assert stack.events == [("ratelimit.pass", {"rule": "default"}),
                            ("ratelimit.reject", {"rule": "default", "limit": "1 per 1 minute"})]


# ------------------------------------------------------------------ rules


RULES = [
    {"paths": ["/api/*"], "methods": ["POST"], "limits": ["1/minute"]},
    {"paths": ["/api/*"], "limits": ["5/minute"], "key": "header:X-Api-Key"},
    {"paths": ["/health", "/static/*"], "limits": []},
    {"paths": ["/search"], "methods": ["GET"], "limits": ["7/minute"], "strategy": "moving-window"},
]


@pytest.mark.parametrize(("method", "path", "expected"), [
    pytest.param("POST", "/api/items", "1", id="first rule: POST under /api"),
    pytest.param("GET", "/api/items", "5", id="second rule: any other method under /api"),
    pytest.param("DELETE", "/api/a/b", "5", id="globs span segments"),
    pytest.param("GET", "/health", None, id="exempt: limits []"),
    pytest.param("GET", "/static/app.js", None, id="exempt by glob"),
    pytest.param("GET", "/search", "7", id="rule with its own strategy"),
    pytest.param("HEAD", "/search", "7", id="HEAD counts as GET"),
    pytest.param("POST", "/search", "100", id="method not listed: default rule"),
    pytest.param("GET", "/elsewhere", "100", id="no rule: default rule"),
    pytest.param("GET", "/API/items", "100", id="paths are case-sensitive"),
])
def test_first_matching_rule_wins(store: Store, method: str, path: str, expected: str | None) -> None:
    stack = Stack(store, limits=["100/minute"], rules=RULES)
    response = stack.get(path, method=method)
    assert response.status_int == 200
    assert response.headers.get("RateLimit-Limit") == expected


@pytest.mark.parametrize(("remote_addr", "remote_port", "counted_with"), [
    pytest.param("10.0.0.9", 50000, "10.0.0.9", id="an int port, as werkzeug's own server gives it"),
    pytest.param("10.0.0.9", "50000", "10.0.0.9", id="digits, as Waitress gives it"),
    pytest.param("::ffff", "192.0.2.7", "192.0.2.7", id="an IPv4-mapped address Waitress split as host:port"),
])
def test_the_client_address_with_every_kind_of_remote_port(store: Store, remote_addr: str, remote_port: Any,
                                                           counted_with: str) -> None:
    """One bucket per client: the same client by its plain address is refused once its one request is used."""
    from werkzeug.test import EnvironBuilder

    stack = Stack(store, limits=["1/minute"])

    def status(address: str, port: Any) -> int:  # not WebTest: its lint refuses the int werkzeug's server gives
        environ = EnvironBuilder("/").get_environ()
        environ.update(REMOTE_ADDR=address, REMOTE_PORT=port)
        seen: list[str] = []
        b"".join(stack.wsgi(environ, recording_start(lambda status, headers: seen.append(status))))
        return int(seen[0][:3])

    assert status(remote_addr, remote_port) == 200
    assert status(counted_with, "40000") == 429
    assert status("10.0.0.77", remote_port) == 200  # another client


@pytest.mark.parametrize("remote_addr", ["[2001:db8::1]:40001", "[2001:db8::1]:40002", "2001:db8::2"])
def test_a_bracketed_address_with_a_port_is_its_address(store: Store, remote_addr: str) -> None:
    """Waitress's trusted_proxy hands "[v6]:port" over as REMOTE_ADDR: each new port must not be a new bucket."""
    stack = Stack(store, limits=["2/minute"])
    stack.get(ip="2001:db8::7")  # the same /64
    response = stack.get(ip=remote_addr)
    assert response.headers["RateLimit-Remaining"] == "0"


@pytest.mark.parametrize("strategy", ["moving-window", "sliding-window-counter"])
def test_a_flood_of_new_keys_is_bounded_in_every_strategy(monkeypatch: pytest.MonkeyPatch, strategy: str) -> None:
    import middleware.ratelimit as ratelimit

    monkeypatch.setattr(ratelimit, "MAX_MEMORY_KEYS", 50)
    store = MemoryStore()
    stack = Stack(store, limits=["1/hour"], strategy=strategy)
    assert stack.get(ip="10.9.9.9").status_int == 200
    assert stack.get(ip="10.9.9.9").status_int == 429
    for n in range(200):
        stack.get(ip=f"10.0.{n // 250}.{n % 250}")
    storage = ratelimit._memory_counter(store).storage
    held = len(storage.events) if strategy == "moving-window" else len(storage.storage)
    assert held == 50
    assert stack.get(ip="10.9.9.9").status_int == 200  # hit least recently: it starts anew


def test_a_flood_of_new_keys_does_not_grow_the_memory_counters_without_bound(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import middleware.ratelimit as ratelimit

    monkeypatch.setattr(ratelimit, "MAX_MEMORY_KEYS", 50)
    store = MemoryStore()
    stack = Stack(store, limits=["1/minute"])
    assert stack.get(ip="10.9.9.9").status_int == 200
    assert stack.get(ip="10.9.9.9").status_int == 429
    for n in range(200):
        stack.get(ip=f"10.0.{n // 250}.{n % 250}")
    windows = ratelimit._memory_counter(store).windows
    assert max(len(keys) for keys in windows.values()) == 50
    assert stack.get(ip="10.9.9.9").status_int == 200  # its window was the oldest: it starts anew


@pytest.mark.parametrize("strategy", ["fixed-window", "moving-window", "sliding-window-counter"])
def test_a_flood_of_made_up_keys_on_one_rule_leaves_another_rules_counts(monkeypatch: pytest.MonkeyPatch,
                                                                          strategy: str) -> None:
    """One client floods a header-keyed rule: the login rule's count of that client must stay."""
    import middleware.ratelimit as ratelimit

    monkeypatch.setattr(ratelimit, "MAX_MEMORY_KEYS", 50)
    rules = [{"paths": ["/auth/login"], "limits": ["2/minute"]},
             {"paths": ["/api/*"], "key": ["client_ip", "header:X-Api-Key"], "limits": ["1000/minute"]}]
    stack = Stack(MemoryStore(), limits=["1000/minute"], rules=rules, strategy=strategy)
    assert [stack.get("/auth/login", ip="10.6.6.6").status_int for _ in range(3)] == [200, 200, 429]
    for n in range(200):
        stack.get("/api/items", ip="10.6.6.6", headers={"X-Api-Key": f"made-up-{n}"})
    assert stack.get("/auth/login", ip="10.6.6.6").status_int == 429


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("inner_key", ["header:X-Api-Key", ["client_ip", "header:X-Api-Key"]])
def test_a_flood_through_one_layer_leaves_another_layers_counts(monkeypatch: pytest.MonkeyPatch, strategy: str,
                                                                 inner_key: str | list[str]) -> None:
    """Two layers on one memory store, no namespaces, one window length: each keeps its own keys and cap."""
    import middleware.ratelimit as ratelimit

    monkeypatch.setattr(ratelimit, "MAX_MEMORY_KEYS", 50)
    context = Context(stores={"shared": MemoryStore()})
    by_key = RateLimitMiddleware(inner, RateLimitMiddleware.Options(
        limits=["1000/minute"], key=inner_key, strategy=strategy), context)
    app = TestApp(ErrorsMiddleware(RateLimitMiddleware(by_key, RateLimitMiddleware.Options(
        limits=["20/minute"], strategy=strategy), context), ErrorsMiddleware.Options(), context))

    def get(ip: str, api_key: str) -> int:
        return int(app.get("/", headers={"X-Api-Key": api_key}, extra_environ={"REMOTE_ADDR": ip},
                           expect_errors=True).status_int)

    assert [get("10.9.9.9", "k") for _ in range(21)][-2:] == [200, 429]
    for n in range(80):  # four addresses, each under its address limit, with made-up keys
        assert get(f"10.0.0.{n // 20}", f"made-up-{n}") == 200
    assert get("10.9.9.9", "k") == 429


def test_a_lower_case_method_meets_its_rule(store: Store) -> None:
    """werkzeug routes `post` as POST (servers other than Waitress pass it on): the POST rule counts it."""
    from werkzeug.test import Client

    stack = Stack(store, limits=["100/minute"], rules=RULES)
    response = Client(stack.wsgi).open("/api/items", method="post", environ_base={"REMOTE_ADDR": "10.0.0.9"})
    assert response.headers.get("RateLimit-Limit") == "1"


def test_rule_order_matters(store: Store) -> None:
    broad_first = Stack(store, rules=[{"paths": ["/api/*"], "limits": ["9/minute"]},
                                      {"paths": ["/api/login"], "limits": ["2/minute"]}])
    assert broad_first.get("/api/login").headers["RateLimit-Limit"] == "9"


def test_without_a_default_rule_unmatched_requests_pass_untouched(store: Store) -> None:
    stack = Stack(store, rules=[{"paths": ["/api/*"], "limits": ["1/minute"]}])
    for _ in range(3):
        response = stack.get("/other")
        assert (response.status_int, rate(response)) == (200, {})


def test_rules_count_separately(store: Store) -> None:
    stack = Stack(store, limits=["1/minute"], rules=[{"paths": ["/a"], "limits": ["1/minute"]}])
    assert [stack.get("/a").status_int, stack.get("/b").status_int] == [200, 200]
    assert [stack.get("/a").status_int, stack.get("/b").status_int] == [429, 429]


# ------------------------------------------------------------------ keys


@pytest.mark.parametrize(("options", "first", "second", "shared"), [
    pytest.param({}, {"ip": "10.0.0.1"}, {"ip": "10.0.0.2"}, False, id="client_ip: two addresses"),
    pytest.param({}, {"ip": "10.0.0.1", "headers": {"X-Forwarded-For": "1.1.1.1"}},
                 {"ip": "10.0.0.1", "headers": {"X-Forwarded-For": "2.2.2.2"}}, True,
                 id="client_ip: X-Forwarded-For is never read"),
    pytest.param({}, {"ip": "10.0.0.9", CLIENT_IP: "192.0.2.1"}, {"ip": "10.0.0.9", CLIENT_IP: "192.0.2.2"},
                 False, id="client_ip: the address the proxy layer established"),
    pytest.param({}, {"ip": "2001:db8:1:2::1"}, {"ip": "2001:db8:1:2:ffff:ffff:ffff:ffff"}, True,
                 id="ipv6: one /64 is one client"),
    pytest.param({}, {"ip": "2001:db8:1:2::1"}, {"ip": "2001:db8:1:3::1"}, False,
                 id="ipv6: another /64 is another client"),
    pytest.param({"ipv6_prefix": 48}, {"ip": "2001:db8:1:2::1"}, {"ip": "2001:db8:1:3::1"}, True,
                 id="ipv6: prefix 48 groups wider"),
    pytest.param({"ipv6_prefix": 128}, {"ip": "2001:db8::1"}, {"ip": "2001:db8::2"}, False,
                 id="ipv6: prefix 128 is per address"),
    pytest.param({}, {"ip": "::ffff:192.0.2.7"}, {"ip": "192.0.2.7"}, True,
                 id="ipv4-mapped ipv6 is the ipv4 address"),
    # 6to4 gives one IPv4 address a /48 (65,536 /64s), Teredo a /64 per flags its client picks and per server:
    # each is the IPv4 address it is built on (Teredo's client address, obfuscated in the last 32 bits).
    pytest.param({}, {"ip": "2002:c000:207:1::1"}, {"ip": "2002:c000:207:2::1"}, True,
                 id="6to4: two /64s of one IPv4 address's /48 are one client"),
    pytest.param({}, {"ip": "2002:c000:207:1::1"}, {"ip": "192.0.2.7"}, True, id="6to4 is the ipv4 address"),
    pytest.param({}, {"ip": "2002:c000:207:1::1"}, {"ip": "2002:c000:208:1::1"}, False,
                 id="6to4: another ipv4 address"),
    pytest.param({}, {"ip": "2001:0:4136:e378:8000:63bf:3fff:fdd2"}, {"ip": "2001:0:4136:e379:8abc:63bf:3fff:fdd2"},
                 True, id="teredo: other flags and another server, one client address"),
    pytest.param({}, {"ip": "2001:0:4136:e378:8000:63bf:3fff:fdd2"}, {"ip": "192.0.2.45"}, True,
                 id="teredo is its client's ipv4 address"),
    pytest.param({"key": "header:X-Api-Key"}, {"headers": {"X-Api-Key": "a"}}, {"headers": {"X-Api-Key": "b"}},
                 False, id="header: two keys"),
    pytest.param({"key": "header:X-Api-Key"}, {"ip": "10.0.0.1", "headers": {"X-Api-Key": "a"}},
                 {"ip": "10.0.0.2", "headers": {"X-Api-Key": "a"}}, True, id="header: one key, two addresses"),
    pytest.param({"key": "header:X-Api-Key"}, {"ip": "10.0.0.1"}, {"ip": "10.0.0.2"}, False,
                 id="header missing: falls back to client_ip"),
    pytest.param({"key": "header:Content-Type"}, {"ip": "10.0.0.1", "headers": {"Content-Type": "text/plain"}},
                 {"ip": "10.0.0.2", "headers": {"Content-Type": "text/plain"}}, True,
                 id="header: Content-Type, kept apart from the other headers in WSGI"),
    pytest.param({"key": "header:content-type"}, {"ip": "10.0.0.1", "headers": {"Content-Type": "text/plain"}},
                 {"ip": "10.0.0.1", "headers": {"Content-Type": "text/csv"}}, False,
                 id="header: Content-Type, two values"),
    pytest.param({"key": "header:Content-Length"}, {"ip": "10.0.0.1", "method": "POST", "body": b"12"},
                 {"ip": "10.0.0.2", "method": "POST", "body": b"34"}, True, id="header: Content-Length"),
    pytest.param({"key": "header:Content-Length"}, {"ip": "10.0.0.1", "method": "POST", "body": b"12"},
                 {"ip": "10.0.0.1", "method": "POST", "body": b"345"}, False, id="header: Content-Length, two values"),
    pytest.param({"key": ["client_ip", "header:X-Api-Key"]}, {"ip": "10.0.0.1", "headers": {"X-Api-Key": "a"}},
                 {"ip": "10.0.0.2", "headers": {"X-Api-Key": "a"}}, False, id="combo: same key, two addresses"),
    pytest.param({"key": ["client_ip", "header:X-Api-Key"]}, {"ip": "10.0.0.1", "headers": {"X-Api-Key": "a"}},
                 {"ip": "10.0.0.1", "headers": {"X-Api-Key": "b"}}, False, id="combo: same address, two keys"),
    pytest.param({"key": ["client_ip", "header:X-Api-Key"]}, {"ip": "10.0.0.1", "headers": {"X-Api-Key": "a"}},
                 {"ip": "10.0.0.1", "headers": {"X-Api-Key": "a"}}, True, id="combo: same pair"),
    pytest.param({"key": "user"}, {"ip": "10.0.0.1", IDENTITY: Identity("ann")},
                 {"ip": "10.0.0.2", IDENTITY: Identity("ann")}, True, id="user: one user, two addresses"),
    pytest.param({"key": "user"}, {"ip": "10.0.0.1", IDENTITY: Identity("ann")},
                 {"ip": "10.0.0.1", IDENTITY: Identity("bob")}, False, id="user: two users, one address"),
    pytest.param({"key": "user"}, {"ip": "10.0.0.1"}, {"ip": "10.0.0.1", IDENTITY: Identity("ann")}, False,
                 id="user unknown: falls back to client_ip"),
    pytest.param({"key": "user"}, {"ip": "10.0.0.1"}, {"ip": "10.0.0.2"}, False,
                 id="user unknown: two addresses"),
])
def test_keys(store: Store, options: dict[str, Any], first: dict[str, Any], second: dict[str, Any],
              shared: bool) -> None:
    stack = Stack(store, limits=["1/minute"], **options)
    assert stack.get(**first).status_int == 200
    assert stack.get(**second).status_int == (429 if shared else 200)


# ------------------------------------------------------------------ shadow mode


def test_shadow_mode_counts_reports_and_lets_through(store: Store, caplog: pytest.LogCaptureFixture) -> None:
    stack = Stack(store, limits=["2/minute"], mode="shadow")
    with caplog.at_level(logging.INFO, logger="wsgistack.ratelimit"):
        responses = [stack.get("/shadowed") for _ in range(4)]
    assert [r.status_int for r in responses] == [200] * 4
    assert all(rate(r) == {} for r in responses)  # clients see no difference
    assert [e for e, _ in stack.events] == ["ratelimit.pass", "ratelimit.pass",
                                            "ratelimit.shadow_reject", "ratelimit.shadow_reject"]
    assert stack.events[-1][1] == {"rule": "default", "limit": "2 per 1 minute"}
    lines = [r.getMessage() for r in caplog.records if r.name == "wsgistack.ratelimit"]
    assert lines == ["shadow mode: would have limited ip:10.0.0.1 on GET /shadowed (2 per 1 minute, rule default)"] * 2


def test_shadow_mode_log_line_cannot_be_forged(caplog: pytest.LogCaptureFixture) -> None:
    """Control characters in the path and the key are escaped: a request cannot write a log line of its own."""
    stack = Stack(MemoryStore(), limits=["1/minute"], mode="shadow", key="user")
    forged = "/x\r\n2026-01-01 00:00:00,000 CRITICAL wsgistack.auth: forged"
    with caplog.at_level(logging.INFO, logger="wsgistack.ratelimit"):
        for _ in range(2):
            identified: dict[str, Any] = {IDENTITY: Identity("eve\nCRITICAL")}
            stack.get(forged, **identified)
    lines = [r.getMessage() for r in caplog.records if r.name == "wsgistack.ratelimit"]
    assert lines == ["shadow mode: would have limited u:eve\\x0aCRITICAL on GET /x\\x0d\\x0a2026-01-01 "
                     "00:00:00,000 CRITICAL wsgistack.auth: forged (1 per 1 minute, rule default)"]


# ------------------------------------------------------------------ exactness


def _hammer(wsgi: Any, requests: int, ip: str = "10.9.9.9") -> list[int]:
    """Send ``requests`` concurrent requests from as many threads; return the statuses."""
    barrier = threading.Barrier(requests)
    statuses: list[int] = []
    lock = threading.Lock()

    def one() -> None:
        environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/", "REMOTE_ADDR": ip, "SERVER_NAME": "x",
                   "SERVER_PORT": "80", "wsgi.url_scheme": "http"}
        seen: list[str] = []
        barrier.wait()
        body = wsgi(environ, lambda status, headers, exc_info=None: seen.append(status))
        b"".join(body)
        with lock:
            statuses.append(int(seen[0].split()[0]))

    threads = [threading.Thread(target=one) for _ in range(requests)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    return statuses


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_concurrent_threads_get_exactly_n(store: Store, strategy: str) -> None:
    stack = Stack(store, limits=["20/minute"], strategy=strategy)
    statuses = _hammer(stack.wsgi, 32)
    assert sorted(statuses) == [200] * 20 + [429] * 12


def test_a_rebuilt_layer_on_the_same_store_keeps_counting(store: Store) -> None:
    """A reload that keeps the store (memory:// carried over, or Redis) keeps every client's count."""
    Stack(store, limits=["3/minute"]).get()
    Stack(store, limits=["3/minute"]).get()
    again = Stack(store, limits=["3/minute"])
    assert [again.get().status_int for _ in range(2)] == [200, 429]


def test_memory_windows_roll_over_and_ended_ones_are_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [1_000_000.0]
    monkeypatch.setattr("middleware.ratelimit.time.time", lambda: clock[0])
    monkeypatch.setattr("middleware.ratelimit.time.monotonic", lambda: clock[0])  # memory windows
    store = store_from_url("memory://")
    stack = Stack(store, limits=["2/second", "5/minute"])
    assert [stack.get().status_int for _ in range(3)] == [200, 200, 429]
    assert rate(stack.get()) == {"RateLimit-Limit": "2", "RateLimit-Remaining": "0", "RateLimit-Reset": "1",
                                 "Retry-After": "1"}
    clock[0] += 1.0  # the second has ended; the minute has not
    assert rate(stack.get()) == {"RateLimit-Limit": "5", "RateLimit-Remaining": "0", "RateLimit-Reset": "59"}
    for n in range(50):  # other clients open windows of their own
        stack.get(ip=f"10.1.0.{n}")
    windows = {expiry: keys for (_, expiry), keys in stack.layer.counter.windows.items()}  # type: ignore[union-attr]
    assert (len(windows[1]), len(windows[60])) == (51, 51)
    clock[0] += 2.0
    stack.get(ip="10.2.0.1")  # opening a window drops the ones that ended before it
    assert len(windows[1]) == 1
    clock[0] += 60.0
    stack.get(ip="10.2.0.2")
    assert (len(windows[1]), len(windows[60])) == (1, 1)


@pytest.mark.parametrize(("strategy", "later", "tracked"), [
    pytest.param("moving-window", 59.0, 51, id="moving: a key lives a window after its last hit"),
    pytest.param("moving-window", 60.0, 1, id="moving: then it is forgotten"),
    pytest.param("sliding-window-counter", 119.0, 51, id="sliding: two windows (the last one still weighs)"),
    pytest.param("sliding-window-counter", 120.0, 1, id="sliding: then it is forgotten"),
])
def test_memory_keys_of_moving_and_sliding_windows_are_forgotten_once_they_end(
        monkeypatch: pytest.MonkeyPatch, strategy: str, later: float, tracked: int) -> None:
    clock = [1_000_000.0]
    monkeypatch.setattr("middleware.ratelimit.time.time", lambda: clock[0])
    monkeypatch.setattr("middleware.ratelimit.time.monotonic", lambda: clock[0])
    stack = Stack(store_from_url("memory://"), limits=["1/minute"], strategy=strategy)
    for n in range(50):
        stack.get(ip=f"10.1.0.{n}")
    clock[0] += later
    stack.get(ip="10.2.0.1")  # a new key drops the ones that ended before it
    tables = stack.layer.counter.tracked  # type: ignore[union-attr]
    assert [len(keys) for keys in tables.values()] == [tracked]


def test_memory_windows_end_on_time_whatever_the_wall_clock_does(monkeypatch: pytest.MonkeyPatch) -> None:
    """The wall clock steps back an hour (NTP, a VM resumed): a minute's window still ends after a minute."""
    wall, tick = [1_000_000.0], [500.0]
    monkeypatch.setattr("middleware.ratelimit.time.time", lambda: wall[0])
    monkeypatch.setattr("middleware.ratelimit.time.monotonic", lambda: tick[0])
    stack = Stack(store_from_url("memory://"), limits=["2/minute"])
    assert [stack.get().status_int for _ in range(3)] == [200, 200, 429]
    wall[0] -= 3600.0
    tick[0] += 30.0
    refused = stack.get()
    assert (refused.status_int, refused.headers["Retry-After"]) == (429, "30")
    tick[0] += 30.0
    assert rate(stack.get()) == {"RateLimit-Limit": "2", "RateLimit-Remaining": "1", "RateLimit-Reset": "60"}


@pytest.mark.parametrize("asked_at", [54.9995, 54.99999, 59.9995, 59.0, 30.25])
def test_waiting_the_seconds_said_is_enough(monkeypatch: pytest.MonkeyPatch, asked_at: float) -> None:
    # A window from 1000 to 1060: a refusal at 1000 + asked_at says how long to wait, in whole seconds
    # rounded up; a client that waits exactly that long is let in, and RateLimit-Reset says the same.
    clock = [1_000.0]
    monkeypatch.setattr("middleware.ratelimit.time.time", lambda: clock[0])
    monkeypatch.setattr("middleware.ratelimit.time.monotonic", lambda: clock[0])  # memory windows
    stack = Stack(store_from_url("memory://"), limits=["1/minute"])
    assert stack.get().status_int == 200
    clock[0] = 1_000 + asked_at
    refused = stack.get()
    assert refused.status_int == 429
    assert refused.headers["Retry-After"] == refused.headers["RateLimit-Reset"]
    wait = int(refused.headers["Retry-After"])
    assert 1_000 + asked_at + wait >= 1_060
    clock[0] += wait
    assert stack.get().status_int == 200


@pytest.mark.parametrize(("limit", "asked_at", "expected"), [
    pytest.param("2/minute", 59.9995, {"RateLimit-Limit": "2", "RateLimit-Remaining": "0", "RateLimit-Reset": "1"},
                 id="nothing left, a part of a second to go: rounded up"),
    pytest.param("2/minute", 59.9999995, {"RateLimit-Limit": "2", "RateLimit-Remaining": "0", "RateLimit-Reset": "1"},
                 id="nothing left, less than the microsecond forgiven: still a second, as a refusal would say"),
    pytest.param("3/minute", 59.9999995, {"RateLimit-Limit": "3", "RateLimit-Remaining": "1", "RateLimit-Reset": "0"},
                 id="a request left: the window ends now"),
])
def test_a_pass_with_nothing_left_says_a_wait_of_a_second_at_least(monkeypatch: pytest.MonkeyPatch, limit: str,
                                                                   asked_at: float, expected: dict[str, str]) -> None:
    clock = [1_000.0]
    monkeypatch.setattr("middleware.ratelimit.time.time", lambda: clock[0])
    monkeypatch.setattr("middleware.ratelimit.time.monotonic", lambda: clock[0])  # memory windows
    stack = Stack(store_from_url("memory://"), limits=[limit])
    stack.get()
    clock[0] = 1_000 + asked_at  # just before the window ends: RateLimit-Reset 0 with nothing left invites a retry now
    assert rate(stack.get()) == expected


@pytest.mark.parametrize(("namespaces", "expected"), [
    pytest.param(("", ""), [200, 200, 429, 429], id="no namespace: one counter per client"),
    pytest.param(("api", "auth"), [200, 200, 200, 200], id="a namespace each: apart"),
])
def test_namespaces_keep_two_layers_apart(store: Store, namespaces: tuple[str, str],
                                          expected: list[int]) -> None:
    api = Stack(store, limits=["2/minute"], namespace=namespaces[0])
    auth = Stack(store, limits=["2/minute"], namespace=namespaces[1])
    assert [api.get().status_int, auth.get().status_int, api.get().status_int, auth.get().status_int] == expected
    if namespaces[0]:
        assert ("ratelimit.pass", {"rule": "api:default"}) in api.events


@pytest.mark.parametrize("key", ["user", "header:X-Api-Key"])
def test_a_layer_keyed_by_user_or_header_counts_an_anonymous_request_apart_from_one_keyed_by_address(
        store: Store, key: str) -> None:
    """By address outside auth, by user inside, no namespaces: 4/minute each lets 4 anonymous requests through."""
    by_address, by_user = Stack(store, limits=["4/minute"]), Stack(store, limits=["4/minute"], key=key)
    answers = [(by_address.get().status_int, by_user.get().status_int) for _ in range(5)]
    assert answers == [(200, 200)] * 4 + [(429, 429)]


@pytest.mark.parametrize(("headers", "expected"), [
    pytest.param({"X-A": "same", "X-B": "same"}, [200, 200, 429], id="equal values: a count each"),
    pytest.param({}, [200, 200, 429], id="both missing, both counted by address: a count each"),
])
def test_layers_keyed_by_two_headers_count_apart(store: Store, headers: dict[str, str],
                                                  expected: list[int]) -> None:
    """No namespaces, one limit, keyed by different headers: a value seen in both is two clients, not one,
    on either backend (each header's values are counted under its name)."""
    context = Context(stores={"shared": store})
    by_b = RateLimitMiddleware(inner, RateLimitMiddleware.Options(limits=["2/minute"], key="header:X-B"), context)
    by_a = RateLimitMiddleware(by_b, RateLimitMiddleware.Options(limits=["2/minute"], key="header:X-A"), context)
    app = TestApp(ErrorsMiddleware(by_a, ErrorsMiddleware.Options(), context))
    answers = [app.get("/", headers=headers, extra_environ={"REMOTE_ADDR": "10.4.4.4"}, expect_errors=True).status_int
               for _ in range(3)]
    assert answers == expected


def test_two_layers_on_one_redis_share_the_count(redis_url: str) -> None:
    first, second = store_from_url(redis_url), store_from_url(redis_url)
    try:
        a, b = Stack(first, limits=["3/minute"]), Stack(second, limits=["3/minute"])
        assert [a.get().status_int, b.get().status_int, a.get().status_int, b.get().status_int] == [200, 200, 200, 429]
    finally:
        first.close()
        second.close()


@pytest.mark.redis
@pytest.mark.parametrize(("first", "then"), [
    pytest.param(0.0, 90.0, id="a process whose clock runs 90 s ahead"),
    pytest.param(-90.0, 0.0, id="after a process whose clock runs 90 s behind"),
])
def test_a_moving_window_on_redis_is_timed_by_one_clock(redis_url: str, monkeypatch: pytest.MonkeyPatch,
                                                        first: float, then: float) -> None:
    """Processes on one Redis whose clocks disagree (no NTP in a container, a VM resumed) count one window.

    Each counts in the window Redis's clock says: with its own, a process whose clock ran ahead took
    the others' requests for older than they were and let a client through a window early, and requests
    stamped by a process behind counted for nothing in the others' windows.
    """
    import middleware.ratelimit as module

    skew = [first]
    monkeypatch.setattr(module, "time", SimpleNamespace(time=lambda: time.time() + skew[0],
                                                        monotonic=time.monotonic))
    one, other = store_from_url(redis_url), store_from_url(redis_url)
    try:
        a = Stack(one, limits=["2/minute"], strategy="moving-window")
        b = Stack(other, limits=["2/minute"], strategy="moving-window")
        assert [a.get().status_int, a.get().status_int] == [200, 200]
        skew[0] = then
        refused = b.get()
        assert (refused.status_int, refused.headers["Retry-After"]) == (429, "60")
    finally:
        one.close()
        other.close()


PROCESS_SCRIPT = textwrap.dedent("""
    import json, sys, threading
    from middleware.base import Context
    from middleware.ratelimit import RateLimitMiddleware
    from stores import store_from_url

    url, strategy, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    store = store_from_url(url)
    def app(environ, start_response):
        start_response("200 OK", [])
        return [b"ok"]
    layer = RateLimitMiddleware(app, RateLimitMiddleware.Options(limits=["25/minute"], strategy=strategy),
                                Context(stores={"shared": store}))
    passed, refused, lock = [0], [0], threading.Lock()
    def one():
        environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/", "REMOTE_ADDR": "10.7.7.7"}
        try:
            layer(environ, lambda *a: None)
            with lock: passed[0] += 1
        except Exception as exc:
            assert getattr(exc, "code", None) == 429, exc
            with lock: refused[0] += 1
    threads = [threading.Thread(target=one) for _ in range(count)]
    print("ready", flush=True)
    sys.stdin.readline()  # both processes start together
    for t in threads: t.start()
    for t in threads: t.join()
    print(json.dumps({"passed": passed[0], "refused": refused[0]}))
""")


@pytest.mark.redis
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_two_processes_on_one_redis_get_exactly_n(redis_url: str, strategy: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", PROCESS_SCRIPT, redis_url, strategy, "20"], cwd=ROOT, env=env,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    for proc in procs:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "ready\n"
    results = []
    for proc in procs:
        out, err = proc.communicate("go\n", timeout=30)
        assert proc.returncode == 0, err
        results.append(json.loads(out))
    assert sum(r["passed"] for r in results) == 25
    assert sum(r["refused"] for r in results) == 15


# ------------------------------------------------------------------ Redis costs


class CountingConnection(redis.Connection):
    """A real connection that counts how often it writes to the socket (one write per round trip)."""

    writes = 0

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        type(self).writes += 1
        super().send_packed_command(command, check_health)  # type: ignore[no-untyped-call]


def _commandstats(client: redis.Redis) -> dict[str, int]:
    return {k.removeprefix("cmdstat_"): v["calls"] for k, v in client.info("commandstats").items()}


@pytest.mark.redis
@pytest.mark.parametrize(("strategy", "limits", "commands"), [
    pytest.param("fixed-window", ["100/minute"], {"evalsha": 1, "pttl": 1}, id="fixed, one limit"),
    pytest.param("fixed-window", ["100/second", "1000/minute"], {"evalsha": 2, "pttl": 2}, id="fixed, two limits"),
    pytest.param("moving-window", ["100/minute"], {"evalsha": 2}, id="moving, one limit"),
    pytest.param("sliding-window-counter", ["100/minute"], {"evalsha": 2}, id="sliding, one limit"),
])
def test_one_round_trip_per_request(redis_url: str, strategy: str, limits: list[str],
                                    commands: dict[str, int]) -> None:
    from stores.redis import RedisStore

    pool = redis.ConnectionPool.from_url(redis_url, connection_class=CountingConnection)
    store = RedisStore(client=redis.Redis(connection_pool=pool), breaker=CircuitBreaker(50, 0.2, name="t"))
    stack = Stack(store, limits=limits, strategy=strategy)
    counter: Any = stack.layer.counter
    assert counter.storage.storage.connection_pool is store.pool  # limits uses the store's pool
    assert counter.client is store.client
    stack.get()  # loads the scripts once
    probe = redis.Redis.from_url(redis_url)
    before, writes = _commandstats(probe), CountingConnection.writes
    for _ in range(10):
        assert stack.get().status_int == 200
    after = _commandstats(probe)
    assert CountingConnection.writes - writes == 10  # one pipeline, one round trip, per request
    sent = {name: (after.get(name, 0) - before.get(name, 0)) // 10 for name in ("evalsha", "pttl", "get")
            if name in commands}
    assert sent == commands
    assert len(pool._available_connections) + len(pool._in_use_connections) == 1
    probe.close()
    pool.disconnect()


@pytest.mark.redis
def test_keys_live_under_the_store_prefix(redis_store: Store, redis_url: str) -> None:
    Stack(redis_store, limits=["5/minute"]).get(ip="10.1.1.1")
    keys = redis.Redis.from_url(redis_url, decode_responses=True).keys("*")
    assert keys == ["wsgistack:ratelimit:LIMITER/default/fixed-window/ip:10.1.1.1/5/1/minute"]


@pytest.mark.redis
def test_changing_the_strategy_starts_new_counters(redis_store: Store) -> None:
    fixed = Stack(redis_store, limits=["1/minute"])
    assert [fixed.get().status_int, fixed.get().status_int] == [200, 429]
    moving = Stack(redis_store, limits=["1/minute"], strategy="moving-window")
    assert [moving.get().status_int, moving.get().status_int] == [200, 429]
    assert moving.events[0] == ("ratelimit.pass", {"rule": "default"})  # no WRONGTYPE store error


@pytest.mark.redis
@pytest.mark.parametrize(("strategy", "foreign"), [("fixed-window", "a list"), ("moving-window", "a string")])
def test_a_value_of_another_type_at_a_counter_starts_it_anew(redis_store: Store, redis_url: str,
                                                             strategy: str, foreign: str) -> None:
    """Something else wrote there (a fixed window counts in a string, a moving one in a list): the
    client is counted afresh, not refused (503) for good."""
    stack = Stack(redis_store, limits=["2/minute"], strategy=strategy, on_store_error="closed")
    assert stack.get().status_int == 200
    client = redis.Redis.from_url(redis_url)
    for key in client.keys("wsgistack:ratelimit:*"):
        client.delete(key)
        if foreign == "a list":
            client.rpush(key, b"x")
        else:
            client.set(key, b"x")
    assert [stack.get().status_int, stack.get().status_int, stack.get().status_int] == [200, 200, 429]
    assert not [e for e, _ in stack.events if e == "store.error"]


def test_a_rule_keeps_its_counts_when_rules_are_inserted_before_it(store: Store) -> None:
    """Counters are named by what a rule matches: a reload that adds a rule above the login rule
    neither resets the login attempts nor hands them to the new rule."""
    login = {"paths": ["/auth/login"], "methods": ["POST"], "limits": ["3/minute"]}
    refresh = {"paths": ["/auth/refresh"], "methods": ["POST"], "limits": ["3/minute"]}
    before = Stack(store, limits=["100/minute"], rules=[login])
    assert [before.get("/auth/login", method="POST").status_int for _ in range(2)] == [200, 200]
    after = Stack(store, limits=["100/minute"], rules=[refresh, login])
    assert rate(after.get("/auth/refresh", method="POST"))["RateLimit-Remaining"] == "2"  # its own, fresh
    assert [after.get("/auth/login", method="POST").status_int for _ in range(2)] == [200, 429]


@pytest.mark.redis
def test_scripts_reload_after_a_flush(redis_store: Store, redis_url: str) -> None:
    stack = Stack(redis_store, limits=["2/minute"], strategy="moving-window")
    assert stack.get().status_int == 200
    redis.Redis.from_url(redis_url).script_flush()
    assert [stack.get().status_int, stack.get().status_int] == [200, 429]


# ------------------------------------------------------------------ store failure


@pytest.mark.redis
@pytest.mark.parametrize(("mode", "status"), [("open", 200), ("closed", 503)])
def test_store_down(redis_server: Any, redis_store: Store, mode: str, status: int,
                    caplog: pytest.LogCaptureFixture) -> None:
    if redis_server is None:
        pytest.skip("needs the private redis-server to stop and start it")
    stack = Stack(redis_store, limits=["2/minute"], on_store_error=mode)
    assert stack.get().status_int == 200
    stack.events.clear()
    redis_server.stop()
    try:
        with caplog.at_level(logging.WARNING, logger="wsgistack.ratelimit"):
            down = [stack.get() for _ in range(3)]
    finally:
        redis_server.start()
    assert [r.status_int for r in down] == [status] * 3
    assert all(rate(r) == ({} if mode == "open" else {"Retry-After": "5"}) for r in down)
    if mode == "closed":
        assert down[0].json["error"]["message"] == "The rate-limit store is unavailable; retry shortly."
    assert stack.events == [("store.error", {"store": "shared", "layer": "ratelimit"})] * 3
    warnings = [r.getMessage() for r in caplog.records if r.name == "wsgistack.ratelimit"]
    assert len(warnings) == 1  # logged once, counted every time
    assert warnings[0].startswith(f"rate-limit store 'shared' failed (redis store {redis_store.url} could not count")
    assert warnings[0].endswith(f"; failing {mode}")
    # The restarted server is empty and has no scripts: counting starts again.
    assert [stack.get().status_int for _ in range(3)] == [200, 200, 429]


def test_shadow_mode_never_refuses_not_even_in_an_outage() -> None:
    """A closed rule in shadow mode: counting is what is tried out, so an outage lets requests through."""
    from conftest import free_port

    from stores.redis import RedisStore

    dead = RedisStore(f"redis://127.0.0.1:{free_port()}/0", socket_timeout=0.05, socket_connect_timeout=0.05)
    stack = Stack(dead, limits=["100/minute"], mode="shadow", on_store_error="closed",
                  rules=[{"paths": ["/login"], "limits": ["5/minute"], "on_store_error": "closed"}])
    try:
        assert [stack.get(path).status_int for path in ("/", "/login")] == [200, 200]
    finally:
        dead.close()


@pytest.mark.parametrize(("layer", "rule", "statuses"), [
    ("open", "closed", {"/": 200, "/login": 503}),  # login attempts stay limited when nothing can count them
    ("closed", "open", {"/": 503, "/login": 200}),
    ("closed", None, {"/": 503, "/login": 503}),  # a rule without its own policy takes the layer's
])
def test_a_rule_may_fail_otherwise_than_the_layer(layer: str, rule: str | None, statuses: dict[str, int],
                                                  caplog: pytest.LogCaptureFixture) -> None:
    from conftest import free_port

    from stores.redis import RedisStore

    dead = RedisStore(f"redis://127.0.0.1:{free_port()}/0", socket_timeout=0.05, socket_connect_timeout=0.05)
    policy = {} if rule is None else {"on_store_error": rule}
    stack = Stack(dead, limits=["100/minute"], on_store_error=layer,
                  rules=[{"paths": ["/login"], "limits": ["5/minute"], **policy}])
    try:
        with caplog.at_level(logging.WARNING, logger="wsgistack.ratelimit"):
            got = {path: stack.get(path).status_int for path in statuses}
    finally:
        dead.close()
    assert got == statuses
    described = {("open", "closed"): "open (closed for rule r0)", ("closed", "open"): "closed (open for rule r0)",
                 ("closed", None): "closed"}[(layer, rule)]
    assert caplog.records[0].getMessage().endswith(f"; failing {described}")


# ------------------------------------------------------------------ YAML


def test_built_from_yaml(make_stack: Callable[..., TestApp]) -> None:
    app = make_stack({
        "app": {"factory": "stack_support:echo_app"},
        "pipeline": [{"ratelimit": {"limits": ["2/minute"], "rules": [{"paths": ["/free"], "limits": []}]}}],
    })
    assert [app.get("/", expect_errors=True).status_int for _ in range(3)] == [200, 200, 429]
    assert app.get("/free").status_int == 200


def test_yaml_error_names_the_limit(make_stack: Callable[..., TestApp]) -> None:
    from config import ConfigError

    with pytest.raises(ConfigError, match="'5 per fortnight' is not a rate limit"):
        make_stack({"pipeline": [{"ratelimit": {"limits": ["5 per fortnight"]}}]})


@pytest.mark.parametrize("table", ["events", "expirations"])
def test_the_memory_sweep_takes_keys_cleared_while_it_runs(table: str) -> None:
    """The cap clears the oldest keys of a flood while limits' sweep thread walks them: no KeyError
    (the thread died with a traceback on stderr every few seconds under such a flood)."""
    from limits.storage.memory import Entry

    from middleware.ratelimit import _MemoryStorage

    storage = _MemoryStorage()
    storage.timer.cancel()
    try:
        if table == "expirations":  # listed by the sweep, cleared before it is read
            class Listed(dict[str, float]):
                def keys(self) -> Any:
                    return [*super().keys(), "cleared"]

                def __iter__(self) -> Any:
                    return iter(self.keys())

            storage.expirations = Listed(kept=time.time() - 1)
            storage.storage["kept"] = 3
        else:  # cleared while the sweep looks through its entries
            class Clearing(list[Entry]):
                def __getitem__(self, index: Any) -> Any:
                    storage.clear("cleared")
                    return super().__getitem__(index)

            storage.events["cleared"] = Clearing([Entry(1), Entry(1)])
        storage._MemoryStorage__expire_events()
        assert "cleared" not in storage.events and "kept" not in storage.storage
    finally:
        storage.timer.cancel()


def test_rules_that_differ_only_in_their_methods_count_apart(store: Store) -> None:
    stack = Stack(store, rules=[{"paths": ["/a"], "methods": ["POST"], "limits": ["1/minute"]},
                                {"paths": ["/a"], "methods": ["GET"], "limits": ["1/minute"]}])
    assert stack.get("/a", method="POST").status_int == 200
    assert [stack.get("/a").status_int, stack.get("/a").status_int] == [200, 429]  # a counter of its own


def test_a_later_request_is_told_what_is_left_of_its_window(store: Store) -> None:
    stack = Stack(store, limits=["2 per 3 second"])
    assert stack.get().headers["RateLimit-Reset"] == "3"
    time.sleep(1.3)
    second, third = stack.get(), stack.get()
    assert (second.status_int, second.headers["RateLimit-Reset"]) == (200, "2")
    assert (third.status_int, third.headers["Retry-After"]) == (429, "2")


@pytest.mark.redis
def test_a_sliding_window_weighs_the_window_before(redis_store: Store) -> None:
    """limits' Redis sliding window: the last window's count, weighted by how much of it still overlaps."""
    stack = Stack(redis_store, limits=["3 per 2 second"], strategy="sliding-window-counter")
    assert [stack.get().status_int for _ in range(4)] == [200, 200, 200, 429]
    time.sleep(2.2)  # a new window: the last one's 3 still weigh floor(3 * 1.8 / 2) = 2 (up to 2.6 s later)
    assert [stack.get().status_int for _ in range(2)] == [200, 429]


@pytest.mark.parametrize("raised", [False, True], ids=["answered", "raised"])
def test_a_refusal_of_another_policy_does_not_say_requests_remain(raised: bool) -> None:
    """The core's lockout of a user name after wrong passwords is a 429 of its own: the limiter's fields would
    tell the page it may go on (RateLimit-Remaining: 2) while its Retry-After says 15 minutes."""
    def locked_out(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if raised:
            raise refuse(429, "Too many login attempts for this user name.", headers=[("Retry-After", "900")])
        start_response("429 Too Many Requests", [("Content-Type", "text/plain"), ("Retry-After", "900")])
        return [b"locked"]

    layer = RateLimitMiddleware(locked_out, RateLimitMiddleware.Options(limits=["10/minute"]),
                                Context(stores={"shared": MemoryStore()}))
    response = TestApp(ErrorsMiddleware(layer, ErrorsMiddleware.Options(), Context())).get("/auth/login", status=429)
    assert response.headers["Retry-After"] == "900"
    assert [name for name in response.headers if name.lower().startswith("ratelimit-")] == []
