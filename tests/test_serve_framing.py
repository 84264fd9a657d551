"""How serve.py frames what an app of one's own answers: the bytes on the wire, and whether the connection
is fit for the next request.

An app behind ``app.factory`` may answer in ways the built-in core does not: a ``wsgi.file_wrapper`` for
any method and status, a 304 with the ``Content-Length`` of the full representation (RFC 9110 §8.6), a
1xx status.  Each test reads the exact bytes of a raw socket: a byte too many after an answer without a
body is the start of the next response to the client (or to a proxy's pooled upstream connection).
"""

from __future__ import annotations

import io
import socket
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pytest
from conftest import Served, free_port

FILE = b"the whole file"


def framing_app(**options: Any) -> Callable[..., Iterable[bytes]]:
    """An app that answers as the path says (``app: {factory: "test_serve_framing:framing_app"}``)."""

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        path = environ["PATH_INFO"]
        if path == "/file":  # as an app unaware of HEAD serves a file (Django's FileResponse does)
            start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(FILE)))])
            return environ["wsgi.file_wrapper"](io.BytesIO(FILE))  # type: ignore[no-any-return]
        if path == "/file-304":
            start_response("304 Not Modified", [("ETag", '"v1"')])
            return environ["wsgi.file_wrapper"](io.BytesIO(FILE))  # type: ignore[no-any-return]
        if path == "/not-modified":  # with the Content-Length a 200 would have (RFC 9110 §8.6 allows it)
            start_response("304 Not Modified", [("ETag", '"v1"'), ("Content-Length", str(len(FILE)))])
            return []
        if path == "/early-hints":  # WSGI has no interim answers: this is the app's only one
            start_response("103 Early Hints", [("Link", "</style.css>; rel=preload")])
            return []
        if path == "/echo":  # the body, as the app reads it
            body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
            start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
            return [body]
        if path == "/ok":
            start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
            return [b"ok"]
        start_response("404 Not Found", [("Content-Type", "text/plain"), ("Content-Length", "0")])
        return []

    return app


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """serve.py with :func:`framing_app` as its app."""
    port = free_port()
    config = tmp_path_factory.mktemp("framing") / "stack.yaml"
    config.write_text(f"""
server:
  listen: ["127.0.0.1:{port}"]
  workers: 1
  threads: 2
  max_request_body_size: 1024
app:
  factory: test_serve_framing:framing_app
pipeline:
  - errors: {{format: problem}}
""")
    server = Served(config, {}, port)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def port(served: Served) -> int:
    return served.port


def exchange(port: int, *requests: tuple[str, str]) -> tuple[bytes, bool]:
    """Send ``requests`` (method, path) pipelined on one HTTP/1.1 connection; what comes back in the next
    second, and whether the server closed the connection."""
    return converse(port, b"".join(f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
                                   for method, path in requests))


def converse(port: int, data: bytes) -> tuple[bytes, bool]:
    """Send ``data`` on one connection; what comes back in the next second, and whether the server closed it."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(data)
        sock.settimeout(1.0)
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except TimeoutError:
            return received, False
    return received, True


@pytest.mark.parametrize(("method", "path", "status", "length"), [
    pytest.param("HEAD", "/file", "HTTP/1.1 200 OK", str(len(FILE)), id="HEAD on a file_wrapper: the GET's headers"),
    pytest.param("GET", "/file-304", "HTTP/1.1 304 Not Modified", None, id="a 304 with a file_wrapper"),
])
def test_a_file_wrapper_answer_without_a_body_sends_no_file(port: int, method: str, path: str, status: str,
                                                          length: str | None) -> None:
    """The headers, then the next answer on the same connection: not the file in between."""
    received, closed = exchange(port, (method, path), ("GET", "/ok"))
    first, _, rest = received.partition(b"\r\n\r\n")
    lines = first.decode("latin-1").split("\r\n")
    assert lines[0] == status
    assert {line.partition(": ")[2] for line in lines if line.startswith("Content-Length")} == (
        {length} if length else set())
    assert rest.startswith(b"HTTP/1.1 200 OK\r\n") and rest.endswith(b"\r\n\r\nok"), received
    assert not closed


def test_a_get_on_a_file_wrapper_still_sends_the_file(port: int) -> None:
    received, closed = exchange(port, ("GET", "/file"))
    assert received.startswith(b"HTTP/1.1 200 OK\r\n") and received.endswith(b"\r\n\r\n" + FILE), received
    assert f"Content-Length: {len(FILE)}\r\n".encode() in received
    assert not closed


@pytest.mark.parametrize("version", ["1.1", "1.0"])
def test_an_app_answering_1xx_closes_the_connection_after_it(served: Served, version: str) -> None:
    """A client waits on after a 1xx for the final answer (RFC 9110 §15.2), and would take the next response on
    the connection for it: the next request's answer read as this one's.  The connection closes
    after the 1xx instead, an answer that ended early; the log says why."""
    logged = served.err.read_text().count("an interim status, as its final answer")
    with socket.create_connection(("127.0.0.1", served.port), timeout=5) as sock:
        # (One request: one the server leaves unread when it closes would have it reset the connection.)
        sock.sendall(f"GET /early-hints HTTP/{version}\r\nHost: 127.0.0.1\r\nConnection: keep-alive\r\n\r\n"
                     .encode())
        sock.settimeout(2.0)
        received = b""
        while chunk := sock.recv(65536):  # (a TimeoutError here: the connection stayed open)
            received += chunk
    head, blank, after = received.partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/{version} 103 Early Hints\r\n".encode()) and blank, received
    assert b"Connection: close" in head.split(b"\r\n")
    assert after == b""
    assert served.err.read_text().count(
        "the app answered GET /early-hints with 103 Early Hints, an interim status, as its final answer") == logged + 1


@pytest.mark.parametrize(("version", "connection"), [("1.1", ""), ("1.0", "keep-alive")])
def test_a_304_with_the_content_length_of_the_200_is_no_short_body(served: Served, version: str,
                                                                    connection: str) -> None:
    """No body is sent, and none was due: the connection is kept, and nothing is logged (Waitress warned that
    the app "returned too few bytes (0) for specified Content-Length" on every revalidation)."""
    logged = served.err.read_text()
    with socket.create_connection(("127.0.0.1", served.port), timeout=5) as sock:
        sock.sendall(b"".join(f"GET {path} HTTP/{version}\r\nHost: 127.0.0.1\r\nConnection: {connection}\r\n\r\n"
                              .encode() for path in ("/not-modified", "/ok")))
        sock.settimeout(1.0)
        received = b""
        with pytest.raises(TimeoutError):  # the connection stays open
            while chunk := sock.recv(65536):
                received += chunk
    head, _, after = received.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0] == f"HTTP/{version} 304 Not Modified" and 'Etag: "v1"' in lines, received
    assert after.startswith(f"HTTP/{version} 200 OK\r\n".encode()) and after.endswith(b"\r\n\r\nok"), received
    assert served.err.read_text() == logged


def head_lines(received: bytes) -> list[str]:
    return received.partition(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")


def test_a_request_framed_by_both_content_length_and_chunked_closes_the_connection(port: int) -> None:
    """It is read as chunked (RFC 9112 §6.1), and the connection closes after the answer, as §6.1 requires: a
    front end that framed it by its Content-Length would take the rest of the chunks for the next request
    (request smuggling), and a connection that stays open would answer it."""
    received, closed = converse(port, b"POST /echo HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 3\r\n"
                                      b"Transfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n")
    assert head_lines(received)[0] == "HTTP/1.1 200 OK", received
    assert "Connection: close" in head_lines(received)
    assert received.endswith(b"\r\n\r\nhi"), received
    assert closed


@pytest.mark.parametrize("path", ["/ok", "/not-modified"])
@pytest.mark.parametrize(("connection", "close"), [
    pytest.param("TE, close", True, id="TE, close"),
    pytest.param("close, TE", True, id="close, TE"),
    pytest.param("Keep-Alive , CLOSE", True, id="any case, spaces"),
    pytest.param("keep-alive\r\nConnection: close", True, id="two Connection lines"),
    pytest.param("keep-alive, TE", False, id="keep-alive, TE: kept"),
    pytest.param("TE, x-close", False, id="TE, x-close: kept"),
])
def test_connection_is_a_list_of_options(port: int, path: str, connection: str, close: bool) -> None:
    """``Connection`` is a comma-separated list of options (RFC 9110 §7.6.1): ``close`` among them closes the
    connection after the answer (§9.6), as ``close`` alone does, with ``Connection: close`` in it."""
    received, closed = converse(port, f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: {connection}\r\n"
                                      f"\r\n".encode())
    lines = head_lines(received)
    assert lines[0].startswith("HTTP/1.1 200 OK" if path == "/ok" else "HTTP/1.1 304"), received
    assert ("Connection: close" in lines) is close
    assert closed is close


@pytest.mark.parametrize("method", ["GET", "POST"])
@pytest.mark.parametrize("length", [pytest.param("", id="no Content-Length"),
                                    pytest.param("Content-Length: 0\r\n", id="Content-Length: 0")])
def test_expect_100_continue_without_a_body_is_answered_at_once(port: int, method: str, length: str) -> None:
    """No ``100 Continue`` is due where the framing says there is no body (RFC 9110 §10.1.1): the answer comes
    at once, and the next request on the connection is answered too.  (Waitress sent ``100 Continue`` and
    then waited for a body that never came, until ``channel_timeout`` closed the connection.)"""
    received, closed = converse(port, f"{method} /ok HTTP/1.1\r\nHost: 127.0.0.1\r\nExpect: 100-continue\r\n"
                                      f"{length}\r\nGET /ok HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    assert received.startswith(b"HTTP/1.1 200 OK\r\n"), received
    assert received.count(b"HTTP/1.1 200 OK\r\n") == 2 and b"100 Continue" not in received, received
    assert not closed


@pytest.mark.parametrize("body", [pytest.param(b"hi", id="2 bytes"),
                                  pytest.param(b"x" * 1024, id="max_request_body_size bytes")])
def test_expect_100_continue_with_a_body_waits_for_it(port: int, body: bytes) -> None:
    """Where a body is due, ``100 Continue`` comes before the client sends it, and the answer after."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(f"POST /echo HTTP/1.1\r\nHost: 127.0.0.1\r\nExpect: 100-continue\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n".encode())
        assert sock.recv(65536) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(body)
        received = b""
        while not received.endswith(b"\r\n\r\n" + body) and (chunk := sock.recv(65536)):
            received += chunk
    assert received.startswith(b"HTTP/1.1 200 OK\r\n") and received.endswith(b"\r\n\r\n" + body), received


def test_expect_100_continue_with_a_body_over_the_limit_gets_413_at_the_headers(port: int) -> None:
    """The client learns before it sends the body that it would be refused (RFC 9110 §10.1.1): no ``100
    Continue``, but the 413, and the connection closes (the body the client might send all the same is no
    request).  (Waitress sent ``100 Continue``, and the 413 once the whole body had come.)"""
    received, closed = converse(port, b"POST /echo HTTP/1.1\r\nHost: 127.0.0.1\r\nExpect: 100-continue\r\n"
                                      b"Content-Length: 1025\r\n\r\n")
    lines = head_lines(received)
    assert lines[0] == "HTTP/1.1 413 Request Entity Too Large", received
    assert "Connection: close" in lines and b"100 Continue" not in received
    assert closed
