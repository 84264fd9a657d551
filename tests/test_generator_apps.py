"""Apps that start their response on the body's first iteration (PEP 3333 allows it), in a built stack.

A refusal such an app raises there, before anything was sent, is one from the call for every layer
outside: the builder takes that first chunk within the call (around the core and the layers named by a
dotted path), so each built-in layer puts its headers on it and counts and logs its status.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from webtest import TestApp

from config import build_from_dict
from middleware.base import refuse

ORIGIN = "http://app.example"


def refusing_generator(**options: Any) -> Callable[..., Iterable[bytes]]:
    """A core that refuses on its body's first iteration, before it starts the response."""

    def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        raise refuse(503, "Later.", headers=[("Retry-After", "5")])
        yield b""  # a generator all the same

    return app


def answering_generator(**options: Any) -> Callable[..., Iterable[bytes]]:
    """A core that starts its response on the body's first iteration."""

    def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        yield b"one, "
        yield b"two"

    return app


def lazy_layer(app: Callable[..., Iterable[bytes]]) -> Callable[..., Iterable[bytes]]:
    """A middleware of your own that is a generator: the app inside runs only once its body is iterated."""

    def middleware(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        yield from app(environ, start_response)

    return middleware


def stack(core: str, *inner: dict[str, Any]) -> TestApp:
    built = build_from_dict({
        "stores": {"mem": "memory://"},
        "app": {"factory": f"{__name__}:{core}"},
        "pipeline": [
            {"errors": {}},
            {"request_id": {}},
            {"metrics": {}},
            {"access_log": {"logger": "wsgistack.test.generators"}},
            {"headers": {}},
            {"cors": {"origins": [ORIGIN]}},
            {"ratelimit": {"store": "mem", "limits": ["10/minute"]}},
            *inner,
        ],
    }, strict=False)
    return TestApp(built.app)


#: What every layer outside puts on a refusal: the security headers, the rate limit's, the CORS grant.
ON_REFUSALS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "RateLimit-Limit": "10",
    "RateLimit-Remaining": "9",
    "Access-Control-Allow-Origin": ORIGIN,
    "Retry-After": "5",
}
WITHOUT_RETRY = {name: value for name, value in ON_REFUSALS.items() if name != "Retry-After"}
REQUIRED = {"store": "mem", "secret": "s" * 32, "default": "required"}


@pytest.mark.parametrize(("core", "inner", "status", "headers"), [
    pytest.param("refusing_generator", (), 503, ON_REFUSALS, id="the core refuses on its first chunk"),
    pytest.param("refusing_generator", ({f"{__name__}:lazy_layer": {}},), 503, ON_REFUSALS,
                 id="through a generator layer of your own"),
    pytest.param("answering_generator", ({f"{__name__}:lazy_layer": {}}, {"auth": REQUIRED}), 401,
                 {**WITHOUT_RETRY, "WWW-Authenticate": 'Bearer realm="wsgistack"'},
                 id="a built-in layer inside a generator layer refuses"),
])
def test_a_refusal_before_the_response_starts_carries_every_layers_headers(
        core: str, inner: tuple[dict[str, Any], ...], status: int, headers: dict[str, str],
        caplog: pytest.LogCaptureFixture) -> None:
    app = stack(core, *inner)
    with caplog.at_level(logging.INFO, logger="wsgistack.test.generators"):
        response = app.get("/x", headers={"Origin": ORIGIN}, status=status)
    assert {name: response.headers.get(name) for name in headers} == headers
    assert response.json["error"]["code"] == status
    # counted and logged with its own status, not as a failure of the server's
    [line] = [json.loads(r.getMessage()) for r in caplog.records if r.name == "wsgistack.test.generators"]
    assert line["status"] == status
    exposition = app.get("/metrics", extra_environ={"REMOTE_ADDR": "127.0.0.1"}).text
    counted = [line for line in exposition.splitlines() if line.startswith("wsgistack_http_requests_total{")]
    assert [line.partition(",status=")[2] for line in counted] == [f'"{status}"}} 1.0']


def test_a_generator_core_is_answered_whole_with_every_layers_headers() -> None:
    response = stack("answering_generator", {f"{__name__}:lazy_layer": {}}).get("/x", headers={"Origin": ORIGIN})
    assert response.body == b"one, two"
    assert {name: response.headers.get(name) for name in ON_REFUSALS} == {**WITHOUT_RETRY, "Retry-After": None}


def test_a_flask_core_and_the_built_in_layers_are_not_wrapped(tmp_path: Path) -> None:
    """They start the response before they return: nothing to take ahead, nothing more per request."""
    built = build_from_dict({"app": {"factory": "app:create_app", "options": {"var_dir": str(tmp_path)}},
                             "pipeline": [{"errors": {}}, {"headers": {}}]}, strict=False)
    layer = built.app
    while hasattr(layer, "app"):
        assert type(layer).__name__ != "_Primer"
        layer = layer.app
    assert layer is built.core
