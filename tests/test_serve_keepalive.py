"""Which answers keep the connection open, and what follows a HEAD's headers, as serve.py serves them.

Waitress 3.0.2 closed the connection after every response without a ``Content-Length``: also
after a 204 (every CORS preflight) and a 304 (every revalidation), whose status says they have no
body, so each cost the client, or a proxy's upstream keep-alive pool, a new connection.  And a
``HEAD`` on the event stream was followed by a chunked terminator after its headers, and closed the
connection as the ``GET`` does, though nothing follows a ``HEAD``'s headers.  serve.py's
task keeps Waitress's rules otherwise: ``Connection: close`` and HTTP/1.0 without
``keep-alive`` close, a body of unknown length is sent chunked and closes.  ``explain`` shows what
the server sends.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import pytest
from conftest import Served, free_port

import serve

ORIGIN = "http://localhost:3000"
STACK = """
server:
  listen: [{listen}]
  workers: {workers}
  threads: 6
app:
  factory: app:create_app
  options:
    var_dir: {var_dir}
    search: {{engine: local, index_sources: [json], stream_interval: 0.05}}
stores:
  shared: "memory://"
pipeline:
  - errors: {{format: problem}}
  - cors: {{origins: ["{origin}"]}}
  - cache: {{store: shared, ttl: 60, paths: ["/api/*/search"]}}
"""

Request = tuple[str, str, dict[str, str]]
Response = tuple[int, dict[str, str], bytes]

PREFLIGHT: Request = ("OPTIONS", "/api/v1/search", {"Origin": ORIGIN, "Access-Control-Request-Method": "GET"})
#: ``*`` holds for any stored or stored-now answer: the cache layer answers 304 (RFC 9110 §13.1.2).
REVALIDATION: Request = ("GET", "/api/v1/search?q=json", {"If-None-Match": "*"})
SEARCH: Request = ("GET", "/api/v1/search?q=json", {})
STREAM = "/api/v1/search/stream?q=json"


@pytest.fixture(scope="module")
def var_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A var/ with the search index built once (index_sources: [json])."""
    from app.options import SearchOptions
    from app.search.local import LocalEngine

    var = tmp_path_factory.mktemp("var")
    engine = LocalEngine(SearchOptions(index_path=str(var / "search-index.sqlite3"), index_sources=["json"]))
    engine.ensure_index()
    engine.close()
    return var


@pytest.fixture(scope="module", params=[pytest.param(1, id="one worker, one address"),
                                        pytest.param(2, id="two workers, two addresses")])
def served(request: pytest.FixtureRequest, var_dir: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, list[int]]]:
    """serve.py on the stack above; yields (config path, the ports it listens on)."""
    ports = [free_port() for _ in range(request.param)]
    config = tmp_path_factory.mktemp("keepalive") / "stack.yaml"
    config.write_text(STACK.format(listen=", ".join(f"127.0.0.1:{port}" for port in ports),
                                   workers=request.param, var_dir=var_dir, origin=ORIGIN))
    server = Served(config, {}, ports[-1])
    try:
        yield config, ports
    finally:
        server.stop()


def send(sock: socket.socket, version: str, request: Request, connection: str | None = None) -> None:
    method, target, headers = request
    lines = [f"{method} {target} HTTP/{version}", "Host: 127.0.0.1",
             *(f"{name}: {value}" for name, value in headers.items())]
    if connection is not None:
        lines.append(f"Connection: {connection}")
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))


def receive(reader: BinaryIO, method: str) -> Response:
    """One response off ``reader``, framed as a client frames it (RFC 9112 §6.3); raises at an early end."""
    status_line = reader.readline()
    if not status_line:
        raise ConnectionError("the server closed the connection instead of answering")
    status = int(status_line.split()[1])
    headers: dict[str, str] = {}
    while line := reader.readline().decode("latin-1").rstrip("\r\n"):
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if method == "HEAD" or status in (204, 304) or status < 200:
        return status, headers, b""
    if headers.get("transfer-encoding") == "chunked":
        body = b""
        while size := int(reader.readline().split(b";")[0], 16):
            body += reader.read(size)
            assert reader.read(2) == b"\r\n"
        assert reader.readline() == b"\r\n", "a chunked body ends with an empty line after its last chunk"
        return status, headers, body
    return status, headers, reader.read(int(headers["content-length"]))


def closed_after(sock: socket.socket) -> bool:
    """Whether the server closed the connection (after what was read); False if it stays open, idle."""
    sock.settimeout(0.5)
    try:
        return sock.recv(1) == b""  # a byte here would be a stray one: caught below
    except TimeoutError:
        return False


@pytest.mark.parametrize(("version", "connection", "kept", "connection_header"), [
    pytest.param("1.1", None, True, None, id="HTTP/1.1: kept open after each"),
    pytest.param("1.1", "close", False, "close", id="HTTP/1.1, Connection: close: closed after the first"),
    pytest.param("1.0", None, False, "close", id="HTTP/1.0: closed after the first"),
    pytest.param("1.0", "keep-alive", True, "Keep-Alive", id="HTTP/1.0, Connection: keep-alive: kept open"),
])
def test_a_204_a_304_and_a_200_in_a_row_on_one_connection(served: tuple[Path, list[int]], version: str,
                                                          connection: str | None, kept: bool,
                                                          connection_header: str | None) -> None:
    for port in served[1]:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock, sock.makefile("rb") as reader:
            answered = []
            for request in (PREFLIGHT, REVALIDATION, SEARCH):
                send(sock, version, request, connection)
                status, headers, body = receive(reader, request[0])
                answered.append(status)
                assert headers.get("connection") == connection_header, (status, headers)
                if not kept:
                    break
                if status == 200:
                    assert b'"results"' in body
            assert answered == ([204, 304, 200] if kept else [204])
            assert closed_after(sock) is not kept
            if kept:  # still the same connection: one more answer comes over it
                sock.settimeout(5)
                send(sock, version, PREFLIGHT, connection)
                assert receive(reader, "OPTIONS")[0] == 204


@pytest.mark.parametrize(("version", "connection", "kept", "connection_header"), [
    pytest.param("1.1", None, True, None, id="HTTP/1.1: kept open"),
    pytest.param("1.1", "close", False, "close", id="HTTP/1.1, Connection: close: closed"),
    pytest.param("1.0", None, False, "close", id="HTTP/1.0: closed"),
    pytest.param("1.0", "keep-alive", True, "Keep-Alive", id="HTTP/1.0, Connection: keep-alive: kept open"),
])
def test_a_head_on_the_stream_gets_its_headers_and_nothing_after(served: tuple[Path, list[int]], version: str,
                                                                 connection: str | None, kept: bool,
                                                                 connection_header: str | None) -> None:
    """The headers a GET would get (chunked, no Content-Length), and not one byte after the blank line; the
    connection is kept as after a 204: no body follows a HEAD's headers (RFC 9112 §6.3), however the GET's
    would be framed.  The next answer on it comes whole."""
    for port in served[1]:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            send(sock, version, ("HEAD", STREAM, {}), connection)
            if kept:  # (a request the server leaves unread when it closes would have it reset the connection)
                send(sock, version, PREFLIGHT, connection)
            sock.settimeout(1.0)
            received = b""
            try:
                while chunk := sock.recv(65536):
                    received += chunk
                closed = True
            except TimeoutError:
                closed = False
        head, blank, after = received.partition(b"\r\n\r\n")
        assert blank, received
        lines = head.decode("latin-1").split("\r\n")
        assert lines[0] == f"HTTP/{version} 200 OK"
        assert ("Transfer-Encoding: chunked" in lines[1:]) is (version == "1.1")  # (HTTP/1.0 has no chunks)
        assert not any(line.lower().startswith("content-length") for line in lines)
        assert [line.partition(": ")[2] for line in lines if line.startswith("Connection:")] == (
            [connection_header] if connection_header else [])
        assert closed is not kept
        if kept:
            assert after.startswith(f"HTTP/{version} 204 No Content\r\n".encode()) and after.endswith(b"\r\n\r\n")
        else:
            assert after == b"", received


def test_a_get_on_the_stream_is_still_chunked_and_closes(served: tuple[Path, list[int]]) -> None:
    for port in served[1]:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock, sock.makefile("rb") as reader:
            send(sock, "1.1", ("GET", STREAM, {}))
            status, headers, body = receive(reader, "GET")
            assert (status, headers["transfer-encoding"], headers["connection"]) == (200, "chunked", "close")
            assert "content-length" not in headers
            events = [block.split("\n", 1)[0] for block in body.decode().strip().split("\n\n")]
            assert events[0] == "event: search_started" and events[-1] == "event: search_complete", events
            assert closed_after(sock)


# (Queries no other test asks for: explain's memory:// cache is new, the server's must miss as well.)
@pytest.mark.parametrize("request_", [
    pytest.param(PREFLIGHT, id="preflight: 204"),
    pytest.param(("GET", "/api/v1/search?q=os", {"If-None-Match": "*"}), id="revalidation: 304"),
    pytest.param(("GET", "/api/v1/search?q=http", {}), id="search: 200 with a Content-Length"),
    pytest.param(("HEAD", STREAM, {}), id="HEAD on the stream"),
])
def test_explain_shows_what_the_server_sends(served: tuple[Path, list[int]], request_: Request) -> None:
    config, ports = served
    method, target, headers = request_
    lines, status = serve.explain(str(config), method, target, [f"{k}: {v}" for k, v in headers.items()])
    start = lines.index(next(line for line in lines if line.startswith("status: ")))
    explained = {name.strip().lower(): value for name, _, value in
                 (line.partition(": ") for line in lines[start + 1:] if line.startswith("  "))}
    with socket.create_connection(("127.0.0.1", ports[0]), timeout=5) as sock, sock.makefile("rb") as reader:
        send(sock, "1.1", request_)
        answered, sent, _ = receive(reader, method)
    assert status == answered
    del explained["date"], sent["date"]
    assert explained == sent
    assert lines[-1].startswith("body (0 bytes)") == (method == "HEAD" or status in (204, 304))
