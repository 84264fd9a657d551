"""The searxng engine against a SearXNG-shaped server on loopback: 200, 502, 504."""

from __future__ import annotations

import base64
import contextlib
import email.utils
import json
import socket
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from webtest import TestApp
from werkzeug.test import EnvironBuilder

from app import create_app
from middleware.base import Context
from middleware.errors import ErrorsMiddleware


class FakeSearxng(ThreadingHTTPServer):
    """Answers /search like SearXNG; the query text picks a misbehaviour."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.requests: list[tuple[str, dict[str, list[str]]]] = []
        self.authorizations: list[str | None] = []  # the Authorization header of each request
        self.agents: list[str | None] = []  # the User-Agent header of each request
        self.release = threading.Event()
        #: query -> the body of a 200 answer, for bodies the tests write themselves
        self.canned: dict[str, bytes] = {}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client the tests make give up (a timeout) leaves a broken pipe: not worth a traceback."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class Handler(BaseHTTPRequestHandler):
    server: FakeSearxng

    def log_message(self, format: str, *args: Any) -> None:
        """Keep test output quiet."""

    def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _trickle(self, data: bytes, size: int) -> None:
        """Send ``data`` ``size`` bytes at a time, 20 ms apart, until done or the client goes away."""
        with contextlib.suppress(OSError):
            for start in range(0, len(data), size):
                self.wfile.write(data[start:start + size])
                time.sleep(0.02)

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        params = parse_qs(parts.query)
        self.server.requests.append((parts.path, params))
        self.server.authorizations.append(self.headers.get("Authorization"))
        self.server.agents.append(self.headers.get("User-Agent"))
        query = params.get("q", [""])[0]
        body = b'{"results": []}'
        if not parts.path.endswith("/search"):
            self._send(404, b"not found", "text/plain")
        elif query in self.server.canned:
            self._send(200, self.server.canned[query])
        elif query == "trickle body":  # 100 bytes, one every 20 ms: 2 seconds
            body = body.ljust(100)
            self.wfile.write(b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n" % len(body))
            self._trickle(body, 1)
        elif query == "trickle headers":  # 1000 bytes of headers, 10 every 20 ms: 2 seconds
            head = (b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\nX-Padding: " + b"p" * 900
                    + b"\r\nContent-Length: %d\r\n\r\n" % len(body))
            self._trickle(head + body, 10)
        elif query in ("busy", "busy for two hours", "busy for long", "busy for ever",
                       "busy, said with zeros"):  # SearXNG's limiter
            self.send_response(429)
            waits = {"busy": "60", "busy for two hours": "7200", "busy for long": "86400",
                     "busy, said with zeros": "0" * 30 + "45"}
            self.send_header("Retry-After", waits.get(query, "9" * 5000))
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif query.startswith("busy until "):  # an HTTP date this many seconds from now
            self.send_response(503)
            self.send_header("Retry-After", email.utils.formatdate(time.time() + int(query[11:]), usegmt=True))
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif query in INTERIM_ANSWERS:  # interim answers, then the final one
            answer = json.dumps({"results": [{"title": query, "url": "https://example.org/", "content": ""}]})
            self.wfile.write(INTERIM_ANSWERS[query])
            self._send(200, answer.encode())
        elif query in BROKEN_ANSWERS:  # written as is, then the connection is closed
            self.wfile.write(BROKEN_ANSWERS[query])
            self.close_connection = True
        elif query == "down for maintenance":
            self._send(503, b"maintenance", "text/plain")
        elif query == "boom":
            self._send(500, b"<h1>Internal Server Error</h1>", "text/html")
        elif query == "garbage":
            self._send(200, b"<html>not json</html>", "text/html")
        elif query == "shapeless":
            self._send(200, b'{"answers": []}')
        elif query == "slow":
            self.server.release.wait(5)
            self._send(200, b'{"results": []}')
        elif query == "stalls mid-body":  # half the body, then the rest once released
            body = b'{"results": [], "number_of_results": 0}'
            self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n" % len(body) + body[:10])
            self.wfile.flush()
            self.server.release.wait(5)
            self.wfile.write(body[10:])
        elif query == "chunked":  # the body in three chunks, then the last chunk and a trailer
            body = json.dumps({"results": [{"title": "t", "url": "https://example.org/", "content": ""}]}).encode()
            self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
            for part in (body[:5], body[5:20], body[20:]):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
                self.wfile.flush()
                time.sleep(0.02)
            self.wfile.write(b"0\r\nX-Trailer: t\r\n\r\n")
        else:
            page = int(params.get("pageno", ["1"])[0])
            doc = {
                "query": query,
                "number_of_results": 42,
                "results": [
                    {"title": f"{query} result {page}.{i}", "url": f"https://example.org/{page}/{i}",
                     "content": f"About {query}", "engine": "duckduckgo", "score": 1.0}
                    for i in range(3)
                ] + [{"title": "no url, dropped"}],
            }
            self._send(200, json.dumps(doc).encode())


#: Interim (1xx) answers an upstream (or a proxy before it) may send ahead of the final one.
INTERIM_ANSWERS = {
    "continue": b"HTTP/1.1 100 Continue\r\n\r\n",
    "early hints": b"HTTP/1.1 103 Early Hints\r\nLink: </static/style.css>; rel=preload; as=style\r\n\r\n",
    "processing, then early hints": b"HTTP/1.1 102 Processing\r\n\r\nHTTP/1.1 103 Early Hints\r\n"
                                    b"Link: </a.js>; rel=preload\r\nLink: </b.js>; rel=preload\r\n\r\n",
    "an interim answer of a code not yet assigned": b"HTTP/1.1 199 Whatever\r\nX-A: b\r\n\r\n",
}


#: Answers HTTP cannot read, or that end before their body does.
BROKEN_ANSWERS = {
    "no answer": b"",
    "bad status line": b"HTTP/1.1 OK\r\n\r\n",
    "too many headers": b"HTTP/1.1 200 OK\r\n" + b"X-Padding: p\r\n" * 101 + b"\r\n",
    "cut short": b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"results\"",
    "bad chunk": b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
}


@pytest.fixture
def upstream() -> Iterator[FakeSearxng]:
    """A SearXNG-shaped server on a free loopback port."""
    server = FakeSearxng()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.release.set()
        server.shutdown()
        server.server_close()
        thread.join(5)


def searxng_app(tmp_path: Path, upstream: str, **search: Any) -> TestApp:
    opts = {"var_dir": str(tmp_path), "search": {"engine": "searxng", "upstream": upstream, **search}}
    return TestApp(ErrorsMiddleware(create_app(opts), ErrorsMiddleware.Options(), Context()))


def test_results_are_mapped_to_v1(tmp_path: Path, upstream: FakeSearxng) -> None:
    body = searxng_app(tmp_path, upstream.url).get("/api/v1/search", {"q": "python wsgi", "page": "2"}).json
    assert body["query"] == "python wsgi"
    assert body["results"] == [
        {"title": f"python wsgi result 2.{i}", "url": f"https://example.org/2/{i}",
         "content": "About python wsgi", "engine": "duckduckgo"}
        for i in range(3)
    ]
    assert body["meta"] == {"total": 42, "page": 2, "per_page": 10, "query": "python wsgi"}
    path, params = upstream.requests[-1]
    assert path == "/search"
    assert params == {"q": ["python wsgi"], "format": ["json"], "pageno": ["2"]}


def test_results_are_mapped_to_v2(tmp_path: Path, upstream: FakeSearxng) -> None:
    body = searxng_app(tmp_path, upstream.url).get("/api/v2/search", {"q": "flask"}).json
    assert [r["url"] for r in body["data"]] == [f"https://example.org/1/{i}" for i in range(3)]
    assert body["pagination"] == {"page": 1, "per_page": 10, "total": 42, "pages": 5}


def test_upstream_path_prefix_is_kept(tmp_path: Path, upstream: FakeSearxng) -> None:
    searxng_app(tmp_path, upstream.url + "/searx/").get("/api/v1/search", {"q": "x"})
    assert upstream.requests[-1][0] == "/searx/search"


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        pytest.param("boom", (502, "The search upstream answered with HTTP 500."), id="upstream 500"),
        pytest.param("garbage", (502, "The search upstream sent a response that is not valid JSON."),
                     id="invalid JSON"),
        pytest.param("shapeless", (502, "The search upstream sent JSON without a 'results' list."),
                     id="JSON without results"),
        pytest.param("slow", (504, "The search upstream did not answer within 0.2 seconds."), id="slow upstream"),
    ],
)
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_upstream_failures(tmp_path: Path, upstream: FakeSearxng, version: str, query: str,
                           expected: tuple[int, str]) -> None:
    status, message = expected
    client = searxng_app(tmp_path, upstream.url, timeout=0.2)
    error = client.get(f"/api/{version}/search", {"q": query}, status=status).json["error"]
    assert (error["code"], error["message"]) == (status, message)


@pytest.mark.parametrize("query", ["trickle body", "trickle headers"])
def test_timeout_bounds_an_upstream_that_trickles(tmp_path: Path, upstream: FakeSearxng, query: str) -> None:
    client = searxng_app(tmp_path, upstream.url, timeout=0.25)
    started = time.monotonic()
    error = client.get("/api/v1/search", {"q": query}, status=504).json["error"]
    elapsed = time.monotonic() - started
    assert error["message"] == "The search upstream did not answer within 0.25 seconds."
    assert elapsed < 1.0, f"the answer took {elapsed:.2f} s, not about 0.25 s"


@pytest.fixture
def stalled_address() -> Iterator[tuple[str, int]]:
    """A loopback address whose listen queue is full, so a connect to it hangs."""
    with socket.socket() as listener, socket.socket() as queued:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        queued.connect(listener.getsockname())  # fills the queue; nobody accepts
        yield listener.getsockname()


def test_connect_attempts_share_the_timeout(tmp_path: Path, stalled_address: tuple[str, int],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    # A name with four addresses: each one tried gets the rest of the deadline, not connect_timeout afresh.
    entry = (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", stalled_address)
    monkeypatch.setattr(socket, "getaddrinfo", lambda *args, **kwargs: [entry] * 4)
    client = searxng_app(tmp_path, "http://searxng.invalid:8888", timeout=0.3, connect_timeout=0.25)
    started = time.monotonic()
    error = client.get("/api/v1/search", {"q": "x"}, status=504).json["error"]
    elapsed = time.monotonic() - started
    assert error["message"] == "The search upstream did not answer within 0.3 seconds."
    assert elapsed < 0.7, f"the answer took {elapsed:.2f} s, not about 0.3 s"


def test_an_address_that_takes_no_connection_is_cut_off_at_connect_timeout(
        tmp_path: Path, stalled_address: tuple[str, int]) -> None:
    host, port = stalled_address
    client = searxng_app(tmp_path, f"http://{host}:{port}", timeout=2, connect_timeout=0.2)
    started = time.monotonic()
    error = client.get("/api/v1/search", {"q": "x"}, status=504).json["error"]
    assert error["message"] == "The search upstream did not accept a connection within 0.2 seconds."
    assert time.monotonic() - started < 1.0


def test_a_tls_handshake_gets_the_rest_of_the_timeout_not_connect_timeout(tmp_path: Path) -> None:
    with socket.socket() as listener:  # the kernel accepts the connection; nobody ever answers the handshake
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        client = searxng_app(tmp_path, f"https://127.0.0.1:{port}", timeout=0.8, connect_timeout=0.2)
        started = time.monotonic()
        error = client.get("/api/v1/search", {"q": "x"}, status=504).json["error"]
        elapsed = time.monotonic() - started
    assert error["message"] == "The search upstream did not answer within 0.8 seconds."
    assert 0.7 <= elapsed < 1.5, f"the handshake was given {elapsed:.2f} s, not the timeout's 0.8 s"


@pytest.mark.parametrize(("query", "error"), [
    pytest.param("no answer", "RemoteDisconnected", id="closed without an answer"),
    pytest.param("bad status line", "BadStatusLine", id="a status line that is not HTTP"),
    pytest.param("too many headers", "HTTPException", id="over 100 headers"),
    pytest.param("cut short", "IncompleteRead", id="closed before the body's end"),
    pytest.param("bad chunk", "IncompleteRead", id="a chunk size that is not one"),
])
def test_an_answer_http_cannot_read_is_a_502_that_says_so(tmp_path: Path, upstream: FakeSearxng, query: str,
                                                           error: str) -> None:
    """The upstream was reached and answered: not "could not be reached"."""
    answer = searxng_app(tmp_path, upstream.url).get("/api/v2/search", {"q": query}, status=502)
    assert answer.headers["Content-Type"] == "application/json"
    assert answer.json["error"]["message"] == f"The search upstream's answer was broken ({error})."


@pytest.mark.parametrize("query", list(INTERIM_ANSWERS))
def test_interim_answers_are_skipped(tmp_path: Path, upstream: FakeSearxng, query: str) -> None:
    """RFC 9110 §15.2: a client reads past any 1xx answer to the final one (http.client skips only 100)."""
    body = searxng_app(tmp_path, upstream.url).get("/api/v1/search", {"q": query}).json
    assert [r["title"] for r in body["results"]] == [query]


def test_an_unasked_switch_of_protocols_is_a_502(tmp_path: Path) -> None:
    """101 is final for the connection, and this client never asks to upgrade."""
    server = Flood(b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n", mib=0)
    server.start()
    try:
        error = searxng_app(tmp_path, server.url).get("/api/v1/search", {"q": "x"}, status=502).json["error"]
    finally:
        server.join(5)
        server.listener.close()
    assert error["message"] == "The search upstream answered with HTTP 101."


def test_unreachable_upstream_is_a_502(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    error = searxng_app(tmp_path, f"http://127.0.0.1:{port}").get(
        "/api/v1/search", {"q": "x"}, status=502).json["error"]
    assert error["message"] == "The search upstream could not be reached (ConnectionRefusedError)."


def test_upstream_failure_in_a_stream_becomes_an_error_event(tmp_path: Path, upstream: FakeSearxng) -> None:
    text = searxng_app(tmp_path, upstream.url).get("/api/v1/search/stream", {"q": "boom"}).text
    events = [block.split("\n") for block in text.strip().split("\n\n")]
    assert [e[0] for e in events] == ["event: search_started", "event: search_progress",
                                      "event: search_progress", "event: search_error"]
    assert json.loads(events[-1][1][len("data: "):]) == {
        "code": 502, "message": "The search upstream answered with HTTP 500.", "retry_after": 30,
        "request_id": None}
    # An EventSource reconnects to a stream that ended: not before 30 s (its own default is about 3 s).
    assert events[-1][2:] == ["retry: 30000"]


def test_a_stream_never_asks_to_reconnect_at_once(tmp_path: Path, upstream: FakeSearxng) -> None:
    """An upstream's date gone by (or Retry-After: 0) is 0 s for the 503, and at least 3 s for an EventSource."""
    text = searxng_app(tmp_path, upstream.url).get("/api/v1/search/stream", {"q": "busy until -600"}).text
    last = text.strip().split("\n\n")[-1].split("\n")
    assert json.loads(last[1][len("data: "):])["retry_after"] == 3
    assert last[2:] == ["retry: 3000"]


def test_a_busy_upstream_in_a_stream_sets_the_reconnection_time_to_its_retry_after(
        tmp_path: Path, upstream: FakeSearxng) -> None:
    text = searxng_app(tmp_path, upstream.url).get("/api/v1/search/stream", {"q": "busy"}).text
    last = text.strip().split("\n\n")[-1].split("\n")
    assert last[0] == "event: search_error"
    assert json.loads(last[1][len("data: "):]) == {
        "code": 503, "message": "The search upstream is busy (HTTP 429); retry in 60 seconds.", "retry_after": 60,
        "request_id": None}
    assert last[2:] == ["retry: 60000"]


def test_stream_reports_the_upstream_stages(tmp_path: Path, upstream: FakeSearxng) -> None:
    text = searxng_app(tmp_path, upstream.url).get("/api/v1/search/stream", {"q": "ok"}).text
    progress = [json.loads(line[len("data: "):]) for line in text.split("\n") if '"progress"' in line]
    assert progress == [
        {"progress": 25, "stage": "upstream_connected"},
        {"progress": 50, "stage": "upstream_responded"},
        {"progress": 75, "stage": "upstream_received"},
        {"progress": 100, "stage": "parsed"},
    ]


def test_a_client_leaving_a_stream_closes_the_upstream_connection_at_once(tmp_path: Path) -> None:
    """Closing the body (the server's answer to a client gone mid-stream) ends the exchange: not at the timeout."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        app = searxng_app(tmp_path, f"http://127.0.0.1:{listener.getsockname()[1]}", timeout=10,
                          stream_interval=0.01).app
        environ = EnvironBuilder(path="/api/v1/search/stream", query_string={"q": "x"}).get_environ()
        body = app(environ, lambda status, headers, exc_info=None: None)
        chunks = iter(body)
        assert next(chunks).startswith(b"event: search_started")
        assert b"upstream_connected" in next(chunks)  # the request went out; the upstream has not answered
        upstream, _ = listener.accept()
        with upstream:
            upstream.settimeout(5)
            request = b""
            while b"\r\n\r\n" not in request:
                request += upstream.recv(4096)
            started = time.monotonic()
            body.close()
            assert upstream.recv(1) == b""  # the engine hung up
        assert time.monotonic() - started < 1.0


def test_stream_interval_does_not_count_against_the_timeout(tmp_path: Path, upstream: FakeSearxng) -> None:
    # Two pauses of 0.15 s fall inside the upstream exchange; only the exchange itself is timed.
    client = searxng_app(tmp_path, upstream.url, timeout=0.2, stream_interval=0.15)
    text = client.get("/api/v2/search/stream", {"q": "ok"}).text
    events = [(block.split("\n")[0][len("event: "):], json.loads(block.split("\n")[1][len("data: "):]))
              for block in text.strip().split("\n\n")]
    assert [name for name, _ in events] == ["search_started"] + ["search_progress"] * 4 + ["search_complete"]
    assert events[-1][1] == client.get("/api/v2/search", {"q": "ok"}).json


def open_stream(app: Any, query: str) -> tuple[Iterator[bytes], Any]:
    """Start a stream on the WSGI app itself, so that each chunk is seen as it is made."""
    environ = EnvironBuilder(path="/api/v1/search/stream", query_string={"q": query}).get_environ()
    body = app(environ, lambda status, headers, exc_info=None: None)
    return iter(body), body


def test_a_stream_waiting_on_a_slow_upstream_sends_comments(tmp_path: Path, upstream: FakeSearxng,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """SearXNG may take up to ``timeout`` (300 s at most) to answer: silent that long, the stream was cut by a
    proxy's idle timeout (nginx's proxy_read_timeout is a minute), and a client that left went unnoticed."""
    monkeypatch.setattr("app.stream.HEARTBEAT_SECONDS", 0.1)
    chunks, body = open_stream(searxng_app(tmp_path, upstream.url, timeout=10).app, "slow")
    try:
        assert next(chunks).startswith(b"event: search_started")
        assert b"upstream_connected" in next(chunks)
        started = time.monotonic()
        assert [next(chunks) for _ in range(3)] == [b": keep-alive\n\n"] * 3  # the upstream has not answered
        assert 0.25 < time.monotonic() - started < 2.0
        upstream.release.set()
        rest = b"".join(chunks)
    finally:
        body.close()
    events = [block.split("\n")[0] for block in rest.decode().strip().split("\n\n")]
    assert [e for e in events if e.startswith("event: ")] == ["event: search_progress"] * 3 + ["event: search_complete"]


def test_comments_while_waiting_do_not_count_against_the_timeout(tmp_path: Path, upstream: FakeSearxng,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The time a comment takes to go out (here 0.4 s each) is the stream's, as a pause is: not the upstream's."""
    monkeypatch.setattr("app.stream.HEARTBEAT_SECONDS", 0.1)
    chunks, body = open_stream(searxng_app(tmp_path, upstream.url, timeout=0.5).app, "slow")
    try:
        next(chunks), next(chunks)
        for _ in range(2):
            assert next(chunks) == b": keep-alive\n\n"
            time.sleep(0.4)  # a slow client
        upstream.release.set()
        rest = b"".join(chunks)
    finally:
        body.close()
    assert b"event: search_complete" in rest and b"search_error" not in rest


def test_an_upstream_that_never_answers_a_stream_is_cut_off_at_the_timeout(tmp_path: Path, upstream: FakeSearxng,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The waits between comments take what is left of ``timeout``, not a whole heartbeat more."""
    monkeypatch.setattr("app.stream.HEARTBEAT_SECONDS", 0.4)
    chunks, body = open_stream(searxng_app(tmp_path, upstream.url, timeout=0.5).app, "slow")
    started = time.monotonic()
    try:
        rest = b"".join(chunks)
    finally:
        body.close()
    assert 0.5 <= time.monotonic() - started < 0.75  # not 0.8: a second slice of 0.4
    assert rest.count(b": keep-alive\n\n") == 1
    assert b'"code":504' in rest


def test_a_client_leaving_at_a_comment_closes_the_upstream_connection_at_once(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The server closes the body when the comment's write fails: the engine hangs up, not at the timeout."""
    monkeypatch.setattr("app.stream.HEARTBEAT_SECONDS", 0.05)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        chunks, body = open_stream(searxng_app(tmp_path, f"http://127.0.0.1:{listener.getsockname()[1]}",
                                               timeout=10).app, "x")
        next(chunks), next(chunks)
        upstream, _ = listener.accept()
        with upstream:
            upstream.settimeout(5)
            assert next(chunks) == b": keep-alive\n\n"
            started = time.monotonic()
            body.close()
            request = b""
            while data := upstream.recv(4096):  # the request, then the end of the connection
                request += data
        assert time.monotonic() - started < 1.0
        assert request.startswith(b"GET /search?q=x")


def test_a_name_lookup_that_hangs_sends_comments_in_a_stream(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("app.stream.HEARTBEAT_SECONDS", 0.05)
    release = threading.Event()

    def hang(host: str, port: int) -> Any:
        release.wait(5)
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr("app.search.searxng.resolve", hang)
    chunks, body = open_stream(searxng_app(tmp_path, "http://searxng.invalid:8888", timeout=10).app, "x")
    try:
        assert next(chunks).startswith(b"event: search_started")
        assert [next(chunks) for _ in range(2)] == [b": keep-alive\n\n"] * 2
        release.set()
        rest = b"".join(chunks)
    finally:
        release.set()
        body.close()
    assert b"could not be reached (gaierror)" in rest


def test_a_body_that_stalls_halfway_sends_comments_in_a_stream(tmp_path: Path, upstream: FakeSearxng,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("app.stream.HEARTBEAT_SECONDS", 0.05)
    chunks, body = open_stream(searxng_app(tmp_path, upstream.url, timeout=10).app, "stalls mid-body")
    try:
        assert [next(chunks).split(b"\n")[0] for _ in range(3)] == [b"event: search_started",
                                                                   *[b"event: search_progress"] * 2]
        assert [next(chunks) for _ in range(2)] == [b": keep-alive\n\n"] * 2  # the body's first bytes came
        upstream.release.set()
        rest = b"".join(chunks)
    finally:
        body.close()
    assert rest.count(b"event: search_progress") == 2 and b"event: search_complete" in rest


@pytest.mark.parametrize("query", ["ok", "chunked", "trickle body", "trickle headers", *BROKEN_ANSWERS,
                                   *INTERIM_ANSWERS, "boom", "garbage", "busy", "slow"])
def test_a_stream_ends_as_the_plain_search_answers(tmp_path: Path, upstream: FakeSearxng, query: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A stream waits in slices of the heartbeat (here shorter than the trickles' pauses, to be sure);
    the search itself waits in one piece: the answer is the same."""
    monkeypatch.setattr("app.stream.HEARTBEAT_SECONDS", 0.05)
    client = searxng_app(tmp_path, upstream.url, timeout=0.25)
    plain = client.get("/api/v1/search", {"q": query}, expect_errors=True)
    last = client.get("/api/v1/search/stream", {"q": query}).text.strip().split("\n\n")[-1].split("\n")
    data = json.loads(last[1][len("data: "):])
    if plain.status_int == 200:
        assert (last[0], data) == ("event: search_complete", plain.json)
    else:
        assert last[0] == "event: search_error"
        assert (data["code"], data["message"]) == (plain.json["error"]["code"], plain.json["error"]["message"])


def results_body(number_of_results: str, results: str = "[]") -> bytes:
    return f'{{"results": {results}, "number_of_results": {number_of_results}}}'.encode()


#: One valid result, so that a page is not past the end (which caps the total).
ONE_RESULT = json.dumps([{"title": "t", "url": "https://example.org/1", "content": "c"}])


@pytest.mark.parametrize(
    ("reported", "expected"),
    [
        pytest.param("42", 42, id="a count"),
        pytest.param("42.0", 42, id="a whole float"),
        pytest.param(str(2**53 - 1), 2**53 - 1, id="the largest count believed"),
        pytest.param(str(2**53), 1, id="one more"),
        pytest.param("1" + "0" * 400, 1, id="400 digits"),
        pytest.param("1" + "0" * 5000, 1, id="more digits than Python reads as an int"),
        pytest.param("Infinity", 1, id="Infinity"),
        pytest.param("-Infinity", 1, id="-Infinity"),
        pytest.param("NaN", 1, id="NaN"),
        pytest.param("1e999", 1, id="a float that overflows"),
        pytest.param("42.5", 1, id="not whole"),
        pytest.param("-5", 1, id="negative"),
        pytest.param("true", 1, id="a boolean"),
        pytest.param('"42"', 1, id="a string"),
        pytest.param("null", 1, id="null"),
    ],
)
def test_implausible_totals_are_ignored(tmp_path: Path, upstream: FakeSearxng, reported: str,
                                        expected: int) -> None:
    upstream.canned["x"] = results_body(reported, ONE_RESULT)
    client = searxng_app(tmp_path, upstream.url)
    assert client.get("/api/v1/search", {"q": "x"}).json["meta"]["total"] == expected
    assert client.get("/api/v2/search", {"q": "x"}).json["pagination"] == {
        "page": 1, "per_page": 10, "total": expected, "pages": min(-(-expected // 10), 1000)}


@pytest.mark.parametrize(("reported", "page", "expected"), [
    pytest.param("0", 1, {"page": 1, "per_page": 10, "total": 11, "pages": 2}, id="SearXNG's 0: a next page"),
    pytest.param("0", 3, {"page": 3, "per_page": 10, "total": 31, "pages": 4}, id="and from every full page"),
    pytest.param("10", 1, {"page": 1, "per_page": 10, "total": 10, "pages": 1}, id="a count of exactly the page"),
    pytest.param("57", 1, {"page": 1, "per_page": 10, "total": 57, "pages": 6}, id="a count"),
])
def test_a_full_page_without_a_count_promises_one_more(tmp_path: Path, upstream: FakeSearxng, reported: str,
                                                       page: int, expected: dict[str, int]) -> None:
    """A client that follows pages must ask for the next page of an engine that gives no estimate."""
    results = json.dumps([{"title": "t", "url": f"https://example.org/{i}", "content": "c"} for i in range(10)])
    upstream.canned["x"] = results_body(reported, results)
    client = searxng_app(tmp_path, upstream.url)
    assert client.get("/api/v2/search", {"q": "x", "page": page}).json["pagination"] == expected


def test_an_ignored_total_is_the_number_of_results_seen(tmp_path: Path, upstream: FakeSearxng) -> None:
    results = json.dumps([{"title": "t", "url": f"https://example.org/{i}", "content": "c"} for i in range(3)])
    upstream.canned["x"] = results_body("1e999", results)
    client = searxng_app(tmp_path, upstream.url)
    assert client.get("/api/v2/search", {"q": "x"}).json["pagination"] == {
        "page": 1, "per_page": 10, "total": 3, "pages": 1}


def test_an_implausible_total_in_a_v2_stream_completes_it(tmp_path: Path, upstream: FakeSearxng) -> None:
    upstream.canned["x"] = results_body("1" + "0" * 400)
    text = searxng_app(tmp_path, upstream.url).get("/api/v2/search/stream", {"q": "x"}).text
    name, data, event_id = text.strip().split("\n\n")[-1].split("\n")
    assert (name, event_id) == ("event: search_complete", "id: complete")
    assert json.loads(data[len("data: "):])["pagination"] == {"page": 1, "per_page": 10, "total": 0, "pages": 0}


@pytest.mark.parametrize("body", [b"[" * 100_000, b"[" * 100_000 + b"]" * 100_000], ids=["open", "closed"])
def test_json_nested_too_deeply_is_a_502(tmp_path: Path, upstream: FakeSearxng, body: bytes) -> None:
    upstream.canned["x"] = body
    client = searxng_app(tmp_path, upstream.url)
    error = client.get("/api/v1/search", {"q": "x"}, status=502).json["error"]
    assert error["message"] == "The search upstream sent JSON nested too deeply to read."


def test_results_with_fields_of_the_wrong_type_are_dropped(tmp_path: Path, upstream: FakeSearxng) -> None:
    results = [
        {"url": {"a": 1}, "title": "a URL that is an object", "content": "c"},
        {"url": 7, "title": "a URL that is a number", "content": "c"},
        {"url": "", "title": "an empty URL", "content": "c"},
        {"url": "https://example.org/1", "title": ["a", "list"], "content": "c"},
        {"url": "https://example.org/2", "title": "t", "content": {"a": 1}},
        {"url": "https://example.org/3", "title": True, "content": "c"},
        {"url": "https://example.org/4", "title": None, "content": None, "engine": 7},
        {"url": "https://example.org/5", "title": "kept", "content": "c", "engine": "bing"},
        "not an object",
    ]
    upstream.canned["x"] = json.dumps({"results": results, "number_of_results": 0}).encode()
    body = searxng_app(tmp_path, upstream.url).get("/api/v1/search", {"q": "x"}).json
    assert body["results"] == [
        {"title": "", "url": "https://example.org/4", "content": "", "engine": "searxng"},
        {"title": "kept", "url": "https://example.org/5", "content": "c", "engine": "bing"},
    ]
    assert body["meta"]["total"] == 2


@pytest.mark.parametrize(("page", "reported", "total"), [
    pytest.param(2, 0, 0, id="SearXNG's own zero, past the end"),
    pytest.param(50, 0, 0, id="far past the end"),
    pytest.param(50, 1230, 490, id="an estimate larger than the pages before can hold"),
    pytest.param(50, 300, 300, id="an estimate the pages before can hold"),
    pytest.param(1, 42, 0, id="an empty first page: nothing at all"),
    pytest.param(2, "true", 0, id="a boolean is no count"),
])
def test_a_page_past_the_end_makes_up_no_total(tmp_path: Path, upstream: FakeSearxng, page: int,
                                               reported: int | str, total: int) -> None:
    """An empty page proves nothing about the pages before it: the total is at most what they hold."""
    upstream.canned["x"] = results_body(str(reported))
    client = searxng_app(tmp_path, upstream.url)
    assert client.get("/api/v1/search", {"q": "x", "page": str(page)}).json["meta"]["total"] == total
    assert client.get("/api/v2/search", {"q": "x", "page": str(page)}).json["pagination"]["total"] == total


def test_an_upstream_behind_basic_auth_and_with_its_own_query(tmp_path: Path, upstream: FakeSearxng) -> None:
    port = upstream.server_address[1]
    client = searxng_app(tmp_path, f"http://searx:s%3Acret@127.0.0.1:{port}/?token=abc")
    assert client.get("/api/v1/search", {"q": "python"}).status_int == 200
    assert upstream.authorizations[-1] == "Basic " + base64.b64encode(b"searx:s:cret").decode()
    path, params = upstream.requests[-1]
    assert (path, params["token"], params["q"], params["format"]) == ("/search", ["abc"], ["python"], ["json"])
    searxng_app(tmp_path, upstream.url).get("/api/v1/search", {"q": "python"})
    assert upstream.authorizations[-1] is None
    assert upstream.agents == ["wsgistack", "wsgistack"]  # named, for the instance's logs and pass lists


@pytest.mark.parametrize(("query", "retry_after"), [
    pytest.param("busy", "60", id="429 with its Retry-After"),
    pytest.param("busy for two hours", "3600", id="two hours: an hour at most"),
    pytest.param("busy for long", "3600", id="a day: an hour at most"),
    pytest.param("busy for ever", "3600", id="any number of digits is seconds: an hour at most"),
    pytest.param("busy, said with zeros", "45", id="leading zeros are no more seconds"),
    pytest.param("down for maintenance", "30", id="503 without one: 30 s"),
])
def test_a_busy_upstream_asks_the_client_to_wait(tmp_path: Path, upstream: FakeSearxng, query: str,
                                                 retry_after: str) -> None:
    response = searxng_app(tmp_path, upstream.url).get("/api/v1/search", {"q": query}, status=503)
    assert response.headers["Retry-After"] == retry_after
    assert response.json["error"]["message"] == (
        f"The search upstream is busy (HTTP {429 if 'busy' in query else 503}); retry in {retry_after} seconds.")


@pytest.mark.parametrize(("query", "low", "high"), [
    pytest.param("busy until 120", 119, 120, id="a date two minutes ahead"),
    pytest.param("busy until -600", 0, 0, id="a date gone by: now"),
    pytest.param("busy until 86400", 3600, 3600, id="a date a day ahead: an hour at most"),
])
def test_a_retry_after_date_is_passed_on_in_seconds(tmp_path: Path, upstream: FakeSearxng, query: str,
                                                    low: int, high: int) -> None:
    response = searxng_app(tmp_path, upstream.url).get("/api/v1/search", {"q": query}, status=503)
    seconds = int(response.headers["Retry-After"])
    assert low <= seconds <= high
    assert response.json["error"]["message"] == (
        f"The search upstream is busy (HTTP 503); retry in {seconds} seconds.")


def test_results_a_link_would_not_open_as_a_web_page_are_dropped(tmp_path: Path, upstream: FakeSearxng) -> None:
    urls = ["javascript:alert(1)", "JAVASCRIPT:alert(1)", "data:text/html,<script>", "ftp://example.org/x",
            "https://example.org/ok", "HTTP://example.org/upper"]
    upstream.canned["x"] = results_body("6", json.dumps([{"title": "t", "url": url} for url in urls]))
    body = searxng_app(tmp_path, upstream.url).get("/api/v1/search", {"q": "x"}).json
    assert [r["url"] for r in body["results"]] == ["https://example.org/ok", "HTTP://example.org/upper"]


@pytest.mark.parametrize(("url", "kept"), [
    pytest.param("https://example.org/a b", True, id="a space: browsers encode it"),
    pytest.param("https://b\u00fccher.example/\u00e4", True, id="letters beyond ASCII"),
    pytest.param("https://[::1]:8080/", True, id="an IPv6 host"),
    pytest.param("https://", False, id="no host"),
    pytest.param("http:///etc/passwd", False, id="an empty host"),
    pytest.param("https://@:80/", False, id="no host name, only a user and a port"),
    pytest.param("https://[::1/", False, id="a bracketed host left open"),
    pytest.param("https://example.org/a\r\nLocation: https://evil.example/", False, id="CR LF"),
    pytest.param("https://example.org/\u0000", False, id="NUL"),
    pytest.param("https://example.org/\u0085", False, id="a C1 control"),
    pytest.param("https://example.org/\udc00", False, id="a lone surrogate: not text"),
])
def test_results_whose_url_is_not_a_web_address_are_dropped(tmp_path: Path, upstream: FakeSearxng, url: str,
                                                           kept: bool) -> None:
    upstream.canned["x"] = results_body("1", json.dumps([{"title": "t", "url": url}]))
    body = searxng_app(tmp_path, upstream.url).get("/api/v1/search", {"q": "x"}).json
    assert [r["url"] for r in body["results"]] == ([url] if kept else [])


def test_lone_surrogates_in_a_results_text_become_replacement_characters(tmp_path: Path,
                                                                         upstream: FakeSearxng) -> None:
    """Python's JSON passes "\\ud800" on as it is: text no UTF-8 can carry, which strict clients refuse."""
    upstream.canned["x"] = results_body("1", '[{"title": "a\\ud800b", "url": "https://example.org/",'
                                             ' "content": "\\udfffc\\ud83d\\ude00", "engine": "e\\udc00"}]')
    response = searxng_app(tmp_path, upstream.url).get("/api/v2/search", {"q": "x"})
    assert response.json["data"] == [
        {"title": "a\ufffdb", "url": "https://example.org/", "content": "\ufffdc\U0001f600", "engine": "e\ufffd"}]


def test_a_page_passes_on_at_most_max_results(tmp_path: Path, upstream: FakeSearxng) -> None:
    from app.search.searxng import MAX_RESULTS

    many = [{"title": "t", "url": f"https://example.org/{i}"} for i in range(MAX_RESULTS * 50)]
    upstream.canned["x"] = results_body("5000", json.dumps(many))
    body = searxng_app(tmp_path, upstream.url).get("/api/v2/search", {"q": "x"}).json
    assert len(body["data"]) == body["pagination"]["per_page"] == MAX_RESULTS


class Flood(threading.Thread):
    """A server on loopback that answers one request with ``head`` and then ``mib`` MiB of spaces."""

    def __init__(self, head: bytes, mib: int) -> None:
        super().__init__(daemon=True)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.head, self.mib = head, mib
        self.sent = 0  # body bytes the client took (the kernel's buffers included) before it hung up

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listener.getsockname()[1]}"

    def run(self) -> None:
        conn, _ = self.listener.accept()
        with conn, contextlib.suppress(OSError):
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(4096)
            conn.sendall(self.head)
            block = b" " * (1 << 20)
            for _ in range(self.mib):
                conn.sendall(block)
                self.sent += len(block)


@pytest.mark.parametrize(
    "head",
    [
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 67108864\r\n\r\n",
                     id="Content-Length"),
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"4000000\r\n", id="one chunk"),
        # http.client takes -1 as a size and reads to the end of the stream in one call
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"-1\r\n", id="a chunk size of -1"),
    ],
)
def test_an_upstream_answer_larger_than_the_cap_is_cut_off(tmp_path: Path, head: bytes) -> None:
    from app.search.searxng import MAX_BODY_BYTES, MAX_RESPONSE_BYTES

    flood = Flood(head, mib=64)
    flood.start()
    try:
        error = searxng_app(tmp_path, flood.url, timeout=10).get("/api/v1/search", {"q": "x"}, status=502).json
    finally:
        flood.join(10)
        flood.listener.close()
    assert error["error"]["message"] == f"The search upstream sent more than {MAX_BODY_BYTES} bytes."
    # read no further than the cap, plus what the sockets' buffers took before the engine hung up
    assert flood.sent <= MAX_RESPONSE_BYTES + 16 * (1 << 20) < 64 * (1 << 20)


def test_a_name_the_resolver_refuses_is_a_502(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """getaddrinfo's idna codec raises UnicodeError (a ValueError) for a name the options could not foresee."""
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise UnicodeError("encoding with 'idna' codec failed (UnicodeError: label empty or too long)")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    error = searxng_app(tmp_path, "http://searxng.invalid:8888").get(
        "/api/v1/search", {"q": "x"}, status=502).json["error"]
    assert error["message"] == "The search upstream could not be reached (UnicodeError)."


def test_a_name_lookup_that_hangs_is_cut_off_at_the_timeout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The resolver's own timeouts (5 s a try, for each server and attempt in resolv.conf) are not the search's."""
    from app.search import searxng

    release = threading.Event()
    lookups: list[tuple[str, int]] = []

    def hang(host: str, port: int) -> Any:
        lookups.append((host, port))
        release.wait(10)
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr(searxng, "resolve", hang)
    client = searxng_app(tmp_path, "http://searxng.invalid:8888", timeout=0.3)
    try:
        for _ in range(2):
            started = time.monotonic()
            error = client.get("/api/v1/search", {"q": "x"}, status=504).json["error"]
            elapsed = time.monotonic() - started
            assert error["message"] == "The search upstream's name was not resolved within 0.3 seconds."
            assert elapsed < 0.8, f"the answer took {elapsed:.2f} s, not about 0.3 s"
        # The second search waited for the lookup still running: a hung resolver ties up one thread, not one a search.
        assert lookups == [("searxng.invalid", 8888)]
    finally:
        release.set()


def test_a_name_is_looked_up_again_for_each_search(tmp_path: Path, upstream: FakeSearxng,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """No address is kept: a lookup that finished is not reused (the resolver caches as long as the name's TTL)."""
    from app.search import searxng

    lookups: list[str] = []

    def loopback(host: str, port: int) -> Any:
        lookups.append(host)
        return socket.getaddrinfo("127.0.0.1", port, type=socket.SOCK_STREAM)

    monkeypatch.setattr(searxng, "resolve", loopback)
    client = searxng_app(tmp_path, upstream.url.replace("127.0.0.1", "searxng.invalid"))
    for _ in range(2):
        assert client.get("/api/v1/search", {"q": "ok"}).json["results"]
    assert lookups == ["searxng.invalid"] * 2


@pytest.mark.parametrize("upstream", ["http://[::1]:8888/", "http://127.0.0.1:8888", "https://bücher.example/searx"])
def test_upstream_hosts_that_resolve_are_taken(tmp_path: Path, upstream: str) -> None:
    from app.options import SearchOptions

    assert SearchOptions(engine="searxng", upstream=upstream).upstream is not None
