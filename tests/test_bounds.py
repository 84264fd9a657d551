"""Per-process memory a client can make grow: every table keyed by what a request carries stays bounded.

Each test sends distinct client values (paths, origins, addresses, tokens, cookies) through a built
pipeline and measures the table that keeps them: its length, and for keys a client may make long
(an address Waitress's ``trusted_proxy`` passed on as the proxy wrote it), the characters kept.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from webtest import TestApp

from middleware import cors, session
from middleware.base import ipv6_network
from middleware.cors import CORSMiddleware
from middleware.metrics import MetricsMiddleware
from middleware.proxy import _parsed_address
from middleware.ratelimit import _COUNTERS, MAX_MEMORY_KEYS
from middleware.session import SessionMiddleware
from middleware.versioning import VersioningMiddleware

ECHO = {"factory": "stack_support:echo_app"}
LONG = "x" * 4000  # text far longer than any address, as a proxy may forward what a client wrote


def layer(stack: TestApp, kind: type[Any]) -> Any:
    """The built instance of layer class ``kind`` in ``stack``."""
    return next(i for i in stack.built.instances if isinstance(i, kind))


def counter_keys(stack: TestApp) -> list[str]:
    """Every key the memory rate-limit counters of ``stack``'s ``shared`` store keep: their tables and ``limits``'."""
    counter = _COUNTERS[stack.built.context.store("shared")]
    tables: list[Any] = [*counter.windows.values(), *counter.tracked.values()]
    if counter._storage is not None:
        storage = counter._storage
        tables += [storage.storage, storage.expirations, storage.events]
    return [key for table in tables for key in table]


def test_proxy_keeps_no_long_forwarded_text(make_stack: Callable[..., TestApp]) -> None:
    """A Forwarded ``for`` no address can be is read, refused, and not kept in the parse cache."""
    stack = make_stack({"app": ECHO, "pipeline": [{"proxy": {"forwarded": 1}}]})
    _parsed_address.cache_clear()
    for i in range(50):
        answer = stack.get("/", headers={"Forwarded": f'for="{i}:{LONG}"'}, extra_environ={"REMOTE_ADDR": "127.0.0.1"})
        assert answer.json["client_ip"] == "127.0.0.1"  # not an address: the peer's stays
    stack.get("/", headers={"Forwarded": "for=203.0.113.9"}, extra_environ={"REMOTE_ADDR": "127.0.0.1"})
    assert _parsed_address.cache_info().currsize == 1  # the real address only


def test_proxy_keeps_no_long_peer_text(make_stack: Callable[..., TestApp]) -> None:
    """A peer no address can be (Waitress's trusted_proxy passed a forwarded text on) is not trusted, nor kept."""
    from middleware.proxy import ProxyMiddleware

    stack = make_stack({"app": ECHO, "pipeline": [{"proxy": {"x_for": 1}}]})
    proxy = layer(stack, ProxyMiddleware)
    for i in range(50):
        answer = stack.get("/", headers={"X-Forwarded-For": "203.0.113.9"}, extra_environ={"REMOTE_ADDR": f"{i}{LONG}"})
        assert answer.json["client_ip"] == f"{i}{LONG}"
    assert proxy.trusted.cache_info().currsize == 0
    trusted = stack.get("/", headers={"X-Forwarded-For": "203.0.113.9"}, extra_environ={"REMOTE_ADDR": "127.0.0.1"})
    assert (trusted.json["client_ip"], proxy.trusted.cache_info().currsize) == ("203.0.113.9", 1)


def test_proxy_refuses_an_address_with_a_zone_longer_than_any_interface_name(
        make_stack: Callable[..., TestApp]) -> None:
    stack = make_stack({"app": ECHO, "pipeline": [{"proxy": {"forwarded": 1}}]})
    forwarded = {"Forwarded": f'for="[fe80::1%{LONG}]"'}
    assert stack.get("/", headers=forwarded, extra_environ={"REMOTE_ADDR": "127.0.0.1"}).json["client_ip"] \
        == "127.0.0.1"
    short = {"Forwarded": 'for="[fe80::1%eth0]:4711"'}
    assert stack.get("/", headers=short, extra_environ={"REMOTE_ADDR": "127.0.0.1"}).json["client_ip"] \
        == "fe80::1%eth0"


@pytest.mark.parametrize("strategy", ["fixed-window", "sliding-window-counter", "moving-window"])
def test_ratelimit_memory_keys_stay_short_whatever_the_address_text(
        make_stack: Callable[..., TestApp], strategy: str) -> None:
    """Waitress's trusted_proxy passes on the forwarded text as REMOTE_ADDR: each counted client is a short key."""
    stack = make_stack({"app": ECHO, "pipeline": [{"ratelimit": {"limits": ["100/minute"], "strategy": strategy}}]})
    before = ipv6_network.cache_info().currsize
    addresses = [f"2001:db8::{i}:{LONG}" for i in range(40)] + [f"{i}{LONG}" for i in range(40)]
    for address in addresses:
        stack.get("/", extra_environ={"REMOTE_ADDR": address})
        stack.get("/", extra_environ={"REMOTE_ADDR": address})
    keys = counter_keys(stack)
    assert len(set(keys)) >= len(addresses)  # each text still counted apart
    assert max(map(len, keys)) < 150
    assert ipv6_network.cache_info().currsize - before <= 1  # (the digests pass it by)
    assert stack.get("/", extra_environ={"REMOTE_ADDR": addresses[0]}).headers["RateLimit-Remaining"] == "97"


def test_versioning_counts_keep_short_client_keys(make_stack: Callable[..., TestApp]) -> None:
    stack = make_stack({"app": ECHO, "pipeline": [{"versioning": {
        "supported": ["v1", "v2"], "default": "v2", "max_clients": 30,
        "deprecated": {"v1": {"deprecation": "2024-01-01"}}}}]})
    versioning = layer(stack, VersioningMiddleware)
    for i in range(60):
        stack.get("/api/v1/x", extra_environ={"REMOTE_ADDR": f"{i}:{LONG}"})
    assert len(versioning._counts) == 30
    assert max(len(client) for client, _ in versioning._counts) < 100


# ------------------------------------------------------------------ bounds that hold


def test_cors_remembers_at_most_1024_origins(make_stack: Callable[..., TestApp]) -> None:
    stack = make_stack({"app": ECHO, "pipeline": [{"cors": {"origins": ["https://*.example.org"]}}]})
    policy = layer(stack, CORSMiddleware).default
    for i in range(1500):
        stack.get("/", headers={"Origin": f"https://n{i}.example.com"})
        assert len(policy.seen) <= 1024
    stack.get("/", headers={"Origin": "https://" + "a" * 400 + ".example.com"})
    assert max(map(len, policy.seen)) <= cors._LONGEST_ORIGIN


def test_session_remembers_a_bounded_number_of_cookies(make_stack: Callable[..., TestApp],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(session, "VERIFIED_CACHE_SIZE", 50)
    stack = make_stack({"app": {"factory": "test_session:probe_factory"},
                        "pipeline": [{"session": {"secret_key": "s" * 43}}]})
    sessions = layer(stack, SessionMiddleware)
    for i in range(120):
        stack.get("/get", headers={"Cookie": f"__Host-session={sessions.signer.sign(f'{i:043d}').decode()}"})
        assert 0 < len(sessions._verified) <= 50
    sessions._verified.clear()
    for i in range(120):  # values whose signature does not check out are never kept
        stack.get("/get", headers={"Cookie": f"__Host-session={i:043d}.{'A' * 43}"})
    assert sessions._verified == {}


def test_ratelimit_memory_keys_are_capped(make_stack: Callable[..., TestApp],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from middleware import ratelimit

    monkeypatch.setattr(ratelimit, "MAX_MEMORY_KEYS", 30)
    stack = make_stack({"app": ECHO, "pipeline": [{"ratelimit": {"limits": ["5/minute"]}}]})
    for i in range(100):
        stack.get("/", extra_environ={"REMOTE_ADDR": f"198.51.100.{i}"})
    assert len(counter_keys(stack)) == 30
    assert MAX_MEMORY_KEYS == 100_000


def test_metrics_labels_and_tables_are_capped(make_stack: Callable[..., TestApp]) -> None:
    stack = make_stack({"app": ECHO, "pipeline": [{"metrics": {"max_routes": 20}}]})
    metrics = layer(stack, MetricsMiddleware)
    for i in range(300):
        stack.get(f"/p{i}/{'y' * (i % 3) * 200}", headers={"Accept": f"text/{i}"}, status="*")
    routes = {labels[1] for labels in metrics.counts.by_labels}
    assert len(routes) <= 21 and "other" in routes
    assert len(metrics._series) <= 10_000 and max(len(route) for _, route, _ in metrics._series) <= 256
    assert len(metrics._templates) <= 1000


def test_auth_remembers_a_bounded_number_of_verified_tokens(make_stack: Callable[..., TestApp],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from middleware import auth

    monkeypatch.setattr(auth, "_VERIFIED_MAX", 20)
    stack = make_stack({"app": ECHO, "pipeline": [{"auth": {"secret": "k" * 43}}]})
    tokens = stack.built.context.services["tokens"]
    for i in range(60):
        token = tokens.issue(f"user{i}")["access_token"]
        assert stack.get("/", headers={"Authorization": f"Bearer {token}"}).json["identity"] == f"user{i}"
        assert len(tokens._verified) <= 20
    kept = dict(tokens._verified)
    for i in range(60):  # a signature that does not check out is never kept
        forged = token[:-8] + f"{i:08d}"
        stack.get("/", headers={"Authorization": f"Bearer {forged}"}, status=401)
    assert tokens._verified == kept
