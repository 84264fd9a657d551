"""Per-process memory a client can make grow: every table keyed by what a request carries stays bounded.

Each test sends distinct client values (paths, origins, addresses, tokens, cookies) through a built
pipeline and measures the table that keeps them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from webtest import TestApp

from middleware import cors, session
from middleware.cors import CORSMiddleware
from middleware.metrics import MetricsMiddleware
from middleware.ratelimit import _COUNTERS, MAX_MEMORY_KEYS
from middleware.session import SessionMiddleware

ECHO = {"factory": "stack_support:echo_app"}


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
