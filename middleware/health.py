"""Liveness and readiness probes, answered before the rest of the stack runs.

``/healthz`` (liveness) answers 200 ``{"status": "ok"}`` whenever the process
serves requests at all.  ``/readyz`` (readiness) asks each store for its
``health()`` (a ping, and for Redis the circuit-breaker state) and answers
200 when all are ok, else ``degraded_status`` with the per-store detail.  While
``drain_file`` exists, ``/readyz`` answers 503 ``{"status": "draining"}`` so a
load balancer stops sending traffic before a restart (``touch`` it, wait,
restart, ``rm`` it).  Neither probe enters the inner layers or the app.

Place it near the top of the pipeline, so probes skip auth, sessions and rate
limits.  Do not use it when an orchestrator probes something else (a
sidecar, a TCP check); and do not point liveness at stores: a Redis outage
must not make an orchestrator restart every healthy process.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from collections.abc import Iterable
from http import HTTPStatus
from typing import TYPE_CHECKING

from pydantic import Field, field_validator, model_validator

from .base import ROUTE, Context, LayerOptions, refuse, rooted_path

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

    from stores.base import Store

__all__ = ["STORE_CHECK_SECONDS", "HealthMiddleware", "StoreChecks"]

_log = logging.getLogger("wsgistack.health")
#: How long (seconds) a metrics scrape or the operator page waits for the stores' health checks, all
#: together: a store that has not answered by then counts as down, so a hung Redis never makes a
#: scrape outlast Prometheus's ``scrape_timeout`` (readiness has its own ``timeout`` option).
STORE_CHECK_SECONDS = 1.0
#: Statuses whose answer has no body (RFC 9110 §15.3.5, §15.3.6, §15.4.5): not for a degraded readiness.
_NO_BODY = frozenset((204, 205, 304))
_ALLOW = [("Allow", "GET, HEAD"), ("Cache-Control", "no-store")]  # a 405 is cacheable by default (RFC 9110 15.5.6)


class HealthMiddleware:
    """Answer liveness and readiness probes from the stores' health and a drain file.

    Options:
        ``liveness_path`` ("/healthz"): always 200 ``{"status": "ok"}``.
        ``readiness_path`` ("/readyz"): 200 ``{"status": "ok", "stores": {...}}`` when every
        checked store is ok, else ``degraded_status`` with ``"status": "degraded"``.
        ``degraded_status`` (503): the status of a degraded readiness answer.
        ``drain_file`` (none): while this file exists, readiness answers 503 "draining".
        ``stores`` (all): names of the stores readiness checks.
        ``timeout`` (0.5 s): how long readiness waits for the stores, all together; one that has
        not answered by then counts as failed ("no answer in time").

    The store detail is what ``store.health()`` reports (``ok``, ``backend``,
    ``breaker`` …) without the store URL, which is not a probe's business.

    Example::

        app = HealthMiddleware(app, HealthMiddleware.Options(drain_file="/run/app.drain"),
                               Context(stores={"shared": MemoryStore()}))
    """

    class Options(LayerOptions):
        liveness_path: str = "/healthz"
        readiness_path: str = "/readyz"
        degraded_status: int = 503
        drain_file: str | None = None
        stores: tuple[str, ...] | None = None
        timeout: float = Field(0.5, gt=0, le=60, allow_inf_nan=False)

        @field_validator("liveness_path", "readiness_path")
        @classmethod
        def _path(cls, value: str) -> str:
            if not value.startswith("/"):
                raise ValueError(f"probe paths must start with '/', got {value!r}")
            return value

        @field_validator("degraded_status")
        @classmethod
        def _status(cls, value: int) -> int:
            if not 200 <= value <= 599:
                raise ValueError(f"degraded_status must be an HTTP status from 200 to 599, got {value}")
            if value in _NO_BODY:  # the JSON went out after headers that say none follows (a framing error)
                raise ValueError(f"degraded_status {value} is an answer without a body (RFC 9110), and readiness's "
                                 "body says what is degraded: use another status (503, or 200 to stay in rotation)")
            return value

        @model_validator(mode="after")
        def _distinct(self) -> HealthMiddleware.Options:
            if self.liveness_path == self.readiness_path:
                raise ValueError("liveness_path and readiness_path must differ")
            if self.drain_file == "":
                raise ValueError("drain_file must be a path, or left out")
            if self.drain_file is not None and "\0" in self.drain_file:  # os.stat raises ValueError: a 500 per probe
                raise ValueError("drain_file cannot hold a NUL character")
            return self

    def __init__(self, app: WSGIApplication, options: Options, context: Context) -> None:
        self.app, self.options = app, options
        self.liveness, self.readiness = options.liveness_path, options.readiness_path
        self.drain_file = context.path(options.drain_file) if options.drain_file is not None else None
        names = options.stores if options.stores is not None else sorted(context.stores)
        self.stores: list[tuple[str, Store]] = [(name, context.store(name)) for name in names]
        self.degraded = _status_line(options.degraded_status)
        self.checks = StoreChecks()

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO") or ""
        if not ("/0" <= path < "0" or "/" <= path < "//"):  # not as the router reads it (see rooted_path):
            path = rooted_path(path)  # leading slashes count as one (gunicorn passes them on), one is added
        if path != self.liveness and path != self.readiness:
            return self.app(environ, start_response)
        environ[ROUTE] = path  # a fixed label for metrics
        method = environ.get("REQUEST_METHOD")
        if method != "GET" and method != "HEAD":
            exc = refuse(405, headers=_ALLOW)
            exc.description = f"{path} answers GET and HEAD only."  # 405's first argument is not text
            raise exc
        body: dict[str, object]
        if path == self.liveness:
            status, body = "200 OK", {"status": "ok"}
        else:
            status, body = self.ready()
        data = json.dumps(body, separators=(",", ":"), default=str).encode()
        start_response(status, [("Content-Type", "application/json"),
                                ("Cache-Control", "no-store"), ("Content-Length", str(len(data)))])
        return [] if method == "HEAD" else [data]

    def ready(self) -> tuple[str, dict[str, object]]:
        """The readiness status line and body: draining, degraded or ok."""
        if self.drain_file is not None and _exists(self.drain_file):
            return "503 Service Unavailable", {"status": "draining"}
        facts = self.checks.facts(self.stores, self.options.timeout)
        detail: dict[str, object] = {name: {k: v for k, v in found.items() if k != "url"}
                                     for name, found in facts.items()}
        if all(found.get("ok") for found in facts.values()):
            return "200 OK", {"status": "ok", "stores": detail}
        return self.degraded, {"status": "degraded", "stores": detail}


class StoreChecks:
    """Asks stores for their ``health()`` all at once, each in a thread of its own, waiting up to a timeout in all.

    One after the other, a hung Redis held the caller (and its server thread) for
    every store's ``socket_timeout``.  A caller that comes while a store's check is
    still out waits for that one: callers never pile up on a store that does not
    answer.  Readiness, the metrics scrape and the operator page each keep one.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: dict[str, _Check] = {}  # each store's health check still out, which callers share

    def facts(self, stores: Iterable[tuple[str, Store]], timeout: float) -> dict[str, dict[str, object]]:
        """What each store's ``health()`` says; ``{"ok": False, "backend": …, "error": …}`` for one that
        raised (the exception's type) or did not answer within ``timeout`` ("no answer in time")."""
        checks = [(name, store, self._check(name, store)) for name, store in stores]
        deadline = time.monotonic() + timeout
        found: dict[str, dict[str, object]] = {}
        for name, store, check in checks:
            facts = check.facts if check.done.wait(max(0.0, deadline - time.monotonic())) else None
            found[name] = facts if facts is not None else {"ok": False, "backend": type(store).__name__,
                                                           "error": "no answer in time"}
        return found

    def _check(self, name: str, store: Store) -> _Check:
        """The health check of ``store`` still out, or a new one started in a thread."""
        with self._lock:
            check = self._pending.get(name)
            if check is not None:
                return check
            check = self._pending[name] = _Check()
        try:
            threading.Thread(target=self._run, args=(name, store, check), name=f"health {name}", daemon=True).start()
        except RuntimeError:  # no thread to be had: ask here, unbounded, rather than fail the caller
            self._run(name, store, check)
        return check

    def _run(self, name: str, store: Store, check: _Check) -> None:
        try:
            check.facts = dict(store.health())
        except Exception as exc:  # a health check that raises is a failed one
            check.facts = {"ok": False, "backend": type(store).__name__, "error": type(exc).__name__}
        finally:
            with self._lock:
                del self._pending[name]
            check.done.set()


class _Check:
    """One store's health check: ``done`` is set when ``facts`` holds its answer."""

    __slots__ = ("done", "facts")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.facts: dict[str, object] | None = None


def _exists(path: str) -> bool:
    """Whether the drain file is there; one that cannot be looked at counts as there.

    Only "no such file" (or a path through something that is not a directory) is
    absent: a file the process may not look at (its directory's mode) was most
    likely put there by the operator, and serving on would ignore the drain.
    """
    try:
        os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as exc:
        now = time.monotonic()
        if now - _STAT_FAILED[0] >= 60:
            _STAT_FAILED[0] = now
            _log.warning("health: cannot look at drain_file %s (%s): readiness answers draining", path, exc)
    return True


_STAT_FAILED = [-math.inf]  # when a failed look at a drain file was last logged (once a minute)


#: RFC 9110 §15's names of the classes, the reason phrase of a code Python's HTTPStatus does not know (520).
_CLASS_PHRASES = {2: "Successful", 3: "Redirection", 4: "Client Error", 5: "Server Error"}


def _status_line(code: int) -> str:
    try:
        phrase = HTTPStatus(code).phrase
    except ValueError:
        phrase = _CLASS_PHRASES[code // 100]
    return f"{code} {phrase}"
