"""The search progress stream through every built-in layer, served by a real Waitress (serve.py).

A stream that some layer buffers still arrives complete, just late: the test reads the response off
a raw socket, stamps each chunk as it lands, and checks that ``search_started`` is on the wire long
before the stream ends, that the events keep their pace, and that nothing cached or measured the
body (no Content-Length, no cache HIT, and every layer's headers on the response).
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from conftest import RedisServer, free_port
from conftest import Served as ServedBase
from stack_support import secret

from config import read_text
from config.build import parse
from config.lint import kind
from config.registry import LAYERS

ROOT = Path(__file__).resolve().parent.parent
INTERVAL = 0.3  # seconds the app pauses between events: search_started, 3 search_progress, search_complete
PASSWORD = "correct horse battery staple"
ORIGIN = "http://localhost:3000"
SECRETS = {"SESSION_SECRET": secret("session"), "JWT_SECRET": secret("jwt")}

# Every built-in layer, in the order `serve.py check` accepts, with the options that make it act on
# the stream: metrics times every layer (Server-Timing), the cache has the stream path in scope,
# auth is optional so anonymous and bearer requests both reach the app.
STACK = """
server:
  listen: 127.0.0.1:{port}
  threads: 6
app:
  factory: app:create_app
  options:
    var_dir: {var_dir}
    search: {{engine: local, index_sources: [json], stream_interval: {interval}}}
stores:
  shared: {store}
pipeline:
  - errors: {{format: problem}}
  - proxy: {{x_for: 1, x_proto: 1}}
  - request_id: {{}}
  - health: {{drain_file: {var_dir}/drain}}
  - metrics: {{server_timing: true, layer_timing: true}}
  - access_log: {{stream: stdout}}
  - operator_page: {{path: /_stack}}
  - headers: {{}}
  - cors:
      origins: ["{origin}"]
      allow_credentials: true
      expose_headers: [X-Request-ID, Server-Timing]
  - validation: {{max_query_length: 2048}}
  - ratelimit: {{store: shared, limits: ["100/minute"]}}
  - session: {{store: shared, secret_key: "${{SESSION_SECRET}}", cookie_name: sid, cookie_secure: true}}
  - csrf: {{cookie_name: sid, trusted_origins: ["{origin}"]}}
  - auth: {{store: shared, secret: "${{JWT_SECRET}}", default: optional}}
  - versioning:
      supported: [v1, v2]
      default: v2
      deprecated: {{v1: {{deprecation: 2026-06-01, sunset: 2027-06-30}}}}
  - cache:
      store: shared
      ttl: 60
      cookie_names: [sid]
      paths: ["/api/*/search", "/api/*/search/stream"]
"""


@dataclass
class Streamed:
    """A response read off the socket: status, headers, each chunk with the time it arrived."""

    status: int
    headers: dict[str, str]
    chunks: list[tuple[float, bytes]] = field(default_factory=list)
    done: float = 0.0

    def events(self) -> list[tuple[float, str, Any]]:
        """``(arrival, event, data)`` for each event, stamped when its blank line arrived."""
        out: list[tuple[float, str, Any]] = []
        pending = b""
        for stamp, data in self.chunks:
            pending += data
            while b"\n\n" in pending:
                block, pending = pending.split(b"\n\n", 1)
                fields = dict(line.split(": ", 1) for line in block.decode().splitlines())
                out.append((stamp, fields["event"], json.loads(fields["data"])))
        assert pending == b"", f"the stream ended inside an event: {pending!r}"
        return out


def stream(port: int, target: str, headers: dict[str, str]) -> Streamed:
    """GET ``target`` over a raw socket, timing every chunk from the moment the request was sent."""
    lines = [f"GET {target} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Connection: close",
             *(f"{k}: {v}" for k, v in headers.items())]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock, sock.makefile("rb") as reader:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        start = time.perf_counter()
        status = int(reader.readline().split()[1])
        head: dict[str, str] = {}
        while (line := reader.readline().decode("latin-1").rstrip("\r\n")):
            name, _, value = line.partition(":")
            head[name.strip().lower()] = value.strip()
        result = Streamed(status, head)
        if head.get("transfer-encoding") == "chunked":
            while size := int(reader.readline().split(b";")[0], 16):
                data = reader.read(size)
                reader.read(2)
                result.chunks.append((time.perf_counter() - start, data))
            reader.readline()  # the empty trailer
        else:  # a Content-Length body, or one that ends when the connection closes
            left = int(head.get("content-length", -1))
            while left and (data := reader.read1(65536)):
                result.chunks.append((time.perf_counter() - start, data))
                left -= len(data)
        result.done = time.perf_counter() - start
    return result


def pacing_problems(response: Streamed) -> list[str]:
    """What shows that something held the stream back: late first event, bunched events."""
    events = response.events()
    stamps = [round(stamp, 3) for stamp, _, _ in events]
    problems = []
    if not events[0][0] < response.done - 2 * INTERVAL:
        problems.append(f"search_started arrived at {stamps[0]} s of {response.done:.3f} s")
    gaps = sorted(b - a for a, b in itertools.pairwise(stamps))
    if gaps[1] <= INTERVAL / 3:  # one short gap may be scheduling noise; two are a buffer
        problems.append(f"events arrived bunched together at {stamps}")
    if response.done < 4 * INTERVAL:
        problems.append(f"the stream took {response.done:.3f} s, less than the app's pauses")
    return problems


class Buffering:
    """A deliberately wrong layer (``factory(app)``): it joins the body before handing it on."""

    def __init__(self, app: Any) -> None:
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: Any) -> list[bytes]:
        body = self.app(environ, start_response)
        try:
            return [b"".join(body)]
        finally:
            if hasattr(body, "close"):
                body.close()


class Served(ServedBase):
    """serve.py in a subprocess, with its stdout (the access log) kept in a file."""

    def __init__(self, config: Path, env: dict[str, str], port: int) -> None:
        super().__init__(config, env, port, config.stem)
        self.log = self.out

    def access_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.startswith("{")]

    def login(self) -> str:
        import http.client

        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        conn.request("POST", "/auth/login", json.dumps({"username": "ann", "password": PASSWORD}),
                     {"Content-Type": "application/json"})
        response = conn.getresponse()
        body = json.loads(response.read())
        conn.close()
        assert response.status == 200, body
        return str(body["access_token"])


@pytest.fixture(scope="module")
def var_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A var/ with the user 'ann' and the search index built once (index_sources: [json])."""
    from app.options import SearchOptions
    from app.search.local import LocalEngine
    from app.users import UserStore

    var = tmp_path_factory.mktemp("var")
    users = UserStore(var / "users.sqlite3")
    users.add("ann", PASSWORD, roles=["user"])
    users.close()
    engine = LocalEngine(SearchOptions(index_path=str(var / "search-index.sqlite3"), index_sources=["json"]))
    engine.ensure_index()
    engine.close()
    return var


def stack_text(port: int, var_dir: Path, store: str, extra: str = "", interval: float = INTERVAL) -> str:
    """The every-layer stack; ``extra`` is one more pipeline entry, placed right inside errors."""
    text = STACK.format(port=port, var_dir=var_dir, store=store, interval=interval, origin=ORIGIN)
    return text.replace("  - errors: {format: problem}\n", f"  - errors: {{format: problem}}\n{extra}")


@pytest.fixture(scope="module", params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def server(request: pytest.FixtureRequest, var_dir: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """The every-layer stack on a memory:// store, then on a real Redis."""
    store = "memory://"
    if request.param == "redis":
        redis_server: RedisServer | None = request.getfixturevalue("redis_server")
        if redis_server is not None and not redis_server.running:
            redis_server.start()
        store = os.environ.get("REDIS_URL") or (redis_server.url if redis_server else "")
    port = free_port()
    config = tmp_path_factory.mktemp("stack") / "stack.yaml"
    config.write_text(stack_text(port, var_dir, store))
    served = Served(config, SECRETS, port)
    try:
        yield served
    finally:
        served.stop()


def test_the_stack_holds_every_built_in_layer_and_checks_clean(tmp_path: Path) -> None:
    doc = read_text(stack_text(8889, tmp_path, "memory://"), env=SECRETS)
    config = parse(doc)
    from config import lint

    assert lint(config) == []
    assert sorted(kind(spec) or spec.name for spec in config.pipeline) == sorted(LAYERS), \
        "every built-in layer belongs in STACK, so that the stream is shown to pass it"


@pytest.mark.parametrize("credentials", ["anonymous", "bearer"])
def test_search_stream_passes_every_layer_unbuffered(server: Served, credentials: str) -> None:
    headers = {"Accept": "text/event-stream", "Origin": ORIGIN}
    if credentials == "bearer":
        headers["Authorization"] = f"Bearer {server.login()}"
    for attempt in ("first", "second"):
        response = stream(server.port, "/api/v1/search/stream?q=json", headers)
        assert response.status == 200, response.chunks
        events = response.events()

        names = [name for _, name, _ in events]
        assert names == ["search_started", "search_progress", "search_progress", "search_progress",
                         "search_complete"], attempt
        assert events[0][2] == {"query": "json"}
        assert [data["progress"] for _, name, data in events if name == "search_progress"] == [33, 67, 100]
        assert events[-1][2]["meta"]["query"] == "json" and events[-1][2]["results"]

        assert pacing_problems(response) == [], attempt

        # Nothing measured, stored or replayed the body; every layer still added its headers.
        head = response.headers
        assert "content-length" not in head and head["transfer-encoding"] == "chunked"
        assert head["content-type"] == "text/event-stream; charset=utf-8"
        assert head["x-cache"] == ("MISS" if credentials == "anonymous" else "BYPASS"), attempt
        assert head["cache-control"] == "no-cache"
        assert head["x-accel-buffering"] == "no"
        assert len(head["x-request-id"]) == 32
        assert head["access-control-allow-origin"] == ORIGIN
        assert head["x-content-type-options"] == "nosniff"
        assert head["ratelimit-limit"] == "100"
        assert head["deprecation"] == "@1780272000"
        assert "cache;dur=" in head["server-timing"] and "total;dur=" in head["server-timing"]

    # The access log line is written when the server closes the response: the whole stream's
    # bytes and duration, not the moment the app handed back its generator.
    deadline = time.monotonic() + 5
    while True:
        lines = [line for line in server.access_lines() if line["path"] == "/api/v1/search/stream"]
        if len(lines) >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    last = lines[-1]
    assert last["status"] == 200
    assert last["bytes"] == sum(len(data) for _, data in response.chunks)
    assert last["duration_ms"] >= 4 * INTERVAL * 1000
    assert last["user"] == ("ann" if credentials == "bearer" else None)


def test_a_client_that_leaves_mid_stream_is_logged_as_aborted(server: Served) -> None:
    """The line counts the chunks the server took, not the ones the app made after the client left."""
    import socket

    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(b"GET /api/v1/search/stream?q=json&left=1 HTTP/1.1\r\nHost: localhost\r\n"
                     b"Accept: text/event-stream\r\n\r\n")
        received = b""
        while b"search_started" not in received:
            received += sock.recv(65536)
    deadline = time.monotonic() + 5 * INTERVAL + 5
    while True:
        lines = [line for line in server.access_lines() if line.get("query") == "q=json&left=1"
                 or (line["path"] == "/api/v1/search/stream" and line.get("error") == "aborted")]
        if lines or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    [line] = lines
    assert (line["status"], line["error"]) == (200, "aborted")
    whole = stream(server.port, "/api/v1/search/stream?q=json", {"Accept": "text/event-stream"})
    assert 0 < line["bytes"] < sum(len(data) for _, data in whole.chunks)


#: A pace slower than the server's once-a-second look at connections with a request in flight.
LEAVING_INTERVAL = 1.2


@pytest.fixture(scope="module")
def paced(var_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """The every-layer stack with events LEAVING_INTERVAL apart."""
    port = free_port()
    config = tmp_path_factory.mktemp("paced") / "stack.yaml"
    config.write_text(stack_text(port, var_dir, "memory://", interval=LEAVING_INTERVAL))
    served = Served(config, SECRETS, port)
    try:
        yield served
    finally:
        served.stop()


def leave_after(port: int, events: int, request_id: str) -> tuple[float, int]:
    """Read ``events`` events of a stream, then close the connection: (when, wall clock; body bytes read)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock, sock.makefile("rb") as reader:
        sock.sendall(f"GET /api/v1/search/stream?q=json HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     f"X-Request-ID: {request_id}\r\n\r\n".encode())
        while reader.readline() != b"\r\n":  # the status line and headers
            pass
        body = b""
        while body.count(b"\n\n") < events:  # one chunk per event
            data = reader.read(int(reader.readline().split(b";")[0], 16))
            reader.read(2)
            body += data
        closed = time.time()
    return closed, len(body)


@pytest.mark.parametrize("events", [1, 3], ids=["after the first event", "before the last two"])
def test_a_client_that_leaves_frees_its_thread_within_a_second_of_the_next_event(paced: Served, events: int) -> None:
    """Waitress reads nothing of a connection while it answers a request there, so it does not see the
    client's FIN; a write draws a reset, and only the write after it failed. The server looks at such
    connections once a second: the next event's write fails, and the line says what the client got."""
    request_id = f"leaves-after-{events}"
    closed, received = leave_after(paced.port, events, request_id)
    deadline = time.monotonic() + 5 * LEAVING_INTERVAL + 5
    while not (lines := [line for line in paced.access_lines() if line["request_id"] == request_id]):
        assert time.monotonic() < deadline, "no access line"
        time.sleep(0.05)
    [line] = lines
    assert (line["status"], line.get("error"), line["bytes"]) == (200, "aborted", received)
    started = datetime.fromisoformat(line["time"]).timestamp()
    held = started + line["duration_ms"] / 1000 - closed
    assert held <= LEAVING_INTERVAL + 1.5, f"the stream ran on for {held:.2f} s after the client left"


def test_a_pipelined_request_is_not_taken_for_a_client_that_left(paced: Served) -> None:
    """Bytes waiting behind the stream's request (the next request) say the client is still there."""
    with socket.create_connection(("127.0.0.1", paced.port), timeout=10) as sock:
        sock.sendall(b"GET /api/v1/search/stream?q=json HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Request-ID: pipelined\r\n\r\n"
                     b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        received = b""
        while b"0\r\n\r\n" not in received:  # the stream's end (its connection then closes)
            data = sock.recv(65536)
            assert data, f"the connection closed inside the stream: {received[-200:]!r}"
            received += data
    assert received.count(b"event: ") == 5 and b"event: search_complete" in received
    deadline = time.monotonic() + 5
    while not (lines := [line for line in paced.access_lines() if line["request_id"] == "pipelined"]):
        assert time.monotonic() < deadline, "no access line"
        time.sleep(0.05)
    assert "error" not in lines[0]


def test_a_client_that_half_closes_mid_stream_is_taken_as_gone(paced: Served) -> None:
    """An ``EventSource`` never half-closes: a FIN during a stream is a client that left (as it would be for
    Waitress reading ahead, ``channel_request_lookahead``), while an ordinary request's client that
    half-closes gets its answer (test_departed.py)."""
    with socket.create_connection(("127.0.0.1", paced.port), timeout=10) as sock:
        sock.sendall(b"GET /api/v1/search/stream?q=json HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"X-Request-ID: half-closed\r\n\r\n")
        sock.shutdown(socket.SHUT_WR)
        left = time.time()
        received = b""
        while data := sock.recv(65536):
            received += data
    assert b"event: search_started" in received and b"event: search_complete" not in received
    deadline = time.monotonic() + 5 * LEAVING_INTERVAL + 5
    while not (lines := [line for line in paced.access_lines() if line["request_id"] == "half-closed"]):
        assert time.monotonic() < deadline, "no access line"
        time.sleep(0.05)
    [line] = lines
    assert (line["status"], line.get("error")) == (200, "aborted")
    held = datetime.fromisoformat(line["time"]).timestamp() + line["duration_ms"] / 1000 - left
    assert held <= LEAVING_INTERVAL + 1.5, f"the stream ran on for {held:.2f} s after the client left"


def test_a_buffering_layer_is_caught(var_dir: Path, tmp_path: Path) -> None:
    """The checks above can fail: one layer that joins the body makes the stream arrive at once."""
    port = free_port()
    config = tmp_path / "stack.yaml"
    config.write_text(stack_text(port, var_dir, "memory://", extra="  - test_streaming:Buffering: {}\n"))
    served = Served(config, SECRETS, port)
    try:
        response = stream(port, "/api/v1/search/stream?q=json", {"Accept": "text/event-stream"})
    finally:
        served.stop()
    assert response.status == 200
    assert response.headers["content-length"] == str(sum(len(data) for _, data in response.chunks))
    assert [name for _, name, _ in response.events()] == ["search_started", *["search_progress"] * 3, "search_complete"]
    problems = pacing_problems(response)
    assert problems[0].startswith("search_started arrived at 1."), problems
    assert problems[1].startswith("events arrived bunched together"), problems
