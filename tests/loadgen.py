"""A small, bounded load generator for the fault and load tests, and a serve.py runner.

Everything here talks to loopback only and stops by itself: a ``Load`` runs a
fixed number of threads, each sending requests from a plan over one keep-alive
connection, until ``stop()`` is called, ``max_seconds`` have passed or
``max_requests`` were sent, whichever comes first.  Every request becomes a
``Result`` (status, latency, the few response headers the tests read, or the
connection error), so a test can ask what happened in any time window::

    with Load(port, [Req("GET", "/api/v1/health")], threads=4, max_seconds=10) as load:
        time.sleep(2)
    assert not load.failures()

``ServeProcess`` starts ``serve.py`` on a stack.yaml as an operator would,
keeps its combined output in a file, and stops it with SIGTERM.
``slow_app`` (``app: {factory: "loadgen:slow_app"}``) answers after
``?sleep=SECONDS``, for tests of requests in flight.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import parse_qsl

from stack_support import secret

ROOT = Path(__file__).resolve().parent.parent
LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})
#: Response headers a Result keeps (lower case); the tests read nothing else.
KEPT_HEADERS = ("x-stack-generation", "x-cache", "retry-after", "connection", "content-type")

__all__ = ["KEPT_HEADERS", "SECRETS", "Load", "Req", "Result", "ServeProcess", "full_stack", "percentile", "request",
           "slow_app"]

#: Test-only secrets (the session and auth layers want at least 32 characters).
SECRETS = {"SESSION_SECRET": secret("session"), "JWT_SECRET": secret("jwt")}


def full_stack(port: int, var_dir: Path, *, store: str = "memory://", rate_limit: str = "100000/minute",
               server: str = "", errors_format: str = "envelope", origin: str = "http://localhost:3000",
               cache_ttl: int = 60, workers: int = 1) -> str:
    """A stack.yaml with every built-in layer the default stack has, on one store, for real servers.

    The search index holds only the ``json`` module's docstrings, so it builds in
    well under a second; the rate limit is high enough not to refuse load tests;
    access lines go to ``var_dir/access.log`` (``var_dir`` is created).
    """
    var_dir.mkdir(parents=True, exist_ok=True)
    return f"""
server:
  listen: 127.0.0.1:{port}
  threads: 8
  workers: {workers}
  connection_limit: 500
  channel_timeout: 60
  generation_header: true
{server}
stores:
  shared: "{store}"
app:
  factory: app:create_app
  options:
    var_dir: "{var_dir}"
    search: {{engine: local, index_sources: [json]}}
pipeline:
  - errors: {{format: {errors_format}}}
  - request_id: {{}}
  - health: {{}}
  - metrics: {{}}
  - access_log: {{file: "{var_dir}/access.log"}}
  - headers: {{}}
  - cors:
      origins: ["{origin}"]
      allow_methods: [GET, POST, PUT, DELETE]
      allow_headers: [Authorization, Content-Type, X-Request-ID, X-API-Version]
      allow_credentials: true
  - validation: {{max_body_bytes: 1048576, max_query_length: 2048}}
  - ratelimit:
      store: shared
      key: client_ip
      limits: ["{rate_limit}"]
      paths: ["/api/*", "/auth/*"]
  - session:
      store: shared
      secret_key: "{SECRETS['SESSION_SECRET']}"
      cookie_name: wsgistack_session
      cookie_secure: false
  - csrf:
      cookie_name: wsgistack_session
      trusted_origins: ["{origin}"]
  - auth:
      store: shared
      secret: "{SECRETS['JWT_SECRET']}"
      default: optional
      rules:
        - paths: ["/auth/login", "/auth/refresh", "/auth/logout"]
          auth: none
  - versioning: {{supported: [v1, v2], default: v1}}
  - cache:
      store: shared
      ttl: {cache_ttl}
      cookie_names: [wsgistack_session]
      paths: ["/api/*/search"]
"""


def slow_app(options: dict[str, Any] | None = None) -> Any:
    """A WSGI app that sleeps ``?sleep=SECONDS`` (at most 10) and answers ``{"slept": SECONDS}``."""

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        query = dict(parse_qsl(environ.get("QUERY_STRING", "")))
        try:
            seconds = min(10.0, max(0.0, float(query.get("sleep", "0"))))
        except ValueError:
            seconds = 0.0
        time.sleep(seconds)
        body = json.dumps({"slept": seconds}).encode()
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]

    return app


@dataclass(frozen=True)
class Req:
    """One request of a plan; ``name`` labels its results."""

    method: str
    path: str
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""
    name: str = ""

    @property
    def label(self) -> str:
        return self.name or f"{self.method} {self.path}"


@dataclass(frozen=True)
class Result:
    """What one request got: a status and headers, or the connection error instead."""

    name: str
    started: float  # time.monotonic() when the request was sent
    elapsed: float  # seconds until the whole body was read (or the error)
    status: int | None
    headers: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    body: bytes = b""
    thread: int = 0

    @property
    def ok(self) -> bool:
        return self.error is None and self.status is not None and self.status < 500


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank ``q`` percentile (0 < q <= 100) of ``values``."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), -(-len(ordered) * q // 100)))
    return ordered[int(rank) - 1]


def _check_host(host: str) -> None:
    if host not in LOOPBACK:
        raise ValueError(f"the load generator only talks to loopback, not {host!r}")


def request(port: int, method: str, path: str, headers: Iterable[tuple[str, str]] = (), body: bytes = b"",
            host: str = "127.0.0.1", timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    """Send one request on a fresh connection; return status, lower-cased headers and body."""
    _check_host(host)
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request(method, path, body=body or None, headers=dict(headers))
        response = conn.getresponse()
        data = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, data
    finally:
        conn.close()


class Load:
    """Steady, bounded traffic from ``threads`` keep-alive connections.

    ``plan`` is a sequence of ``Req`` (thread *i* sends ``plan[(i + n) % len(plan)]``
    as its *n*-th request) or a callable ``plan(thread, n) -> Req``.  ``pause``
    sleeps between a thread's requests, ``fresh_connections`` opens one
    connection per request, ``keep_body`` keeps response bodies (off: bodies
    are read and dropped).  ``sink`` receives every result instead of
    ``results`` (long runs that keep only aggregates).
    """

    def __init__(self, port: int, plan: Sequence[Req] | Callable[[int, int], Req], *, threads: int = 4,
                 max_seconds: float = 30.0, max_requests: int = 50_000, pause: float = 0.0,
                 timeout: float = 5.0, fresh_connections: bool = False, keep_body: bool = False,
                 host: str = "127.0.0.1", sink: Callable[[Result], None] | None = None) -> None:
        _check_host(host)
        if not callable(plan) and not plan:
            raise ValueError("the plan needs at least one request")
        self.port, self.host = port, host
        self.plan = plan
        self.threads = threads
        self.max_seconds, self.max_requests = max_seconds, max_requests
        self.pause, self.timeout = pause, timeout
        self.fresh, self.keep_body = fresh_connections, keep_body
        self.results: list[Result] = []
        self.sink = sink
        self._lock = threading.Lock()
        self._sent = 0
        self._stop = threading.Event()
        self._workers: list[threading.Thread] = []
        self.started_at = 0.0

    # -------------------------------------------------------------- running

    def start(self) -> Load:
        self.started_at = time.monotonic()
        for i in range(self.threads):
            thread = threading.Thread(target=self._run, args=(i,), name=f"load-{i}", daemon=True)
            thread.start()
            self._workers.append(thread)
        return self

    def stop(self) -> list[Result]:
        self._stop.set()
        for thread in self._workers:
            thread.join(self.timeout + 5)
        return self.results

    def __enter__(self) -> Load:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return any(t.is_alive() for t in self._workers)

    def _next(self, thread: int, n: int) -> Req | None:
        with self._lock:
            if self._sent >= self.max_requests:
                return None
            self._sent += 1
        plan = self.plan
        if callable(plan):
            return plan(thread, n)
        return plan[(thread + n) % len(plan)]

    def _run(self, thread: int) -> None:
        deadline = self.started_at + self.max_seconds
        conn: http.client.HTTPConnection | None = None
        n = 0
        while not self._stop.is_set() and time.monotonic() < deadline:
            req = self._next(thread, n)
            if req is None:
                break
            n += 1
            if conn is None:
                conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            started = time.monotonic()
            try:
                conn.request(req.method, req.path, body=req.body or None, headers=dict(req.headers))
                response = conn.getresponse()
                body = response.read()
                elapsed = time.monotonic() - started
                headers = {k: v for k in KEPT_HEADERS if (v := response.getheader(k)) is not None}
                result = Result(req.label, started, elapsed, response.status, headers,
                                body=body if self.keep_body else b"", thread=thread)
                if self.fresh or response.will_close:
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException) as exc:
                result = Result(req.label, started, time.monotonic() - started, None,
                                error=f"{type(exc).__name__}: {exc}", thread=thread)
                if conn is not None:
                    conn.close()
                conn = None
            if self.sink is not None:
                self.sink(result)
            else:
                with self._lock:
                    self.results.append(result)
            if self.pause:
                self._stop.wait(self.pause)
        if conn is not None:
            conn.close()

    # -------------------------------------------------------------- reading results

    def snapshot(self) -> list[Result]:
        with self._lock:
            return list(self.results)

    def between(self, start: float, end: float = float("inf")) -> list[Result]:
        """Results of requests sent in ``[start, end)`` (``time.monotonic()`` values)."""
        return [r for r in self.snapshot() if start <= r.started < end]

    def failures(self, results: Iterable[Result] | None = None) -> list[Result]:
        """Connection errors and 5xx answers."""
        return [r for r in (self.snapshot() if results is None else results) if not r.ok]

    def wait_for(self, count: int, timeout: float = 10.0) -> None:
        """Block until at least ``count`` more results have arrived."""
        target = len(self.snapshot()) + count
        deadline = time.monotonic() + timeout
        while len(self.snapshot()) < target:
            if time.monotonic() > deadline or not self.running:
                raise TimeoutError(f"the load made fewer than {count} requests in {timeout}s")
            time.sleep(0.01)


class ServeProcess:
    """``serve.py -c CONFIG serve`` in a subprocess, output kept in ``log_path``."""

    def __init__(self, config: Path, log_path: Path | None = None, env: dict[str, str] | None = None,
                 command: str = "serve") -> None:
        self.config = config
        self.log_path = log_path or config.with_suffix(".log")
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
                    "PYTHONUNBUFFERED": "1", **(env or {})}
        self.command = command
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: BinaryIO | None = None

    def start(self) -> ServeProcess:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "-c", str(self.config), self.command],
                                     cwd=self.config.parent, env=self.env, stdout=self._log,
                                     stderr=subprocess.STDOUT)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_output(self, text: str, count: int = 1, timeout: float = 10.0) -> None:
        """Block until ``text`` appears ``count`` times in the output."""
        deadline = time.monotonic() + timeout
        while self.output().count(text) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{text!r} did not appear {count} time(s) in {timeout}s:\n{self.output()[-3000:]}")
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"serve.py exited with {self.proc.returncode}:\n{self.output()[-3000:]}")
            time.sleep(0.02)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, wait, and return the exit code (SIGKILL after ``timeout``)."""
        code = 0
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
            try:
                code = self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
                code = -9
        if self._log is not None:
            self._log.close()
            self._log = None
        return code

    def __enter__(self) -> ServeProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
